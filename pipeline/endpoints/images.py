"""The image-generation endpoint: one row's prompt in, image files out, beside the output.

An answer's images are decoded (or fetched, for a server that answers with URLs, which expire) and written as
files named from the request key and the image's own hash, each to a temporary name first and renamed, so a
file under its final name is always whole and a rerun never overwrites a different image. The journal records
the files' names, sizes and hashes, never their bytes; a resume calls a row done only while its files are still
there and unchanged, and sends it again otherwise.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import orjson
import polars as pl

from pipeline.endpoints.base import AnswerColumns, Endpoint, JobParts, RowSender, mode_of
from pipeline.errors import TransientError
from pipeline.outcome import Outcome, answered, failed
from pipeline.pricing import Usage
from pipeline.providers.base import Answer, GeneratedImage, ImageAnswer
from pipeline.providers.image_models import (
    BACKGROUNDS,
    MAX_IMAGES,
    MODERATIONS,
    OUTPUT_FORMATS,
    check_image_job,
    image_model,
)
from pipeline.rates import NO_RATE
from pipeline.spec import ImageGenSpec, RequestSpec
from pipeline.tables import Table, shown

if TYPE_CHECKING:
    from pipeline.pricing import Price
    from pipeline.providers.base import BatchResult, Codec, ImagesCodec
    from pipeline.rendered import Request
    from pipeline.senders import Sending
    from pipeline.structured import Checker
    from pipeline.tokens import ChatTokenCounter

QUALITIES = ("low", "medium", "high", "xhigh", "max", "auto", "standard", "hd")  # the API's; per model: checked later
STYLES = ("vivid", "natural")
RESPONSE_FORMATS = ("url", "b64_json")
FOREIGN_KEYS = ("system", "messages", "max_tokens", "temperature", "top_p", "seed", "stop", "reasoning_effort",
                "response_schema", "response_schema_file", "schema_retries", "images", "image_position", "tools",
                "tool_choice", "input", "dimensions", "encoding_format", "batch_size", "batch_tokens",
                "max_input_tokens")

# The file formats an image can come back in, known by their first bytes (never by what the answer claims).
_MAGIC = ((b"\x89PNG\r\n\x1a\n", "png", "image/png"), (b"\xff\xd8\xff", "jpg", "image/jpeg"),
          (b"GIF8", "gif", "image/gif"))


def image_type(data: bytes) -> tuple[str, str] | None:
    """The file extension and MIME type of an image's bytes; None when they are no image format the API makes."""
    for magic, ext, mime in _MAGIC:
        if data.startswith(magic):
            return ext, mime
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp", "image/webp"
    return None


