"""The chat endpoint: one row per request, messages in, text (or a schema's fields, or tool calls) out.

A chat unit is one row, asked again when its answer does not match the schema. The model family's documented
rules (sampling, reasoning models, stop sequences) are checked before a run.
"""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, cast

from pipeline.endpoints.base import AnswerColumns, Endpoint, JobParts, RowSender, mode_of
from pipeline.outcome import Outcome, answered, failed, invalid_answer
from pipeline.pricing import Usage
from pipeline.providers.families import check_family
from pipeline.spec import ChatSpec, ImageSpec, Message, RequestSpec, ToolSpec
from pipeline.tables import Table, default_of, resolve_path, shown, type_name

ROLES = ("system", "developer", "user", "assistant")
IMAGE_DETAILS = ("low", "high", "auto")
IMAGE_POSITIONS = ("after", "before")
TOOL_CHOICES = ("auto", "required")
_TOOL_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
EMBEDDINGS_KEYS = ("input", "dimensions", "encoding_format", "batch_size", "batch_tokens", "max_input_tokens")

if TYPE_CHECKING:
    from pipeline.pricing import Price
    from pipeline.providers.base import Answer, BatchResult, ChatCodec, Codec
    from pipeline.rendered import Request
    from pipeline.senders import Sending
    from pipeline.structured import Checker
    from pipeline.tokens import ChatTokenCounter


