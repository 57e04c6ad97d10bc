"""What every layer may import: operator errors, logging, image decoding. It imports nothing of the project."""
