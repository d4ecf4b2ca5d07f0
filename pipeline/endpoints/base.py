"""The endpoint seam: what one kind of request is and needs, declared once.

Every stage that used to ask "is this an embeddings job?" asks the job's endpoint instead: how its prompt is
framed, what one request body is, how rows make units of work (the sender), what a request can never carry,
how many HTTP requests the estimate should expect, what a Batch API result line becomes, which model-family
rules apply and what the output's answer columns are. A new endpoint is a new module here and a codec in each
provider that serves it; the scheduler, the journal, the sink and the estimate stay as they are.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import polars as pl

from pipeline.outcome import too_large
from pipeline.spec import ApiSpec, PricingSpec, RequestSpec
from pipeline.tables import Table, default_of, shown

if TYPE_CHECKING:
    from pathlib import Path

    from pipeline.outcome import Outcome
    from pipeline.pricing import Price, PriceIds
    from pipeline.providers.base import BatchResult, Codec
    from pipeline.rendered import Request
    from pipeline.senders import Sender, Sending, Sent
    from pipeline.structured import Checker
    from pipeline.tokens import ChatTokenCounter


MODES = ("online", "batch")


class JobParts(Protocol):
    """What an endpoint reads of a job (a ``job.Job`` has them): its request, dialect, prices and file."""

    @property
    def request(self) -> RequestSpec: ...

    @property
    def api(self) -> ApiSpec: ...

    @property
    def pricing(self) -> PricingSpec: ...

    @property
    def source(self) -> str: ...


def mode_of(req: Table) -> str:
    """``[request].mode``: online, or through the provider's Batch API."""
    mode: str = req.str("mode", default_of(RequestSpec, "mode"))
    if mode not in MODES:
        raise req.fail("mode", f"must be one of {', '.join(MODES)}, got {shown(mode)}")
    return mode


@dataclass(frozen=True)
class AnswerColumns:
    """How an endpoint's answers become the output's typed columns: the ``checker`` reads them (and checks them
    where the sender asks), ``columns`` are their types; ``whole`` says whether a recorded answer is still whole
    (an answer that lives in files beside the output: they are there and unchanged), so a resume sends again what
    was lost rather than calling it done."""

    checker: Checker | None = None
    columns: dict[str, pl.DataType] | None = None
    whole: Callable[[Outcome], bool] | None = None
    folder: Path | None = None     # where the answers' files are written (uploaded beside an object-storage output)
    folder_url: str | None = None  # and where they go on object storage


class MediaProblem(Exception):
    """Why a row's file (its audio) cannot be sent: the row fails alone, before the run, with this reason."""

    def __init__(self, message: str, kind: str) -> None:
        super().__init__(message)
        self.kind = kind


class Media(Protocol):
    """What builds the body of a row whose request carries a file the endpoint reads (transcriptions' audio)."""

    def body(self, messages: list[dict[str, str]], value: Any) -> tuple[bytes, bytes]:
        """(the row's body, what its request key hashes) from its rendered messages and the value its last
        template names (a rendered path, or a binary column's bytes); MediaProblem when the file cannot go."""
        ...


@dataclass(frozen=True)
class Vectors:
    """An endpoint whose answers are vectors: the output gets a float32 column of this many dimensions
    (None: not known before the first answer)."""

    dims: int | None


