"""Image data sets (plain folder, MVTec AD, VisA) behind one lazily loaded, corruption-tolerant Item sequence.

Layouts
-------
folder  ``<root>/**/*.{png,jpg,jpeg,bmp,tif,tiff}`` (recursive, case-insensitive suffixes, hidden files and
        folders ignored): good images only, label 0, mask None.
mvtec   ``<root>/<category>/train/good/*.png``; ``<root>/<category>/test/<type>/*.png`` with masks at
        ``<root>/<category>/ground_truth/<type>/<stem>_mask.png``; test ``good`` items get an all-false mask.
        Without a ``ground_truth`` folder the test labels are image-level only (e.g. an export of operator
        reviews, inspector/reviews.py): every item's mask is None and pixel metrics are not available.
visa    ``<root>/split_csv/1cls.csv`` (columns object,split,label,image,mask; label normal/anomaly; paths
        relative to root) pointing into ``<root>/<category>/Data/Images/{Normal,Anomaly}/*.JPG`` and
        ``<root>/<category>/Data/Masks/Anomaly/*.png`` (non-zero = defect); normal test items get an
        all-false mask.

Corrupt files
-------------
Construction checks every file's header with ``cv2.haveImageReader`` (reads a few bytes, no decode): a file
OpenCV cannot read at all (e.g. a text file named .png) is left out and logged once as ``image_skipped``.
A file that passes the header check but fails to decode (e.g. a truncated PNG) is found on first access:
``__getitem__`` logs it, records it in ``skipped`` and returns the next decodable item instead (wrapping
around), so an epoch never crashes on one bad file; ``DataError`` only when no file decodes at all.
A file its decoder would have to repair fails too (foundation.images: a truncated, zeroed or overwritten JPEG
that OpenCV would decode grey-filled, a PNG with a bad chunk CRC): it is never trained on.

Decoding once
-------------
Items are decoded and resized to the model input (or, for a tiled SKU, scaled by its tile scale,
tdad.tiling) on first access and kept in a process-wide, bounded DecodeCache keyed by (file, mtime, byte
size, model size, resize mode, tile scale): eval's passes (one per schedule or
ablation row, plus the montage) and every data set opened again on the same files decode each file once.
Cached arrays are read-only and shared; copy before changing them. Training decodes its whole set once at
start (tdad.training.train.load_images) and never per step.
"""

from __future__ import annotations

import csv
import hashlib
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, overload

import cv2
import numpy as np

from foundation.errors import DataError
from foundation.images import load_image_rgb
from foundation.log import get_logger
from tdad.preprocess import ResizeMode, resize_mask_to_model, resize_to_model
from tdad.tiling import scale_image, scale_mask

log = get_logger(__name__)

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})
DECODE_CACHE_MB = 512  # default bound of the shared cache: ~2,700 images at 256 px, ~10,000 at 128 px
DatasetKind = Literal["folder", "mvtec", "visa"]
Split = Literal["train", "test"]


@dataclass(frozen=True)
class Item:
    """One image with its ground truth: uint8 HxWx3 RGB, bool HxW mask (None when a good item has no GT)."""

    image: np.ndarray
    mask: np.ndarray | None
    label: int
    path: Path
    defect_type: str


@dataclass(frozen=True)
class Record:
    """What a scan finds for one item, before anything is decoded."""

    path: Path
    mask_path: Path | None
    label: int
    defect_type: str
    empty_mask: bool


CacheKey = tuple[str, int, int, int, str, float | None]


class DecodeCache:
    """Least-recently-used arrays (decoded and resized files) under a byte budget, thread-safe; counts hits."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.nbytes = 0
        self.hits = 0
        self.misses = 0
        self._items: OrderedDict[CacheKey, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def key(path: Path, image_size: int, resize: ResizeMode, tile_scale: float | None = None) -> CacheKey:
        """What makes a cached array valid: the file's identity and content stamp, and the target geometry."""
        stat = path.stat()
        return str(path.resolve()), stat.st_mtime_ns, stat.st_size, image_size, resize, tile_scale

    def get(self, key: CacheKey, load: Callable[[], np.ndarray]) -> np.ndarray:
        """The cached array for key, else load() (made read-only and cached unless it alone exceeds the budget)."""
        with self._lock:
            array = self._items.get(key)
            if array is not None:
                self._items.move_to_end(key)
                self.hits += 1
                return array
            self.misses += 1
        array = load()
        array.setflags(write=False)
        with self._lock:
            if array.nbytes <= self.max_bytes and key not in self._items:
                self._items[key] = array
                self.nbytes += array.nbytes
                while self.nbytes > self.max_bytes:
                    self.nbytes -= self._items.popitem(last=False)[1].nbytes
        return array

    def __getstate__(self) -> dict[str, int]:
        """A copy sent to another process (DataLoader workers under spawn) starts empty: arrays stay here."""
        return {"max_bytes": self.max_bytes}

    def __setstate__(self, state: dict[str, int]) -> None:
        self.__init__(state["max_bytes"])  # type: ignore[misc]

    def clear(self) -> None:
        """Drop every cached array and reset the counters."""
        with self._lock:
            self._items.clear()
            self.nbytes = self.hits = self.misses = 0


