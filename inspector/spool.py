"""Durable on-disk queue of outgoing MQTT records: nothing the line produced is lost to a broker outage.

Layout under the spool directory (one process at a time: exclusive flock on `lock`): segment files
`<first seq>.jsonl`, one JSON line per record `{"seq": n, "ng": bool, "msgs": [[topic, base64 payload],
...]}`, and beside each an `<first seq>.acks` file listing, one per line, the seqs that were acknowledged
(every message PUBACKed) or dropped. OK and NG records go to separate segments, so dropping the oldest OK
records frees whole files, i.e. real disk space.

Durability: a record is written, flushed and fsync'ed before append() returns (a power cut after that
cannot lose it); ack lines are written but not fsync'ed, so a crash may forget an ack and the record is
sent again. Delivery is therefore at-least-once: a consumer de-duplicates verdicts by (run_id, frame_id).
On start-up a torn last line (crash mid-write) is cut off, a damaged line elsewhere is skipped with a log
line, and a seq found twice is delivered once.

Disk: free space is checked before every write and `reserve_bytes` are always left free, so ack lines
(which let delivered records be deleted) can still be written on a nearly full disk. A record that cannot
be written (no space, ENOSPC, I/O error) is kept in memory instead and sent in its place in the queue, so
a full disk never stops live delivery; records in memory move to disk as soon as space returns
(`spool_disk_full` / `spool_disk_ok` in the log). Memory holds at most `memory_max_bytes`; beyond that the
oldest unsent OK records are dropped (on disk a whole OK segment at a time, freeing its space), NG records
only when no unsent OK record is left. Records still only in memory when the spool closes are lost; they
are counted (`unsaved`) and logged as `spool_unsaved`.

Accounting (`journal`, rewritten in place in a preallocated 4 KiB file, so a full disk cannot stop it):
frames acquired (`note_acquired`) against records made safe: written to disk, or delivered / dropped
(counted) while only in memory. What a stop leaves only in memory is counted `unsaved`; after a crash
(SIGKILL, OOM kill) the next start reads the journal and counts the difference as `lost_in_crash`
(`verdicts_lost_in_crash` in the log). The journal is not fsync'ed: a power cut may leave an older count.
`holding()` says when records wait in memory that the disk cannot take: the daemon then stops taking
frames until the broker or the disk takes them (docs/operations.md, "Spool disk full").

Bound: `max_bytes` caps the bytes of records not yet acknowledged. When an append would exceed it, the
oldest unsent OK records are dropped first and NG records only when no OK record is left; each drop is
logged (`spool_dropped`) and counted. Records already handed to the client are never dropped. Segments
whose records are all acknowledged are deleted (rotation at `segment_bytes`).
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from foundation.errors import ConfigError
from foundation.files import fsync_path
from foundation.log import get_logger

log = get_logger(__name__)

LOSS_CAUSES = ("dropped_ok", "dropped_ng", "unsaved", "lost_in_crash")  # stats() keys counting lost verdicts
JOURNAL_BYTES = 4096  # one JSON line, space-padded, rewritten at offset 0
RESERVE_BYTES = 256 << 10  # left free on the spool's filesystem for ack lines and directory updates
MEMORY_MAX_BYTES = 32 << 20  # records kept in memory while the disk is full


@dataclass
class _Entry:
    """Where one record lives: a segment file (segment, offset) or, while the disk is full, memory (data)."""

    seq: int
    ng: bool
    length: int
    segment: int | None = None
    offset: int = 0
    data: bytes | None = None


@dataclass
class _Segment:
    """One segment file, its ack file, how many of its records are still unacknowledged, acks not yet written."""

    data: Path
    acks: Path
    ng: bool
    live: int = 0
    size: int = 0
    ack_fd: int | None = None
    ack_size: int = 0
    pending_acks: list[int] = field(default_factory=list)


class Journal:
    """Frames acquired vs verdict records made safe, in a preallocated file rewritten in place (one pwrite of one
    page: a killed process leaves either the old or the new line, never half of it)."""

    def __init__(self, path: Path) -> None:
        try:
            self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o640)
            previous = os.pread(self._fd, JOURNAL_BYTES, 0)
            if len(previous) < JOURNAL_BYTES:
                _write_all(self._fd, bytes(JOURNAL_BYTES - len(previous)))
                os.fsync(self._fd)
        except OSError as exc:
            raise ConfigError(f"mqtt.spool_dir: cannot write the acquisition journal {path} ({exc}); free space "
                              "on the spool's filesystem or fix its permissions") from exc
        self.path = path
        self.previous = _parse_journal(previous)
        self.acquired = self.accounted = 0
        self.closed = False
        self._unwritten = False
        self.write()

    def write(self) -> None:
        """Store the counters (a failure is logged once; the counts in memory stay right)."""
        line = json.dumps({"acquired": self.acquired, "accounted": self.accounted, "closed": self.closed}).encode()
        try:
            os.pwrite(self._fd, line.ljust(JOURNAL_BYTES - 1) + b"\n", 0)
            self._unwritten = False
        except OSError as exc:
            if not self._unwritten:
                log.error("journal_unwritten", file=str(self.path), error=str(exc),
                          detail="a crash now cannot be accounted at the next start")
            self._unwritten = True

    def close(self) -> None:
        """Mark the run closed (its losses were counted by this process) and release the file."""
        self.closed = True
        self.write()
        _close_fd(self._fd)


class Spool:
    """Append-only, fsync'ed record queue with per-record acknowledgement, ordered re-delivery and a size cap."""

    def __init__(self, directory: Path, max_bytes: int, *, segment_bytes: int | None = None, fsync: bool = True,
                 reserve_bytes: int = RESERVE_BYTES, memory_max_bytes: int = MEMORY_MAX_BYTES) -> None:
        self.directory = Path(directory)
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._lock_file = (self.directory / "lock").open("a")
        except OSError as exc:
            raise ConfigError(f"mqtt.spool_dir = {self.directory} is not writable ({exc}); fix the path") from exc
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            self._lock_file.close()
            raise ConfigError(
                f"mqtt.spool_dir = {self.directory} is in use by another running inspector; give each "
                "station its own spool_dir"
            ) from exc
        self.max_bytes = max_bytes
        st = os.statvfs(self.directory)  # small filesystems get small segments: acks free space sooner
        self.segment_bytes = segment_bytes or min(8 << 20, max(64 << 10, max_bytes // 8),
                                                  max(16 << 10, st.f_blocks * st.f_frsize // 16))
        self.reserve_bytes = reserve_bytes
        self.memory_max_bytes = min(memory_max_bytes, max_bytes)
        self._fsync = fsync
        self._lock = threading.Lock()
        self._segments: dict[int, _Segment] = {}
        self._unsent_ok: OrderedDict[int, _Entry] = OrderedDict()
        self._unsent_ng: OrderedDict[int, _Entry] = OrderedDict()
        self._inflight: dict[int, _Entry] = {}
        self._memory: OrderedDict[int, _Entry] = OrderedDict()
        self._memory_bytes = 0
        self._live_bytes = 0
        self._next_seq = 1
        self._active: dict[bool, int] = {}  # ng -> first seq of the segment being written
        self._writers: dict[bool, int] = {}  # ng -> its file descriptor
        self.disk_full: str | None = None  # why records are kept in memory, while they are
        self.dropped_ok = 0
        self.dropped_ng = 0
        self.unsaved = 0
        try:
            self.journal = Journal(self.directory / "journal")
        except ConfigError:
            self._lock_file.close()
            raise
        self.lost_in_crash = self._lost_in_crash(self.journal.previous)
        self._load()

    def _load(self) -> None:
        """Rebuild the index from the segment files; every unacknowledged record becomes unsent, in seq order."""
        entries: dict[int, _Entry] = {}
        for data in sorted((p for p in self.directory.glob("*.jsonl") if p.stem.isdigit()), key=lambda p: int(p.stem)):
            first = int(data.stem)
            segment = _Segment(data, data.with_suffix(".acks"), ng=False)
            acked = _read_acks(segment.acks)
            offset = 0
            for line in data.read_bytes().splitlines(keepends=True):
                record = _parse_record(line)
                if record is None and not line.endswith(b"\n"):
                    log.warning("spool_torn_record", file=str(data), offset=offset, detail="cut off (crash mid-write)")
                    os.truncate(data, offset)
                    break
                if record is None:
                    log.warning("spool_torn_record", file=str(data), offset=offset, detail="damaged line skipped")
                elif record["seq"] in entries or record["seq"] in acked:
                    self._next_seq = max(self._next_seq, record["seq"] + 1)
                else:
                    seq, segment.ng = record["seq"], record["ng"]
                    self._next_seq = max(self._next_seq, seq + 1)
                    entries[seq] = _Entry(seq, segment.ng, len(line), first, offset)
                    segment.live += 1
                    self._live_bytes += len(line)
                offset += len(line)
            segment.size = offset
            self._segments[first] = segment
        for seq in sorted(entries):
            entry = entries[seq]
            (self._unsent_ng if entry.ng else self._unsent_ok)[seq] = entry
        for first in [f for f, s in self._segments.items() if s.live == 0]:
            self._delete_segment(first)
        if self.unacked():
            log.info("spool_backlog", records=self.unacked(), bytes=self._live_bytes, dir=str(self.directory))

    @staticmethod
    def _lost_in_crash(previous: dict[str, Any] | None) -> int:
        """Frames the last run acquired but never made safe, when it ended without closing the spool."""
        if previous is None or previous["closed"]:
            return 0
        lost = max(0, previous["acquired"] - previous["accounted"])
        if lost:
            log.error("verdicts_lost_in_crash", lost=lost, acquired=previous["acquired"],
                      accounted=previous["accounted"],
                      detail="the last run was killed with these verdicts neither stored nor delivered")
        return lost

    # ---- the queue -------------------------------------------------------------------------------------------

    def note_acquired(self) -> None:
        """One more frame acquired: its verdict record is owed (the journal counts it until it is safe)."""
        with self._lock:
            self.journal.acquired += 1
            self.journal.write()

    def note_unspooled(self) -> None:
        """A verdict the spool could not take and that was sent live instead: accounted, as `unspooled`."""
        with self._lock:
            self._account()

    def holding(self) -> bool:
        """True while records wait in memory that the disk cannot take yet (each call retries the disk)."""
        with self._lock:
            return bool(self._memory) and not self._spill()

    def append(self, messages: list[tuple[str, bytes]], *, ng: bool) -> int:
        """Store one record (its MQTT messages as (topic, payload)), on disk when it fits; returns its seq."""
        with self._lock:
            seq = self._next_seq
            self._next_seq += 1
            line = (
                json.dumps(
                    {"seq": seq, "ng": ng, "msgs": [[t, base64.b64encode(p).decode()] for t, p in messages]},
                    separators=(",", ":"),
                ).encode()
                + b"\n"
            )
            self._make_room(len(line))
            entry = _Entry(seq, ng, len(line))
            (self._unsent_ng if ng else self._unsent_ok)[seq] = entry
            self._live_bytes += len(line)
            if not (self._spill() and self._store(entry, line)):
                entry.data = line
                self._memory[seq] = entry
                self._memory_bytes += len(line)
                self._limit_memory()
            return seq

    def take_next(self) -> tuple[int, list[tuple[str, bytes]]] | None:
        """The oldest unsent record as (seq, messages), now counted as in flight; None when all are sent."""
        with self._lock:
            heads = [q for q in (self._unsent_ok, self._unsent_ng) if q]
            if not heads:
                return None
            queue = min(heads, key=lambda q: next(iter(q)))
            _, entry = queue.popitem(last=False)
            line = entry.data
            try:
                if line is None:
                    assert entry.segment is not None
                    with self._segments[entry.segment].data.open("rb") as f:
                        f.seek(entry.offset)
                        line = f.read(entry.length)
            except OSError:
                queue[entry.seq] = entry  # back to the head: retried by the next call
                queue.move_to_end(entry.seq, last=False)
                raise
            self._inflight[entry.seq] = entry
        record = json.loads(line)
        return entry.seq, [(t, base64.b64decode(p)) for t, p in record["msgs"]]

    def ack(self, seq: int) -> None:
        """Mark an in-flight record delivered (all its messages acknowledged by the broker)."""
        with self._lock:
            entry = self._inflight.pop(seq, None)
            if entry is not None:
                self._retire(entry)

    def unacked(self) -> int:
        """Records stored but not yet acknowledged (unsent plus in flight)."""
        return len(self._unsent_ok) + len(self._unsent_ng) + len(self._inflight)

    def has_unsent(self) -> bool:
        """True when take_next() would return a record."""
        return bool(self._unsent_ok or self._unsent_ng)

    def free_bytes(self) -> int:
        """Bytes an unprivileged writer may still use on the spool's filesystem (-1 when unknown)."""
        try:
            st = os.statvfs(self.directory)
        except OSError:
            return -1
        return st.f_bavail * st.f_frsize

    def stats(self) -> dict[str, Any]:
        """Counters for the status topic: what waits, where, and what was lost (dropped, unsaved)."""
        return {
            "pending": self.unacked(),
            "bytes": self._live_bytes,
            "in_memory": len(self._memory),
            "disk_full": self.disk_full is not None,
            "free_mb": round(self.free_bytes() / 2**20, 2),
            "dropped_ok": self.dropped_ok,
            "dropped_ng": self.dropped_ng,
            "unsaved": self.unsaved,
            "lost_in_crash": self.lost_in_crash,
        }

    def close(self) -> None:
        """Move what waits in memory to disk if it fits, NG first (freeing whole OK segments for it); count the
        rest unsaved; write pending acks; close files. Afterwards `unacked()` counts what is on disk."""
        with self._lock:
            self._spill()
            while any(e.ng for e in self._memory.values()) and not self._spill(ng_only=True):
                if not self._drop_oldest_ok_segment():
                    break
            if self._memory:
                ng = sum(e.ng for e in self._memory.values())
                self.unsaved += len(self._memory)
                log.error("spool_unsaved", records=len(self._memory), ng=ng, reason=self.disk_full,
                          detail="the disk was full and the broker did not take them before the stop")
                for entry in self._memory.values():  # gone with this process: off the books
                    for queue in (self._unsent_ok, self._unsent_ng, self._inflight):
                        queue.pop(entry.seq, None)
                    self._live_bytes -= entry.length
                self._memory.clear()
                self._memory_bytes = 0
            owed = self.journal.acquired - self.journal.accounted - self.unsaved
            if owed > 0:  # frames whose verdict never reached the spool (a drain cut short)
                log.error("verdicts_unaccounted", frames=owed, acquired=self.journal.acquired,
                          detail="acquired, but no verdict reached the spool before the stop")
            self.journal.close()
            for segment in self._segments.values():
                if segment.pending_acks:
                    self._write_acks(segment)
                if segment.ack_fd is not None:
                    _close_fd(segment.ack_fd)
                    segment.ack_fd = None
            for fd in self._writers.values():
                _close_fd(fd)
            self._writers.clear()
            self._active.clear()
            self._lock_file.close()

    # ---- disk ------------------------------------------------------------------------------------------------

    def _store(self, entry: _Entry, line: bytes) -> bool:
        """Write a record to its segment when the disk has room; False (disk_full set) when it cannot."""
        free = self.free_bytes()
        if 0 <= free < len(line) + self.reserve_bytes:
            self._note_full(f"{free} bytes free on the spool's filesystem, {self.reserve_bytes} kept in reserve")
            return False
        try:
            self._write(entry, line)
        except OSError as exc:
            self._note_full(f"{type(exc).__name__}: {exc}")
            return False
        if self.disk_full is not None:
            log.info("spool_disk_ok", free_mb=round(free / 2**20, 2), was=self.disk_full)
            self.disk_full = None
        return True

    def _write(self, entry: _Entry, line: bytes) -> None:
        """Append and fsync one line; on failure cut the file back so no torn line is left before later ones."""
        fd, first, segment = self._writer_for(entry.seq, entry.ng)
        offset = segment.size
        try:
            _write_all(fd, line)
            if self._fsync:
                os.fsync(fd)
        except OSError:
            try:
                os.ftruncate(fd, offset)
            except OSError:
                self._close_writer(entry.ng)  # never append after a line that may be torn
            raise
        segment.size += len(line)
        segment.live += 1
        entry.segment, entry.offset = first, offset
        self._account()

    def _account(self) -> None:
        """One more verdict record made safe (on disk, or delivered / dropped from memory)."""
        self.journal.accounted += 1
        self.journal.write()

    def _note_full(self, reason: str) -> None:
        """Log the start of a disk-full episode once; records go to memory until a write succeeds."""
        if self.disk_full is None:
            log.error("spool_disk_full", dir=str(self.directory), reason=reason, backlog=self.unacked(),
                      detail="records wait in memory (sent live when the broker is up) until space returns")
        self.disk_full = reason

    def _spill(self, ng_only: bool = False) -> bool:
        """Move records waiting in memory (NG ones only, with ng_only) to disk, oldest first; True when none of
        them is left in memory."""
        for seq, entry in list(self._memory.items()):
            if ng_only and not entry.ng:
                continue
            assert entry.data is not None
            if not self._store(entry, entry.data):
                return False
            del self._memory[seq]
            self._memory_bytes -= entry.length
            entry.data = None
        return True

    def _limit_memory(self) -> None:
        """Keep memory under memory_max_bytes: drop the oldest unsent OK records (on disk a whole segment, which
        frees its space for the records in memory), NG records only when no unsent OK record is left."""
        while self._memory_bytes > self.memory_max_bytes:
            victim = next((e for e in self._memory.values() if e.seq in self._unsent_ok), None)
            if victim is None:
                if self._drop_oldest_ok_segment():
                    self._spill()
                    continue
                victim = next((e for e in self._memory.values() if e.seq in self._unsent_ng), None)
            if victim is None:
                return  # everything in memory is in flight: the broker has it
            self._drop(victim)

    def _drop_oldest_ok_segment(self) -> bool:
        """Drop the oldest segment whose live records are all unsent OK ones, deleting its file; True if one went."""
        for first in sorted(self._segments):
            segment = self._segments[first]
            victims = [e for e in self._unsent_ok.values() if e.segment == first]
            if not victims or len(victims) != segment.live:
                continue  # empty, or it holds NG or in-flight records
            for entry in victims:
                del self._unsent_ok[entry.seq]
                self._live_bytes -= entry.length
            self.dropped_ok += len(victims)
            log.warning("spool_dropped", seq=victims[0].seq, records=len(victims), ng=False, dropped_ok=self.dropped_ok,
                        dropped_ng=self.dropped_ng, disk_full=True, detail="a whole OK segment, to free disk space")
            self._delete_segment(first)
            return True
        return False

    def _make_room(self, needed: int) -> None:
        """Drop the oldest unsent OK records, then NG ones, until `needed` more bytes fit under max_bytes."""
        while self._live_bytes + needed > self.max_bytes and (self._unsent_ok or self._unsent_ng):
            ng = not self._unsent_ok
            self._drop(next(iter((self._unsent_ng if ng else self._unsent_ok).values())))

    def _drop(self, entry: _Entry) -> None:
        """Give up on an unsent record: count it, log it, retire it."""
        (self._unsent_ng if entry.ng else self._unsent_ok).pop(entry.seq)
        if entry.ng:
            self.dropped_ng += 1
        else:
            self.dropped_ok += 1
        log.warning("spool_dropped", seq=entry.seq, ng=entry.ng, dropped_ok=self.dropped_ok,
                    dropped_ng=self.dropped_ng, max_mb=round(self.max_bytes / 2**20, 3),
                    disk_full=self.disk_full is not None)
        self._retire(entry)

    def _retire(self, entry: _Entry) -> None:
        """Forget an acked/dropped record: memory freed, or an ack line written; empty segments are deleted."""
        self._live_bytes -= entry.length
        if entry.segment is None:
            if self._memory.pop(entry.seq, None) is not None:
                self._memory_bytes -= entry.length
            self._account()
            return
        segment = self._segments[entry.segment]
        segment.live -= 1
        if segment.live > 0:
            segment.pending_acks.append(entry.seq)
            self._write_acks(segment)
            return
        # the segments being written go too when nothing is left to send, or when records wait for disk space
        any_empty = self.unacked() == 0 or bool(self._memory)
        for first in [f for f, s in self._segments.items()
                      if s.live == 0 and (any_empty or f not in self._active.values())]:
            self._delete_segment(first)
        if entry.segment in self._segments:
            segment.pending_acks.append(entry.seq)
            self._write_acks(segment)
        elif self._memory:
            self._spill()

    def _write_acks(self, segment: _Segment) -> None:
        """Append the segment's pending ack lines; on failure keep them pending (retried with the next ack)."""
        data = "".join(f"{seq}\n" for seq in segment.pending_acks).encode()
        try:
            if segment.ack_fd is None:
                segment.ack_fd = os.open(segment.acks, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
                segment.ack_size = os.fstat(segment.ack_fd).st_size
            _write_all(segment.ack_fd, data)
        except OSError as exc:
            if segment.ack_fd is not None:
                try:
                    os.ftruncate(segment.ack_fd, segment.ack_size)
                except OSError:
                    _close_fd(segment.ack_fd)  # a torn ack line could ack the wrong seq: stop using this file
                    segment.ack_fd = None
            if len(segment.pending_acks) == 1:
                log.warning("spool_ack_unwritten", file=str(segment.acks), error=str(exc),
                            detail="kept in memory and retried; a restart before that re-sends these records")
            return
        segment.ack_size += len(data)
        segment.pending_acks.clear()

    def _writer_for(self, seq: int, ng: bool) -> tuple[int, int, _Segment]:
        """The open segment for OK or NG records, rotated to a new file named after `seq` when full or gone."""
        first = self._active.get(ng)
        segment = self._segments.get(first) if first is not None else None
        if first is None or segment is None or ng not in self._writers or segment.size >= self.segment_bytes:
            self._close_writer(ng)
            if first is not None and segment is not None and segment.live == 0:
                self._delete_segment(first)
            data = self.directory / f"{seq:016d}.jsonl"
            data.with_suffix(".acks").unlink(missing_ok=True)  # a stale ack file must not retire new records
            fd = os.open(data, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
            segment = _Segment(data, data.with_suffix(".acks"), ng=ng)
            self._segments[seq] = segment
            self._active[ng], self._writers[ng] = seq, fd
            first = seq
            if self._fsync:
                fsync_path(self.directory)  # the new segment's name survives a power cut
        return self._writers[ng], first, segment

    def _close_writer(self, ng: bool) -> None:
        """Stop writing the current OK or NG segment (the next record starts a new one)."""
        fd = self._writers.pop(ng, None)
        self._active.pop(ng, None)
        if fd is not None:
            _close_fd(fd)

    def _delete_segment(self, first: int) -> None:
        """Remove a segment with no live record, and its ack file."""
        segment = self._segments.pop(first)
        if segment.ack_fd is not None:
            _close_fd(segment.ack_fd)
        for ng, active in list(self._active.items()):
            if active == first:
                self._close_writer(ng)
        try:
            segment.acks.unlink(missing_ok=True)  # acks first: a crash in between re-sends, never loses
            segment.data.unlink(missing_ok=True)
        except OSError as exc:  # the records are delivered; at worst a restart sends them again
            log.warning("spool_segment_not_deleted", file=str(segment.data), error=str(exc))


def _parse_record(line: bytes) -> dict[str, Any] | None:
    """A complete, well-formed record line as {"seq": int, "ng": bool, ...}; None when torn or damaged."""
    if not line.endswith(b"\n"):
        return None
    try:
        record = json.loads(line)
        record["seq"], record["ng"] = int(record["seq"]), bool(record["ng"])
        return record if isinstance(record.get("msgs"), list) else None
    except (ValueError, TypeError, KeyError):
        return None


def _parse_journal(data: bytes) -> dict[str, Any] | None:
    """The journal's counters as {"acquired", "accounted", "closed"}; None for a new or unreadable journal."""
    try:
        record = json.loads(data.rstrip(b"\0").strip() or b"null")
        return {"acquired": int(record["acquired"]), "accounted": int(record["accounted"]),
                "closed": bool(record["closed"])}
    except (ValueError, TypeError, KeyError):
        return None


def _read_acks(path: Path) -> set[int]:
    """Seqs listed in an ack file; only complete lines count (a torn last line is ignored)."""
    try:
        lines = path.read_bytes().split(b"\n")[:-1]
    except FileNotFoundError:
        return set()
    return {int(line) for line in lines if line.isdigit()}


def _write_all(fd: int, data: bytes) -> None:
    """os.write until every byte is written (a short write is retried; an error raises OSError)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _close_fd(fd: int) -> None:
    """Close a descriptor; a late write error reported by close is already handled by the caller's bookkeeping."""
    with contextlib.suppress(OSError):
        os.close(fd)
