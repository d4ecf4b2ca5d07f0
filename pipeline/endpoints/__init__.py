"""One module per kind of request; ``endpoint_of`` finds a job's (see ``base`` for what an endpoint owns)."""

from __future__ import annotations

from pipeline.endpoints.base import Endpoint, JobParts, Vectors
from pipeline.endpoints.chat import Chat
from pipeline.endpoints.embeddings import Embeddings
from pipeline.endpoints.images import Images
from pipeline.endpoints.transcriptions import Transcriptions
from pipeline.pricing import Price, no_price_warning
from pipeline.providers.registry import DESCRIPTORS

ENDPOINTS: dict[str, Endpoint] = {e.name: e for e in (Chat(), Embeddings(), Images(), Transcriptions())}


def endpoint_of(name: str) -> Endpoint:
    """The endpoint named by ``[request].endpoint`` (the job file's parser has checked the name)."""
    return ENDPOINTS[name]


def price_for(job: JobParts) -> Price | None:
    """The price of the job's model, with the job's overrides (an endpoint without output tokens needs no
    output rate)."""
    return endpoint_of(job.request.endpoint).price(job, DESCRIPTORS[job.api.provider].price_ids)


def no_price_for(job: JobParts) -> str:
    """What the user is told when ``price_for`` knows no price: the nearest names under the provider's ids."""
    return no_price_warning(job.request.model, DESCRIPTORS[job.api.provider].price_ids)


__all__ = ["ENDPOINTS", "Endpoint", "Vectors", "endpoint_of", "no_price_for", "price_for"]
