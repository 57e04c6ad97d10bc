"""Operator reviews of archived parts: an append-only store, kept copies outside the archive's cap, an export.

An operator reviews a part of the archive (inspector/archive.py) on the station page or with `{"cmd": "review",
...}` on /cmd (inspector/service.py, one command path). Everything lives under <archive.dir>/reviews/:

    reviews.jsonl                      one JSON object per review, appended, never rewritten
    <sku>/<YYYY-MM-DD>/<stem>.json     the part's verdict, frame and heat map, hard-linked (copied across file
    <sku>/<YYYY-MM-DD>/<stem>.png      systems) from the archive before the review's line is written, so the
    <sku>/<YYYY-MM-DD>/<stem>_heat.png archive's size cap never deletes a reviewed part (the cap skips reviews/)

A part is named by its archive path without the suffix, `<sku>/<YYYY-MM-DD>/<HHMMSS.mmm>_<frame id>_<ok|ng>`
(PART_PATTERN). Each line of reviews.jsonl is a `Review` (schema_version 1):

| key | value |
| --- | --- |
| `schema_version` | 1 |
| `t` | when the review was made, ISO 8601 UTC (`2026-11-25T10:15:03.123456Z`) |
| `client` | who sent it: `web <client address>` (station page) or `mqtt` (/cmd) |
| `operator` | the name the operator typed on the page (or sent), else null |
| `part` | the part, as above; its kept files are `reviews/<part>.json`, `.png`, `_heat.png` |
| `sku`, `frame_id`, `run_id` | from the part's verdict ((run_id, frame_id) names the frame for ever) |
| `verdict_ok`, `score`, `threshold`, `reason` | the daemon's decision on the part (reason: a fail-safe's, else null) |
| `label` | `defect_confirmed` or `false_reject` (an NG part); `missed_defect` or `ok_confirmed` (a sampled OK part) |
| `defect_type` | one of the SKU's `skus.<name>.defect_types` for a defective label, else null |

The part is defective for `defect_confirmed` and `missed_defect`, good for the other two. A later review of the
same part supersedes the earlier ones when read (`read_reviews`); the file keeps them all. Lines are written with
one O_APPEND write and an fsync each; a line that does not parse (a crash mid-write) is skipped with a warning.
`export_mvtec` writes a SKU's reviewed parts as an MVTec AD test split for `inspector calibrate` and `eval`.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
import threading
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import cv2
from pydantic import BaseModel, ConfigDict, ValidationError

from foundation.errors import DataError, InspectorError
from foundation.log import get_logger
from inspector.config import REVIEWS_DIR

log = get_logger(__name__)

REVIEWS_FILE = "reviews.jsonl"
SCHEMA_VERSION = 1
PART_PATTERN = re.compile(r"(?P<sku>[^/\x00]+)/\d{4}-\d{2}-\d{2}/\d{6}\.\d{3}_\d+_(?P<kind>ok|ng)")
PART_SUFFIXES = (".json", ".png", "_heat.png")  # the verdict first: a part without it cannot be reviewed
MAX_OPERATOR = 64  # characters of an operator name
Label = Literal["defect_confirmed", "false_reject", "missed_defect", "ok_confirmed"]
# label -> (the verdict it applies to: "ng" or "ok", whether it says the part is defective)
LABELS: dict[str, tuple[str, bool]] = {
    "defect_confirmed": ("ng", True),
    "false_reject": ("ng", False),
    "missed_defect": ("ok", True),
    "ok_confirmed": ("ok", False),
}
GOOD_FOLDER = "good"  # the export's folder of good parts
DEFECT_FOLDER = "defect"  # the export's folder of defective parts reviewed without a defect type


class ReviewError(InspectorError):
    """A review that cannot be recorded: a malformed request (the page answers 400) or a part that is gone."""


class PartNotFound(ReviewError):
    """The part is neither in the archive nor kept (the size cap deleted it, or it never existed)."""


class Review(BaseModel):
    """One line of reviews.jsonl (module docstring); unknown keys of later schema versions are ignored."""

    model_config = ConfigDict(extra="ignore", frozen=True, allow_inf_nan=False)

    schema_version: int = SCHEMA_VERSION
    t: datetime
    client: str
    operator: str | None = None
    part: str
    sku: str
    frame_id: int
    run_id: str | None = None
    verdict_ok: bool
    score: float | None = None
    threshold: float | None = None
    reason: str | None = None
    label: Label
    defect_type: str | None = None

    @property
    def defective(self) -> bool:
        """True when the operator says the part has a defect (defect_confirmed, missed_defect)."""
        return LABELS[self.label][1]


@dataclass(frozen=True)
class ReviewRequest:
    """What one review command asks for, checked (parse_review) but not yet recorded."""

    part: str
    sku: str
    label: Label
    defect_type: str | None
    operator: str | None


@dataclass(frozen=True)
class ReviewedPart:
    """A part's latest review and its kept frame (None when the part had no image, e.g. a fail-safe)."""

    review: Review
    image: Path | None


