"""Where a job's requests go and with which key: the base URL (``--base-url``, then ``PIPELINE_BASE_URL``, then the
job's ``[api].base_url``), the API key from the variable the job names, and the refusal to send a key in clear text
to a host that is not loopback. Apart from the HTTP client, which takes a URL and a key and knows no job."""

from __future__ import annotations

import os
from urllib.parse import urlsplit

from pipeline.client import is_loopback
from pipeline.errors import UsageError
from pipeline.job import Job, url_problem
from pipeline.providers import DESCRIPTORS, provider_for


def check_transport_security(base_url: str, has_key: bool, allow_insecure: bool) -> None:
    """Refuse to send a key in clear text over a network; loopback (the simulator) is fine."""
    parts = urlsplit(base_url)
    if parts.scheme == "http" and has_key and not allow_insecure and not is_loopback(parts.hostname or ""):
        raise UsageError(f"{base_url}: refusing to send the API key over plain http:// to a host that is not "
                         "loopback; use https:// or pass --allow-insecure")


def resolve_base_url(job: Job, override: str | None) -> str:
    """--base-url, then PIPELINE_BASE_URL, then the job's [api].base_url; as the job's provider writes it (the
    provider is the job's, whichever URL is used: pointing a job at another server keeps its dialect)."""
    url = override or os.environ.get("PIPELINE_BASE_URL") or job.api.base_url
    if not url:
        example = DESCRIPTORS[job.api.provider].example_base_url
        raise UsageError(f'{job.source}: [api].base_url is required for provider = "{job.api.provider}" (for '
                         f'example "{example}"), unless --base-url or PIPELINE_BASE_URL gives the address')
    problem = url_problem(url)
    if problem:
        where = "--base-url" if override else "PIPELINE_BASE_URL" if os.environ.get("PIPELINE_BASE_URL") else \
            f"{job.source}: [api].base_url"
        raise UsageError(f"{where}: the base URL {problem}, got {url!r}")
    return provider_for(job).base_url(url)


def resolve_api_key(job: Job, base_url: str) -> str | None:
    """The key from the environment variable the job names; only a loopback server may go without one."""
    key = os.environ.get(job.api.api_key_env) or None
    if key is None and not is_loopback(urlsplit(base_url).hostname or ""):
        raise UsageError(f"{job.source}: the environment variable {job.api.api_key_env} (named by "
                         f"[api].api_key_env) is not set; export your API key in it")
    return key
