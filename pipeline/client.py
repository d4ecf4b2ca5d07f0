"""One request over HTTP, and what its outcome means: ok, retry (after how long), fail the row, or abort the run.

Classifying is a pure function of status, headers and body (``classify``), so every branch of the table in
the design is tested without a server. Sending goes through httpx's transport seam; the default transport is
httpx-aiohttp, because httpx's own pool costs ~3 ms of CPU per request at the concurrency this tool runs at,
and aiohttp's ~0.3 ms (see DESIGN.md).
"""

from __future__ import annotations

import asyncio
import binascii
import contextlib
import ipaddress
import os
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import aiohttp
import httpx
import numpy as np
import orjson
import pybase64
from httpx_aiohttp import AiohttpTransport
from tenacity import RetryCallState, Retrying, retry_if_exception_type, stop_after_attempt
from tenacity.wait import wait_base, wait_random_exponential

from pipeline.errors import AbortError, ProviderError, RowError, TransientError, UsageError
from pipeline.job import Job
from pipeline.pricing import Usage

T = TypeVar("T")
RETRYABLE_STATUS = frozenset({408, 409, 429, 500, 502, 503, 504})
MAX_SERVER_WAIT_S = 120.0  # the SDK's rule: a server asking for longer than this is not worth waiting for
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|us|µs|ns|h|m|s)")
_UNIT_S = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}


@dataclass(frozen=True, slots=True)
class RateInfo:
    """The x-ratelimit-* headers of one response; any may be absent on compatible servers."""

    limit_requests: int | None = None
    limit_tokens: int | None = None
    remaining_requests: int | None = None
    remaining_tokens: int | None = None
    reset_requests_s: float | None = None
    reset_tokens_s: float | None = None


NO_RATE = RateInfo()


@dataclass(frozen=True, slots=True)
class Answer:
    """A successful chat completion, reduced to what the output table needs."""

    content: str | None
    finish_reason: str | None
    refusal: str | None
    model: str | None
    usage: Usage
    rate: RateInfo


def parse_duration(value: str | None) -> float | None:
    """Go-style durations as in x-ratelimit-reset-*: ``20ms``, ``6m0s``, ``1h2m3.5s``."""
    if not value:
        return None
    parts = _DURATION.findall(value)
    if not parts:
        try:
            return float(value)
        except ValueError:
            return None
    return sum(float(n) * _UNIT_S[u] for n, u in parts)


def _int(value: str | None) -> int | None:
    try:
        return int(float(value)) if value is not None else None
    except ValueError:
        return None


def parse_rate(headers: Any) -> RateInfo:
    """The x-ratelimit-* headers of a response (absent ones stay None)."""
    g = headers.get
    return RateInfo(
        limit_requests=_int(g("x-ratelimit-limit-requests")), limit_tokens=_int(g("x-ratelimit-limit-tokens")),
        remaining_requests=_int(g("x-ratelimit-remaining-requests")),
        remaining_tokens=_int(g("x-ratelimit-remaining-tokens")),
        reset_requests_s=parse_duration(g("x-ratelimit-reset-requests")),
        reset_tokens_s=parse_duration(g("x-ratelimit-reset-tokens")),
    )


def retry_after(headers: Any) -> float | None:
    """The wait the server asked for: ``retry-after-ms`` first, then ``retry-after`` (seconds or an HTTP date)."""
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return max(0.0, float(ms) / 1000)
        except ValueError:
            pass
    ra = headers.get("retry-after")
    if ra:
        try:
            return max(0.0, float(ra))
        except ValueError:
            from email.utils import parsedate_to_datetime

            try:
                return max(0.0, parsedate_to_datetime(ra).timestamp() - time.time())
            except (TypeError, ValueError):
                return None
    return None


