"""The simulator's image generation (``POST /v1/images/generations``): OpenAI's GPT image models as the API
reference describes them, with its own copy of their rules (never the client's), real images of the asked size
and format, and usage as the image-generation guide's token table gives it.

Answers are deterministic: an image's colours and a band across it come from a hash of the prompt and the
image's index, so a test can check an image against its row, and two rows never share an image by chance.
PNGs are built by hand as 1-bit palette images (a few KiB to compress, not 3 MB per 1024x1024 image); JPEG and
WebP go through Pillow.

Test hooks: a prompt containing ``SIM_400`` gets a 400 (the moderation refusal), ``SIM_NOT_IMAGE`` gets an
answer whose bytes are no image, ``SIM_URL`` is answered with a URL to fetch the image from.
"""

from __future__ import annotations

import base64
import hashlib
import io
import re
import struct
import time
import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from aiohttp import web

from pipeline.sim.errors import SimFailure
from pipeline.tokens import get_encoding

if TYPE_CHECKING:
    from pipeline.sim.host import Host

# The API reference's parameters (POST /images/generations) and what GPT image models take.
FIELDS = frozenset({"model", "prompt", "n", "size", "quality", "background", "output_format", "output_compression",
                    "moderation", "partial_images", "stream", "user", "safety_identifier", "response_format",
                    "style"})
STANDARD_SIZES = {"1024x1024": (1024, 1024), "1536x1024": (1536, 1024), "1024x1536": (1024, 1536)}
RETIRED = {"dall-e-2", "dall-e-3", "gpt-image-1"}
KNOWN = re.compile(r"^(gpt-image-(1-mini|1\.5|2|2\.5-sunburst|2\.5-flare|2\.6-sunburst|2\.6-flare)"
                   r"(-\d{4}-\d{2}-\d{2})?|chatgpt-image-latest)$")
FREE_SIZES = re.compile(r"^gpt-image-2(\.5-(sunburst|flare))?(-\d{4}-\d{2}-\d{2})?$")
MORE_QUALITIES = re.compile(r"^gpt-image-2\.5-")
# Output tokens of one image by quality and size (the guide's table); "auto" is answered at medium here.
TOKENS = {"low": {"1024x1024": 272, "1024x1536": 408, "1536x1024": 400},
          "medium": {"1024x1024": 1056, "1024x1536": 1584, "1536x1024": 1568},
          "high": {"1024x1024": 4160, "1024x1536": 6240, "1536x1024": 6208}}


@dataclass
class ImageCall:
    """A checked image-generation body."""

    body: dict[str, Any]
    model: str
    prompt: str
    n: int
    width: int
    height: int
    size: str
    quality: str
    fmt: str
    prompt_tokens: int
    output_tokens: int


def _bad(message: str, param: str | None = None, code: str | None = None) -> SimFailure:
    return SimFailure(400, message, code=code, param=param)


