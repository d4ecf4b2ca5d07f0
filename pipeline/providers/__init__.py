"""One module per wire dialect; ``provider_for`` picks a job's (``[api].provider``). Everything outside speaks
provider-neutral messages (before) and outcomes (after): see ``base.Provider`` for the seam."""

from __future__ import annotations

from pipeline.job import Job
from pipeline.providers.base import Provider


def provider_for(job: Job) -> Provider:
    """The provider a job talks to."""
    name = job.api.provider
    if name == "anthropic":
        from pipeline.providers.anthropic import AnthropicProvider

        return AnthropicProvider(job.api, user_tools=bool(job.request.tools))
    if name == "azure":
        from pipeline.providers.azure import AzureProvider

        return AzureProvider(job.api)
    if name == "openai-compatible":
        from pipeline.providers.compatible import CompatibleProvider

        return CompatibleProvider(job.api)
    from pipeline.providers.openai import OpenAIProvider

    return OpenAIProvider(job.api)


__all__ = ["Provider", "provider_for"]
