"""The simulator's Anthropic API: Messages, count_tokens and Message Batches, with its headers and errors.

Token rule (stated, since Claude's tokenizer is not public): a text is ``ceil(1.25 x`` its o200k token
count ``)`` Claude tokens; a request's input is 5 tokens, plus 3 and the system text's tokens when it has a
system prompt, plus 4 and the content's tokens per message, plus the tokens of the tool definitions and of the
JSON output schema when it has them. ``count_tokens`` returns exactly what the same request is billed.
Output tokens follow the same rule and stop at ``max_tokens``.

Requests are checked the way the API checks them: ``max_tokens`` is required, fields of OpenAI's dialect
(``max_completion_tokens``, ``response_format``, a ``system`` message) are refused with a 400, and the JSON
output format is refused on the models that lack it. Rate limits are those of the simulator's config (RPM,
and input / output tokens per minute apart, output charged ``max_tokens`` at admission), reported in the
``anthropic-ratelimit-*`` headers with RFC 3339 reset times; 529 ``overloaded_error`` comes on demand.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import math
import re
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web

from pipeline.sim import answers, vision
from pipeline.sim.errors import SimFailure
from pipeline.sim.rules import (
    check_anthropic_headers,
    check_anthropic_sampling,
    claude_cache_minimum,
    takes_output_format,
)
from pipeline.tokens import get_encoding

if TYPE_CHECKING:
    from pipeline.sim.host import Host

FACTOR = 1.25
MAX_BATCH_REQUESTS = 100_000
MAX_BATCH_BYTES = 256 * 1024 * 1024
CUSTOM_ID = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
KNOWN_FIELDS = frozenset({"model", "max_tokens", "messages", "system", "temperature", "top_p", "top_k",
                          "stop_sequences", "tools", "tool_choice", "output_config", "metadata", "stream",
                          "thinking", "service_tier"})
SLICES = 10
_ERROR_IDS = itertools.count(1)


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, tz=UTC).isoformat().replace("+00:00", "Z")


class AnthropicService:
    """The Anthropic routes of one simulator."""

    def __init__(self, sim: Host) -> None:
        self.sim = sim
        self.enc = get_encoding("o200k_base")
        self.batches: dict[str, dict[str, Any]] = {}
        self.results: dict[str, list[dict[str, Any]]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._n = 0
        self._drops_left = sim.config.batch_create_drop_replies
        self._cached: set[bytes] = set()  # prompt prefixes in the cache (they never expire here)

    def routes(self, app: web.Application) -> None:
        """Register the routes on ``app``."""
        r = app.router
        r.add_post("/v1/messages", self.messages)
        r.add_post("/v1/messages/count_tokens", self.count_tokens)
        r.add_post("/v1/messages/batches", self.create_batch)
        r.add_get("/v1/messages/batches", self.list_batches)
        r.add_get("/v1/messages/batches/{id}", self.get_batch)
        r.add_post("/v1/messages/batches/{id}/cancel", self.cancel_batch)
        r.add_get("/v1/messages/batches/{id}/results", self.batch_results)

    # -- the wire's shapes -------------------------------------------------------------------------------------

    @staticmethod
    def error(status: int, message: str, type_: str, headers: dict[str, str] | None = None) -> web.Response:
        """Anthropic's error body, with the ``request-id`` its answers carry."""
        request_id = f"req_sim{next(_ERROR_IDS):016d}"
        body = {"type": "error", "error": {"type": type_, "message": message}, "request_id": request_id}
        return web.Response(status=status, body=orjson.dumps(body), content_type="application/json",
                            headers={**(headers or {}), "request-id": request_id})

    def rate_headers(self) -> dict[str, str]:
        """anthropic-ratelimit-* of the configured limits; resets are the times the buckets are full again."""
        sim, now, h = self.sim, time.time(), {}
        tightest: tuple[float, str] | None = None
        for name, bucket in (("requests", sim.rpm), ("input-tokens", sim.itpm), ("output-tokens", sim.otpm)):
            if bucket is None:
                continue
            p = f"anthropic-ratelimit-{name}-"
            h[p + "limit"] = str(bucket.limit)
            h[p + "remaining"] = str(max(0, int(bucket.level)))
            h[p + "reset"] = _iso(now + bucket.reset_s())
            if name != "requests" and (tightest is None or bucket.level / bucket.capacity < tightest[0]):
                tightest = (bucket.level / bucket.capacity, name)
        if tightest is not None:
            for part in ("limit", "remaining", "reset"):
                h[f"anthropic-ratelimit-tokens-{part}"] = h[f"anthropic-ratelimit-{tightest[1]}-{part}"]
        return h

    def tokens(self, text: str) -> int:
        """Claude tokens of a text, by the stated rule."""
        return math.ceil(FACTOR * len(self.enc.encode_ordinary(text)))

    @staticmethod
    def _text(content: Any) -> str:
        if isinstance(content, str):
            return content
        if isinstance(content, list):
            return "".join(str(b.get("text", "")) for b in content if isinstance(b, dict))
        raise SimFailure(400, "messages: content must be a string or a list of blocks")

    def check(self, body: dict[str, Any], *, counting: bool = False) -> int:
        """Check a Messages body the way the API does; its input tokens. Raises SimFailure."""
        unknown = sorted(set(body) - KNOWN_FIELDS)
        if unknown:
            raise SimFailure(400, f"{unknown[0]}: Extra inputs are not permitted")
        model = body.get("model")
        if not isinstance(model, str):
            raise SimFailure(400, "model: Field required")
        if not counting and not isinstance(body.get("max_tokens"), int):
            raise SimFailure(400, "max_tokens: Field required")
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise SimFailure(400, "messages: at least one message is required")
        total = 5
        system = body.get("system")
        if system is not None:
            total += 3 + self.tokens(self._text(system))
        for m in messages:
            if not isinstance(m, dict) or m.get("role") not in ("user", "assistant"):
                role = m.get("role") if isinstance(m, dict) else None
                raise SimFailure(400, f'messages: Unexpected role "{role}". The Messages API accepts a top-level '
                                      "`system` parameter, not 'system' as an input message role.")
            total += 4 + self.tokens(self._text(m.get("content")))
            content = m.get("content")
            for block in content if isinstance(content, list) else ():
                if isinstance(block, dict) and block.get("type") == "image":
                    total += vision.anthropic_block(block)[0]
        if body.get("tools"):
            total += self.tokens(orjson.dumps(body["tools"]).decode())
        fmt = (body.get("output_config") or {}).get("format")
        if fmt is not None:
            if not takes_output_format(model):
                raise SimFailure(400, f"output_config.format: structured outputs are not supported by {model}")
            total += self.tokens(orjson.dumps(fmt.get("schema") or {}).decode())
        return total

    def cache_usage(self, body: dict[str, Any]) -> tuple[int, int]:
        """(read, written) prompt-cache tokens of a request: the tools and system prompt up to a block marked
        ``cache_control``, when they are at least the model's minimum; the first time written, then read."""
        system = body.get("system")
        if not isinstance(system, list):
            return 0, 0
        marked = [i for i, b in enumerate(system) if isinstance(b, dict) and b.get("cache_control")]
        if not marked:
            return 0, 0
        upto = system[:marked[-1] + 1]
        tokens = 5 + 3 + self.tokens(self._text(upto))
        if body.get("tools"):
            tokens += self.tokens(orjson.dumps(body["tools"]).decode())
        if tokens < claude_cache_minimum(str(body.get("model"))):
            return 0, 0
        digest = orjson.dumps([body.get("model"), body.get("tools"), upto])
        if digest in self._cached:
            return tokens, 0
        self._cached.add(digest)
        return 0, tokens

    def answer(self, body: dict[str, Any], input_tokens: int, cache: tuple[int, int] = (0, 0)) -> dict[str, Any]:
        """The Message for a checked body (also a batch result's). Raises SimFailure for the test hooks."""
        content_blocks = body["messages"][-1].get("content")
        last = self._text(content_blocks)
        notes = [vision.anthropic_block(b)[1] for b in content_blocks if isinstance(b, dict)
                 and b.get("type") == "image"] if isinstance(content_blocks, list) else []
        if notes:  # what the simulator "sees": the images' sizes and types
            last = f"{last}\n\nImages: {'; '.join(notes)}."
        if "SIM_400" in last:
            raise SimFailure(400, "Invalid request (the simulator's SIM_400 hook).")
        max_out = int(body["max_tokens"])
        tools = [t for t in body.get("tools") or [] if isinstance(t, dict)]
        choice = body.get("tool_choice") or {"type": "auto"}
        tool = None
        if tools and choice.get("type") == "tool":
            tool = next((t for t in tools if t.get("name") == choice.get("name")), None)
            if tool is None:
                raise SimFailure(400, f"tool_choice: no tool named {choice.get('name')!r} in tools")
        elif tools and choice.get("type") != "none" and not (choice.get("type") == "auto" and "SIM_NO_TOOL" in last):
            tool = vision.pick_tool(tools, last)
        forced = tool is not None
        fmt = (body.get("output_config") or {}).get("format")
        stop = "end_turn"
        schema = (fmt or {}).get("schema") if fmt else tool.get("input_schema") if forced and tool else None
        text: str
        if "SIM_REFUSE" in last:
            text, stop = "", "refusal"
        elif "SIM_BAD_JSON" in last and schema is not None and not forced:
            text = '{"label": "unterminated'
        elif forced and "SIM_BAD_TOOL_ARGS" in last:
            text = '{"amount": "not a number"}'  # Claude's tool input is always JSON; here it breaks the schema
        elif schema is not None:
            value = answers.structured(schema, last)
            text = orjson.dumps(value).decode()
        else:
            text = answers.summary(last)
        out = self.tokens(text)
        if out > max_out and stop != "refusal":
            keep = int(max_out / FACTOR)
            text = self.enc.decode(self.enc.encode_ordinary(text)[:keep])
            out, stop = max_out, "max_tokens"
        if forced and tool is not None and stop == "end_turn":
            content = [{"type": "tool_use", "id": f"toolu_sim{self.sim.stats.requests}", "name": tool["name"],
                        "input": orjson.loads(text)}]
            stop = "tool_use"
        else:
            content = [{"type": "text", "text": text}] if text else []
        return {"id": f"msg_sim{self.sim.stats.requests:08d}", "type": "message", "role": "assistant",
                "model": body["model"], "content": content, "stop_reason": stop, "stop_sequence": None,
                "usage": {"input_tokens": input_tokens - cache[0] - cache[1], "output_tokens": out,
                          "cache_creation_input_tokens": cache[1], "cache_read_input_tokens": cache[0]}}

    # -- online ------------------------------------------------------------------------------------------------

    async def _body(self, request: web.Request) -> tuple[bytes, dict[str, Any]] | web.Response:
        self.sim.arrived()
        raw = await request.read()
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return self.error(400, "The request body is not valid JSON.", "invalid_request_error")
        if not isinstance(body, dict):
            return self.error(400, "The request body must be a JSON object.", "invalid_request_error")
        problem = check_anthropic_headers(request.headers)
        if problem is not None:
            return self.error(400, problem, "invalid_request_error")
        if not self.sim.config.lenient:
            try:
                check_anthropic_sampling(body, request.headers["anthropic-version"])
            except SimFailure as f:
                return self.error(f.status, f.message, "invalid_request_error")
        return raw, body

    async def messages(self, request: web.Request) -> web.StreamResponse:
        """POST /v1/messages."""
        return await self.sim.in_flight(self._messages(request))

    async def _messages(self, request: web.Request) -> web.StreamResponse:
        sim = self.sim
        read = await self._body(request)
        if isinstance(read, web.Response):
            return read
        raw, body = read
        try:
            input_tokens = self.check(body)
            max_out = int(body["max_tokens"])
            refused = await sim.admit(request, raw, body, input_tokens + max_out, str(body["model"]), max_out)
            if refused is not None:
                return refused
            payload = self.answer(body, input_tokens, self.cache_usage(body))
        except SimFailure as f:
            return self.error(f.status, f.message, "invalid_request_error" if f.status < 500 else "api_error")
        await sim.delay()
        sim.stats.billed_input_tokens += input_tokens
        return await sim.respond(request, raw, payload)

    async def count_tokens(self, request: web.Request) -> web.Response:
        """POST /v1/messages/count_tokens: free, exactly what the same request is billed."""
        if (denied := self.sim.unauthorised(request)) is not None:
            return denied
        read = await self._body(request)
        if isinstance(read, web.Response):
            return read
        _raw, body = read
        self.sim.stats.count_tokens_calls += 1
        try:
            return web.json_response({"input_tokens": self.check(body, counting=True)})
        except SimFailure as f:
            return self.error(f.status, f.message, "invalid_request_error")

    # -- Message Batches ---------------------------------------------------------------------------------------

    def _batch_id(self) -> str:
        self._n += 1
        return f"msgbatch_sim{self._n:08d}"

    async def create_batch(self, request: web.Request) -> web.StreamResponse:
        """POST /v1/messages/batches with inline requests."""
        sim = self.sim
        if (denied := sim.unauthorised(request)) is not None:
            return denied
        raw = await request.read()
        if len(raw) > MAX_BATCH_BYTES:
            return self.error(413, f"A batch may be at most {MAX_BATCH_BYTES} bytes.", "request_too_large")
        try:
            reqs = orjson.loads(raw).get("requests")
        except (orjson.JSONDecodeError, AttributeError):
            return self.error(400, "The request body is not valid JSON.", "invalid_request_error")
        if not isinstance(reqs, list) or not reqs:
            return self.error(400, "requests: at least one request is required", "invalid_request_error")
        if len(reqs) > MAX_BATCH_REQUESTS:
            return self.error(400, f"requests: at most {MAX_BATCH_REQUESTS} requests per batch",
                              "invalid_request_error")
        seen: set[str] = set()
        for r in reqs:
            cid = r.get("custom_id") if isinstance(r, dict) else None
            if not isinstance(cid, str) or not CUSTOM_ID.match(cid) or cid in seen:
                return self.error(400, f"requests: custom_id {cid!r} must match ^[a-zA-Z0-9_-]{{1,64}}$ and be "
                                       "unique in the batch", "invalid_request_error")
            if not isinstance(r.get("params"), dict):
                return self.error(400, "requests: each request needs params", "invalid_request_error")
            seen.add(cid)
        hold = sim.config.batch_create_hold_s
        if hold:
            await asyncio.sleep(hold)
            if request.transport is None or request.transport.is_closing():
                return web.Response(status=499)  # the client is gone: as if the request never got through
        now = time.time()
        b: dict[str, Any] = {
            "id": self._batch_id(), "type": "message_batch", "processing_status": "in_progress",
            "request_counts": {"processing": len(reqs), "succeeded": 0, "errored": 0, "canceled": 0, "expired": 0},
            "ended_at": None, "created_at": _iso(now), "expires_at": _iso(now + 86_400), "archived_at": None,
            "cancel_initiated_at": None, "results_url": None}
        self.batches[b["id"]] = b
        self.results[b["id"]] = []
        sim.stats.batches_created += 1
        sim.stats.batches_by_input_file[hashlib.blake2b("\n".join(sorted(seen)).encode()).hexdigest()[:16]] += 1
        base = f"{request.scheme}://{request.host}"
        task = asyncio.create_task(self._process(b, reqs, base))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        if self._drops_left > 0:
            self._drops_left -= 1
            sim.stats.injected["batch_reply_dropped"] += 1
            if request.transport is not None:
                request.transport.abort()
            raise asyncio.CancelledError
        return web.json_response(b)

    async def list_batches(self, request: web.Request) -> web.Response:
        """GET /v1/messages/batches?limit=&after_id= (newest first)."""
        if (denied := self.sim.unauthorised(request)) is not None:
            return denied
        limit = max(1, min(1000, int(request.query.get("limit", "20"))))
        ordered = list(reversed(self.batches.values()))
        after = request.query.get("after_id")
        if after is not None:
            ids = [b["id"] for b in ordered]
            ordered = ordered[ids.index(after) + 1:] if after in ids else []
        page = ordered[:limit]
        return web.json_response({"data": page, "has_more": len(ordered) > limit,
                                  "first_id": page[0]["id"] if page else None,
                                  "last_id": page[-1]["id"] if page else None})

    def _find(self, request: web.Request) -> dict[str, Any] | web.Response:
        if (denied := self.sim.unauthorised(request)) is not None:
            return denied
        b = self.batches.get(request.match_info["id"])
        return b if b is not None else self.error(404, f"No such batch: {request.match_info['id']}",
                                                  "not_found_error")

    async def get_batch(self, request: web.Request) -> web.Response:
        """GET /v1/messages/batches/{id}."""
        self.sim.stats.batch_polls += 1
        b = self._find(request)
        return b if isinstance(b, web.Response) else web.json_response(b)

    async def cancel_batch(self, request: web.Request) -> web.Response:
        """POST /v1/messages/batches/{id}/cancel: what has not run ends ``canceled``."""
        b = self._find(request)
        if isinstance(b, web.Response):
            return b
        if b["processing_status"] == "ended":
            return self.error(400, "the batch has already ended", "invalid_request_error")
        b["processing_status"], b["cancel_initiated_at"] = "canceling", _iso(time.time())
        return web.json_response(b)

    async def batch_results(self, request: web.Request) -> web.Response:
        """GET /v1/messages/batches/{id}/results: JSONL, in no particular order."""
        b = self._find(request)
        if isinstance(b, web.Response):
            return b
        if b["processing_status"] != "ended":
            return self.error(400, "the batch has not ended yet", "invalid_request_error")
        lines = self.results[b["id"]]
        return web.Response(body=b"".join(orjson.dumps(r) + b"\n" for r in lines),
                            content_type="application/binary")

    def _run_one(self, r: dict[str, Any]) -> dict[str, Any]:
        sim = self.sim
        sim.stats.batch_lines += 1
        cid, params = r["custom_id"], r["params"]
        rate = sim.config.batch_line_error_rate
        try:
            if rate and sim.rng.random() < rate:
                sim.stats.injected["batch_line_error"] += 1
                raise SimFailure(500, "Internal server error (injected).")
            if not sim.config.lenient:  # a batch's lines are checked as they run, each failing alone
                check_anthropic_sampling(params, "2023-06-01")
            tokens = self.check(params)
            message = self.answer(params, tokens)
            sim.stats.billed_input_tokens += tokens
            return {"custom_id": cid, "result": {"type": "succeeded", "message": message}}
        except SimFailure as f:
            type_ = "api_error" if f.status >= 500 else "invalid_request_error"
            return {"custom_id": cid, "result": {"type": "errored", "error": {
                "type": "error", "error": {"type": type_, "message": f.message}}}}

    async def _process(self, b: dict[str, Any], reqs: list[dict[str, Any]], base: str) -> None:
        cfg = self.sim.config
        step = cfg.batch_delay_s / (SLICES + 1)
        counts, out = b["request_counts"], self.results[b["id"]]
        per_slice = max(1, -(-len(reqs) // SLICES))
        expire_at = int(len(reqs) * cfg.batch_expire_fraction) if cfg.batch_expire_fraction is not None else None
        done = 0
        while done < len(reqs):
            await asyncio.sleep(step)
            if b["processing_status"] == "canceling" or (expire_at is not None and done >= expire_at):
                kind = "canceled" if b["processing_status"] == "canceling" else "expired"
                for r in reqs[done:]:
                    out.append({"custom_id": r["custom_id"], "result": {"type": kind}})
                counts[kind] += len(reqs) - done
                counts["processing"] -= len(reqs) - done
                break
            end = min(len(reqs), done + per_slice, expire_at if expire_at is not None else len(reqs))
            for r in reqs[done:end]:
                line = self._run_one(r)
                out.append(line)
                counts["succeeded" if line["result"]["type"] == "succeeded" else "errored"] += 1
                counts["processing"] -= 1
            done = end
        await asyncio.sleep(step)
        out.reverse()  # results come in any order: clients must join on custom_id
        b["processing_status"], b["ended_at"] = "ended", _iso(time.time())
        b["results_url"] = f"{base}/v1/messages/batches/{b['id']}/results"
