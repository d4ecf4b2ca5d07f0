"""The providers' descriptors, by name: what the job file's parser checks ``[api]`` against. Apart from
``provider_for`` (which takes a whole job) so the parser can read them without importing itself back."""

from __future__ import annotations

from urllib.parse import urlsplit

from pipeline.providers import anthropic, azure, compatible, openai
from pipeline.providers.base import Descriptor

DESCRIPTORS: dict[str, Descriptor] = {d.name: d for d in (openai.DESCRIPTOR, azure.DESCRIPTOR, anthropic.DESCRIPTOR,
                                                          compatible.DESCRIPTOR)}
DEFAULT = openai.DESCRIPTOR        # a job that names neither a provider nor a base URL
FALLBACK = compatible.DESCRIPTOR   # a base URL on no provider's own host: a compatible server


def descriptor_of_url(url: str) -> Descriptor:
    """The provider a base URL belongs to, for jobs that do not say: the API's own hosts, else a compatible
    server."""
    host = (urlsplit(url).hostname or "").lower()
    return next((d for d in DESCRIPTORS.values() if d.serves_host(host)), FALLBACK)
