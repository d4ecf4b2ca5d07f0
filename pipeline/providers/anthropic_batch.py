"""Anthropic's Message Batches: inline requests, no file upload; results streamed as JSONL in any order.

The batch runner (``batch.py``) speaks one flow for every provider: upload a file, create a batch from it,
find a batch already made from it, poll, read its result lines. Here "uploading" is local (the staged file
is the batch's request list, sent inline when the batch is created), and the batch objects are presented in
the runner's terms: ``processing_status`` (``in_progress``, ``canceling``, ``ended``) as a status, and the
request counts as total / completed / failed; an ended batch's results are its "output file".

Finding a batch already made: Message Batches carry no metadata and no input file id, so a create whose
reply was lost (or a run killed while creating) is matched by what a batch does show: created after the part
was recorded (less a minute of clock skew), with exactly the part's number of requests, and not a batch the
ledger already holds. Two such batches would be ambiguous; then none is taken and the part is created again
(the only way this tool could submit twice, and only if two unrecorded batches of the same size were made
in that minute).
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson

from pipeline.errors import ProviderError, RowError, TransientError
from pipeline.providers.anthropic_wire import PATHS, TRANSIENT_TYPES, message_answer, raise_for_status
from pipeline.providers.base import BatchResult, BatchState
from pipeline.providers.openai_batch import BatchClient, _json_object

LOCAL = "local:"  # a "file id" that is the staged file itself: nothing is uploaded


def _timestamp(value: Any) -> float:
    try:
        return datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return 0.0


def batch_state(b: dict[str, Any]) -> BatchState:
    """A Message Batch as a ``BatchState``: ended is completed, cancelled or expired by what ended it; its result
    lines are read from the batch itself (its id stands for the output file)."""
    counts = b.get("request_counts") or {}
    n = {k: int(counts.get(k) or 0) for k in ("processing", "succeeded", "errored", "canceled", "expired")}
    ps = b.get("processing_status")
    if ps == "ended":
        status = "cancelled" if b.get("cancel_initiated_at") else "expired" if n["expired"] else "completed"
    else:
        status = "cancelling" if ps == "canceling" else "in_progress"
    return BatchState(id=str(b["id"]), status=status, created_at=_timestamp(b.get("created_at")),
                      counts={"total": sum(n.values()), "completed": n["succeeded"],
                              "failed": n["errored"] + n["canceled"] + n["expired"]},
                      output_file_id=str(b["id"]) if ps == "ended" else None)


class MessageBatchClient(BatchClient):
    """``/v1/messages/batches``: create (inline), list, retrieve, cancel, results; retried like any call."""

    @staticmethod
    def _json(status: int, headers: Any, content: bytes) -> dict[str, Any]:
        if status != 200:
            raise_for_status(status, headers, content)
        return _json_object(content, headers)

    def upload(self, path: Path, filename: str) -> str:
        """Nothing to upload: the requests go inline when the batch is created."""
        return LOCAL + str(path)

    def create(self, file_id: str, endpoint: str, metadata: dict[str, str]) -> BatchState:
        """Create the batch of a staged file's requests (one try: the caller looks for a batch already made
        before trying again)."""
        lines = [line for line in Path(file_id.removeprefix(LOCAL)).read_bytes().split(b"\n") if line.strip()]
        body = b'{"requests":[' + b",".join(lines) + b"]}"
        return batch_state(self._once("POST", PATHS["batches"], content=body,
                                     headers={"Content-Type": "application/json"}))

    def find(self, input_file_id: str, since: float, taken: frozenset[str] = frozenset()) -> BatchState | None:
        """The one batch that can be the staged file's, if there is one (see the module's docstring)."""
        path = Path(input_file_id.removeprefix(LOCAL))
        if not path.exists():
            return None
        n = sum(1 for line in path.read_bytes().split(b"\n") if line.strip())
        found: list[BatchState] = []
        after: str | None = None
        while True:
            page = self.call("GET", PATHS["batches"], params={"limit": "100", **({"after_id": after} if after else {})})
            data = [batch_state(b) for b in page.get("data") or []]
            found += [b for b in data if b.created_at >= since - 60 and b.counts["total"] == n and b.id not in taken]
            if not page.get("has_more") or not data or data[-1].created_at < since - 60:
                break
            after = page.get("last_id") or data[-1].id
        return found[0] if len(found) == 1 else None

    def retrieve(self, batch_id: str) -> BatchState:
        """The batch, with its status and request counts."""
        return batch_state(self.call("GET", f"{PATHS['batches']}/{batch_id}"))

    def cancel(self, batch_id: str) -> BatchState:
        """Ask Anthropic to cancel; what ended stays in its results."""
        return batch_state(self.call("POST", f"{PATHS['batches']}/{batch_id}/cancel"))

    def lines(self, file_id: str) -> Iterator[bytes]:
        """An ended batch's result lines (its "output file" is the batch itself), streamed."""
        return self._stream(f"{PATHS['batches']}/{file_id}/results")


def _error(result: dict[str, Any]) -> ProviderError:
    err = (result.get("error") or {}).get("error") or result.get("error") or {}
    type_, message = str(err.get("type") or "api_error"), str(err.get("message") or "no error message")
    cls = TransientError if type_ in TRANSIENT_TYPES else RowError
    return cls(f"{type_}: {message}", kind=type_)


def batch_result(raw: bytes, *, user_tools: bool = False) -> BatchResult | None:
    """One result line: ``{custom_id, result: {type: succeeded|errored|canceled|expired, ...}}``."""
    try:
        line = orjson.loads(raw)
        key, result = str(line["custom_id"]), line["result"]
        kind = result["type"]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return None
    if kind == "succeeded":
        try:
            return BatchResult(key, answer=message_answer(result.get("message"), user_tools=user_tools))
        except ProviderError as e:
            return BatchResult(key, error=e)
    if kind == "errored":
        return BatchResult(key, error=_error(result))
    if kind == "expired":  # never executed: worth another batch on a plain rerun
        return BatchResult(key, error=TransientError("the batch expired before this request ran",
                                                     kind="batch_expired"), attempts=0)
    return BatchResult(key, error=RowError("the batch was canceled before this request ran",
                                           kind="batch_cancelled"), attempts=0)