class Images(Endpoint):
    """``endpoint = "images"``: ``[request].prompt`` is the template; each row asks for ``n`` images."""

    name = "images"
    prompt_role = "user"
    chat_messages = False
    bills_output = True
    row_prints = False  # a row is done only while its files are whole: it is known by its key, looked up
    size_limit = "prompt limit"
    price_output = ("output_image_mtok", "output_mtok")  # image tokens (image-only models price them as output)
    ray = False

    def parse(self, req: Table, base: Path) -> RequestSpec:
        """The image keys: model, prompt, and the model's own parameters (checked against the model later)."""
        for key in FOREIGN_KEYS:
            if req.has(key):
                raise req.fail(key, 'does not apply to endpoint = "images"')
        model = req.str("model", required=True)
        prompt = req.str("prompt", required=True)
        assert model is not None and prompt is not None
        n = req.int("n", 1)
        if n > MAX_IMAGES:
            raise req.fail("n", f"can be at most {MAX_IMAGES} (the API's limit of images per request), got {n}")
        image = ImageGenSpec(
            n=n, size=req.str("size"), quality=_choice(req, "quality", QUALITIES),
            background=_choice(req, "background", BACKGROUNDS),
            output_format=_choice(req, "output_format", OUTPUT_FORMATS),
            output_compression=req.int("output_compression", minimum=0),
            moderation=_choice(req, "moderation", MODERATIONS), style=_choice(req, "style", STYLES),
            response_format=_choice(req, "response_format", RESPONSE_FORMATS))
        if image.output_compression is not None:
            if image.output_compression > 100:
                raise req.fail("output_compression", f"must be 0 to 100, got {image.output_compression}")
            if image.output_format not in ("jpeg", "webp"):
                raise req.fail("output_compression", 'applies with output_format = "jpeg" or "webp" only')
        if image.background == "transparent" and image.output_format == "jpeg":
            raise req.fail("background", 'a transparent background needs output_format = "png" or "webp"')
        per_image, _exact = image_model(model).output_tokens(image.size, image.quality)
        spec = RequestSpec(endpoint=self.name, model=model, prompt=prompt, prompt_source=req.where("prompt"),
                           max_tokens=n * per_image, mode=mode_of(req), image=image)
        req.done()
        return spec

    def body(self, codec: Codec, messages: list[dict[str, str]]) -> bytes:
        """The body of the row's prompt."""
        return cast("ImagesCodec", codec).body(messages[-1]["content"])

    def text_body(self, codec: Codec) -> Any:
        """A row's text is its body's prompt: no message list per row."""
        return cast("ImagesCodec", codec).body

    def sender(self, sending: Sending, spec: RequestSpec, *, codec: Codec, checker: Checker | None,
               counter: ChatTokenCounter | None) -> ImagesSender:
        """A row per request; its images written to files as they come."""
        assert isinstance(checker, ImageFiles), "the images endpoint's answers are its files (``answers``)"
        return ImagesSender(sending, cast("ImagesCodec", codec), checker)

    def made(self, spec: RequestSpec, requests: int, units: float) -> tuple[str, str]:
        """The images the requests make (``n`` each)."""
        return "images to make", f"{requests * (spec.image.n if spec.image else 1):,}"

    def known_output(self, spec: RequestSpec) -> tuple[int, str] | None:
        """A documented model at a stated quality and size bills the table's tokens per image, exactly."""
        image = spec.image
        assert image is not None
        per_image, exact = image_model(spec.model).output_tokens(image.size, image.quality)
        if not exact:
            return None
        return image.n * per_image, f"the image-token table: {per_image:,} tokens per image"

    def context_window(self, spec: RequestSpec, model_window: int | None) -> int | None:
        """No context window: a prompt is limited in characters, which the API checks."""
        return None

    def answers(self, spec: RequestSpec, output: Path, url: str | None = None) -> AnswerColumns:
        """The image files' columns; a recorded answer is whole while its files are. Beside an object-storage
        output, the files are uploaded after the run and the columns name their objects."""
        folder = output.with_suffix(f".{self.name}")
        folder_url = None if url is None else (url.removesuffix(".parquet") + f".{self.name}")
        files = ImageFiles(folder, spec.image.n if spec.image else 1, folder_url)
        return AnswerColumns(files, files.columns, files.whole, folder, folder_url)

    def family_warnings(self, job: JobParts) -> list[str]:
        """The image model's documented rules (``providers.image_models``) applied to the job's parameters."""
        assert job.request.image is not None
        return check_image_job(job.source, job.api.provider, job.request.model, job.request.image)

    def batch_outcome(self, r: BatchResult, price: Price | None, *, codec: Codec,
                      checker: Checker | None) -> Outcome:
        """A result line's images written to files, priced at the Batch API price."""
        assert r.answer is not None and isinstance(checker, ImageFiles)
        a = cast("ImageAnswer", r.answer)
        if any(i.data is None for i in a.images):
            return Outcome(r.key, "error", error="the Batch API answered with image URLs; ask for b64_json",
                           error_type="image_url")
        return checker.outcome(r.key, a, [cast("bytes", i.data) for i in a.images], price, attempts=1,
                               latency_ms=None, batch=True)


def _choice(req: Table, key: str, choices: tuple[str, ...]) -> str | None:
    value = req.str(key)
    if value is not None and value not in choices:
        raise req.fail(key, f"must be one of {', '.join(choices)}, got {shown(value)}")
    return value


@dataclass(frozen=True)
class _Fetched:
    """An image fetched from the URL an answer gave (``rate``: what ``Sending.call`` reads of an answer)."""

    data: bytes
    rate: Any = NO_RATE