DECODE_CACHE = DecodeCache(DECODE_CACHE_MB << 20)


def list_images(root: Path, recursive: bool = True) -> list[Path]:
    """Sorted image files under root (by suffix, case-insensitive), skipping hidden files and folders."""
    if not root.is_dir():
        return []
    candidates = root.rglob("*") if recursive else root.iterdir()
    return sorted(
        p
        for p in candidates
        if p.suffix.lower() in IMAGE_SUFFIXES
        and p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )


def load_mask(path: Path) -> np.ndarray:
    """Decode a mask file to bool HxW (non-zero = defect, at any bit depth: an 8-bit read would zero a 16-bit
    mask's 0/1 values); DataError naming the file when unreadable."""
    mask = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE | cv2.IMREAD_ANYDEPTH)
    if mask is None:
        raise DataError(f"cannot read mask {path}: the file is missing, truncated or not an image")
    return mask > 0


def _has_reader(path: Path) -> bool:
    """Cheap header check: can OpenCV decode this file at all (never decodes the pixels)."""
    try:
        return bool(cv2.haveImageReader(str(path)))
    except cv2.error:
        return False


class ImageDataset(Sequence[Item]):
    """A scanned list of Records decoded on access and resized to image_size x image_size by the SKU's resize
    mode (tdad.preprocess), or with `tile_scale` scaled by it for a tiled SKU (tdad.tiling; the images
    keep their aspect and vary in size), through `cache` (None: decode on every access)."""

    layout = ""

    def __init__(self, root: Path, image_size: int, records: list[Record], resize: ResizeMode = "stretch",
                 cache: DecodeCache | None = DECODE_CACHE, tile_scale: float | None = None) -> None:
        if image_size <= 0:
            raise DataError(f"image_size must be a positive number of pixels, got {image_size}")
        if tile_scale is not None and tile_scale <= 0:
            raise DataError(f"tile scale must be a positive factor, got {tile_scale}")
        self.root = Path(root)
        self.image_size = image_size
        self.resize: ResizeMode = resize
        self.tile_scale = tile_scale
        self.cache = cache
        self.skipped: list[Path] = []
        self.records = [r for r in records if self._readable(r)]
        self._bad: set[int] = set()
        if not self.records:
            raise DataError(f"no readable images under {self.root}: every file failed to open")

    def _readable(self, record: Record) -> bool:
        """Header-check the image and mask files of a record; skip (and log) it when either is unreadable."""
        for path in (record.path, record.mask_path):
            if path is not None and not _has_reader(path):
                self._skip(path, "not a readable image")
                return False
        return True

    def _skip(self, path: Path, reason: str) -> None:
        """Remember and report one unreadable file."""
        self.skipped.append(path)
        log.warning("image_skipped", path=str(path), reason=reason)

    def __len__(self) -> int:
        return len(self.records)

    @overload
    def __getitem__(self, index: int) -> Item: ...
    @overload
    def __getitem__(self, index: slice) -> list[Item]: ...
    def __getitem__(self, index: int | slice) -> Item | list[Item]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        n = len(self.records)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} items")
        index %= n
        last = "each was logged as image_skipped"
        for offset in range(n):
            candidate = (index + offset) % n
            if candidate in self._bad:
                continue
            try:
                return self._load(self.records[candidate])
            except DataError as exc:
                self._bad.add(candidate)
                self._skip(self.records[candidate].path, str(exc))
                last = str(exc)
        raise DataError(f"no decodable images under {self.root}: all {n} files failed to decode ({last})")

    def __iter__(self) -> Iterator[Item]:
        return (self[i] for i in range(len(self)))

    def _cached(self, path: Path, load: Callable[[], np.ndarray]) -> np.ndarray:
        """load() through the decode cache (when there is one); a vanished file is a DataError naming it."""
        if self.cache is None:
            return load()
        try:
            key = DecodeCache.key(path, self.image_size, self.resize, self.tile_scale)
        except OSError as exc:
            raise DataError(f"cannot read {path}: {exc.strerror}") from None
        return self.cache.get(key, load)

    def _load(self, record: Record) -> Item:
        """Decode and resize one record (the model's resize for the image, the same geometry with nearest
        sampling for the mask; or both scaled by the tile scale, the mask so that thin defects survive)."""
        size, mode, scale = self.image_size, self.resize, self.tile_scale
        if scale is None:
            image = self._cached(record.path, lambda: resize_to_model(load_image_rgb(record.path), size, mode))
        else:
            image = self._cached(record.path, lambda: scale_image(load_image_rgb(record.path), scale))
        mask: np.ndarray | None = None
        if record.mask_path is not None:
            mask_path = record.mask_path
            if scale is None:
                mask = self._cached(mask_path, lambda: resize_mask_to_model(load_mask(mask_path), size, mode))
            else:
                mask = self._cached(mask_path, lambda: scale_mask(load_mask(mask_path), scale))
        elif record.empty_mask:
            mask = np.zeros(image.shape[:2], dtype=bool)
        return Item(image=image, mask=mask, label=record.label, path=record.path, defect_type=record.defect_type)

    def relative_files(self) -> list[Path]:
        """Every image and mask file of the data set, relative to root (what file_list_hash covers); masks
        kept in a folder beside the images come out as ../ paths."""
        files = [r.path for r in self.records] + [r.mask_path for r in self.records if r.mask_path]
        return sorted(Path(os.path.relpath(p, self.root)) for p in files)