def _error_fields(body: bytes) -> tuple[str, str | None, str | None]:
    """(message, type, code) of an error body, parsed defensively: compatible servers vary."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        text = body.decode("utf-8", "replace").strip()
        return (text[:300] or "no error message"), None, None
    err = data.get("error") if isinstance(data, dict) else None
    if isinstance(err, dict):
        code = err.get("code")
        return str(err.get("message") or "no error message")[:500], err.get("type"), None if code is None else str(code)
    if isinstance(err, str):
        return err[:500], None, None
    return str(data)[:300], None, None


def classify(status: int, headers: Any, body: bytes, parse: Callable[[bytes, Any], Any] | None = None) -> Any:
    """Turn one HTTP response into an answer (``parse`` reads a 200; a chat completion by default), or raise
    the error class that says what to do about it."""
    if status == 200:
        return (parse or parse_chat)(body, headers)
    raise_for_status(status, headers, body)
    raise AssertionError("unreachable")  # pragma: no cover


def raise_for_status(status: int, headers: Any, body: bytes) -> None:
    """Raise the error class a non-200 response calls for (see the table in DESIGN.md)."""
    message, type_, code = _error_fields(body)
    text = f"HTTP {status}" + (f" {code}" if code else "") + f": {message}"
    should = headers.get("x-should-retry")
    wait = retry_after(headers)
    if status == 429 and "insufficient_quota" in (code, type_):
        raise AbortError(text, kind="insufficient_quota", status=status)
    if status == 401:
        raise AbortError(text, kind="auth", status=status)
    if status == 403:
        raise AbortError(text, kind="permission", status=status)
    if status == 404:
        # Unknown model or a wrong base_url: either way every other row would get the same answer.
        kind = "model_not_found" if code == "model_not_found" else "not_found"
        raise AbortError(text + " (check [request].model and [api].base_url)", kind=kind, status=status)
    retryable = status in RETRYABLE_STATUS if should not in ("true", "false") else should == "true"
    if retryable and (wait is None or wait <= MAX_SERVER_WAIT_S):
        kind = "rate_limit" if status == 429 else "timeout" if status == 408 else "server_error"
        err = TransientError(text, kind=kind, status=status, retry_after=wait)
        err.rate = parse_rate(headers)
        raise err
    kind = "context_length" if code == "context_length_exceeded" else f"http_{status}"
    raise RowError(text, kind=kind, status=status)


def parse_chat(body: bytes, headers: Any) -> Answer:
    """A 200 chat completion; a body that is not the expected JSON is a transient fault (a proxy, a cut stream)."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        data = None
    return chat_answer(data, parse_rate(headers))


def chat_answer(data: Any, rate: RateInfo = NO_RATE) -> Answer:
    """A chat completion already parsed from JSON (a Batch API result line carries it that way)."""
    try:
        choice = data["choices"][0]
        message = choice.get("message") or {}
        u = data.get("usage") or {}
        pd = u.get("prompt_tokens_details") or {}
        cd = u.get("completion_tokens_details") or {}
        usage = Usage(prompt_tokens=int(u.get("prompt_tokens") or 0),
                      completion_tokens=int(u.get("completion_tokens") or 0),
                      cached_tokens=int(pd.get("cached_tokens") or 0),
                      reasoning_tokens=int(cd.get("reasoning_tokens") or 0))
    except (KeyError, IndexError, TypeError, AttributeError, ValueError):
        raise TransientError("HTTP 200 with a malformed body (not a chat completion)", kind="malformed_response",
                             status=200) from None
    return Answer(content=message.get("content"), finish_reason=choice.get("finish_reason"),
                  refusal=message.get("refusal"), model=data.get("model"), usage=usage, rate=rate)


@dataclass(frozen=True, slots=True)
class EmbeddingAnswer:
    """An embeddings response: one float32 vector (little-endian bytes) per input, in input order."""

    vectors: list[bytes]
    prompt_tokens: int
    model: str | None
    rate: RateInfo


