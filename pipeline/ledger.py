"""The Batch API ledger: which input files a job wrote, uploaded and submitted, and what became of them.

Input files are written while the estimate renders the rows (``BatchStage``), so a batch run renders its input
once: they are staged in a folder of their own, and become parts of the ledger only when the run goes ahead
(``commit``); a declined estimate or a killed run leaves nothing the next run would submit. The stage also
records each row's request key, so the output is written from the journal without rendering again.

The ledger shares the journal's SQLite file and connection, so collecting a batch (its outcomes and its "collected"
mark) is one transaction: a kill during collection leaves the batch uncollected, and the rerun reads its
results again. Every step is recorded the moment it happens, so a run killed anywhere never submits a file
twice.
"""

from __future__ import annotations

import json
import shutil
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.endpoints import endpoint_of
from pipeline.errors import OutputError
from pipeline.journal import Journal
from pipeline.keys import key_id
from pipeline.outcome import Outcome
from pipeline.providers.base import Codec
from pipeline.rendered import RenderedChunk
from pipeline.spec import BatchSpec, RequestSpec

_CREATE = """
CREATE TABLE IF NOT EXISTS batch_parts (
    part INTEGER PRIMARY KEY, path TEXT, requests INTEGER, bytes INTEGER, file_id TEXT, batch_id TEXT,
    status TEXT, counts TEXT, output_file_id TEXT, error_file_id TEXT, created_at REAL, collected INTEGER
);
CREATE TABLE IF NOT EXISTS batch_items (key TEXT PRIMARY KEY, part INTEGER);
"""
_PART_COLUMNS = ("part, path, requests, bytes, file_id, batch_id, status, counts, output_file_id, error_file_id, "
                 "created_at, collected, submitted_at, collected_at")
_ADDED_COLUMNS = ("submitted_at", "collected_at")  # a ledger made before they were added gets them on open


@dataclass(frozen=True)
class BatchPart:
    """One Batch API input file of a job and what became of it: written locally, uploaded, submitted as a
    batch, then collected (its results are outcomes). Recorded at each step, so a rerun picks up where the
    last one stopped and never submits a file twice."""

    part: int
    path: str
    requests: int
    bytes: int
    file_id: str | None = None
    batch_id: str | None = None
    status: str | None = None          # the provider's batch status
    counts: str | None = None          # the provider's request_counts, as JSON
    output_file_id: str | None = None
    error_file_id: str | None = None
    created_at: float | None = None    # when the input file was written
    collected: bool = False
    submitted_at: float | None = None  # when its batch was created at the provider
    collected_at: float | None = None  # when its results were collected


def _part(row: Sequence[Any]) -> BatchPart:
    values = list(row)
    values[11] = bool(values[11])
    return BatchPart(*values)