class FolderDataset(ImageDataset):
    """Every image under a folder (recursive): all good, the simplest way to train one SKU; or, with
    `mask_dir`, all defective with their masks (`<stem>_mask.png` as in MVTec AD, or `<stem>.png`)."""

    layout = "folder"

    def __init__(self, root: Path, image_size: int, mask_dir: Path | None = None,
                 resize: ResizeMode = "stretch", tile_scale: float | None = None) -> None:
        root = Path(root)
        paths = list_images(root)
        if not paths:
            raise DataError(
                f"no images in {root}: expected a folder of good images (*.png, *.jpg, *.bmp, *.tif, recursive)"
            )
        if mask_dir is None:
            records = [Record(p, None, 0, "good", False) for p in paths]
        else:
            records = [Record(p, _mask_for(p, Path(mask_dir)), 1, "defect", False) for p in paths]
        super().__init__(root, image_size, records, resize, tile_scale=tile_scale)


def _mask_for(image: Path, mask_dir: Path) -> Path:
    """The mask file of a defective image in mask_dir; DataError naming both names it looked for."""
    candidates = [mask_dir / f"{image.stem}_mask.png", mask_dir / f"{image.stem}.png"]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise DataError(f"no mask for {image}: expected {candidates[0]} or {candidates[1]}")


class MVTecDataset(ImageDataset):
    """One MVTec AD category, train (good only) or test (good + defect types with ground-truth masks)."""

    layout = "mvtec"

    def __init__(self, root: Path, category: str, split: Split, image_size: int,
                 resize: ResizeMode = "stretch", tile_scale: float | None = None) -> None:
        root = Path(root)
        base = root / category
        if split == "train":
            records = [Record(p, None, 0, "good", False) for p in list_images(base / "train" / "good", False)]
            if not records:
                raise DataError(
                    f"no images in {base / 'train' / 'good'}: expected MVTec AD layout "
                    "<root>/<category>/train/good/*.png"
                )
        elif split == "test":
            records = self._scan_test(base)
        else:
            raise DataError(f"unknown split {split!r} for {base}: use 'train' or 'test'")
        super().__init__(root, image_size, records, resize, tile_scale=tile_scale)

    @staticmethod
    def _scan_test(base: Path) -> list[Record]:
        """Test items per defect-type folder; with a ground_truth folder every non-good image must have its
        <stem>_mask.png, without one the labels are image-level only (no masks)."""
        expected = (
            "expected MVTec AD layout <root>/<category>/test/<type>/*.png with masks at "
            "<root>/<category>/ground_truth/<type>/<stem>_mask.png"
        )
        test_dir = base / "test"
        types = (
            sorted(d.name for d in test_dir.iterdir() if d.is_dir() and not d.name.startswith("."))
            if test_dir.is_dir()
            else []
        )
        pixel_truth = (base / "ground_truth").is_dir()
        records: list[Record] = []
        for defect_type in types:
            for path in list_images(test_dir / defect_type, False):
                if defect_type == "good" or not pixel_truth:
                    records.append(Record(path, None, int(defect_type != "good"), defect_type, pixel_truth))
                    continue
                mask_path = base / "ground_truth" / defect_type / f"{path.stem}_mask.png"
                if not mask_path.is_file():
                    raise DataError(f"missing ground-truth mask {mask_path} for {path}: {expected}")
                records.append(Record(path, mask_path, 1, defect_type, False))
        if not records:
            raise DataError(f"no images in {test_dir}/<type>: {expected}")
        return records


