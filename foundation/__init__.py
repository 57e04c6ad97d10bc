"""The foundation every layer may import: operator errors and logging. It imports nothing of the project."""