class Endpoint(ABC):
    """One kind of request (``[request].endpoint``). Subclasses declare the facts as class attributes and the
    behaviours as methods; instances hold no state, so one per kind is shared (``endpoint_of``)."""

    name: ClassVar[str]            # the [request].endpoint value, and the name a provider maps to its URL path
    prompt_role: ClassVar[str]     # the role [request].prompt renders as
    chat_messages: ClassVar[bool]  # a request is a list of chat messages (framing tokens, a cacheable prefix)
    bills_output: ClassVar[bool]   # answers carry output tokens (a price needs an output rate)
    row_prints: ClassVar[bool]     # a resume may know rows by their cells' print (an answer is one row's own)
    size_limit: ClassVar[str]      # what a request too large for the model exceeds, in words
    # the price table's fields that price the answer's tokens, the first a model has
    price_output: ClassVar[tuple[str, ...]] = ("output_mtok",)
    ray: ClassVar[bool] = True     # runs on the Ray engine too
    billed_units: ClassVar[bool] = False  # requests bill units that are not tokens (``units``)
    text_answers: ClassVar[bool] = False  # the answer is text a later step reads (a [reduce], a chained job)

    @abstractmethod
    def parse(self, req: Table, base: Path) -> RequestSpec:
        """Its ``[request]`` keys read into the typed spec (``req.done()`` refuses the keys left over)."""

    @abstractmethod
    def body(self, codec: Codec, messages: list[dict[str, str]]) -> bytes:
        """The exact JSON body of one row's rendered messages (its bytes are hashed into the request key)."""

    def media(self, spec: RequestSpec, input_folder: Path) -> Media | None:
        """The builder of rows' bodies when a request carries a file the endpoint reads (None: rendering alone
        makes the body)."""
        return None

    def text_body(self, codec: Codec) -> Callable[[str], bytes] | None:
        """A builder from the prompt's text straight to a body, when the endpoint takes plain text (no
        message list per row); None when its requests are messages."""
        return None

    @abstractmethod
    def sender(self, sending: Sending, spec: RequestSpec, *, codec: Codec, checker: Checker | None,
               counter: ChatTokenCounter | None) -> Sender:
        """The sender that turns this endpoint's requests into units of work and sends them."""

    def refuse_staged(self, key: str, prompt_tokens: int, spec: RequestSpec) -> Outcome | None:
        """The failed outcome of a request that must not join a Batch API file (it would fail the file);
        None when it can go."""
        return None

    def http_requests(self, spec: RequestSpec, sendable: int, tokens: int) -> int:
        """How many HTTP requests ``sendable`` requests of ``tokens`` prompt tokens in all will take."""
        return sendable

    def price(self, job: JobParts, price_ids: PriceIds) -> Price | None:
        """The price of the job's model, with the job's overrides (looked up under ``price_ids``)."""
        from pipeline.pricing import lookup_price

        return lookup_price(job.request.model, job.pricing, input_only=not self.bills_output, price_ids=price_ids,
                            output_keys=self.price_output)

    def made(self, spec: RequestSpec, requests: int, units: float) -> tuple[str, str] | None:
        """What ``requests`` requests (of ``units`` billed units) make or take, where the estimate should say it:
        (what, how much)."""
        return None

    def units(self, req: Request) -> float:
        """The billed units of a request that are not tokens (seconds of audio); read when ``billed_units``."""
        return 0.0

    def known_output(self, spec: RequestSpec) -> tuple[int, str] | None:
        """The output tokens of every answer, with where that comes from, when the endpoint knows them before the
        run (the expected cost is then the bound)."""
        return None

    def context_window(self, spec: RequestSpec, model_window: int | None) -> int | None:
        """The most tokens one request may hold (the estimate's over-context check)."""
        return model_window

    def answers(self, spec: RequestSpec, output: Path, url: str | None = None) -> AnswerColumns:
        """The typed answer columns of the output at ``output`` (none beyond ``content`` by default); ``url``:
        the object-storage output ``output`` is the stage of."""
        return AnswerColumns()

    def vectors(self, codec: Codec) -> Vectors | None:
        """The vector column of the output, if answers are vectors."""
        return None

    def family_warnings(self, job: JobParts) -> list[str]:
        """What the model family's documented rules say of the job's parameters (refusals raise)."""
        return []

    @abstractmethod
    def batch_outcome(self, r: BatchResult, price: Price | None, *, codec: Codec,
                      checker: Checker | None) -> Outcome:
        """One answered Batch API result line as its row's outcome, priced at the Batch API price."""


class RowSender:
    """What the senders of one row per request share (chat, images, transcriptions): every request is a unit of
    its own, sent with the most it may cost held against the budget; a subclass gives ``_ask`` (one row's request to
    its outcome) and sets ``sending``."""

    sending: Sending

    def refuse(self, req: Request) -> Outcome | None:
        """A request larger than a minute of tokens can never be admitted."""
        budget = self.sending.budget
        if budget.fits(req.budget_tokens, req.max_output_tokens):
            return None
        return too_large(req.key, req.budget_tokens, budget.tpm or budget.itpm or budget.otpm)

    def add(self, req: Request) -> list[Request]:
        """Every request is a unit of its own."""
        return [req]

    def drain(self) -> None:
        """Nothing is ever held back."""
        return None

    async def send(self, unit: list[Request]) -> Sent:
        """Send one row's request to its final outcome."""
        req = unit[0]
        outcome = await self.sending.spending(req.prompt_tokens, req.max_output_tokens, lambda: self._ask(req))
        return [] if outcome is None else [(unit, outcome)]

    async def _ask(self, req: Request) -> Outcome | None:
        raise NotImplementedError
