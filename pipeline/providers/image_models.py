"""OpenAI's image-generation models: what each takes (``/v1/images/generations``) and how many output tokens
an image costs, so a job is refused before the run rather than row by row, and priced before it.

Sources: the API reference of ``POST /images/generations`` (developers.openai.com/api/reference/resources/images,
as the ``openai`` 3.x SDK's ``image_generate_params.py`` carries it, read 2026-12-06) for the models, parameters and
sizes; the image-generation guide's "cost and latency" table for the output tokens of one image by quality and
size (the GPT Image 1 family: gpt-image-1, gpt-image-1-mini, gpt-image-1.5).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from pipeline.errors import JobError
from pipeline.spec import ImageGenSpec

STANDARD_SIZES = ("1024x1024", "1536x1024", "1024x1536")
QUALITIES = ("low", "medium", "high", "auto")
BACKGROUNDS = ("transparent", "opaque", "auto")
OUTPUT_FORMATS = ("png", "webp", "jpeg")
MODERATIONS = ("low", "auto")
MAX_IMAGES = 10          # n: "between 1 and 10"
MAX_PROMPT_CHARS = 32_000  # "The maximum length is 32000 characters"

# Output image tokens of one image, by quality and size (the guide's table for the GPT Image 1 family).
TOKENS_PER_IMAGE: dict[str, dict[str, int]] = {
    "low": {"1024x1024": 272, "1024x1536": 408, "1536x1024": 400},
    "medium": {"1024x1024": 1056, "1024x1536": 1584, "1536x1024": 1568},
    "high": {"1024x1024": 4160, "1024x1536": 6240, "1536x1024": 6208},
}

# Retired models, refused before the run with the date and what to use instead.
RETIRED = {
    "dall-e-2": "was retired on 2026-05-12; use a GPT image model (gpt-image-1.5, gpt-image-2, ...)",
    "dall-e-3": "was retired on 2026-05-12; use a GPT image model (gpt-image-1.5, gpt-image-2, ...)",
    "gpt-image-1": "was shut down on 2026-10-23; use gpt-image-2.5-sunburst or gpt-image-2.5-flare",
}

_DOCUMENTED_TOKENS = re.compile(r"^(gpt-image-1-mini|gpt-image-1\.5)(-\d{4}-\d{2}-\d{2})?$")
_FREE_SIZES = re.compile(r"^gpt-image-2(\.5-(sunburst|flare))?(-\d{4}-\d{2}-\d{2})?$")
_SIZE = re.compile(r"^(\d{2,5})x(\d{2,5})$")
_MORE_QUALITIES = re.compile(r"^gpt-image-2\.5-")


@dataclass(frozen=True)
class ImageModel:
    """What one GPT image model takes, from the API reference."""

    name: str
    free_sizes: bool       # any WIDTHxHEIGHT within the limits, not only the three standard sizes
    qualities: tuple[str, ...]
    documented_tokens: bool  # the guide's table of output tokens applies to it exactly

    def size_problem(self, size: str) -> str | None:
        """Why ``size`` is not one this model takes, or None."""
        if size == "auto" or size in STANDARD_SIZES:
            return None
        if not self.free_sizes:
            return f"must be one of auto, {', '.join(STANDARD_SIZES)} for {self.name}"
        m = _SIZE.match(size)
        if m is None:
            return "must be WIDTHxHEIGHT (for example 1536x864) or auto"
        w, h = int(m[1]), int(m[2])
        if w % 16 or h % 16:
            return "needs a width and a height that are multiples of 16"
        if max(w, h) > 3 * min(w, h):
            return "needs an aspect ratio between 1:3 and 3:1"
        if w * h > 3840 * 2160 or max(w, h) > 3840:
            return "is larger than the largest size the API takes (3840x2160)"
        return None

    def output_tokens(self, size: str | None, quality: str | None) -> tuple[int, bool]:
        """The most output tokens one image of this size and quality can bill, and whether that is the documented
        figure (False: scaled by area from the table, for a size or model the guide does not cover)."""
        q = quality if quality in TOKENS_PER_IMAGE else "high"  # auto (and xhigh/max): the highest known
        table = TOKENS_PER_IMAGE[q]
        exact = self.documented_tokens and quality in TOKENS_PER_IMAGE
        if size is None or size == "auto":
            return max(table.values()), exact
        if size in table:
            return table[size], exact
        w, h = (int(x) for x in size.split("x"))
        return -(-table["1024x1024"] * w * h // (1024 * 1024)), False


def image_model(model: str) -> ImageModel:
    """The rules of ``model`` (a model this module does not know gets the rules every GPT image model shares)."""
    qualities = QUALITIES + (("xhigh", "max") if _MORE_QUALITIES.match(model) else ())
    return ImageModel(name=model, free_sizes=bool(_FREE_SIZES.match(model)), qualities=qualities,
                      documented_tokens=bool(_DOCUMENTED_TOKENS.match(model)))


# Providers whose image models are OpenAI's own (the rules above apply); a compatible server's are its own.
_OPENAI_MODELS = ("openai", "azure")


def check_image_job(source: str, provider: str, model: str, image: ImageGenSpec) -> list[str]:
    """Refuse (JobError) what the model's API refuses, before the run; warn where the estimate is approximate."""
    if provider not in _OPENAI_MODELS:
        return []
    where = f"{source}: [request]"
    if model in RETIRED:
        raise JobError(f"{where}.model = {model!r} {RETIRED[model]}")
    rules = image_model(model)
    for key in ("style", "response_format"):
        if getattr(image, key) is not None:
            raise JobError(f"{where}.{key} is not taken by GPT image models (it was for the retired DALL-E models; "
                           "GPT image models always answer in base64)")
    if image.quality is not None and image.quality not in rules.qualities:
        raise JobError(f"{where}.quality must be one of {', '.join(rules.qualities)} for {model}, got "
                       f"{image.quality!r}")
    if image.size is not None and (problem := rules.size_problem(image.size)) is not None:
        raise JobError(f"{where}.size = {image.size!r} {problem}")
    if rules.documented_tokens and image.quality in (None, *QUALITIES) and image.size in (None, "auto",
                                                                                          *STANDARD_SIZES):
        return []  # the table's figures (auto: the highest, a bound)
    return [f"the output tokens of one {model} image at size {image.size or 'auto'}, quality "
            f"{image.quality or 'auto'} are not documented: the estimate's bound scales the GPT Image 1 table by "
            "area (the run's cost comes from the API's usage)"]
