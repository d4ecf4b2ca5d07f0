"""Request keys are what a resume, the dedup and the Batch API's custom ids recognise a request by, and a chat,
embeddings or image-generation key hashes the exact body (a transcription's, whose multipart form differs at every
build, hashes the logical request). So a change to the bytes a provider's body builder writes (a field added,
reordered or spelled otherwise) changes every key, and a job stopped under one version and resumed under the next
would pay again for every answered row. These keys are pinned: a test failing here means that change needs a way
to keep the old keys (or a decision to let old journals re-send), not a new pin."""

import pytest

from pipeline.keys import key_id, request_key
from tests.test_render import _render

SCHEMA = ('[request.response_schema]\ntype = "object"\nadditionalProperties = false\nrequired = ["label"]\n'
          '[request.response_schema.properties.label]\ntype = "string"\nenum = ["positive", "negative"]\n')
CHAT = ('model = "gpt-4o-mini"\nsystem = "Summarise in one sentence."\nprompt = "Review of {{ product }}: {{ text }}"\n'
        'max_tokens = 50\n')
CLAUDE = CHAT.replace("gpt-4o-mini", "claude-haiku-4-5")
JOBS = {
    "openai chat": (CHAT + "temperature = 0\n", ""),
    "openai chat, typed": (CHAT + SCHEMA, ""),
    "azure chat": (CHAT, '[api]\nbase_url = "https://r.openai.azure.com/openai/v1"\ndeployment = "prod-mini"'),
    "compatible chat": (CHAT, '[api]\nbase_url = "http://127.0.0.1:9/v1"'),
    "anthropic chat": (CLAUDE, '[api]\nprovider = "anthropic"'),
    "anthropic chat, typed": (CLAUDE + SCHEMA, '[api]\nprovider = "anthropic"'),
    "openai embeddings": ('endpoint = "embeddings"\nmodel = "text-embedding-3-small"\ninput = "{{ text }}"\n', ""),
    "openai images": ('endpoint = "images"\nmodel = "gpt-image-1.5"\nprompt = "The {{ product }}, drawn."\n'
                      'size = "1024x1024"\nquality = "low"\n', ""),
}
# The first three rows' keys, as every version since 6cce983 (2026-12-04) has made them (checked against it; image
# generation's since it came, b854abd).
PINNED = {
    "openai chat": ["901ee24c4b1c85e5a16dc074f9488588",
                    "a90ddd180d1ea4b8720af3d8af208e6d",
                    "74374603b014ecd450fa432f98155f78"],
    "openai chat, typed": ["b633f627692b8f95b474adbfc8bb83d6",
                           "67dc2ebcd5b32ad4da2cdb8317c9ab08",
                           "a64b5bd890a8692509d1b223d7dfe75c"],
    "azure chat": ["b901447f763b782db7627e98f6ecd5ea",
                   "c3e8a28fec7fc0ab3626a042d100b8cb",
                   "a6e5c2ba203d8485561099202d3e9923"],
    "compatible chat": ["94a8a119099a06af510ed2523b0d1bfa",
                        "72cc7f7f10bac7eff4cf3c045bde0125",
                        "9a5c4bacc7c23696fe8c5db016d37794"],
    "anthropic chat": ["32aa172349e43de6243060d5b1b4d110",
                       "993c565efe59386dd05fcd1b65565f4d",
                       "74af17ea5a1973e4e2f80a0038e27fa0"],
    "anthropic chat, typed": ["aebcfd56e17c6904052b2e3927ed9052",
                              "c4f332c5e854d52bbdf93d852470e190",
                              "d6ff40a491bfecc40eec134e13a07a19"],
    "openai embeddings": ["6ae34e538c31ee39a9dc1d01331761b0",
                          "86ed4ff692f91b8bf1179dcfc42eaa23",
                          "7a2d1e384e89e1ecbb14a03c61281c7b"],
    "openai images": ["91783594703347becbf8c6e75feaf495",
                      "469f5f5a063962963ead91dcc6da8104",
                      "8789188c436074e178d72494eb74b4f2"],
}


def first_keys(make_job, request: str, extra: str, n: int = 3) -> list[str]:
    _, requests = _render(make_job(request=request, extra=extra))
    return [r.key for r in requests[:n]]


@pytest.mark.parametrize("name", list(JOBS))
def test_the_keys_of_each_body_builder_are_the_ones_earlier_versions_journaled(make_job, name):
    assert first_keys(make_job, *JOBS[name]) == PINNED[name]


def test_a_key_is_the_hash_of_the_endpoint_and_the_exact_body():
    assert request_key("chat", b"{}") != request_key("embeddings", b"{}")
    assert request_key("chat", b'{"a":1}') != request_key("chat", b'{"a": 1}')
    assert key_id(request_key("chat", b"{}")) == int(request_key("chat", b"{}")[:16], 16)
