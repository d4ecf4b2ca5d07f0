"""One module per kind of request; ``endpoint_of`` finds a job's (see ``base`` for what an endpoint owns).

An endpoint's module is imported when a job first names it: a chat job's run does not load the image and audio
modules (with them, a run's start-up executed about 3% more instructions; ``bench/resume.py`` [2] measures the
start-up)."""

from __future__ import annotations

import importlib

from pipeline.endpoints.base import Endpoint, JobParts, Vectors
from pipeline.pricing import Price, no_price_warning
from pipeline.providers.registry import DESCRIPTORS

# [request].endpoint -> (module, class): the endpoints a job file may name.
_CLASSES = {"chat": ("pipeline.endpoints.chat", "Chat"),
            "embeddings": ("pipeline.endpoints.embeddings", "Embeddings"),
            "images": ("pipeline.endpoints.images", "Images"),
            "transcriptions": ("pipeline.endpoints.transcriptions", "Transcriptions")}
ENDPOINT_NAMES: tuple[str, ...] = tuple(_CLASSES)
_loaded: dict[str, Endpoint] = {}


def endpoint_of(name: str) -> Endpoint:
    """The endpoint named by ``[request].endpoint`` (one of ``ENDPOINT_NAMES``; the job file's parser checks)."""
    endpoint = _loaded.get(name)
    if endpoint is None:
        module, cls = _CLASSES[name]
        endpoint = _loaded[name] = getattr(importlib.import_module(module), cls)()
    return endpoint


def price_for(job: JobParts) -> Price | None:
    """The price of the job's model, with the job's overrides (an endpoint without output tokens needs no
    output rate)."""
    return endpoint_of(job.request.endpoint).price(job, DESCRIPTORS[job.api.provider].price_ids)


def no_price_for(job: JobParts) -> str:
    """What the user is told when ``price_for`` knows no price: the nearest names under the provider's ids."""
    return no_price_warning(job.request.model, DESCRIPTORS[job.api.provider].price_ids)


__all__ = ["ENDPOINT_NAMES", "Endpoint", "Vectors", "endpoint_of", "no_price_for", "price_for"]