class ImagesSender(RowSender):
    """One row per request: the answer's images go to files (off the event loop) before the row's outcome is
    recorded, so a journaled answer always has its files."""

    def __init__(self, sending: Sending, codec: ImagesCodec, files: ImageFiles) -> None:
        self.sending, self.codec, self.files = sending, codec, files
        files.sweep()

    async def _ask(self, req: Request) -> Outcome | None:
        s, codec = self.sending, self.codec
        got = await s.call(req.budget_tokens, lambda: s.client.call(codec.path, req.body, codec.answer),
                           req.max_output_tokens)
        if got is None:
            return None
        if got.answer is None:
            assert got.error is not None
            return failed(req.key, got.error, attempts=got.attempts)
        a = got.answer
        if a.usage is None:  # a server that sends no usage: the documented figures, marked estimated
            per_image = req.max_output_tokens // max(1, self.files.n)
            a = ImageAnswer(a.images, a.output_format, a.model, Usage(prompt_tokens=req.prompt_tokens,
                            completion_tokens=per_image * len(a.images)), a.rate)
            estimated = True
        else:
            estimated = False
        datas = []
        for image in a.images:
            data = image.data if image.data is not None else await self._fetch(image)
            if data is None:
                return self.files.unfetched(req.key, a, s.price, attempts=got.attempts)
            datas.append(data)
        outcome = await asyncio.to_thread(self.files.outcome, req.key, a, datas, s.price, attempts=got.attempts,
                                          latency_ms=got.latency_ms)
        return outcome if not estimated or outcome.status != "ok" else _estimated(outcome)

    async def _fetch(self, image: GeneratedImage) -> bytes | None:
        """An image given as a URL, fetched at once (it expires), under the same limits and retries."""
        s, url = self.sending, image.url
        assert url is not None

        async def get() -> _Fetched:
            status, _headers, body = await s.client.get(url)
            if status != 200:
                raise TransientError(f"HTTP {status} fetching a generated image", kind="image_fetch", status=status)
            return _Fetched(body)

        got = await s.call(0, get)
        return None if got is None or got.answer is None else got.answer.data


def _estimated(outcome: Outcome) -> Outcome:
    from dataclasses import replace

    return replace(outcome, usage_estimated=True)


