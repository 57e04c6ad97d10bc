"""Tiny on-disk data sets for tests: thin wrappers over tdad.training.sample_data with small defaults."""

from __future__ import annotations

from pathlib import Path

from tdad.training.sample_data import write_good_folder, write_mvtec_tree, write_visa_tree


def make_good_folder(directory: Path, n: int = 6, size: int = 32, texture: str = "brick", seed: int = 0) -> Path:
    """A plain folder of n good size x size PNG parts; returns the folder."""
    return write_good_folder(directory, n, size, texture, seed)


def make_mvtec_tree(
    root: Path,
    category: str = "brick",
    n_train: int = 6,
    n_test_good: int = 3,
    n_test_bad: int = 4,
    size: int = 32,
    seed: int = 0,
) -> Path:
    """An MVTec AD style <root>/<category> tree (defect types scratch/blob/spot/missing); returns root."""
    return write_mvtec_tree(root, category, n_train, n_test_good, n_test_bad, size, seed)


def make_visa_tree(
    root: Path,
    category: str = "brick",
    n_train: int = 6,
    n_test_good: int = 3,
    n_test_bad: int = 4,
    size: int = 32,
    seed: int = 0,
) -> Path:
    """A VisA style tree with split_csv/1cls.csv for one category; returns root."""
    return write_visa_tree(root, category, n_train, n_test_good, n_test_bad, size, seed)


def damaged_copies(jpeg: bytes, png: bytes) -> dict[str, tuple[bytes, str]]:
    """Issue 30's damaged copies of a clean JPEG and PNG (same length: only a strict decoder sees the damage),
    by file name, each with what its decoder says about it."""
    n = len(jpeg)
    zeroed = jpeg[: n * 6 // 10] + bytes(n - n * 6 // 10)  # the last 40 % of the bytes zeroed
    sos = jpeg.index(b"\xff\xda")  # the scan's entropy-coded data follows the SOS segment
    mid = (sos + 2 + int.from_bytes(jpeg[sos + 2 : sos + 4], "big") + n - 2) // 2
    idat = png.index(b"IDAT") + 4 + 50
    return {
        "zeroed_tail.jpg": (zeroed, "Premature end of JPEG file"),
        "zeroed_tail_eoi.jpg": (zeroed[:-2] + b"\xff\xd9", "Corrupt JPEG data"),
        "overwritten_scan.jpg": (jpeg[:mid] + b"\xa0" * 200 + jpeg[mid + 200 :], "extraneous bytes before marker 0xd9"),
        "flipped_idat.png": (png[:idat] + bytes([png[idat] ^ 0xFF]) + png[idat + 1 :], "IDAT"),
    }