def image_call(body: dict[str, Any], lenient: bool = False) -> ImageCall:
    """Check a body as the API does; raises SimFailure."""
    model = body.get("model")
    if not isinstance(model, str):
        raise _bad("you must provide a model parameter", "model")
    if model in RETIRED:
        raise SimFailure(404, f"The model `{model}` has been deprecated.", code="model_not_found", param="model")
    if not lenient:
        unknown = sorted(set(body) - FIELDS)
        if unknown:
            raise _bad(f"Unrecognized request argument supplied: {unknown[0]}", unknown[0], "unknown_parameter")
        for key in ("response_format", "style"):
            if key in body:
                raise _bad(f"Unknown parameter: '{key}'.", key, "unknown_parameter")
        if not KNOWN.match(model):
            raise SimFailure(404, f"The model `{model}` does not exist or you do not have access to it.",
                             code="model_not_found", param="model")
    prompt = body.get("prompt")
    if not isinstance(prompt, str) or not prompt:
        raise _bad("'prompt' must be a non-empty string", "prompt")
    if len(prompt) > 32_000:
        raise _bad(f"'prompt' is too long: {len(prompt)} characters, the maximum is 32000.", "prompt",
                   "string_above_max_length")
    n = body.get("n", 1)
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= 10:
        raise _bad(f"Invalid 'n': must be an integer between 1 and 10, got {n!r}.", "n", "integer_out_of_range")
    size = body.get("size", "auto")
    width, height = _size(model, size)
    qualities = ("low", "medium", "high", "auto") + (("xhigh", "max") if MORE_QUALITIES.match(model) else ())
    quality = body.get("quality", "auto")
    if quality not in qualities:
        raise _bad(f"Invalid value: '{quality}'. Supported values are: {', '.join(repr(q) for q in qualities)}.",
                   "quality", "invalid_value")
    background = body.get("background", "auto")
    if background not in ("transparent", "opaque", "auto"):
        raise _bad(f"Invalid value: '{background}'.", "background", "invalid_value")
    fmt = body.get("output_format", "png")
    if fmt not in ("png", "webp", "jpeg"):
        raise _bad(f"Invalid value: '{fmt}'. Supported values are: 'png', 'webp' and 'jpeg'.", "output_format",
                   "invalid_value")
    if background == "transparent" and fmt == "jpeg":
        raise _bad("Transparent background is not supported for the jpeg output format.", "background")
    compression = body.get("output_compression")
    if compression is not None:
        if fmt == "png":
            raise _bad("output_compression is only supported for the jpeg and webp output formats.",
                       "output_compression")
        if not isinstance(compression, int) or not 0 <= compression <= 100:
            raise _bad("Invalid 'output_compression': must be an integer between 0 and 100.", "output_compression")
    if body.get("moderation", "auto") not in ("low", "auto"):
        raise _bad(f"Invalid value: '{body.get('moderation')}'.", "moderation", "invalid_value")
    if body.get("stream"):
        raise _bad("streaming is not supported by this simulator", "stream")
    if "SIM_400" in prompt:
        raise _bad("Your request was rejected by the safety system (simulated).", None, "moderation_blocked")
    counted = "high" if quality in ("xhigh", "max") else "medium" if quality == "auto" else quality
    table = TOKENS[counted]
    per_image = table.get(f"{width}x{height}") or -(-table["1024x1024"] * width * height // (1024 * 1024))
    prompt_tokens = len(get_encoding("o200k_base").encode_ordinary(prompt))
    return ImageCall(body, model, prompt, n, width, height, f"{width}x{height}", counted, fmt, prompt_tokens,
                     n * per_image)


def _size(model: str, size: Any) -> tuple[int, int]:
    if size == "auto":
        return 1024, 1024
    if size in STANDARD_SIZES:
        return STANDARD_SIZES[size]
    if not isinstance(size, str) or not FREE_SIZES.match(model):
        raise _bad(f"Invalid value: '{size}'. Supported values are: 'auto', "
                   f"{', '.join(repr(s) for s in STANDARD_SIZES)}.", "size", "invalid_value")
    m = re.match(r"^(\d+)x(\d+)$", size)
    if m is None:
        raise _bad(f"Invalid size '{size}': use WIDTHxHEIGHT.", "size", "invalid_value")
    w, h = int(m[1]), int(m[2])
    if w % 16 or h % 16 or max(w, h) > 3 * min(w, h) or w * h > 3840 * 2160 or max(w, h) > 3840:
        raise _bad(f"Invalid size '{size}': width and height must be multiples of 16, the aspect ratio between 1:3 "
                   "and 3:1, and at most 3840x2160.", "size", "invalid_value")
    return w, h


def colours(prompt: str, index: int) -> tuple[tuple[int, int, int], tuple[int, int, int], float]:
    """The background colour, the band's colour and the band's place (0-1 of the height) of an answer's image."""
    d = hashlib.sha256(f"{index}\x00{prompt}".encode()).digest()
    return (d[0], d[1], d[2]), (255 - d[0], 255 - d[1], 255 - d[2]), d[3] / 255 * 0.8


def render(call: ImageCall, index: int) -> bytes:
    """One image of the answer, in the asked format and size."""
    back, band, at = colours(call.prompt, index)
    if call.fmt == "png":
        return _png(call.width, call.height, back, band, at)
    from PIL import Image, ImageDraw

    im = Image.new("RGB", (call.width, call.height), back)
    top = int(at * call.height)
    ImageDraw.Draw(im).rectangle((0, top, call.width, top + call.height // 10), fill=band)
    out = io.BytesIO()
    quality = call.body.get("output_compression") or 90
    im.save(out, "JPEG" if call.fmt == "jpeg" else "WEBP", quality=quality, **({"method": 0} if call.fmt == "webp"
                                                                               else {}))
    return out.getvalue()


def _png(w: int, h: int, back: tuple[int, int, int], band: tuple[int, int, int], at: float) -> bytes:
    """A 1-bit palette PNG: the background, and a band a tenth of the height across it."""
    plain, banded = b"\x00" + b"\x00" * ((w + 7) // 8), b"\x00" + b"\xff" * ((w + 7) // 8)
    top = int(at * h)
    raw = b"".join(banded if top <= y < top + h // 10 else plain for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 1, 3, 0, 0, 0))
            + chunk(b"PLTE", bytes(back) + bytes(band)) + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b""))


def image_answer(call: ImageCall, url_of: Any = None) -> dict[str, Any]:
    """The response of an admitted call (also a Batch API line's body). ``url_of(bytes) -> url``: answer with
    URLs (the test hook)."""
    data = []
    for i in range(call.n):
        img = render(call, i)
        if "SIM_NOT_IMAGE" in call.prompt:
            img = b"this is not an image"
        if url_of is not None and "SIM_URL" in call.prompt:
            data.append({"url": url_of(img)})
        else:
            data.append({"b64_json": base64.b64encode(img).decode()})
    return {"created": int(time.time()), "background": "opaque", "data": data, "output_format": call.fmt,
            "quality": call.quality, "size": call.size,
            "usage": {"input_tokens": call.prompt_tokens, "output_tokens": call.output_tokens,
                      "total_tokens": call.prompt_tokens + call.output_tokens,
                      "input_tokens_details": {"text_tokens": call.prompt_tokens, "image_tokens": 0},
                      "output_tokens_details": {"image_tokens": call.output_tokens, "text_tokens": 0}}}


class ImagesService:
    """The image-generation routes of one simulator, and the images it serves by URL."""

    def __init__(self, sim: Host) -> None:
        self.sim = sim
        self._hosted: dict[str, bytes] = {}

    def routes(self, app: web.Application) -> None:
        """Register the routes on ``app`` (OpenAI's, Azure's v1 and deployment URLs)."""
        r = app.router
        for prefix in ("/v1", "/openai/v1"):
            r.add_post(f"{prefix}/images/generations", self.generate)
        r.add_post("/openai/deployments/{deployment}/images/generations", self.generate)
        r.add_get("/v1/sim/files/{name}", self.hosted)

    async def generate(self, request: web.Request) -> web.StreamResponse:
        """POST /v1/images/generations."""
        return await self.sim.in_flight(self._generate(request))

    async def _generate(self, request: web.Request) -> web.StreamResponse:
        sim = self.sim
        sim.arrived()
        if (denied := sim.unauthorised(request)) is not None:
            return denied
        raw = await request.read()
        try:
            import orjson

            body = orjson.loads(raw)
            if not isinstance(body, dict):
                raise ValueError
        except ValueError:
            return SimFailure(400, "We could not parse the JSON body of your request.").response()
        if "deployment" in request.match_info:
            body.setdefault("model", request.match_info["deployment"])
        try:
            call = image_call(body, sim.config.lenient)
        except SimFailure as f:
            return f.response()
        refused = await sim.admit(request, raw, body, call.prompt_tokens + call.output_tokens, call.model)
        if refused is not None:
            return refused
        base = f"{request.scheme}://{request.host}"
        payload = image_answer(call, lambda img: self._host(base, img))
        await sim.delay()
        return await sim.respond(request, raw, payload)

    def _host(self, base: str, img: bytes) -> str:
        name = hashlib.sha256(img).hexdigest()[:24] + ".img"
        self._hosted[name] = img
        return f"{base}/v1/sim/files/{name}"

    async def hosted(self, request: web.Request) -> web.Response:
        """GET an image answered by URL (no key needed: a signed URL's stand-in)."""
        img = self._hosted.pop(request.match_info["name"], None)
        if img is None:
            return web.Response(status=404, text="expired")
        return web.Response(body=img, content_type="application/octet-stream")
