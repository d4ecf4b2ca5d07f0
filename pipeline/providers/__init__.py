"""One module per wire dialect, each declaring a ``Descriptor`` of its facts (``registry`` lists them);
``provider_for`` picks a job's (``[api].provider``). Everything outside speaks provider-neutral messages (before)
and outcomes (after): see ``base.Provider`` for the seam. A new provider is a new module and one line in
``registry.DESCRIPTORS``."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pipeline.providers.base import Descriptor, Provider
from pipeline.providers.registry import DEFAULT, DESCRIPTORS, descriptor_of_url

if TYPE_CHECKING:
    from pipeline.job import Job


def provider_for(job: Job) -> Provider:
    """The provider a job talks to."""
    make = DESCRIPTORS[job.api.provider].make
    assert make is not None
    return make(job.api, job.request)


__all__ = ["DEFAULT", "DESCRIPTORS", "Descriptor", "Provider", "descriptor_of_url", "provider_for"]