class VisADataset(ImageDataset):
    """One VisA category, split by the official <root>/split_csv/1cls.csv."""

    layout = "visa"
    csv_name = Path("split_csv") / "1cls.csv"
    columns = ("object", "split", "label", "image", "mask")

    def __init__(self, root: Path, category: str, split: Split, image_size: int,
                 resize: ResizeMode = "stretch", tile_scale: float | None = None) -> None:
        root = Path(root)
        if split not in ("train", "test"):
            raise DataError(f"unknown split {split!r} for {root / category}: use 'train' or 'test'")
        rows = self._read_split_csv(root)
        records = [self._record(root, row) for row in rows if row["object"] == category and row["split"] == split]
        if not records:
            raise DataError(
                f"no {split} rows for object {category!r} in {root / self.csv_name}: expected VisA layout with "
                f"<root>/{category}/Data/Images/{{Normal,Anomaly}}/*.JPG listed in split_csv/1cls.csv"
            )
        super().__init__(root, image_size, records, resize, tile_scale=tile_scale)

    @classmethod
    def _read_split_csv(cls, root: Path) -> list[dict[str, str]]:
        """Rows of the split CSV; DataError naming the file when it is missing or has other columns."""
        path = root / cls.csv_name
        if not path.is_file():
            raise DataError(f"no split file {path}: expected VisA layout <root>/split_csv/1cls.csv")
        with path.open(newline="") as handle:
            reader = csv.DictReader(handle)
            if reader.fieldnames is None or not set(cls.columns) <= set(reader.fieldnames):
                raise DataError(f"{path} has columns {reader.fieldnames}: expected {','.join(cls.columns)}")
            return list(reader)

    @staticmethod
    def _record(root: Path, row: dict[str, str]) -> Record:
        """One CSV row as a Record; anomalies need a mask, normal test items get an empty one."""
        image = root / row["image"]
        if not image.is_file():
            raise DataError(f"image {image} listed in {root / VisADataset.csv_name} does not exist")
        if row["label"] == "normal":
            return Record(image, None, 0, "good", row["split"] == "test")
        if row["label"] != "anomaly":
            raise DataError(f"label {row['label']!r} for {image} in split_csv/1cls.csv: expected normal/anomaly")
        mask = root / row["mask"] if row["mask"] else None
        if mask is None or not mask.is_file():
            raise DataError(f"missing mask {mask} for anomaly {image}: expected <category>/Data/Masks/Anomaly/")
        return Record(image, mask, 1, "anomaly", False)


def open_dataset(kind: DatasetKind, root: Path, category: str | None, split: str, image_size: int,
                 resize: ResizeMode = "stretch", tile_scale: float | None = None) -> ImageDataset:
    """Open a data set by layout name; the one entry point for train, eval and calibrate."""
    if kind == "folder":
        return FolderDataset(root, image_size, resize=resize, tile_scale=tile_scale)
    if kind not in ("mvtec", "visa"):
        raise DataError(f"unknown data set kind {kind!r} for {root}: use folder, mvtec or visa")
    if not category:
        raise DataError(f"a {kind} data set at {root} needs a category (e.g. --category bottle)")
    cls = MVTecDataset if kind == "mvtec" else VisADataset
    return cls(root, category, split, image_size, resize, tile_scale)


def file_digest(path: Path) -> str:
    """The sha256 prefix (16 hex digits) of a file's bytes: an image recognised wherever a copy of it turns up
    (SkuManifest.trained_on); DataError naming the file when it cannot be read."""
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror or exc}") from None


def content_digests(dataset: ImageDataset) -> list[str]:
    """Sorted, distinct file_digest of every image file of the data set (what a SKU was trained on or taught)."""
    return sorted({file_digest(record.path) for record in dataset.records})


def copies_among(dataset: ImageDataset, digests: set[str]) -> list[Path]:
    """The image files of the data set whose content digest (file_digest) is among `digests`: copies, under any
    name, of images a SKU was trained on (or of its good images, for scrap parts)."""
    return [record.path for record in dataset.records if file_digest(record.path) in digests]


def file_list_hash(dataset: ImageDataset) -> str:
    """sha256 over the sorted relative paths and byte sizes of every image and mask (the SKU's train_hash)."""
    digest = hashlib.sha256()
    for rel in dataset.relative_files():
        digest.update(f"{rel.as_posix()}\t{(dataset.root / rel).stat().st_size}\n".encode())
    return digest.hexdigest()
