"""Images in requests: where each one comes from, what it really is, whether the provider takes it, and what
it costs in prompt tokens.

A row's image is an ``https://`` URL (sent as a URL: nothing here can look at it), a local file (read, checked
and sent inline), or the bytes of a binary column. An inline image is checked before anything is sent, so a
bad one fails its row alone: its type by its magic bytes, not its name (Pillow reads the header only, it
decodes nothing), its size and pixel dimensions against the provider's documented limits.

Image tokens come from the dimensions, by each provider's documented rule (``image_tokens``):

- OpenAI's **tile rule** (gpt-4o, gpt-4.1, gpt-4.5, gpt-5 and the o-series): ``detail = "low"`` costs the base
  tokens; otherwise the image is scaled to fit 2048 x 2048, then its short side to 768 px, and each 512-px tile
  costs the tile tokens, plus the base (85 and 170; gpt-4o-mini's own 2,833 and 5,667). ``auto`` is counted
  as ``high``, which bounds what the model picks.
- OpenAI's **patch rule** (gpt-4.1-mini, gpt-4.1-nano, gpt-5-mini, gpt-5-nano, o4-mini): 32-px patches, at
  most 1,536 (larger images are scaled down to fit), times the model's multiplier (1.62, 2.46, 1.62, 2.46,
  1.72). ``detail`` does not change it. Measured bills have been reported below these multipliers (1.2 for
  gpt-5-mini), so the count is at or above the bill.
- **Anthropic**: ``width x height / 750`` after Claude's resize (long edge at most 1,568 px and about 1.15
  megapixels; the 1:2 aspect's 784 x 1,568 is the largest area the docs list, used here as the cap, so the
  count is an upper bound).
- A model whose rule is unknown (an OpenAI-compatible server's) is counted by the larger of the tile rule and
  the patch rule at its largest multiplier: a bound, labelled so.

A URL image has no known dimensions offline: it is counted at the most an image can cost under the rule.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import pybase64

MIME = {"PNG": "image/png", "JPEG": "image/jpeg", "GIF": "image/gif", "WEBP": "image/webp"}


@dataclass(frozen=True, slots=True)
class ImageLimits:
    """What a provider takes per image (from its vision docs)."""

    max_bytes: int                 # of the file (OpenAI) or of its base64 text (Anthropic)
    base64_counts: bool            # the limit applies to the base64 text, not the file
    max_side: int | None           # pixels, either side
    animated_gif: bool             # whether an animated GIF is taken
    request_bytes: int | None      # all the images of one request together

    def describe(self) -> str:
        """The limits as the error message states them."""
        size = f"{self.max_bytes / 1e6:g} MB{' base64-encoded' if self.base64_counts else ''} per image"
        side = f", at most {self.max_side} x {self.max_side} px" if self.max_side else ""
        return size + side


# OpenAI: "PNG, JPEG, WEBP, non-animated GIF; up to 20MB per image, 50 MB of image bytes and 500 images per
# request" (platform.openai.com/docs/guides/images-vision, image input requirements).
# Anthropic: "5MB per image (API), at most 8000x8000 px" (docs.anthropic.com/en/docs/build-with-claude/vision).
# Each provider's descriptor names its limits and rule (``providers/``).
OPENAI_LIMITS = ImageLimits(max_bytes=20_000_000, base64_counts=False, max_side=None, animated_gif=False,
                            request_bytes=50_000_000)
CLAUDE_LIMITS = ImageLimits(max_bytes=5 * 1024 * 1024, base64_counts=True, max_side=8000, animated_gif=True,
                            request_bytes=None)


class ImageProblem(Exception):
    """Why a row's image cannot be sent; the message is what its row's error column says."""


@dataclass(frozen=True, slots=True)
class Image:
    """One checked image of a row: a URL to send as is, or inline bytes with their type and dimensions."""

    url: str | None = None
    data: bytes | None = None
    mime: str | None = None
    width: int | None = None
    height: int | None = None
    detail: str | None = None

    def data_url(self) -> str:
        """The inline image as OpenAI takes it."""
        return f"data:{self.mime};base64,{self.base64()}"

    def base64(self) -> str:
        """The inline bytes as base64 text."""
        assert self.data is not None
        return pybase64.b64encode(self.data).decode()


def sniff(data: bytes) -> tuple[str, int, int, bool]:
    """(MIME type, width, height, animated) of image bytes, from their header; ImageProblem when the bytes are
    not a PNG, JPEG, GIF or WEBP image."""
    from PIL import Image as PILImage
    from PIL import UnidentifiedImageError

    try:
        with PILImage.open(BytesIO(data)) as im:  # reads the header; nothing is decoded
            fmt = im.format or ""
            width, height = im.size
            animated = fmt == "GIF" and bool(getattr(im, "is_animated", False))
    except UnidentifiedImageError:
        head = data[:8].hex(" ")
        raise ImageProblem(f"not a PNG, JPEG, GIF or WEBP image (first bytes: {head or 'none'})") from None
    except PILImage.DecompressionBombError as e:
        raise ImageProblem(f"too many pixels to be an image a model takes ({e})") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise ImageProblem(f"unreadable image header: {e}") from None
    if fmt not in MIME:
        raise ImageProblem(f"a {fmt} image: the providers take PNG, JPEG, GIF and WEBP only")
    return MIME[fmt], width, height, animated


def check(data: bytes, limits: ImageLimits, detail: str | None = None) -> Image:
    """Inline image bytes, checked against the provider's limits."""
    if not data:
        raise ImageProblem("the image is empty (0 bytes)")
    size = 4 * math.ceil(len(data) / 3) if limits.base64_counts else len(data)
    if size > limits.max_bytes:
        raise ImageProblem(f"the image is {size:,} bytes{' base64-encoded' if limits.base64_counts else ''}, "
                           f"more than the provider takes ({limits.describe()})")
    mime, width, height, animated = sniff(data)
    if limits.max_side and max(width, height) > limits.max_side:
        raise ImageProblem(f"the image is {width} x {height} px, more than the provider takes "
                           f"({limits.describe()})")
    if animated and not limits.animated_gif:
        raise ImageProblem("an animated GIF: the provider takes non-animated GIFs only")
    return Image(data=data, mime=mime, width=width, height=height, detail=detail)


