"""Azure OpenAI: OpenAI's dialect on a resource of your own, with its own auth header and URLs.

Two URL schemes, chosen by ``[api].api_version``: without it, the v1 API
(``https://RESOURCE.openai.azure.com/openai/v1/chat/completions``, no version parameter); with it, the older
deployment URLs (``/openai/deployments/DEPLOYMENT/chat/completions?api-version=...``). The key goes in the
``api-key`` header. ``[api].deployment`` is what the body names as its model (Azure routes by deployment),
while ``[request].model`` stays the model that is priced and tokenized. The Batch API is OpenAI's
files-and-batches flow under the same URLs, its input lines addressed to ``/chat/completions``.
"""

from __future__ import annotations

from urllib.parse import quote

from pipeline.providers.base import Descriptor
from pipeline.providers.openai import PATHS, OpenAIProvider
from pipeline.spec import OPENAI_BATCH_LIMITS, RequestSpec

AZURE_BATCH_URLS = {"chat": "/chat/completions", "embeddings": "/embeddings"}
_SUFFIXES = ("/openai/v1", "/openai")


class AzureProvider(OpenAIProvider):
    """Azure OpenAI, v1 API or deployment URLs; ``api-key`` auth."""

    name = "azure"

    def _root(self, url: str) -> str:
        """The resource URL without any ``/openai[/v1]`` path the user gave."""
        url = url.rstrip("/")
        for suffix in _SUFFIXES:
            if url.endswith(suffix):
                return url[: -len(suffix)]
        return url

    def base_url(self, url: str) -> str:
        """v1: ``RESOURCE/openai/v1``; deployment URLs: ``RESOURCE/openai`` (whatever of it was given)."""
        return self._root(url) + ("/openai" if self.api.option("api_version") else "/openai/v1")

    def model(self, spec: RequestSpec) -> str:
        """The deployment name, which is what Azure routes by (the model name when there is none)."""
        return self.api.option("deployment") or spec.model

    def headers(self, api_key: str | None) -> dict[str, str]:
        """Every request's headers; the key goes in ``api-key`` and nowhere else."""
        headers = {"Content-Type": "application/json", "Accept": "application/json", "User-Agent": "pipeline/0.1"}
        if api_key:
            headers["api-key"] = api_key
        return headers

    def path(self, endpoint: str) -> str:
        """v1: the OpenAI path; deployment URLs: under the deployment, with the API version."""
        version = self.api.option("api_version")
        if not version:
            return PATHS[endpoint]
        deployment = quote(self.api.option("deployment") or "", safe="")
        return f"/deployments/{deployment}{PATHS[endpoint]}?api-version={quote(version, safe='')}"

    def batch_urls(self) -> dict[str, str]:
        """Azure's Batch input lines and batches name the endpoint without a version prefix."""
        return AZURE_BATCH_URLS

    def batch_params(self) -> dict[str, str] | None:
        """The deployment URLs' API version, on every Files and Batches call."""
        version = self.api.option("api_version")
        return {"api-version": version} if version else None


DESCRIPTOR = Descriptor(
    name="azure", default_base_url="", key_env="AZURE_OPENAI_API_KEY",
    hosts=(".openai.azure.com", ".cognitiveservices.azure.com", ".services.ai.azure.com"),
    structured_outputs=("json_schema", "json_object", "none"),
    max_tokens_fields=("max_completion_tokens", "max_tokens"), max_images=500, batch_limits=OPENAI_BATCH_LIMITS,
    endpoints=("chat", "embeddings", "images", "transcriptions"), options={"deployment": None, "api_version": None},
    requires={"api_version": "deployment"},  # the older URLs name the deployment
    price_ids=("azure", "openai"),  # Azure sells OpenAI's models; one listed for OpenAI only is priced as OpenAI's
    example_base_url="https://RESOURCE.openai.azure.com/openai/v1",
    make=lambda api, request: AzureProvider(api))
