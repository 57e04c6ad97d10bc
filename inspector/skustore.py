"""The SKU version store: every version of every SKU side by side, one active per SKU, every change on record.

Layout under the store root (`[store] dir`):

    <root>/<sku>/versions/<id>/       an unpacked SKU folder (meta.json, weights, graphs, plans, calibration);
                                      read-only once there: a change to a SKU is a new version
    <root>/<sku>/versions/<id>.json   its record (Version): content hash, created, installed, origin, provenance
    <root>/<sku>/active               symlink -> versions/<id>, swapped atomically (a new link, then os.replace)
    <root>/<sku>/history.jsonl        append-only, one line per add, activate and rollback (HistoryEntry)
    <root>/<sku>/.lock                flock'ed by every change, so concurrent writers never interleave

A version's id is the first 16 hex digits of its content hash: sha256 over the sorted list of its files (path,
sha256, size), so the same content gets the same id wherever it is packed or installed. A version appears by
one rename of a staging folder inside <root>/<sku>/ (the commit point): an add that fails or is interrupted
leaves no version, and its staging folder is removed on the way out.

A station's `[skus.<name>] model_dir` may point at <root>/<name>/active: the link is resolved when the SKU is
loaded, so a version swapped in goes live at the daemon's next load of that SKU.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from foundation.errors import DataError, InspectorError
from foundation.files import fsync_path, write_text_atomic
from tdad.manifest import MANIFEST_FILE, file_sha256

VERSIONS_DIR = "versions"
ACTIVE_LINK = "active"
HISTORY_FILE = "history.jsonl"
LOCK_FILE = ".lock"
STAGING_PREFIX = ".staging-"
ID_LENGTH = 16
# left out of a version: training checkpoints serve `inspector train --resume` on the training box only
EXCLUDED_DIRS = frozenset({"train_state"})

_SKU_NAME = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9_.-]*$")
_VERSION_ID = re.compile(rf"^[0-9a-f]{{{ID_LENGTH}}}$")


def unsafe_path(path: str) -> str | None:
    """Why `path` is not a plain relative POSIX path inside a SKU folder (absolute, `..`, `.`, empty part,
    backslash), or None when it is one."""
    if not path or path.startswith("/"):
        return "is an absolute or empty path"
    if "\\" in path:
        return "holds a backslash"
    if any(part in ("", ".", "..") for part in path.split("/")):
        return "leaves its folder (a '..', '.' or empty path part)"
    return None


class FileEntry(BaseModel):
    """One file of a SKU version: its path relative to the SKU folder (POSIX), sha256 and size in bytes."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    path: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int = Field(ge=0)

    @field_validator("path")
    @classmethod
    def _relative(cls, path: str) -> str:
        problem = unsafe_path(path)
        if problem:
            raise ValueError(f"{path!r} {problem}")
        return path


def content_hash(files: Sequence[FileEntry]) -> str:
    """sha256 (hex) over the sorted (path, sha256, size) list: the identity of a version's content."""
    listing = sorted([f.path, f.sha256, f.size] for f in files)
    return hashlib.sha256(json.dumps(listing, separators=(",", ":")).encode()).hexdigest()


def version_id(files: Sequence[FileEntry]) -> str:
    """The id of a version with these files: the first 16 hex digits of content_hash."""
    return content_hash(files)[:ID_LENGTH]


def sku_paths(folder: Path) -> list[str]:
    """The relative POSIX paths of the files that make up SKU folder `folder` (every regular file; train_state/
    left out), sorted; DataError naming a symlink or special file, which a version cannot hold."""
    paths = []
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder)
        if relative.parts[0] in EXCLUDED_DIRS:
            continue
        if path.is_symlink() or not (path.is_file() or path.is_dir()):
            raise DataError(f"{path}: a SKU version holds regular files only (this is a link or special file); "
                            "replace it with the file itself")
        if path.is_file():
            paths.append(relative.as_posix())
    return paths


def sku_files(folder: Path) -> list[FileEntry]:
    """The FileEntry (path, sha256, size) of every file of SKU folder `folder`, as sku_paths lists them."""
    return [FileEntry(path=p, sha256=file_sha256(folder / p), size=(folder / p).stat().st_size)
            for p in sku_paths(folder)]


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