def parse_embeddings(body: bytes, headers: Any, n_inputs: int) -> EmbeddingAnswer:
    """A 200 embeddings response, mapped back by ``index`` (the order of ``data`` is not promised)."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        data = None
    return embeddings_answer(data, n_inputs, parse_rate(headers))


def embeddings_answer(data: Any, n_inputs: int, rate: RateInfo = NO_RATE) -> EmbeddingAnswer:
    """An embeddings list already parsed from JSON (as in a Batch API result line)."""
    try:
        vectors: list[bytes | None] = [None] * n_inputs
        for item in data["data"]:
            emb = item["embedding"]
            if isinstance(emb, str):
                # Already float32 little-endian, as the API documents. pybase64 (SIMD) decodes a 256-float
                # vector in 0.5 us against binascii's 3 us: that was a fifth of a batched run's event loop.
                raw = pybase64.b64decode(emb, validate=True)
            else:
                raw = np.asarray(emb, dtype="<f4").tobytes()
            vectors[int(item["index"])] = raw
        usage = data.get("usage") or {}
    except (KeyError, IndexError, TypeError, ValueError, AttributeError, binascii.Error):
        raise TransientError("HTTP 200 with a malformed body (not an embeddings list)", kind="malformed_response",
                             status=200) from None
    if any(v is None for v in vectors):
        raise TransientError(f"embeddings response has {sum(v is not None for v in vectors)} vectors for "
                             f"{n_inputs} inputs", kind="malformed_response", status=200)
    return EmbeddingAnswer(vectors=vectors, prompt_tokens=int(usage.get("prompt_tokens") or 0),  # type: ignore[arg-type]
                           model=data.get("model"), rate=rate)


def redact(text: str, secret: str | None) -> str:
    """Remove the key (and any prefix of it a server echoes back) from a message before anyone sees it."""
    if secret:
        text = text.replace(secret, "[redacted]")
        if len(secret) > 8:
            text = re.sub(re.escape(secret[:6]) + r"[\w*.\-]*", "[redacted]", text)
    return text


def is_loopback(host: str) -> bool:
    """True for localhost and loopback addresses, where a key in clear text never leaves the machine."""
    if host in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _env_proxy(base_url: str) -> httpx.Proxy | None:
    """The HTTP(S)_PROXY that applies to ``base_url`` (honouring NO_PROXY), looked up once per run."""
    import urllib.request

    host = urlsplit(base_url).hostname or ""
    if is_loopback(host) or urllib.request.proxy_bypass(host):
        return None
    proxy = urllib.request.getproxies().get(urlsplit(base_url).scheme)
    return httpx.Proxy(proxy) if proxy else None


def check_transport_security(base_url: str, has_key: bool, allow_insecure: bool) -> None:
    """Refuse to send a key in clear text over a network; loopback (the simulator) is fine."""
    parts = urlsplit(base_url)
    if parts.scheme == "http" and has_key and not allow_insecure and not is_loopback(parts.hostname or ""):
        raise UsageError(f"{base_url}: refusing to send the API key over plain http:// to a host that is not "
                         "loopback; use https:// or pass --allow-insecure")


def resolve_base_url(job: Job, override: str | None) -> str:
    """--base-url, then PIPELINE_BASE_URL, then the job's [api].base_url."""
    url = override or os.environ.get("PIPELINE_BASE_URL") or job.api.base_url
    if not url.startswith(("http://", "https://")):
        raise UsageError(f"base URL must start with http:// or https://, got {url!r}")
    return url.rstrip("/")


def resolve_api_key(job: Job, base_url: str) -> str | None:
    """The key from the environment variable the job names; only a loopback server may go without one."""
    key = os.environ.get(job.api.api_key_env) or None
    if key is None and not is_loopback(urlsplit(base_url).hostname or ""):
        raise UsageError(f"{job.source}: the environment variable {job.api.api_key_env} (named by "
                         f"[api].api_key_env) is not set; export your API key in it")
    return key


