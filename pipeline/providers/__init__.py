"""One module per wire dialect, each declaring a ``Descriptor`` of its facts; ``provider_for`` picks a job's
(``[api].provider``). Everything outside speaks provider-neutral messages (before) and outcomes (after): see
``base.Provider`` for the seam. A new provider is a new module and one line in ``DESCRIPTORS``."""

from __future__ import annotations

from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from pipeline.providers import anthropic, azure, compatible, openai
from pipeline.providers.base import Descriptor, Provider

if TYPE_CHECKING:
    from pipeline.job import Job

DESCRIPTORS: dict[str, Descriptor] = {d.name: d for d in (openai.DESCRIPTOR, azure.DESCRIPTOR, anthropic.DESCRIPTOR,
                                                          compatible.DESCRIPTOR)}
DEFAULT = openai.DESCRIPTOR        # a job that names neither a provider nor a base URL
FALLBACK = compatible.DESCRIPTOR   # a base URL on no provider's own host: a compatible server


def descriptor_of_url(url: str) -> Descriptor:
    """The provider a base URL belongs to, for jobs that do not say: the API's own hosts, else a compatible
    server."""
    host = (urlsplit(url).hostname or "").lower()
    return next((d for d in DESCRIPTORS.values() if d.serves_host(host)), FALLBACK)


def provider_for(job: Job) -> Provider:
    """The provider a job talks to."""
    make = DESCRIPTORS[job.api.provider].make
    assert make is not None
    return make(job.api, job.request)


__all__ = ["DEFAULT", "DESCRIPTORS", "Descriptor", "Provider", "descriptor_of_url", "provider_for"]