class BatchLedger:
    """The batch parts of one job, stored beside its journal's outcomes."""

    def __init__(self, journal: Journal) -> None:
        self._journal = journal
        self._db = journal.db
        self._db.executescript(_CREATE)
        have = {str(r[1]) for r in self._db.execute("PRAGMA table_info(batch_parts)")}
        for name in (c for c in _ADDED_COLUMNS if c not in have):
            self._db.execute(f"ALTER TABLE batch_parts ADD COLUMN {name} REAL")

    def add_part(self, path: str, keys: Sequence[str], size: int) -> BatchPart:
        """Record a written batch input file and the request keys in it, in one transaction."""
        with self._journal.transaction():
            cur = self._db.execute("INSERT INTO batch_parts (path, requests, bytes, created_at, collected) "
                                   "VALUES (?, ?, ?, ?, 0)", (path, len(keys), size, time.time()))
            part = int(cur.lastrowid or 0)
            self._db.executemany("INSERT OR REPLACE INTO batch_items VALUES (?, ?)", ((k, part) for k in keys))
        return self._get(part)

    def update_part(self, part: int, **values: Any) -> BatchPart:
        """Record what the provider said about a part (its file id, batch id, status, counts)."""
        names = ", ".join(f"{k} = ?" for k in values)
        with self._journal.transaction():
            self._db.execute(f"UPDATE batch_parts SET {names} WHERE part = ?", (*values.values(), part))
        return self._get(part)

    def part(self, part: int) -> BatchPart | None:
        """One part by number."""
        row = self._db.execute(f"SELECT {_PART_COLUMNS} FROM batch_parts WHERE part = ?", (part,)).fetchone()
        return None if row is None else _part(row)

    def _get(self, part: int) -> BatchPart:
        found = self.part(part)
        assert found is not None
        return found

    def parts(self, *, active: bool = False) -> list[BatchPart]:
        """Every part in order; with ``active``, those whose results are not collected yet."""
        where = " WHERE collected = 0" if active else ""
        rows = self._db.execute(f"SELECT {_PART_COLUMNS} FROM batch_parts{where} ORDER BY part")
        return [_part(r) for r in rows]

    def part_keys(self, part: int) -> list[str]:
        """The request keys a part carries."""
        return [str(r[0]) for r in self._db.execute("SELECT key FROM batch_items WHERE part = ?", (part,))]

    def drop_part(self, part: int) -> None:
        """Forget a part that never reached the provider (its local file is gone): its rows are planned again."""
        with self._journal.transaction():
            self._db.execute("DELETE FROM batch_items WHERE part = ?", (part,))
            self._db.execute("DELETE FROM batch_parts WHERE part = ?", (part,))

    def collect_part(self, part: int, outcomes: Sequence[Outcome]) -> None:
        """Record a finished batch's outcomes and mark it collected, in one transaction: a kill during
        collection leaves it uncollected, and the rerun downloads its results again."""
        with self._journal.transaction():
            self._journal.insert(outcomes)
            self._db.execute("UPDATE batch_parts SET collected = 1, collected_at = ? WHERE part = ?",
                             (time.time(), part))


def describe_part(part: BatchPart) -> str:
    """One line per batch, for people: its id, status and request counts."""
    counts = json.loads(part.counts) if part.counts else {}
    total = counts.get("total") or part.requests
    done = f"{counts.get('completed', 0):,}/{total:,} done, {counts.get('failed', 0):,} failed"
    state = part.status or ("uploaded" if part.file_id else "written")
    collected = ", collected" if part.collected else ""
    return f"part {part.part}: {part.batch_id or part.file_id or Path(part.path).name} {state} ({done}){collected}"


_DIGEST = 16  # request keys are 16-byte digests (hex in the journal)


