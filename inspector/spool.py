"""Durable on-disk queue of outgoing MQTT records: nothing the line produced is lost to a broker outage.

Layout under the spool directory (one process at a time: exclusive flock on `lock`): segment files
`<first seq>.jsonl`, one JSON line per record `{"seq": n, "ng": bool, "msgs": [[topic, base64 payload],
...]}`, and beside each an `<first seq>.acks` file listing, one per line, the seqs that were acknowledged
(every message PUBACKed) or dropped.

Durability: a record is written, flushed and fsync'ed before append() returns (a power cut after that
cannot lose it); ack lines are flushed but not fsync'ed, so a crash may forget an ack and the record is
sent again. Delivery is therefore at-least-once: a consumer de-duplicates verdicts by
(frame_id, t_acquired). A torn last line (crash mid-write) is cut off on start-up.

Bound: `max_bytes` caps the bytes of records not yet acknowledged. When an append would exceed it, the
oldest unsent OK (ng=false) records are dropped first and NG records only when no OK record is left; each
drop is logged (`spool_dropped`) and counted. Records already handed to the client are never dropped.
Segments whose records are all acknowledged are deleted (rotation at `segment_bytes`).
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from foundation.errors import ConfigError
from foundation.log import get_logger

log = get_logger(__name__)


@dataclass
class _Entry:
    """Where one record lives on disk."""

    seq: int
    ng: bool
    segment: int
    offset: int
    length: int


@dataclass
class _Segment:
    """One segment file, its ack file and how many of its records are still unacknowledged."""

    data: Path
    acks: Path
    live: int = 0
    size: int = 0
    ack_file: IO[str] | None = None


class Spool:
    """Append-only, fsync'ed record queue with per-record acknowledgement, ordered re-delivery and a size cap."""

    def __init__(self, directory: Path, max_bytes: int, *, segment_bytes: int | None = None, fsync: bool = True):
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
        self.segment_bytes = segment_bytes or min(8 << 20, max(64 << 10, max_bytes // 8))
        self._fsync = fsync
        self._lock = threading.Lock()
        self._segments: dict[int, _Segment] = {}
        self._unsent_ok: OrderedDict[int, _Entry] = OrderedDict()
        self._unsent_ng: OrderedDict[int, _Entry] = OrderedDict()
        self._inflight: dict[int, _Entry] = {}
        self._live_bytes = 0
        self._next_seq = 1
        self._active: int | None = None
        self._writer: IO[bytes] | None = None
        self.dropped_ok = 0
        self.dropped_ng = 0
        self._load()

    def _load(self) -> None:
        """Rebuild the index from the segment files; every unacknowledged record becomes unsent, in order."""
        segments = [p for p in self.directory.glob("*.jsonl") if p.stem.isdigit()]
        for data in sorted(segments, key=lambda p: int(p.stem)):
            first = int(data.stem)
            segment = _Segment(data, data.with_suffix(".acks"))
            acked = _read_acks(segment.acks)
            good_end = 0
            with data.open("rb") as f:
                for line in f:
                    try:
                        record = json.loads(line) if line.endswith(b"\n") else None
                    except ValueError:
                        record = None
                    if record is None:
                        log.warning("spool_torn_record", file=str(data), offset=good_end)
                        break
                    seq = int(record["seq"])
                    self._next_seq = max(self._next_seq, seq + 1)
                    if seq not in acked:
                        entry = _Entry(seq, bool(record["ng"]), first, good_end, len(line))
                        (self._unsent_ng if entry.ng else self._unsent_ok)[seq] = entry
                        self._live_bytes += entry.length
                        segment.live += 1
                    good_end += len(line)
            if good_end < data.stat().st_size:
                os.truncate(data, good_end)
            segment.size = good_end
            self._segments[first] = segment
            if segment.live == 0:
                self._delete_segment(first)
        if self.unacked():
            log.info("spool_backlog", records=self.unacked(), bytes=self._live_bytes, dir=str(self.directory))

    def append(self, messages: list[tuple[str, bytes]], *, ng: bool) -> int:
        """Durably store one record (its MQTT messages as (topic, payload)); returns its seq."""
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
            writer, first, segment = self._writer_for(seq)
            offset = segment.size
            writer.write(line)
            writer.flush()
            if self._fsync:
                os.fsync(writer.fileno())
            segment.size += len(line)
            segment.live += 1
            entry = _Entry(seq, ng, first, offset, len(line))
            (self._unsent_ng if ng else self._unsent_ok)[seq] = entry
            self._live_bytes += len(line)
            return seq

    def take_next(self) -> tuple[int, list[tuple[str, bytes]]] | None:
        """The oldest unsent record as (seq, messages), now counted as in flight; None when all are sent."""
        with self._lock:
            heads = [q for q in (self._unsent_ok, self._unsent_ng) if q]
            if not heads:
                return None
            queue = min(heads, key=lambda q: next(iter(q)))
            _, entry = queue.popitem(last=False)
            self._inflight[entry.seq] = entry
            path = self._segments[entry.segment].data
        with path.open("rb") as f:
            f.seek(entry.offset)
            record = json.loads(f.read(entry.length))
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

    def stats(self) -> dict[str, int]:
        """Counters for the status topic."""
        return {
            "pending": self.unacked(),
            "bytes": self._live_bytes,
            "dropped_ok": self.dropped_ok,
            "dropped_ng": self.dropped_ng,
        }

    def close(self) -> None:
        """Close the open files; the on-disk state stays for the next start."""
        with self._lock:
            if self._writer is not None:
                self._writer.close()
                self._writer = None
            self._active = None
            for segment in self._segments.values():
                if segment.ack_file is not None:
                    segment.ack_file.close()
                    segment.ack_file = None
            self._lock_file.close()

    def _make_room(self, needed: int) -> None:
        """Drop the oldest unsent OK records, then NG ones, until `needed` more bytes fit under max_bytes."""
        while self._live_bytes + needed > self.max_bytes and (self._unsent_ok or self._unsent_ng):
            ng = not self._unsent_ok
            _, entry = (self._unsent_ng if ng else self._unsent_ok).popitem(last=False)
            if ng:
                self.dropped_ng += 1
            else:
                self.dropped_ok += 1
            log.warning(
                "spool_dropped",
                seq=entry.seq,
                ng=ng,
                dropped_ok=self.dropped_ok,
                dropped_ng=self.dropped_ng,
                max_mb=round(self.max_bytes / 2**20, 3),
            )
            self._retire(entry)

    def _retire(self, entry: _Entry) -> None:
        """Record an ack/drop on disk; delete the segment once it holds no live record and is not being written."""
        segment = self._segments[entry.segment]
        if segment.ack_file is None:
            segment.ack_file = segment.acks.open("a")
        segment.ack_file.write(f"{entry.seq}\n")
        segment.ack_file.flush()
        segment.live -= 1
        self._live_bytes -= entry.length
        if segment.live == 0 and (entry.segment != self._active or self.unacked() == 0):
            self._delete_segment(entry.segment)

    def _writer_for(self, seq: int) -> tuple[IO[bytes], int, _Segment]:
        """The open active segment, rotated to a new file named after `seq` when it is full or gone."""
        active = self._active
        segment = self._segments.get(active) if active is not None else None
        if active is None or segment is None or self._writer is None or segment.size >= self.segment_bytes:
            if self._writer is not None:
                self._writer.close()
                self._writer = None
            if active is not None and segment is not None and segment.live == 0:
                self._delete_segment(active)
            data = self.directory / f"{seq:016d}.jsonl"
            segment = _Segment(data, data.with_suffix(".acks"))
            self._segments[seq] = segment
            self._active = active = seq
            segment.acks.unlink(missing_ok=True)  # a stale ack file must not retire the new records
            self._writer = data.open("ab")
            if self._fsync:
                _fsync_dir(self.directory)
        return self._writer, active, segment

    def _delete_segment(self, first: int) -> None:
        """Remove a fully acknowledged segment and its ack file."""
        segment = self._segments.pop(first)
        if segment.ack_file is not None:
            segment.ack_file.close()
        if first == self._active:
            if self._writer is not None:
                self._writer.close()
            self._writer, self._active = None, None
        segment.acks.unlink(missing_ok=True)  # acks first: a crash in between re-sends, never loses
        segment.data.unlink(missing_ok=True)


def _read_acks(path: Path) -> set[int]:
    """Seqs listed in an ack file; a torn last line is ignored."""
    if not path.exists():
        return set()
    return {int(tok) for tok in path.read_text().split() if tok.isdigit()}


def _fsync_dir(directory: Path) -> None:
    """Persist a new directory entry (the segment file name) across a power cut."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
