"""One module per wire dialect; ``provider_for`` picks a job's. Everything outside speaks provider-neutral
messages (before) and outcomes (after): see ``base.Provider`` for the seam."""

from __future__ import annotations

from pipeline.job import Job
from pipeline.providers.base import Provider
from pipeline.providers.openai import OpenAIProvider


def provider_for(job: Job) -> Provider:
    """The provider a job talks to (OpenAI's dialect is the only one so far)."""
    return OpenAIProvider()


__all__ = ["Provider", "provider_for"]
