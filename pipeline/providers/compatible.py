"""OpenAI-compatible servers (vLLM, llama.cpp, Ollama, LM Studio, proxies): OpenAI's dialect, as each server
understands it.

What they differ in is the job's ``[api]`` profile, with defaults that work on most of them: the output cap
sent as ``max_tokens`` (many ignore ``max_completion_tokens`` silently), structured outputs as ``json_schema``,
``json_object`` or ``none`` (the schema then goes in the system prompt and our own validation does the
rest), no rate-limit headers (the job's limits alone pace the run), and answers without ``usage`` (counted
with the tokenizer, marked ``usage_estimated``). The server's tokenizer is its own, so prompt counts are
tiktoken's approximation, and labelled so.
"""

from __future__ import annotations

from pipeline.providers.base import NO_CACHE, Descriptor, PromptCache
from pipeline.providers.openai import OpenAIProvider
from pipeline.spec import OPENAI_BATCH_LIMITS
from pipeline.tokens import ChatTokenCounter


class ApproximateCounter(ChatTokenCounter):
    """tiktoken's count of a model whose server tokenizes its own way: close, not exact."""

    exact = False


class CompatibleProvider(OpenAIProvider):
    """An OpenAI-compatible server, per the job's ``[api]`` profile."""

    name = "openai-compatible"

    def counter(self, model: str) -> ChatTokenCounter:
        """tiktoken's count, labelled approximate: the server's model has its own tokenizer."""
        return ApproximateCounter(model)

    def prompt_cache(self, model: str) -> PromptCache:
        """Not counted: a compatible server may cache prefixes (vLLM does), but whether it bills less is its own."""
        return NO_CACHE


DESCRIPTOR = Descriptor(
    name="openai-compatible", default_base_url="", key_env="OPENAI_API_KEY", hosts=(),
    structured_outputs=("json_schema", "json_object", "none"),
    max_tokens_fields=("max_tokens", "max_completion_tokens"),  # what most servers (vLLM, llama.cpp) read
    max_images=500, batch_limits=OPENAI_BATCH_LIMITS, endpoints=("chat", "embeddings", "images", "transcriptions"),
    batch_endpoints=("chat", "embeddings", "images"),  # OpenAI's Batch API's; a server without them refuses
    own_keys={"json_object_schema": "OpenAI's and Azure's json_object takes no schema (it goes in the prompt)"},
    price_ids=(None,),  # a served model is priced by its name alone
    make=lambda api, request: CompatibleProvider(api))