class Chat(Endpoint):
    """``endpoint = "chat"``: a request is the row's messages."""

    name = "chat"
    prompt_role = "user"
    chat_messages = True
    bills_output = True
    row_prints = True
    size_limit = "context window"
    text_answers = True

    def parse(self, req: Table, base: Path) -> RequestSpec:
        """The chat keys: model, prompt (or prompt_file), system, messages, sampling, a response schema or tools,
        images."""
        for key in EMBEDDINGS_KEYS:
            if req.has(key):
                raise req.fail(key, 'is for endpoint = "embeddings" only')
        model = req.str("model", required=True)
        assert model is not None
        if req.has("prompt") and req.has("prompt_file"):
            raise req.fail("prompt_file", "conflicts with [request].prompt: give one of them")
        prompt, prompt_source = "", f"{req.where('prompt')}"
        if req.has("prompt_file"):
            rel = req.str("prompt_file", required=True)
            assert rel is not None
            path = Path(resolve_path(base, rel))
            if not path.is_file():
                raise req.fail("prompt_file", f"file not found: {path}")
            try:
                prompt = path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as e:
                raise req.fail("prompt_file", f"cannot be read: {path}: {e}") from None
            prompt_source = str(path)
        else:
            prompt = req.str("prompt", required=True) or ""
        messages = _messages(req)
        stop = req.str_list("stop")
        if len(stop) > 4:
            raise req.fail("stop", f"takes at most 4 strings, got {len(stop)}")
        if req.has("response_schema") and req.has("response_schema_file"):
            raise req.fail("response_schema_file", "conflicts with [request].response_schema: give one of them")
        schema = req.get("response_schema")
        if schema is not None and not isinstance(schema, dict):
            raise req.fail("response_schema", f"must be a table (a JSON Schema object), got {type_name(schema)}")
        schema_where = req.where("response_schema")
        if req.has("response_schema_file"):
            rel = req.str("response_schema_file", required=True)
            assert rel is not None
            path = Path(resolve_path(base, rel))
            try:
                schema = json.loads(path.read_text(encoding="utf-8"))
            except FileNotFoundError:
                raise req.fail("response_schema_file", f"file not found: {path}") from None
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
                raise req.fail("response_schema_file", f"is not a readable JSON file: {path}: {e}") from None
            if not isinstance(schema, dict):
                raise req.fail("response_schema_file", f"must hold a JSON object: {path}")
            schema_where = str(path)
        if schema is not None:
            from pipeline.structured import check_schema

            check_schema(schema, schema_where)
        tools = _tools(req)
        if tools and schema is not None:
            raise req.fail("tools", "conflicts with [request].response_schema: give one of them (tool arguments are "
                                    "already typed columns)")
        tool_choice = _tool_choice(req, tools)
        position = req.str("image_position", default_of(ChatSpec, "image_position"))
        if position not in IMAGE_POSITIONS:
            raise req.fail("image_position", f"must be one of {', '.join(IMAGE_POSITIONS)}, got {shown(position)}")
        spec = RequestSpec(
            endpoint=self.name,
            model=model,
            system=req.str("system"),
            prompt=prompt,
            prompt_source=prompt_source,
            messages=messages,
            max_tokens=req.int("max_tokens", default_of(RequestSpec, "max_tokens")),
            mode=mode_of(req),
            chat=ChatSpec(
                temperature=req.number("temperature", low=0.0, high=2.0, strict_low=False),
                top_p=req.number("top_p", low=0.0, high=1.0, strict_low=False),
                seed=req.int("seed", minimum=0),
                stop=stop,
                reasoning_effort=req.str("reasoning_effort"),
                response_schema=schema,
                schema_retries=req.int("schema_retries", default_of(ChatSpec, "schema_retries"), minimum=0),
                images=_images(req),
                image_position=position,
                tools=tools,
                tool_choice=tool_choice,
            ),
        )
        req.done()
        return spec

    def body(self, codec: Codec, messages: list[dict[str, str]]) -> bytes:
        """The provider's chat body of the messages."""
        return cast("ChatCodec", codec).body(messages)

    def sender(self, sending: Sending, spec: RequestSpec, *, codec: Codec, checker: Checker | None,
               counter: ChatTokenCounter | None) -> ChatSender:
        """A row per request, schema retries as the job says."""
        return ChatSender(sending, cast("ChatCodec", codec), checker=checker, schema_retries=spec.chat.schema_retries,
                          counter=counter)

    def answers(self, spec: RequestSpec, output: Path, url: str | None = None) -> AnswerColumns:
        """A response schema's properties, or the tools' arguments, as typed columns, checked as they come."""
        if spec.chat.response_schema is not None:
            from pipeline.structured import AnswerChecker, columns_of

            return AnswerColumns(AnswerChecker(spec.chat.response_schema), columns_of(spec.chat.response_schema))
        if spec.chat.tools:
            from pipeline.tools import ToolChecker

            checker = ToolChecker(spec.chat.tools, spec.chat.tool_choice)
            return AnswerColumns(checker, checker.columns)
        return AnswerColumns()

    def family_warnings(self, job: JobParts) -> list[str]:
        """The model family's rules (``providers.families``) applied to the job's sampling parameters."""
        req = job.request
        return check_family(job.source, job.api.provider, req.model, temperature=req.chat.temperature,
                            top_p=req.chat.top_p, reasoning_effort=req.chat.reasoning_effort, max_tokens=req.max_tokens,
                            stop=bool(req.chat.stop), options=dict(job.api.options))

    def batch_outcome(self, r: BatchResult, price: Price | None, *, codec: Codec,
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


class ChatSender(RowSender):
    """One row per request. With a response schema, an answer that is not valid JSON for it is asked again up
    to ``schema_retries`` times; every answer paid for is counted."""

    def __init__(self, sending: Sending, codec: ChatCodec, *, checker: Checker | None = None,
                 schema_retries: int = 1, counter: ChatTokenCounter | None = None) -> None:
        self.sending, self.codec, self.checker, self.counter = sending, codec, checker, counter
        self.rounds = 1 + (schema_retries if checker is not None else 0)

    async def _ask(self, req: Request) -> Outcome | None:
        s, client = self.sending, self.sending.client
        path, read = self.codec.path, self.codec.answer
        attempts, rejected = 0, list[Usage]()
        outcome: Outcome | None = None
        for _ in range(self.rounds):
            got = await s.call(req.budget_tokens, lambda: client.call(path, req.body, read),
                               req.max_output_tokens)
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


# -- the [request] keys of a chat job ---------------------------------------------------------------------

def _images(req: Table) -> tuple[ImageSpec, ...]:
    """[request].images: each entry a template string, or a table {source = template, detail = ...}."""
    raw = req.get("images")
    if raw is None:
        return ()
    if not isinstance(raw, list) or not raw:
        raise req.fail("images", f"must be a non-empty list of templates or {{source, detail}} tables, got "
                                 f"{type_name(raw)}")
    out = []
    for i, item in enumerate(raw):
        key = f"images[{i}]"
        if isinstance(item, str):
            item = {"source": item}
        if not isinstance(item, dict) or not set(item) <= {"source", "detail"} or "source" not in item:
            raise req.fail(key, "must be a template string or a table with the keys source and (optionally) detail")
        if not isinstance(item["source"], str) or not item["source"].strip():
            raise req.fail(f"{key}.source", f"must be a non-empty template string, got {shown(item['source'])}")
        detail = item.get("detail")
        if detail is not None and detail not in IMAGE_DETAILS:
            raise req.fail(f"{key}.detail", f"must be one of {', '.join(IMAGE_DETAILS)}, got {shown(detail)}")
        out.append(ImageSpec(template=item["source"], detail=detail, where=req.where(key)))
    return tuple(out)


def _tools(req: Table) -> tuple[ToolSpec, ...]:
    """[[request.tools]]: name, description, JSON Schema parameters, strict; checked like a response schema."""
    raw = req.get("tools")
    if raw is None:
        return ()
    if not isinstance(raw, list) or not raw:
        raise req.fail("tools", f"must be a non-empty list of tables ([[request.tools]]), got {type_name(raw)}")
    from pipeline.structured import check_schema, check_valid_schema

    out: list[ToolSpec] = []
    for i, item in enumerate(raw):
        key = f"tools[{i}]"
        if not isinstance(item, dict):
            raise req.fail(key, f"must be a table with name, description and parameters, got {type_name(item)}")
        unknown = sorted(set(item) - {"name", "description", "parameters", "strict"})
        if unknown:
            raise req.fail(f"{key}.{unknown[0]}", "is not a known key (known keys: description, name, parameters, "
                                                  "strict)")
        name = item.get("name")
        if not isinstance(name, str) or not _TOOL_NAME.match(name):
            raise req.fail(f"{key}.name", f"must be 1-64 letters, digits, _ or -, got {shown(name)}")
        if name in {t.name for t in out}:
            raise req.fail(f"{key}.name", f"repeats the tool name {shown(name)}")
        description = item.get("description")
        if description is not None and not isinstance(description, str):
            raise req.fail(f"{key}.description", f"must be a string, got {type_name(description)}")
        params = item.get("parameters", {"type": "object", "properties": {}, "required": [],
                                          "additionalProperties": False})
        if not isinstance(params, dict):
            raise req.fail(f"{key}.parameters", f"must be a table (a JSON Schema object), got {type_name(params)}")
        strict = item.get("strict", False)
        if not isinstance(strict, bool):
            raise req.fail(f"{key}.strict", f"must be true or false, got {shown(strict)}")
        where = req.where(f"{key}.parameters")
        (check_schema if strict else check_valid_schema)(params, where)
        out.append(ToolSpec(name=name, description=description, parameters=params, strict=strict))
    return tuple(out)


def _tool_choice(req: Table, tools: tuple[ToolSpec, ...]) -> str:
    choice = req.str("tool_choice")
    if choice is None:
        return "auto"
    if not tools:
        raise req.fail("tool_choice", "needs [[request.tools]]")
    names = [t.name for t in tools]
    if choice not in TOOL_CHOICES and choice not in names:
        raise req.fail("tool_choice", f"must be auto, required or a tool's name ({', '.join(names)}), got "
                                      f"{shown(choice)}")
    return choice


def _messages(req: Table) -> tuple[Message, ...]:
    raw = req.get("messages")
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise req.fail("messages", f"must be a list of {{role, content}} tables, got {type_name(raw)}")
    out = []
    for i, m in enumerate(raw):
        key = f"messages[{i}]"
        if not isinstance(m, dict) or set(m) != {"role", "content"}:
            raise req.fail(key, "must be a table with exactly the keys role and content")
        if m["role"] not in ROLES:
            raise req.fail(f"{key}.role", f"must be one of {', '.join(ROLES)}, got {shown(m['role'])}")
        if not isinstance(m["content"], str):
            raise req.fail(f"{key}.content", f"must be a string, got {type_name(m['content'])}")
        out.append(Message(role=m["role"], content=m["content"]))
    return tuple(out)