class _PartFile:
    """A Batch input file being written: lines go to disk as they come, so memory holds keys, not bodies."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / f"part-{uuid.uuid4().hex[:12]}.jsonl"
        try:
            self._fh = self.path.open("wb")
        except OSError as e:
            raise OutputError(f"{folder}: cannot write a batch input file: {e.strerror}") from None
        self.keys = bytearray()  # the request keys as binary digests: 16 bytes a request
        self.size = 0

    @property
    def count(self) -> int:
        return len(self.keys) // _DIGEST

    def add(self, digest: bytes, line: bytes) -> None:
        try:
            self._fh.write(line)
        except OSError as e:
            raise OutputError(f"{self.path}: cannot write a batch input file: {e.strerror}") from None
        self.keys += digest
        self.size += len(line)

    def close(self) -> None:
        try:
            self._fh.close()
        except OSError as e:
            raise OutputError(f"{self.path}: cannot write a batch input file: {e.strerror}") from None

    def hex_keys(self) -> list[str]:
        k = bytes(self.keys)
        return [k[i:i + _DIGEST].hex() for i in range(0, len(k), _DIGEST)]


class BatchStage:
    """The estimate pass's other half in Batch API mode: every row not yet answered or in a batch is written
    to a staged input file (split under the provider's limits), and every row's request key is kept (16 bytes
    a row) for writing the output later."""

    def __init__(self, request: RequestSpec, batch: BatchSpec, codec: Codec, folder: Path,
                 in_batches: set[int]) -> None:
        self.request, self.batch, self.codec, self.in_batches = request, batch, codec, in_batches
        self.folder = folder
        self._staging = folder / f"staging-{uuid.uuid4().hex[:8]}"
        for old in folder.glob("staging-*"):  # a run killed before it committed: nothing of it was submitted
            shutil.rmtree(old, ignore_errors=True)
        self._files: list[_PartFile] = []
        self._open: _PartFile | None = None
        self._seen: set[int] = set()
        self._row_keys = bytearray()
        self.skipped: dict[int, tuple[str, str | None]] = {}  # row -> (reason, error type)
        self.refused: list[Outcome] = []

    def __call__(self, chunk: RenderedChunk) -> None:
        """Stage one rendered chunk (called by the estimate pass, in input order)."""
        spec, endpoint, request = self.batch, self.request.endpoint, self.request
        refuse = endpoint_of(endpoint).refuse_staged
        top = max([r.row for r in chunk.requests] + [s.row for s in chunk.skipped], default=-1)
        if (grow := (top + 1) * _DIGEST - len(self._row_keys)) > 0:
            self._row_keys += bytes(grow)
        for s in chunk.skipped:
            self.skipped[s.row] = (s.reason, s.error_type)
        for req in chunk.requests:
            digest = bytes.fromhex(req.key)
            self._row_keys[req.row * _DIGEST:(req.row + 1) * _DIGEST] = digest
            kid = key_id(req.key)
            if req.key in chunk.settled or kid in self.in_batches or kid in self._seen:
                continue
            self._seen.add(kid)
            refused = refuse(req.key, req.prompt_tokens, request)
            if refused is not None:  # fails alone, before anything is sent: it must not fail its file
                self.refused.append(refused)
                continue
            line = self.codec.batch_line(req.key, req.body)
            f = self._open
            if f is not None and (f.count >= spec.max_requests_per_file
                                  or f.size + len(line) > spec.max_bytes_per_file):
                f.close()
                f = self._open = None
            if f is None:
                if not self._files:
                    try:
                        self._staging.mkdir(parents=True, exist_ok=True)
                    except OSError as e:
                        raise OutputError(f"{self._staging}: cannot write a batch input file: {e.strerror}") from None
                f = self._open = _PartFile(self._staging)
                self._files.append(f)
            f.add(digest, line)

    def key_of(self, row: int) -> str | None:
        """The request key of the row at ``row`` (None for a skipped row)."""
        digest = bytes(self._row_keys[row * _DIGEST:(row + 1) * _DIGEST])
        return None if row in self.skipped or not any(digest) else digest.hex()

    def commit(self, journal: Journal) -> None:
        """The run goes ahead: the rows refused before sending are recorded, the last file is closed."""
        if self._open is not None:
            self._open.close()
            self._open = None
        for o in self.refused:
            journal.add(o)
        journal.flush()
        self.refused = []

    def next_part(self, ledger: BatchLedger) -> BatchPart | None:
        """The next staged file, made a part of the ledger (just before it is submitted, so a kill leaves at
        most one part not yet a batch); None when every file is a part."""
        if not self._files:
            return None
        f = self._files.pop(0)
        final = self.folder / f.path.name
        try:
            f.path.replace(final)
        except OSError as e:
            raise OutputError(f"{final}: cannot move a batch input file: {e.strerror}") from None
        return ledger.add_part(str(final), f.hex_keys(), f.size)

    def discard(self) -> None:
        """The run does not go ahead: the staged files are removed."""
        if self._open is not None:
            self._open.close()
        shutil.rmtree(self._staging, ignore_errors=True)
        self._files, self._open = [], None
