"""The chat endpoint: one row per request, messages in, text (or a schema's fields, or tool calls) out.

A chat unit is one row, asked again when its answer does not match the schema. The model family's documented
rules (sampling, reasoning models, stop sequences) are checked before a run.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from pipeline.endpoints.base import Endpoint
from pipeline.outcome import Outcome, answered, failed, invalid_answer, too_large
from pipeline.pricing import Usage
from pipeline.providers.families import check_family

if TYPE_CHECKING:
    from pipeline.job import Job
    from pipeline.pricing import Price
    from pipeline.providers.base import Answer, BatchResult, Bodies
    from pipeline.rendered import Request
    from pipeline.senders import Sending, Sent
    from pipeline.spec import RequestSpec
    from pipeline.structured import Checker
    from pipeline.tokens import ChatTokenCounter


class Chat(Endpoint):
    """``endpoint = "chat"``: a request is the row's messages."""

    name = "chat"
    prompt_role = "user"
    chat_messages = True
    rows_share_requests = False
    bills_output = True
    row_prints = True
    size_limit = "context window"

    def body(self, bodies: Bodies, messages: list[dict[str, str]]) -> bytes:
        """The provider's chat body of the messages."""
        return bodies.chat(messages)

    def sender(self, sending: Sending, spec: RequestSpec, *, bodies: Bodies, checker: Checker | None,
               dims: int | None, counter: ChatTokenCounter | None) -> ChatSender:
        """A row per request, schema retries as the job says."""
        return ChatSender(sending, checker=checker, schema_retries=spec.schema_retries, counter=counter)

    def family_warnings(self, job: Job) -> list[str]:
        """The model family's rules (``providers.families``) applied to the job's sampling parameters."""
        req = job.request
        return check_family(job.source, job.api.provider, req.model, temperature=req.temperature,
                            top_p=req.top_p, reasoning_effort=req.reasoning_effort, max_tokens=req.max_tokens,
                            stop=bool(req.stop), anthropic_version=job.api.anthropic_version)

    def batch_outcome(self, r: BatchResult, price: Price | None, *, dims: int | None,
                      checker: Checker | None) -> Outcome:
        """A chat result line: priced at the Batch API price, checked against the schema like an online one."""
        assert r.answer is not None
        answer: Answer = r.answer  # type: ignore[assignment]
        outcome = answered(r.key, answer, price, attempts=1, latency_ms=None, batch=True)
        if checker is not None and outcome.status == "ok":
            problem = checker.problem(outcome.content, outcome.tool_calls)
            if problem is not None:
                return invalid_answer(outcome, problem)
        return outcome


class ChatSender:
    """One row per request. With a response schema, an answer that is not valid JSON for it is asked again up
    to ``schema_retries`` times; every answer paid for is counted."""

    def __init__(self, sending: Sending, *, checker: Checker | None = None, schema_retries: int = 1,
                 counter: ChatTokenCounter | None = None) -> None:
        self.sending, self.checker, self.counter = sending, checker, counter
        self.rounds = 1 + (schema_retries if checker is not None else 0)

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
        s, client = self.sending, self.sending.client
        attempts, rejected = 0, list[Usage]()
        outcome: Outcome | None = None
        for _ in range(self.rounds):
            got = await s.call(req.budget_tokens, lambda: client.chat(req.body), req.max_output_tokens)
            if got is None:
                return None
            attempts += got.attempts
            if got.answer is None:
                assert got.error is not None
                return failed(req.key, got.error, attempts=attempts)
            answer = got.answer if got.answer.usage is not None else self._counted(req, got.answer)
            outcome = answered(req.key, answer, s.price, attempts=attempts, latency_ms=got.latency_ms,
                               rejected=rejected)
            if self.checker is None or outcome.status != "ok":
                return outcome
            problem = self.checker.problem(got.answer.content, got.answer.tool_calls)
            if problem is None:
                return outcome
            if answer.usage is not None:
                rejected.append(answer.usage)
        assert outcome is not None and problem is not None
        return invalid_answer(outcome, problem)

    def _counted(self, req: Request, a: Answer) -> Answer:
        """An answer that came without usage (some compatible servers), with it counted by our tokenizer:
        the request's prompt count and the answer's tokens, marked estimated, never presented as billed."""
        if self.counter is None:
            return a
        completion = self.counter.count_text((a.content or a.refusal or "") + (a.tool_calls or ""))
        return replace(a, usage=Usage(prompt_tokens=req.prompt_tokens, completion_tokens=completion),
                       usage_estimated=True)