class ImageFiles:
    """The image files of one output (``OUT.images/``) and the answer columns that point at them.

    An answer's record (the outcome's ``content``) is JSON: each image's file name, size and SHA-256, its MIME
    type and the model's revised prompts. The columns hold the files' full paths (a list per row when ``n`` > 1), or
    their objects' URLs beside an object-storage output.
    """

    def __init__(self, folder: Path, n: int, folder_url: str | None = None) -> None:
        self.folder, self.n, self.folder_url = folder, n, folder_url
        many = n > 1

        def col(dtype: pl.DataType) -> pl.DataType:
            return pl.List(dtype) if many else dtype

        self.columns: dict[str, pl.DataType] = {
            "image_path": col(pl.String()), "image_sha256": col(pl.String()), "image_bytes": col(pl.Int64()),
            "mime_type": pl.String(), "revised_prompt": col(pl.String())}
        self._whole: dict[tuple[str, int, int], str] = {}  # (name, size, mtime) -> hash, checked once per run

    # -- writing -------------------------------------------------------------------------------------------

    def sweep(self) -> None:
        """Remove the temporary files a killed run left (a run holds the output's lock: none is being written)."""
        if self.folder.is_dir():
            for tmp in self.folder.glob(".*.part"):
                tmp.unlink(missing_ok=True)

    def outcome(self, key: str, a: ImageAnswer, datas: list[bytes], price: Price | None, *, attempts: int,
                latency_ms: float | None, batch: bool = False) -> Outcome:
        """Write an answer's images and give the row's outcome: answered (priced), or failed when an image is
        not one (its cost is kept: it was paid for)."""
        files: list[dict[str, Any]] = []
        mime = None
        for i, data in enumerate(datas):
            kind = image_type(data)
            if kind is None:
                return _invalid(answered(key, self._answer(a, None), price, attempts=attempts,
                                         latency_ms=latency_ms, batch=batch), f"image {i} is not a PNG, JPEG, "
                                f"WebP or GIF image ({len(data)} bytes)")
            ext, mime = kind
            files.append(self._write(key, i, data, ext))
        record = {"files": files, "mime_type": mime, "revised_prompt": [im.revised_prompt for im in a.images]}
        return answered(key, self._answer(a, orjson.dumps(record).decode()), price, attempts=attempts,
                        latency_ms=latency_ms, batch=batch)

    def unfetched(self, key: str, a: ImageAnswer, price: Price | None, *, attempts: int) -> Outcome:
        """An answer whose image URL could not be fetched: failed (retried on a plain rerun), its cost kept."""
        out = answered(key, self._answer(a, None), price, attempts=attempts, latency_ms=None)
        return _invalid(out, "a generated image could not be fetched from its URL", "image_fetch", retryable=True)

    @staticmethod
    def _answer(a: ImageAnswer, content: str | None) -> Answer:
        return Answer(content=content, finish_reason=None, refusal=None, model=a.model, usage=a.usage, rate=a.rate)

    def _write(self, key: str, i: int, data: bytes, ext: str) -> dict[str, Any]:
        """One image to ``KEY-I-HASH.EXT``: written under a temporary name, then renamed. A file already under
        that name is kept when it holds these very bytes (the name carries their hash), and replaced by them
        when it was damaged since."""
        digest = hashlib.sha256(data).hexdigest()
        name = f"{key[:16]}-{i}-{digest[:16]}.{ext}"
        path = self.folder / name
        if not self._holds(path, len(data), digest):
            self.folder.mkdir(parents=True, exist_ok=True)
            tmp = self.folder / f".{name}.{uuid.uuid4().hex[:8]}.part"
            try:
                with open(tmp, "wb") as fh:
                    fh.write(data)
                os.replace(tmp, path)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
        return {"name": name, "sha256": digest, "bytes": len(data)}

    def _holds(self, path: Path, size: int, digest: str) -> bool:
        """Whether the file at ``path`` is there with this size and hash (hashed once per run and state)."""
        try:
            st = path.stat()
        except OSError:
            return False
        if st.st_size != size:
            return False
        seen = (path.name, st.st_size, st.st_mtime_ns)
        known = self._whole.get(seen)
        if known is None:
            try:
                known = hashlib.sha256(path.read_bytes()).hexdigest()
            except OSError:
                return False
            self._whole[seen] = known
        return known == digest

    # -- reading -------------------------------------------------------------------------------------------

    def whole(self, outcome: Outcome) -> bool:
        """Whether every file of a recorded answer is there with its size and hash."""
        record = _record(outcome.content)
        if record is None:
            return False
        return all(self._holds(self.folder / f["name"], f["bytes"], f["sha256"]) for f in record["files"])

    def problem(self, content: str | None, tool_calls: str | None = None) -> str | None:
        """Answers are checked as they are written (``outcome``)."""
        return None

    def values(self, content: str | None, tool_calls: str | None = None) -> list[Any]:
        """The row's image columns, from its record."""
        record = _record(content)
        if record is None:
            return [None] * len(self.columns)
        files = record["files"]
        paths = [f"{self.folder_url}/{f['name']}" if self.folder_url else str(self.folder / f["name"]) for f in files]
        hashes = [f["sha256"] for f in files]
        sizes = [f["bytes"] for f in files]
        revised = record.get("revised_prompt") or [None] * len(files)
        if self.n > 1:
            return [paths, hashes, sizes, record.get("mime_type"), revised]
        return [paths[0] if paths else None, hashes[0] if hashes else None, sizes[0] if sizes else None,
                record.get("mime_type"), revised[0] if revised else None]


def _record(content: str | None) -> dict[str, Any] | None:
    if content is None:
        return None
    try:
        record = orjson.loads(content)
    except orjson.JSONDecodeError:
        return None
    return record if isinstance(record, dict) and isinstance(record.get("files"), list) else None


def _invalid(outcome: Outcome, why: str, kind: str = "invalid_answer", *, retryable: bool = False) -> Outcome:
    from dataclasses import replace

    return replace(outcome, status="error", content=None, error=why, error_type=kind, retryable=retryable)