class ImageLoader:
    """Turns a row's rendered image source into a checked ``Image``; relative paths resolve against
    ``base_dir`` (the input's folder)."""

    def __init__(self, base_dir: Path, limits: ImageLimits) -> None:
        self.base_dir, self.limits = base_dir, limits

    def load(self, value: str | bytes | None, detail: str | None) -> Image:
        """The image a cell names (URL or path) or holds (bytes); ImageProblem says what is wrong with it."""
        if value is None:
            raise ImageProblem("no image: the cell is null")
        if isinstance(value, bytes | bytearray | memoryview):
            return check(bytes(value), self.limits, detail)
        text = value.strip()
        if not text:
            raise ImageProblem("no image: the source renders empty")
        if text.startswith("https://"):
            return Image(url=text, detail=detail)
        if text.startswith(("http://", "ftp://", "s3://", "gs://")):
            raise ImageProblem(f"{text[:80]}: only https:// URLs are sent as URLs (providers fetch those alone)")
        if text.startswith("data:"):
            return check(_data_url_bytes(text), self.limits, detail)
        path = Path(text).expanduser()
        path = path if path.is_absolute() else self.base_dir / path
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise ImageProblem(f"{path}: image file not found") from None
        except IsADirectoryError:
            raise ImageProblem(f"{path}: is a folder, not an image file") from None
        except OSError as e:
            raise ImageProblem(f"{path}: cannot read the image file: {e.strerror}") from None
        try:
            return check(data, self.limits, detail)
        except ImageProblem as e:
            raise ImageProblem(f"{path}: {e}") from None


_DATA_URL = re.compile(r"^data:image/[a-z0-9.+-]+;base64,", re.IGNORECASE)


def _data_url_bytes(text: str) -> bytes:
    m = _DATA_URL.match(text)
    if m is None:
        raise ImageProblem("a data: URL must be data:image/...;base64,...")
    try:
        return pybase64.b64decode(text[m.end():], validate=True)
    except ValueError:
        raise ImageProblem("the data: URL's base64 is not valid") from None


# -- image tokens ----------------------------------------------------------------------------------------------

_TILE_BASE = (85, 170)
_PATCH_CAP = 1536
# Model families, most specific first (a dated snapshot name matches its family's pattern).
_OPENAI_RULES: tuple[tuple[re.Pattern[str], str, tuple[float, float]], ...] = tuple(
    (re.compile(pattern), rule, numbers) for pattern, rule, numbers in (
        (r"^gpt-4\.1-mini", "patch", (1.62, 0)),
        (r"^gpt-4\.1-nano", "patch", (2.46, 0)),
        (r"^gpt-5(\.\d+)?-mini", "patch", (1.62, 0)),
        (r"^gpt-5(\.\d+)?-nano", "patch", (2.46, 0)),
        (r"^o4-mini", "patch", (1.72, 0)),
        (r"^gpt-4o-mini", "tile", (2833, 5667)),
        (r"^(gpt-4o|chatgpt-4o|gpt-4\.1|gpt-4\.5|gpt-4-turbo|gpt-5|o1|o3)", "tile", _TILE_BASE),
    ))