@dataclass(frozen=True)
class Provenance:
    """Where a new version comes from, kept in its record and shown by `inspector sku list`."""

    origin: str  # "bundle" (a signed bundle installed), "update" (made on this box from another version), ...
    source: str = ""  # the bundle's path or URL, or the version it was derived from
    created: str | None = None  # when its content was made (ISO 8601); None = now
    actor: str = ""  # who added it
    details: dict[str, Any] = field(default_factory=dict)  # free-form: signer key id, producer, parent version, ...


@dataclass(frozen=True)
class Version:
    """One version of a SKU in the store: its record (versions/<id>.json), folder and whether it is active."""

    id: str
    sku: str
    hash: str  # content_hash of its files
    files: int
    bytes: int
    created: str
    installed: str
    origin: str
    source: str
    actor: str
    details: dict[str, Any]
    path: Path
    active: bool


@dataclass(frozen=True)
class HistoryEntry:
    """One line of history.jsonl: when, who, what ("add", "activate" or "rollback"), from and to which version
    (`before` is None for an add and for the first activation), and why."""

    time: str
    actor: str
    action: str
    before: str | None
    after: str
    reason: str

    def to_json(self) -> str:
        """The entry as one JSON line, with the keys "from" and "to"."""
        return json.dumps({"time": self.time, "actor": self.actor, "action": self.action, "from": self.before,
                           "to": self.after, "reason": self.reason}, sort_keys=True)


@dataclass(frozen=True)
class Change:
    """The outcome of activate/rollback: the SKU's active version before and after (equal: nothing changed)."""

    sku: str
    before: str | None
    after: str


class VersionExists(DataError):
    """A version with this content (so this id) is already in the store."""