def parse_review(command: Mapping[str, Any], defect_types: Mapping[str, Sequence[str]]) -> ReviewRequest:
    """The review a command asks for, checked without touching the disk (part name, label for the part's verdict,
    defect type from the SKU's list, operator name); ReviewError with one line saying what is wrong."""
    part = command.get("part")
    match = PART_PATTERN.fullmatch(part) if isinstance(part, str) else None
    if match is None or match["sku"] in (".", "..", REVIEWS_DIR):
        raise ReviewError(f'review needs "part": an archived part as <sku>/<YYYY-MM-DD>/<HHMMSS.mmm>_<frame id>_'
                          f'<ok|ng> (the queue\'s "part"), got {str(part)[:80]!r}')
    sku, kind = match["sku"], match["kind"]
    label = command.get("label")
    if not isinstance(label, str) or label not in LABELS:
        raise ReviewError(f"unknown review label {str(label)[:40]!r}: use {', '.join(LABELS)}")
    if LABELS[label][0] != kind:
        allowed = " or ".join(name for name, (applies, _) in LABELS.items() if applies == kind)
        raise ReviewError(f"label {label!r} is not for an {kind.upper()} part; use {allowed}")
    defect_type = command.get("defect_type")
    if defect_type is not None:
        known = list(defect_types.get(sku, ()))
        if not LABELS[label][1]:
            raise ReviewError(f"a defect type goes with a defective label (defect_confirmed, missed_defect), not "
                              f"{label!r}")
        if defect_type not in known:
            listed = f"one of {', '.join(known)}" if known else "none: the list is empty"
            raise ReviewError(f"defect type {str(defect_type)[:40]!r} is not in skus.{sku}.defect_types ({listed}); "
                              "add it in inspector.toml or send no defect type")
    operator = command.get("operator")
    if operator is not None:
        if not isinstance(operator, str) or len(operator) > MAX_OPERATOR or not operator.isprintable():
            raise ReviewError(f'"operator" must be a name of at most {MAX_OPERATOR} printable characters')
        operator = operator.strip() or None
    return ReviewRequest(part, sku, label, defect_type, operator)


class ReviewStore:
    """The reviews of one archive folder: records reviews (append-only, the part's files kept first) and keeps the
    latest review per part in memory for the review queue. Thread-safe; never called on the pipeline thread."""

    def __init__(self, archive_root: Path) -> None:
        self.archive_root = Path(archive_root)
        self.folder = self.archive_root / REVIEWS_DIR
        self.path = self.folder / REVIEWS_FILE
        self._lock = threading.Lock()
        self._latest = latest_reviews(read_lines(self.path))

    def latest(self) -> dict[str, Review]:
        """part -> its latest review."""
        with self._lock:
            return dict(self._latest)

    def verdict_file(self, part: str) -> Path:
        """The part's verdict JSON in the archive, else its kept copy; PartNotFound when neither exists."""
        for folder in (self.archive_root, self.folder):
            candidate = folder / f"{part}.json"
            with contextlib.suppress(OSError):  # a name too long for the file system: not there
                if candidate.is_file():
                    return candidate
        raise PartNotFound(f"part {part} is not in the archive (deleted by the size cap, or never archived); "
                           "refresh the queue")

    def add(self, request: ReviewRequest, *, client: str) -> Review:
        """Keep the part's files, then append its review; PartNotFound when the part is gone, ReviewError when its
        verdict cannot be read."""
        try:
            verdict = json.loads(self.verdict_file(request.part).read_text(encoding="utf-8"))
            self._keep(request.part)
        except FileNotFoundError:  # the size cap deleted it just now
            raise PartNotFound(f"part {request.part} was deleted by the archive's size cap just now; refresh the "
                               "queue") from None
        except (OSError, ValueError) as exc:
            raise ReviewError(f"cannot read the verdict of part {request.part}: {exc}") from None
        try:
            review = Review(
                t=datetime.now(UTC), client=client, operator=request.operator, part=request.part, sku=request.sku,
                frame_id=verdict["frame_id"], run_id=verdict.get("run_id"), verdict_ok=verdict["ok"],
                score=verdict.get("score"), threshold=verdict.get("threshold"), reason=verdict.get("reason"),
                label=request.label, defect_type=request.defect_type)
        except (KeyError, TypeError, ValidationError) as exc:
            raise ReviewError(f"the verdict of part {request.part} is not a verdict: {str(exc)[:200]}") from None
        line = review.model_dump_json().encode() + b"\n"
        with self._lock:
            append_line(self.path, line)
            self._latest[review.part] = review
        return review

    def _keep(self, part: str) -> None:
        """Hard-link (or copy, across file systems) the part's files into the reviews folder, once."""
        for suffix in PART_SUFFIXES:
            source, kept = self.archive_root / f"{part}{suffix}", self.folder / f"{part}{suffix}"
            if kept.exists():
                continue
            kept.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(source, kept)
            except FileNotFoundError:
                if suffix == PART_SUFFIXES[0]:
                    raise
            except FileExistsError:
                pass  # kept by a review running beside this one
            except OSError:  # another file system, or one without hard links
                _copy_atomic(source, kept)


