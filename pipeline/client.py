"""One request over HTTP to the provider: where it goes, with which key, and through which transport.

What the bytes mean is the provider module's business (``providers/``); this is the transport side: the base
URL and key resolved from the job and the environment, the refusal to send a key in clear text, redaction of
the key from every message, and the client itself. By default a request goes straight to an aiohttp session:
httpx's own pool costs ~3 ms of CPU per request at the concurrency this tool runs at (see DESIGN.md), and
httpx's models over aiohttp (the httpx-aiohttp transport, used here before) cost 0.23-0.24 ms of CPU per request
against 0.14-0.15 ms straight to aiohttp (this client alone, 20,000 chat requests at 128 in flight). httpx's
transport seam stays: an injected ``httpx.AsyncBaseTransport`` (tests use ``httpx.MockTransport``) is sent
through instead, and both routes give the caller the same (status, headers, body).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import aiohttp
import httpx
from yarl import URL

from pipeline.errors import ProviderError
from pipeline.providers.base import Provider
from pipeline.providers.openai import OpenAIProvider
from pipeline.redact import redact
from pipeline.retry import TRANSPORT_ERRORS, transport_error

T = TypeVar("T")


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


class ApiClient:
    """An HTTP client bound to one provider: ``async with ApiClient(...) as c: await c.call(path, body, read)``."""

    def __init__(self, base_url: str, api_key: str | None, *, timeout_s: float, concurrency: int,
                 provider: Provider | None = None, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.provider = provider or OpenAIProvider()  # the dialect most servers speak
        self._key = api_key
        self._timeout = timeout_s
        self._concurrency = concurrency
        self._transport = transport
        self._urls: dict[str, Any] = {}  # per path, parsed once: a yarl.URL for aiohttp, an httpx.URL for a transport
        self._open: httpx.AsyncBaseTransport | None = None  # the injected transport, once entered
        self._aiohttp: aiohttp.ClientSession | None = None  # else this session, once entered

    async def __aenter__(self) -> ApiClient:
        self._headers = self.provider.headers(self._key)
        if self._transport is not None:
            self._timeouts = httpx.Timeout(self._timeout, connect=min(10.0, self._timeout)).as_dict()
            self._open = self._transport
            return self
        proxy = _env_proxy(self.base_url)
        self._proxy: dict[str, Any] = {} if proxy is None else {
            "proxy": str(proxy.url), "proxy_headers": dict(proxy.headers) or None,
            "proxy_auth": aiohttp.BasicAuth(*proxy.auth) if proxy.auth else None}
        # One connection per worker, kept alive. trust_env is off because aiohttp then looks up netrc and proxy
        # settings in a thread on every request; the proxy is resolved once instead (``_env_proxy``). Each
        # request's whole exchange is bounded by ``asyncio.timeout`` in ``post``; only connecting has its own.
        connector = aiohttp.TCPConnector(limit=self._concurrency, limit_per_host=self._concurrency,
                                         keepalive_timeout=30, ttl_dns_cache=300)
        self._aiohttp = aiohttp.ClientSession(
            connector=connector, trust_env=False, cookie_jar=aiohttp.DummyCookieJar(),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=min(10.0, self._timeout)))
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._open is not None:
            await self._open.aclose()
        if self._aiohttp is not None:
            await self._aiohttp.close()

    async def post(self, path: str, body: bytes) -> tuple[int, Any, bytes]:
        """Send one body; connection-level failures become TransientError (retried). The headers returned
        answer ``get(name)`` case-insensitively, whichever route the request took."""
        session = self._aiohttp
        url: Any = self._urls.get(path)  # a yarl URL for the session, an httpx one for an injected transport
        if url is None:
            url = self._urls[path] = (httpx.URL if session is None else URL)(self.base_url + path)
        try:
            # A body that trickles in needs an overall deadline, not only one per socket read.
            async with asyncio.timeout(self._timeout):
                if session is None:
                    return await self._through_transport(url, body)
                async with session.request("POST", url, data=body, headers=self._headers, allow_redirects=False,
                                           **self._proxy) as r:
                    return r.status, r.headers, await r.read()
        except TRANSPORT_ERRORS as e:
            raise transport_error(e, self._timeout, lambda t: redact(t, self._key)) from None

    async def post_form(self, path: str, fields: list[tuple[str, str]],
                        file: tuple[str, str, bytes | Path, str]) -> tuple[int, Any, bytes]:
        """Send a multipart form: ``fields``, then ``file`` as (field, file name, its bytes or its path, content
        type); a path is streamed from the file, never read whole. The provider's headers go with it but for
        their JSON content type (the form sets its own, with its boundary)."""
        headers = {k: v for k, v in self._headers.items() if k.lower() != "content-type"}
        name, filename, data, mime = file
        try:
            async with asyncio.timeout(self._timeout):
                if self._aiohttp is None:
                    assert self._open is not None, "use ApiClient as an async context manager"
                    content = data if isinstance(data, bytes) else await asyncio.to_thread(data.read_bytes)
                    values: dict[str, list[str]] = {}
                    for key, value in fields:
                        values.setdefault(key, []).append(value)
                    request = httpx.Request("POST", self.base_url + path, headers=headers, data=values,
                                            files=[(name, (filename, content, mime))],
                                            extensions={"timeout": self._timeouts})
                    resp = await self._open.handle_async_request(request)
                    try:
                        return resp.status_code, resp.headers, await resp.aread()
                    finally:
                        await resp.aclose()
                with contextlib.ExitStack() as files:
                    body: Any = data if isinstance(data, bytes) else files.enter_context(open(data, "rb"))
                    form = aiohttp.FormData()
                    for key, value in fields:
                        form.add_field(key, value)
                    form.add_field(name, body, filename=filename, content_type=mime)
                    async with self._aiohttp.post(self.base_url + path, data=form, headers=headers,
                                                  allow_redirects=False, **self._proxy) as r:
                        return r.status, r.headers, await r.read()
        except TRANSPORT_ERRORS as e:
            raise transport_error(e, self._timeout, lambda t: redact(t, self._key)) from None

    async def get(self, url: str) -> tuple[int, Any, bytes]:
        """Fetch an absolute URL an answer gave (a generated image): without the provider's headers, so the key
        never goes to another host; connection failures become TransientError like a request's."""
        try:
            async with asyncio.timeout(self._timeout):
                if self._aiohttp is None:
                    assert self._open is not None, "use ApiClient as an async context manager"
                    resp = await self._open.handle_async_request(httpx.Request(
                        "GET", url, extensions={"timeout": self._timeouts}))
                    try:
                        return resp.status_code, resp.headers, await resp.aread()
                    finally:
                        await resp.aclose()
                async with self._aiohttp.get(url, allow_redirects=True, **self._proxy) as r:
                    return r.status, r.headers, await r.read()
        except TRANSPORT_ERRORS as e:
            raise transport_error(e, self._timeout, lambda t: redact(t, self._key)) from None

    async def _through_transport(self, url: httpx.URL, body: bytes) -> tuple[int, httpx.Headers, bytes]:
        """The injected transport's route: straight to it, without httpx.AsyncClient's layers (URL and header
        merging, auth flow, redirects, cookies, event hooks), which these requests do not need."""
        assert self._open is not None, "use ApiClient as an async context manager"  # neither route was opened
        request = httpx.Request("POST", url, headers=self._headers, content=body,
                                extensions={"timeout": self._timeouts})
        resp = await self._open.handle_async_request(request)
        try:
            content = await resp.aread()
        finally:
            await resp.aclose()
        return resp.status_code, resp.headers, content

    async def call(self, path: str, body: bytes, parse: Callable[[int, Any, bytes], T]) -> T:
        """One request to any of the provider's endpoints, read by ``parse`` (the endpoint's sender says which
        path and which of the provider's readers); raises TransientError, RowError or AbortError, with the key
        redacted."""
        status, headers, content = await self.post(path, body)
        try:
            return parse(status, headers, content)
        except ProviderError as e:
            e.args = (redact(str(e), self._key),)
            raise