class SkuStore:
    """The version store under `root` (see the module docstring); every method takes the SKU by name.

    Reading (skus, versions, active, history, path) needs no lock. Changes (add_version, commit, activate,
    rollback) hold <root>/<sku>/.lock, so two processes changing one SKU run one after the other.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    # ---- reading ---------------------------------------------------------------------------------------------

    def skus(self) -> list[str]:
        """The names of the SKUs with a folder in the store, sorted."""
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if (p / VERSIONS_DIR).is_dir())

    def path(self, sku: str, version: str) -> Path:
        """The folder of version `version` of `sku` (<root>/<sku>/versions/<id>); DataError when there is none."""
        folder = self._sku_dir(sku) / VERSIONS_DIR / _checked_id(version)
        if not folder.is_dir():
            known = ", ".join(v.id for v in self.versions(sku)) or "none"
            raise DataError(f"SKU {sku!r} has no version {version} in the store {self.root} (its versions: "
                            f"{known}); `inspector sku list --sku {sku}` shows them")
        return folder

    def has_version(self, sku: str, version: str) -> bool:
        """Whether `sku` has version `version` in the store."""
        return (self._sku_dir(sku) / VERSIONS_DIR / _checked_id(version)).is_dir()

    def active(self, sku: str) -> str | None:
        """The id of the active version of `sku` (where <root>/<sku>/active points), None when none is active."""
        return _read_active(self._sku_dir(sku))

    def versions(self, sku: str) -> list[Version]:
        """Every version of `sku`, oldest installed first; a record that cannot be read shows as "unknown"."""
        folder = self._sku_dir(sku)
        active = _read_active(folder)
        versions_dir = folder / VERSIONS_DIR
        ids = sorted(p.name for p in versions_dir.iterdir() if p.is_dir() and _VERSION_ID.match(p.name)) \
            if versions_dir.is_dir() else []
        found = [self._version(sku, versions_dir / i, active == i) for i in ids]
        return sorted(found, key=lambda v: (v.installed, v.id))

    def history(self, sku: str) -> list[HistoryEntry]:
        """Every line of <root>/<sku>/history.jsonl, oldest first; DataError naming a line that is not an entry."""
        path = self._sku_dir(sku) / HISTORY_FILE
        if not path.is_file():
            return []
        entries = []
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                data = json.loads(line)
                entries.append(HistoryEntry(time=data["time"], actor=data["actor"], action=data["action"],
                                            before=data["from"], after=data["to"], reason=data["reason"]))
            except (ValueError, KeyError, TypeError):
                raise DataError(f"{path} line {number} is not a history entry (cut short by a power loss?); "
                                "move that line out of the file") from None
        return entries

    # ---- changes ---------------------------------------------------------------------------------------------

    def add_version(self, sku: str, folder: Path, provenance: Provenance) -> str:
        """Copy SKU folder `folder` into the store as a new version of `sku` and return its id (not activated).

        The copy is staged inside the store and appears by one rename; nothing is left behind on failure.
        VersionExists (a DataError) when this content is already a version of `sku`; DataError when `folder` has
        no meta.json or holds a link. `inspector sku update` and `bundle.install` (through commit) end here.
        """
        folder = Path(folder)
        if not (folder / MANIFEST_FILE).is_file():
            raise DataError(f"{folder} is not a SKU folder (no {MANIFEST_FILE}); pass the folder `inspector train` "
                            "wrote")
        paths = sku_paths(folder)
        with self.staging(sku) as staged:
            for relative in paths:
                (staged / relative).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(folder / relative, staged / relative)
            return self.commit(sku, staged, sku_files(staged), provenance)

    @contextmanager
    def staging(self, sku: str) -> Iterator[Path]:
        """A new empty folder inside <root>/<sku>/ (so on the store's filesystem) to assemble a version in, for
        commit(); removed on exit unless commit() renamed it into the store."""
        folder = self._sku_dir(sku)
        folder.mkdir(parents=True, exist_ok=True)
        staged = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=folder))
        try:
            yield staged
        finally:
            shutil.rmtree(staged, ignore_errors=True)

    def commit(self, sku: str, staged: Path, files: Sequence[FileEntry], provenance: Provenance) -> str:
        """Make staging folder `staged` (from staging(), holding exactly `files`, already verified) version
        version_id(files) of `sku`: its files made read-only, its record written, then one rename, the commit
        point, and an "add" line in the history. Returns the id; VersionExists when that version is there."""
        vid = version_id(files)
        with self._locked(sku) as folder:
            target = folder / VERSIONS_DIR / vid
            if target.exists():
                raise VersionExists(f"SKU {sku!r} already has version {vid} (the same content) in {self.root}")
            target.parent.mkdir(exist_ok=True)
            staged.chmod(0o755)  # mkdtemp made it private; a version is read by the service user
            for entry in files:
                path = staged / entry.path
                path.chmod(path.stat().st_mode & ~0o222)
                fsync_path(path)  # on disk before the rename makes the version visible
            record = {"id": vid, "sku": sku, "hash": content_hash(files), "files": len(files),
                      "bytes": sum(f.size for f in files), "created": provenance.created or _now(),
                      "installed": datetime.now(UTC).isoformat(),  # to the microsecond: versions() sorts by it
                      "origin": provenance.origin, "source": provenance.source, "actor": provenance.actor,
                      "details": provenance.details}
            write_text_atomic(target.parent / f"{vid}.json", json.dumps(record, indent=2) + "\n")
            os.rename(staged, target)
            fsync_path(target.parent)
            reason = f"{provenance.origin} {provenance.source}".strip()
            _append(folder, HistoryEntry(_now(), provenance.actor, "add", None, vid, reason))
        return vid

    def activate(self, sku: str, version: str, *, check: Callable[[Path], None] | None = None, actor: str = "",
                 reason: str = "") -> Change:
        """Make `version` the active version of `sku`: run `check(version folder)` (the pre-flight; it raises
        InspectorError on a problem, e.g. inspector.preflight.version_check), then swap <root>/<sku>/active to it
        atomically and append an "activate" line (actor, reason) to the history.

        A failing check raises DataError naming the version and leaves the active version as it was. Activating
        the version already active changes nothing and records nothing. Returns the Change.
        """
        return self._swap(sku, lambda folder, active: version, "activate", check, actor, reason)

    def rollback(self, sku: str, *, check: Callable[[Path], None] | None = None, actor: str = "",
                 reason: str = "") -> Change:
        """Activate again the version that was active before the current one, as `activate` does (same check),
        recording a "rollback" line. Rollbacks walk back one activation each: after A, B, C two rollbacks give B
        then A. DataError when there is no earlier version or the history does not end at the active version."""
        return self._swap(sku, self._rollback_target, "rollback", check, actor, reason)

    # ---- internals -------------------------------------------------------------------------------------------

    def _sku_dir(self, sku: str) -> Path:
        """<root>/<sku>; DataError for a name that cannot be a folder of the store."""
        if not _SKU_NAME.match(sku):
            raise DataError(f"SKU name {sku!r}: use letters, digits, '_', '.' and '-' (not starting with '.')")
        return self.root / sku

    @contextmanager
    def _locked(self, sku: str) -> Iterator[Path]:
        """Hold <root>/<sku>/.lock (flock, exclusive) for one change; yields <root>/<sku>."""
        folder = self._sku_dir(sku)
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield folder
        finally:
            os.close(fd)  # releases the lock

    def _swap(self, sku: str, target: Callable[[Path, str | None], str], action: str,
              check: Callable[[Path], None] | None, actor: str, reason: str) -> Change:
        """Under the lock: pick the target version, pre-flight it, swap the link, record the change."""
        with self._locked(sku) as folder:
            before = _read_active(folder)
            after = target(folder, before)
            version_dir = self.path(sku, after)
            if after == before:
                return Change(sku, before, after)
            if check is not None:
                try:
                    check(version_dir)
                except InspectorError as exc:
                    now = f"version {before} stays active" if before else "no version is active"
                    raise DataError(f"SKU {sku!r} version {after} fails the pre-flight, {now}: {exc}") from None
            link = folder / f".{ACTIVE_LINK}.new"
            with suppress(FileNotFoundError):
                link.unlink()
            os.symlink(f"{VERSIONS_DIR}/{after}", link)
            os.replace(link, folder / ACTIVE_LINK)
            fsync_path(folder)
            _append(folder, HistoryEntry(_now(), actor, action, before, after, reason))
        return Change(sku, before, after)

    def _rollback_target(self, folder: Path, active: str | None) -> str:
        """The version active before `active`, replaying the history: each activation pushes the version it
        replaced, each rollback pops one."""
        sku = folder.name
        replaced: list[str | None] = []
        current: str | None = None
        for entry in self.history(sku):
            if entry.action == "activate":
                replaced.append(entry.before)
            elif entry.action == "rollback" and replaced:
                replaced.pop()
            if entry.action in ("activate", "rollback"):
                current = entry.after
        if active is None:
            raise DataError(f"SKU {sku!r} has no active version, so there is nothing to roll back; `inspector sku "
                            f"activate --sku {sku} VERSION` makes one active")
        if current != active:
            raise DataError(f"{folder / HISTORY_FILE} ends at version {current}, but {folder / ACTIVE_LINK} points "
                            f"at {active}: choose the version yourself with `inspector sku activate --sku {sku} "
                            "VERSION`")
        if not replaced or replaced[-1] is None:
            raise DataError(f"SKU {sku!r}: no version was active before {active}, so there is nothing to roll back "
                            f"to; `inspector sku list --sku {sku}` shows the versions to activate")
        return replaced[-1]

    def _version(self, sku: str, folder: Path, active: bool) -> Version:
        """The Version of a version folder, from its record (fields "unknown" when the record is unreadable)."""
        try:
            record = json.loads((folder.parent / f"{folder.name}.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            record = {}
        fields = {name: record.get(name, "unknown") for name in ("hash", "created", "installed", "origin")}
        return Version(id=folder.name, sku=sku, files=int(record.get("files", 0)), bytes=int(record.get("bytes", 0)),
                       source=str(record.get("source", "")), actor=str(record.get("actor", "")),
                       details=dict(record.get("details", {})), path=folder, active=active, **fields)


def _checked_id(version: str) -> str:
    """`version` when it has the form of a version id; DataError otherwise."""
    if not _VERSION_ID.match(version):
        raise DataError(f"{version!r} is not a version id ({ID_LENGTH} hex digits, as `inspector sku list` shows)")
    return version


def _read_active(folder: Path) -> str | None:
    """The version id <folder>/active points at, None when there is no link; DataError when it is not one."""
    link = folder / ACTIVE_LINK
    try:
        target = os.readlink(link)
    except FileNotFoundError:
        return None
    except OSError:
        raise DataError(f"{link} is not a symlink; move it away (the store swaps it as a link to "
                        f"{VERSIONS_DIR}/<id>)") from None
    return Path(target).name


def _append(folder: Path, entry: HistoryEntry) -> None:
    """Append one line to history.jsonl, written in one call and synced."""
    fd = os.open(folder / HISTORY_FILE, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (entry.to_json() + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)

