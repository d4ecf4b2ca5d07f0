"""One request over HTTP to the provider: where it goes, with which key, and through which transport.

What the bytes mean is the provider module's business (``providers/``); this is the transport side: the base
URL and key resolved from the job and the environment, the refusal to send a key in clear text, redaction of
the key from every message, and the client itself. Sending goes through httpx's transport seam; the default
transport is httpx-aiohttp, because httpx's own pool costs ~3 ms of CPU per request at the concurrency this
tool runs at, and aiohttp's ~0.3 ms (see DESIGN.md).
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import re
from collections.abc import Callable
from typing import Any, TypeVar
from urllib.parse import urlsplit

import aiohttp
import httpx
from httpx_aiohttp import AiohttpTransport

from pipeline.errors import ProviderError, UsageError
from pipeline.job import Job
from pipeline.providers.base import Answer, EmbeddingAnswer, Provider
from pipeline.providers.openai import OpenAIProvider
from pipeline.retry import TRANSPORT_ERRORS, transport_error

T = TypeVar("T")


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
    """--base-url, then PIPELINE_BASE_URL, then the job's [api].base_url; as the job's provider writes it (the
    provider is the job's, whichever URL is used: pointing a job at another server keeps its dialect)."""
    from pipeline.providers import provider_for

    url = override or os.environ.get("PIPELINE_BASE_URL") or job.api.base_url
    if not url.startswith(("http://", "https://")):
        raise UsageError(f"base URL must start with http:// or https://, got {url!r}")
    return provider_for(job).base_url(url)


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
                 provider: Provider | None = None, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.provider = provider or OpenAIProvider()  # the dialect most servers speak
        self._key = api_key
        self._timeout = timeout_s
        self._concurrency = concurrency
        self._transport = transport
        self._open: httpx.AsyncBaseTransport | None = None

    async def __aenter__(self) -> ApiClient:
        self._headers = list(self.provider.headers(self._key).items())
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
        except TRANSPORT_ERRORS as e:
            raise transport_error(e, self._timeout, lambda t: redact(t, self._key)) from None

    async def embed(self, body: bytes, n_inputs: int) -> EmbeddingAnswer:
        """One embeddings request of ``n_inputs`` inputs; errors as for ``chat``."""
        p = self.provider
        return await self.call(p.path("embeddings"), body,
                                    lambda st, h, c: p.embeddings_answer(st, h, c, n_inputs))

    async def chat(self, body: bytes) -> Answer:
        """One chat completion; raises TransientError, RowError or AbortError with the key redacted."""
        return await self.call(self.provider.path("chat"), body, self.provider.chat_answer)

    async def call(self, path: str, body: bytes, parse: Callable[[int, Any, bytes], T]) -> T:
        """One request to any of the provider's endpoints, read by ``parse``; errors as for ``chat``."""
        status, headers, content = await self.post(path, body)
        try:
            return parse(status, headers, content)
        except ProviderError as e:
            e.args = (redact(str(e), self._key),)
            raise