def append_line(path: Path, line: bytes) -> None:
    """Append one line with a single O_APPEND write and fsync it; a torn last line (a crash mid-write) is ended
    first, so it never swallows this one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o640)  # read: the last byte
    try:
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            line = b"\n" + line
        if os.write(fd, line) != len(line):
            raise OSError(f"short write to {path} (disk full?)")
        os.fsync(fd)
    finally:
        os.close(fd)


def _copy_atomic(source: Path, target: Path) -> None:
    """Copy source to target through a temporary file in target's folder, so target is whole or absent."""
    fd, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    os.close(fd)
    try:
        shutil.copyfile(source, temporary)
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def read_lines(path: Path) -> list[Review]:
    """Every review in a reviews.jsonl, in file order; lines that do not parse are skipped with a warning."""
    if not path.is_file():
        return []
    reviews = []
    with path.open(encoding="utf-8", errors="replace") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                reviews.append(Review.model_validate_json(line))
            except ValidationError as exc:
                log.warning("review_line_skipped", file=str(path), line=number, error=str(exc).splitlines()[0])
    return reviews


def latest_reviews(reviews: Sequence[Review]) -> dict[str, Review]:
    """part -> the last review of it in file order (a later review supersedes an earlier one)."""
    return {review.part: review for review in reviews}


def read_reviews(archive_root: Path, sku: str | None = None) -> list[ReviewedPart]:
    """The latest review of every reviewed part (of `sku`, or of all SKUs) under an archive folder, oldest part
    first, each with its kept frame; the reader for the export and `inspector sku update --from-reviews`."""
    folder = Path(archive_root) / REVIEWS_DIR
    latest = latest_reviews(read_lines(folder / REVIEWS_FILE))
    parts = []
    for part, review in sorted(latest.items(), key=lambda item: item[0].partition("/")[2]):
        if sku is None or review.sku == sku:
            image = folder / f"{part}.png"
            parts.append(ReviewedPart(review, image if image.is_file() else None))
    return parts


def export_mvtec(archive_root: Path, sku: str, out: Path,
                 roi: tuple[int, int, int, int] | None = None) -> Counter[str]:
    """Write `sku`'s reviewed parts as an MVTec AD test split: out/<sku>/test/good/ (false rejects, confirmed OK),
    out/<sku>/test/<defect type or "defect">/ (confirmed and missed defects), each frame cropped to `roi` (what the
    model sees). No ground_truth (reviews carry no masks) and no train split. Returns images per folder, with
    "skipped" for parts kept without a frame. DataError when there is nothing to export or out/<sku> exists."""
    archive_root, out = Path(archive_root), Path(out)
    reviewed = read_reviews(archive_root, sku)
    if not reviewed:
        raise DataError(f"no reviews of SKU {sku!r} in {archive_root / REVIEWS_DIR / REVIEWS_FILE}: review its parts "
                        "on the station page first")
    target = out / sku
    if target.exists():
        raise DataError(f"{target} exists; export into a new --out folder (an export never mixes with an older one)")
    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out, prefix=f".{sku}."))
    counts: Counter[str] = Counter()
    try:
        for item in reviewed:
            if item.image is None:
                counts["skipped"] += 1
                continue
            review = item.review
            folder = (review.defect_type or DEFECT_FOLDER) if review.defective else GOOD_FOLDER
            destination = staging / "test" / folder / f"{review.part.partition('/')[2].replace('/', '_')}.png"
            destination.parent.mkdir(parents=True, exist_ok=True)
            if roi is None:
                shutil.copyfile(item.image, destination)
            else:
                _write_roi(item.image, roi, destination, sku)
            counts[folder] += 1
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return counts


def _write_roi(image: Path, roi: tuple[int, int, int, int], destination: Path, sku: str) -> None:
    """The frame's ROI (x, y, w, h) as a PNG; DataError naming the key when the ROI does not fit the frame."""
    frame = cv2.imread(str(image), cv2.IMREAD_UNCHANGED)
    if frame is None:
        raise DataError(f"cannot read the kept frame {image}: the file is truncated or not a PNG")
    x, y, w, h = roi
    if x + w > frame.shape[1] or y + h > frame.shape[0]:
        raise DataError(f"skus.{sku}.roi = {list(roi)} does not fit the {frame.shape[1]}x{frame.shape[0]} frame "
                        f"{image}; fix the ROI or export without it")
    if not cv2.imwrite(str(destination), frame[y:y + h, x:x + w]):
        raise DataError(f"cannot write {destination}")
