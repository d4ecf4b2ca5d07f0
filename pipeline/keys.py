"""Request keys: what makes two requests the same question, asked once (the journal, dedup and the Batch API's
custom ids all use them). A key hashes the endpoint and the request's logical body, so a resume recognises a
request whatever run, engine or mode made it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence


def request_key(endpoint: str, body: bytes) -> str:
    """The identity of a request: the same endpoint and body is the same question, asked once."""
    return request_keys(endpoint, [body])[0]


def request_keys(endpoint: str, bodies: Sequence[bytes]) -> list[str]:
    """``request_key`` of many bodies of one endpoint (a chunk's), without encoding the endpoint each time."""
    prefix, blake = endpoint.encode() + b"\n", hashlib.blake2b
    return [blake(prefix + body, digest_size=16).hexdigest() for body in bodies]


def key_id(key: str) -> int:
    """64 bits of a request key: sets of millions of keys at a third of the memory of the strings."""
    return int(key[:16], 16)
