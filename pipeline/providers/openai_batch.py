"""OpenAI's Batch API: the Files and Batches endpoints, the input line format and the result lines.

A handful of calls a minute, so a plain synchronous httpx client; every call retries transient trouble with
the same policy as the online requests (``retry.RetryPolicy``). Azure OpenAI's Batch API is the same flow.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
import orjson
from tenacity import Retrying

from pipeline.errors import ProviderError, RowError, TransientError
from pipeline.providers.base import BatchResult, BatchState
from pipeline.providers.openai_wire import BATCH_URLS, classify, raise_for_status
from pipeline.redact import redact
from pipeline.retry import RetryPolicy, transport_error

T = TypeVar("T")
FINAL = frozenset({"completed", "failed", "expired", "cancelled"})


def batch_line(key: str, url: str, body: bytes) -> bytes:
    """One request of a Batch input file to ``url`` (``/v1/chat/completions``): ``custom_id`` is the request
    key, so results join back to rows however the provider orders them."""
    return (b'{"custom_id":"' + key.encode() + b'","method":"POST","url":"' + url.encode()
            + b'","body":' + body + b"}\n")


def batch_result(raw: bytes, read: Callable[[Any], Any]) -> BatchResult | None:
    """One line of a results (or errors) file, its answer read by ``read`` (the endpoint's reader of a parsed
    body); None for a line that is not a result of ours."""
    try:
        line = orjson.loads(raw)
        key = str(line["custom_id"])
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return None
    resp = line.get("response")
    if not isinstance(resp, dict):  # never executed: the batch expired or was cancelled first
        err = line.get("error") if isinstance(line.get("error"), dict) else {}
        code = str(err.get("code") or "batch_error")
        cls = TransientError if code == "batch_expired" else RowError
        return BatchResult(key, error=cls(str(err.get("message") or code), kind=code), attempts=0)
    body = resp.get("body")
    try:
        status = int(resp.get("status_code") or 0)
        if status != 200:
            raise_for_status(status, {}, orjson.dumps(body))
        answer = read(body)
    except ProviderError as e:  # the line's own error, as its status code classes it
        return BatchResult(key, error=e)
    return BatchResult(key, answer=answer)


def batch_state(b: dict[str, Any]) -> BatchState:
    """An OpenAI (or Azure) batch object as a ``BatchState``."""
    errors = (b.get("errors") or {}).get("data") or []
    return BatchState(
        id=str(b["id"]), status=str(b.get("status")), counts=dict(b.get("request_counts") or {}),
        output_file_id=b.get("output_file_id"), error_file_id=b.get("error_file_id"),
        created_at=float(b.get("created_at") or 0), input_file_id=b.get("input_file_id"),
        errors=tuple(f"{e.get('code')}: {e.get('message')}" + (f" (line {e['line']})" if e.get("line") else "")
                     for e in errors))


class BatchClient:
    """The Files and Batches endpoints, for Batch API mode: a handful of calls a minute, so a plain
    synchronous httpx client; every call retries transient trouble like the online requests do.

    ``with BatchClient(base_url, headers, key, timeout_s=60, max_attempts=6) as api: api.upload(path, name)``.
    ``headers`` carry the auth (the provider's), ``params`` go on every call (Azure's ``api-version``), and
    ``urls`` are the endpoint names a batch is created for.
    """

    def __init__(self, base_url: str, headers: dict[str, str], api_key: str | None, *, timeout_s: float,
                 max_attempts: int, urls: dict[str, str] | None = None, params: dict[str, str] | None = None,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        headers = {k: v for k, v in headers.items() if k.lower() != "content-type"}  # uploads are multipart
        self._key, self._timeout_s, self._urls = api_key, timeout_s, urls or BATCH_URLS
        self._client = httpx.Client(base_url=base_url.rstrip("/"), headers=headers, params=params,
                                    timeout=httpx.Timeout(timeout_s, connect=min(10.0, timeout_s)))
        self._policy, self._sleep = RetryPolicy(max_attempts), sleep

    def __enter__(self) -> BatchClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self._client.close()

    def retrying(self) -> Retrying:
        """The retry policy of these calls (transient errors only, honouring retry-after)."""
        return self._policy.synchronous(self._sleep)

    def retried(self, call: Callable[[], T]) -> T:
        """``call()`` under the retry policy."""
        for attempt in self.retrying():
            with attempt:
                return call()
        raise AssertionError("unreachable")  # pragma: no cover

    @contextlib.contextmanager
    def _errors(self, method: str, path: str) -> Iterator[None]:
        """Transport failures become TransientError; every error names the call, with the key redacted."""
        try:
            yield
        except httpx.TransportError as e:
            raise transport_error(e, self._timeout_s, lambda t: redact(t, self._key), f"{method} {path}") from None
        except ProviderError as e:
            e.args = (redact(f"{method} {path}: {e}", self._key),)
            raise

    @staticmethod
    def _json(status: int, headers: Any, content: bytes) -> dict[str, Any]:
        """A JSON object answer, or the error class of the response (the provider's error table)."""
        return classify(status, headers, content, _json_object)  # type: ignore[no-any-return]

    def _once(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        with self._errors(method, path):
            resp = self._client.request(method, path, **kwargs)
            return self._json(resp.status_code, resp.headers, resp.content)

    def call(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        """One JSON call, retried on transient errors; raises RowError/AbortError for the rest."""
        return self.retried(lambda: self._once(method, path, **kwargs))

    def upload(self, path: Path, filename: str) -> str:
        """Upload a Batch input file (``purpose = batch``); returns its file id."""
        def send() -> dict[str, Any]:
            with path.open("rb") as fh:  # reopened on each try: a retry must send the whole file again
                return self._once("POST", "/files", data={"purpose": "batch"},
                                  files={"file": (filename, fh, "application/jsonl")})

        return str(self.retried(send)["id"])

    def create(self, file_id: str, endpoint: str, metadata: dict[str, str]) -> BatchState:
        """Create a batch of ``endpoint`` requests (``chat``, ``embeddings``); one try: the caller checks for a
        batch already made before trying again."""
        return batch_state(self._once("POST", "/batches", json={
            "input_file_id": file_id, "endpoint": self._urls[endpoint], "completion_window": "24h",
            "metadata": metadata}))

    def find(self, input_file_id: str, since: float, taken: frozenset[str] = frozenset()) -> BatchState | None:
        """The batch made from ``input_file_id``, if there is one: batches are listed newest first, so the
        search stops at the first batch created before ``since``. (The file id says it exactly: ``taken``,
        the batches the ledger already holds, matters to providers without one.)"""
        after: str | None = None
        while True:
            params = {"limit": "100", **({"after": after} if after else {})}
            page = self.call("GET", "/batches", params=params)
            data = page.get("data") or []
            for b in data:
                if b.get("input_file_id") == input_file_id:
                    return batch_state(b)
            if not page.get("has_more") or not data or (data[-1].get("created_at") or 0) < since - 60:
                return None
            after = data[-1].get("id")

    def retrieve(self, batch_id: str) -> BatchState:
        """The batch (status, request counts, output and error file ids)."""
        return batch_state(self.call("GET", f"/batches/{batch_id}"))

    def cancel(self, batch_id: str) -> BatchState:
        """Ask the provider to cancel; finished lines stay in its output file."""
        return batch_state(self.call("POST", f"/batches/{batch_id}/cancel"))

    def lines(self, file_id: str) -> Iterator[bytes]:
        """The lines of a file's content, streamed (output files can be hundreds of MB)."""
        return self._stream(f"/files/{file_id}/content")

    def _stream(self, path: str) -> Iterator[bytes]:
        with self._errors("GET", path), self._client.stream("GET", path) as resp:
            if resp.status_code != 200:
                resp.read()
                self._json(resp.status_code, resp.headers, resp.content)
            buf = b""
            for chunk in resp.iter_bytes():
                buf += chunk
                *complete, buf = buf.split(b"\n")
                yield from (line for line in complete if line.strip())
            if buf.strip():
                yield buf


def _json_object(body: bytes, headers: Any) -> dict[str, Any]:
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        data = None
    if not isinstance(data, dict):
        raise TransientError("HTTP 200 with a body that is not a JSON object", kind="malformed_response", status=200)
    return data