_LARGEST_MULTIPLIER = 2.46


def tile_tokens(width: int, height: int, detail: str | None, base: float = 85, tile: float = 170) -> int:
    """OpenAI's tile rule: fit 2048 x 2048, short side to 768, 512-px tiles (``low``: the base alone)."""
    if detail == "low":
        return int(base)
    w, h = float(width), float(height)
    if max(w, h) > 2048:
        s = 2048 / max(w, h)
        w, h = w * s, h * s
    if min(w, h) > 768:
        s = 768 / min(w, h)
        w, h = w * s, h * s
    return int(base + tile * math.ceil(w / 512) * math.ceil(h / 512))


def patches(width: int, height: int) -> int:
    """OpenAI's 32-px patches of an image, scaled down to at most 1,536 as its docs give the steps."""
    n = math.ceil(width / 32) * math.ceil(height / 32)
    if n > _PATCH_CAP:
        s = math.sqrt(32 * 32 * _PATCH_CAP / (width * height))
        s *= min(math.floor(width * s / 32) / (width * s / 32), math.floor(height * s / 32) / (height * s / 32))
        n = math.ceil(int(width * s) / 32) * math.ceil(int(height * s) / 32)
    return min(n, _PATCH_CAP)


def patch_tokens(width: int, height: int, multiplier: float) -> int:
    """OpenAI's patch rule: patches times the model's multiplier (rounded up)."""
    return math.ceil(patches(width, height) * multiplier)


ANTHROPIC_MAX_EDGE = 1568
ANTHROPIC_MAX_PIXELS = 784 * 1568  # the largest area in Claude's table of sizes that are not resized


def anthropic_tokens(width: int, height: int) -> int:
    """Claude's ``width x height / 750``, after its resize (long edge 1,568 px, about 1.15 megapixels)."""
    s = min(1.0, ANTHROPIC_MAX_EDGE / max(width, height), math.sqrt(ANTHROPIC_MAX_PIXELS / (width * height)))
    return math.ceil(int(width * s) * int(height * s) / 750)


@dataclass(frozen=True, slots=True)
class ImageRule:
    """How one model's images are counted, and whether that count is the documented one or a bound."""

    name: str
    exact: bool

    def tokens(self, image: Image) -> int:
        """The prompt tokens of one image (a URL: the most any image can cost under this rule)."""
        raise NotImplementedError


@dataclass(frozen=True, slots=True)
class _Tile(ImageRule):
    base: float = 85
    tile: float = 170

    def tokens(self, image: Image) -> int:
        if image.width is None or image.height is None:
            return tile_tokens(768, 2048, image.detail, self.base, self.tile)  # the most tiles an image gets
        return tile_tokens(image.width, image.height, image.detail, self.base, self.tile)


@dataclass(frozen=True, slots=True)
class _Patch(ImageRule):
    multiplier: float = 1.0

    def tokens(self, image: Image) -> int:
        if image.width is None or image.height is None:
            return math.ceil(_PATCH_CAP * self.multiplier)
        return patch_tokens(image.width, image.height, self.multiplier)


@dataclass(frozen=True, slots=True)
class _Claude(ImageRule):
    def tokens(self, image: Image) -> int:
        if image.width is None or image.height is None:
            return math.ceil(ANTHROPIC_MAX_PIXELS / 750)
        return anthropic_tokens(image.width, image.height)


@dataclass(frozen=True, slots=True)
class _Unknown(ImageRule):
    def tokens(self, image: Image) -> int:
        return max(_Tile("", True).tokens(image), _Patch("", True, multiplier=_LARGEST_MULTIPLIER).tokens(image))


def claude_rule(model: str) -> ImageRule:
    """Claude's image-token rule (every model alike)."""
    return _Claude("Anthropic's width x height / 750 after its resize (an upper bound)", exact=False)


def openai_rule(model: str) -> ImageRule:
    """The image-token rule of an OpenAI model: its documented tile or patch rule, else a bound by both."""
    name = model.lower().rsplit("/", 1)[-1]
    for pattern, kind, (a, b) in _OPENAI_RULES:
        if pattern.match(name):
            if kind == "patch":
                return _Patch(f"OpenAI's patch rule, x{a:g}", exact=True, multiplier=a)
            return _Tile(f"OpenAI's tile rule ({a:g} + {b:g} a tile)", exact=True, base=a, tile=b)
    return _Unknown(f"no known image rule for {model!r}: bounded by OpenAI's tile and patch rules", exact=False)