class ApiClient:
    """An HTTP client bound to one provider: ``async with ApiClient(...) as c: await c.chat(body)``."""

    def __init__(self, base_url: str, api_key: str | None, *, timeout_s: float, concurrency: int,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self._key = api_key
        self._timeout = timeout_s
        self._concurrency = concurrency
        self._transport = transport
        self._open: httpx.AsyncBaseTransport | None = None

    async def __aenter__(self) -> ApiClient:
        headers = {"Content-Type": "application/json", "Accept": "application/json",
                   "User-Agent": "pipeline/0.1"}
        if self._key:
            headers["Authorization"] = f"Bearer {self._key}"
        self._headers = list(headers.items())
        self._timeouts = httpx.Timeout(self._timeout, connect=min(10.0, self._timeout)).as_dict()
        proxy = _env_proxy(self.base_url)
        # Loading the CA bundle takes ~20 ms: only an https URL (or a proxy, which may be https) needs it.
        tls = proxy is not None or not self.base_url.startswith("http://")
        self._open = self._transport or AiohttpTransport(client=self._session, proxy=proxy, verify=tls)
        self._urls: dict[str, httpx.URL] = {}
        return self

    def _session(self) -> aiohttp.ClientSession:
        # One connection per worker, kept alive. trust_env is off because aiohttp then looks up netrc and proxy
        # settings in a thread on every request; the proxy is resolved once instead (``_env_proxy``).
        connector = aiohttp.TCPConnector(limit=self._concurrency, limit_per_host=self._concurrency,
                                         keepalive_timeout=30, ttl_dns_cache=300)
        return aiohttp.ClientSession(connector=connector, trust_env=False, cookie_jar=aiohttp.DummyCookieJar())

    def url(self, path: str) -> httpx.URL:
        """Parsed once per path: httpx would otherwise parse and merge the URL twice per request."""
        u = self._urls.get(path)
        if u is None:
            u = self._urls[path] = httpx.URL(self.base_url + path)
        return u

    async def __aexit__(self, *exc: object) -> None:
        if self._open is not None:
            await self._open.aclose()

    async def post(self, path: str, body: bytes) -> tuple[int, httpx.Headers, bytes]:
        """Send one body; connection-level failures become TransientError (retried).

        The request goes straight to the transport: httpx.AsyncClient's layers (URL and header merging,
        auth flow, redirects, cookies, event hooks) did nothing for these requests but took a quarter of the
        client's CPU at full speed (py-spy, bench/compare.py workload 1).
        """
        assert self._open is not None, "use ApiClient as an async context manager"
        request = httpx.Request("POST", self.url(path), headers=self._headers, content=body,
                                extensions={"timeout": self._timeouts})
        try:
            # httpx's timeouts bound each socket read; a body that trickles in needs an overall deadline too.
            async with asyncio.timeout(self._timeout):
                resp = await self._open.handle_async_request(request)
                try:
                    content = await resp.aread()
                finally:
                    await resp.aclose()
            return resp.status_code, resp.headers, content
        except (httpx.TimeoutException, TimeoutError) as e:
            cause = e.__cause__
            # httpx-aiohttp maps every aiohttp connection error (refused, reset) to ConnectTimeout; undo that.
            if isinstance(cause, aiohttp.ClientConnectionError) and not isinstance(cause, aiohttp.ServerTimeoutError):
                reason = redact(str(cause) or type(cause).__name__, self._key)
                raise TransientError(f"connection error: {reason}", kind="connection") from None
            raise TransientError(f"timed out after {self._timeout:g} s", kind="timeout") from None
        except (httpx.TransportError, aiohttp.ClientError, ConnectionError) as e:
            reason = redact(str(e) or type(e).__name__, self._key)
            raise TransientError(f"connection error: {reason}", kind="connection") from None

    async def embed(self, body: bytes, n_inputs: int) -> EmbeddingAnswer:
        """One embeddings request of ``n_inputs`` inputs; errors as for ``chat``."""
        return await self._exchange("/embeddings", body, lambda c, h: parse_embeddings(c, h, n_inputs))

    async def chat(self, body: bytes) -> Answer:
        """One chat completion; raises TransientError, RowError or AbortError with the key redacted."""
        return await self._exchange("/chat/completions", body, parse_chat)

    async def _exchange(self, path: str, body: bytes, parse: Callable[[bytes, Any], T]) -> T:
        status, headers, content = await self.post(path, body)
        try:
            return classify(status, headers, content, parse)
        except ProviderError as e:
            e.args = (redact(str(e), self._key),)
            raise



class wait_server_hint(wait_base):
    """Wait what the server asked for (retry-after), else the fallback (exponential backoff, full jitter)."""

    def __init__(self, fallback: wait_base, jitter_s: float = 0.05) -> None:
        self.fallback, self.jitter_s = fallback, jitter_s

    def __call__(self, retry_state: RetryCallState) -> float:
        """The wait before the next try."""
        exc = retry_state.outcome.exception() if retry_state.outcome else None
        hint = getattr(exc, "retry_after", None)
        if hint is not None:
            return float(hint) + self.jitter_s
        return float(self.fallback(retry_state))


class BatchClient:
    """The Files and Batches endpoints, for Batch API mode: a handful of calls a minute, so a plain
    synchronous httpx client; every call retries transient trouble like the online requests do.

    ``with BatchClient(base_url, key, timeout_s=60, max_attempts=6) as api: api.upload(path, name)``.
    """

    def __init__(self, base_url: str, api_key: str | None, *, timeout_s: float, max_attempts: int,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        headers = {"User-Agent": "pipeline/0.1", "Accept": "application/json"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        self._key = api_key
        self._client = httpx.Client(base_url=base_url.rstrip("/"), headers=headers,
                                    timeout=httpx.Timeout(timeout_s, connect=min(10.0, timeout_s)))
        self._max_attempts, self._sleep = max_attempts, sleep

    def __enter__(self) -> BatchClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self._client.close()

    def retrying(self) -> Retrying:
        """The retry policy of these calls (transient errors only, honouring retry-after)."""
        return Retrying(stop=stop_after_attempt(self._max_attempts), reraise=True, sleep=self._sleep,
                        wait=wait_server_hint(wait_random_exponential(multiplier=1, max=60)),
                        retry=retry_if_exception_type(TransientError))

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
        except httpx.TimeoutException:
            raise TransientError(f"{method} {path}: timed out", kind="timeout") from None
        except httpx.TransportError as e:
            reason = redact(str(e) or type(e).__name__, self._key)
            raise TransientError(f"{method} {path}: connection error: {reason}", kind="connection") from None
        except ProviderError as e:
            e.args = (redact(f"{method} {path}: {e}", self._key),)
            raise

    def _once(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        with self._errors(method, path):
            resp = self._client.request(method, path, **kwargs)
            return classify(resp.status_code, resp.headers, resp.content, _json_object)  # type: ignore[no-any-return]

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

    def create(self, file_id: str, endpoint: str, metadata: dict[str, str]) -> dict[str, Any]:
        """Create a batch (one try: the caller checks for a batch already made before trying again)."""
        return self._once("POST", "/batches", json={
            "input_file_id": file_id, "endpoint": endpoint, "completion_window": "24h", "metadata": metadata})

    def find(self, input_file_id: str, since: float) -> dict[str, Any] | None:
        """The batch made from ``input_file_id``, if there is one: batches are listed newest first, so the
        search stops at the first batch created before ``since``."""
        after: str | None = None
        while True:
            params = {"limit": "100", **({"after": after} if after else {})}
            page = self.call("GET", "/batches", params=params)
            data = page.get("data") or []
            for b in data:
                if b.get("input_file_id") == input_file_id:
                    return b  # type: ignore[no-any-return]
            if not page.get("has_more") or not data or (data[-1].get("created_at") or 0) < since - 60:
                return None
            after = data[-1].get("id")

    def retrieve(self, batch_id: str) -> dict[str, Any]:
        """The batch object (status, request_counts, output and error file ids)."""
        return self.call("GET", f"/batches/{batch_id}")

    def cancel(self, batch_id: str) -> dict[str, Any]:
        """Ask the provider to cancel; finished lines stay in its output file."""
        return self.call("POST", f"/batches/{batch_id}/cancel")

    def lines(self, file_id: str) -> Iterator[bytes]:
        """The lines of a file's content, streamed (output files can be hundreds of MB)."""
        path = f"/files/{file_id}/content"
        with self._errors("GET", path), self._client.stream("GET", path) as resp:
            if resp.status_code != 200:
                resp.read()
                classify(resp.status_code, resp.headers, resp.content, _json_object)
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
