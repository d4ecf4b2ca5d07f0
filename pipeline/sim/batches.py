"""The simulator's Files and Batch API: upload a JSONL of requests, create a batch, poll it, download results.

Batches are processed in the background the way OpenAI describes them (``validating`` -> ``in_progress`` ->
``finalizing`` -> ``completed``), spread over ``batch_delay_s`` so polling sees the counts move. Each line is
answered by the same code as the online endpoints, without rate limits (the Batch API has its own queue).
Results come back out of input order, as the real API warns. Faults on demand: per-line errors, a batch that
fails validation, a batch that expires part-way, a create request held (and dropped if the client has gone),
and a create whose reply is lost after the batch was made.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web

from pipeline.sim.errors import SimFailure, error_response

if TYPE_CHECKING:
    from pipeline.sim.host import Host

MAX_LINES = 50_000
MAX_FILE_BYTES = 200 * 1024 * 1024
ENDPOINTS = ("/v1/chat/completions", "/v1/embeddings", "/v1/images/generations",  # OpenAI's
             "/chat/completions", "/embeddings")  # Azure's
FINAL = ("completed", "failed", "expired", "cancelled")
SLICES = 10  # a batch's lines are answered in this many steps, spread over the configured delay


@dataclass
class _File:
    id: str
    filename: str
    purpose: str
    data: bytes
    created_at: int = field(default_factory=lambda: int(time.time()))

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "object": "file", "bytes": len(self.data), "created_at": self.created_at,
                "filename": self.filename, "purpose": self.purpose, "status": "processed"}


def _not_found(what: str, id_: str) -> web.Response:
    return error_response(404, f"No such {what}: '{id_}'")


def _bad(message: str) -> web.Response:
    return error_response(400, message)


class BatchService:
    """The /v1/files and /v1/batches routes of one simulator, and the background work on its batches."""

    def __init__(self, sim: Host) -> None:
        self.sim = sim
        self.files: dict[str, _File] = {}
        self.batches: dict[str, dict[str, Any]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._n = 0
        self._drops_left = sim.config.batch_create_drop_replies

    def routes(self, app: web.Application) -> None:
        """Register the routes on ``app``."""
        r = app.router
        for prefix in ("/v1", "/openai/v1", "/openai"):  # OpenAI's; Azure's v1 API and its api-version URLs
            r.add_post(f"{prefix}/files", self.upload)
            r.add_get(f"{prefix}/files", self.list_files)
            r.add_get(f"{prefix}/files/{{id}}", self.get_file)
            r.add_get(f"{prefix}/files/{{id}}/content", self.content)
            r.add_post(f"{prefix}/batches", self.create)
            r.add_get(f"{prefix}/batches", self.list_batches)
            r.add_get(f"{prefix}/batches/{{id}}", self.get_batch)
            r.add_post(f"{prefix}/batches/{{id}}/cancel", self.cancel)

    def _id(self, prefix: str) -> str:
        self._n += 1
        return f"{prefix}-sim{self._n:06d}" if prefix == "file" else f"{prefix}_sim{self._n:06d}"

    # -- files -------------------------------------------------------------------------------------------------

    async def upload(self, request: web.Request) -> web.Response:
        """POST /v1/files (multipart: ``file`` and ``purpose``)."""
        if (denied := self.sim.unauthorised(request)) is not None:
            return denied
        try:
            form = await request.post()
        except ValueError as e:
            return _bad(f"could not read the upload: {e}")
        upload, purpose = form.get("file"), form.get("purpose")
        if not isinstance(upload, web.FileField) or not isinstance(purpose, str):
            return _bad("a multipart body with 'file' and 'purpose' is required")
        if purpose not in ("batch", "fine-tune", "assistants", "user_data"):
            return _bad(f"'{purpose}' is not a valid purpose")
        f = _File(self._id("file"), upload.filename or "upload.jsonl", purpose, upload.file.read())
        self.files[f.id] = f
        self.sim.stats.files_uploaded += 1
        return web.json_response(f.to_dict())

    async def list_files(self, request: web.Request) -> web.Response:
        """GET /v1/files (optionally ``?purpose=``)."""
        purpose = request.query.get("purpose")
        data = [f.to_dict() for f in reversed(self.files.values()) if purpose in (None, f.purpose)]
        return web.json_response({"object": "list", "data": data, "has_more": False})

    async def get_file(self, request: web.Request) -> web.Response:
        """GET /v1/files/{id}."""
        f = self.files.get(request.match_info["id"])
        return web.json_response(f.to_dict()) if f else _not_found("file", request.match_info["id"])

    async def content(self, request: web.Request) -> web.Response:
        """GET /v1/files/{id}/content."""
        f = self.files.get(request.match_info["id"])
        if f is None:
            return _not_found("file", request.match_info["id"])
        return web.Response(body=f.data, content_type="application/octet-stream")

    # -- batches -----------------------------------------------------------------------------------------------

    async def create(self, request: web.Request) -> web.StreamResponse:
        """POST /v1/batches."""
        if (denied := self.sim.unauthorised(request)) is not None:
            return denied
        try:
            body = orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            return _bad("We could not parse the JSON body of your request.")
        if not isinstance(body, dict):
            return _bad("the body must be a JSON object")
        file_id, endpoint = body.get("input_file_id"), body.get("endpoint")
        if endpoint not in ENDPOINTS:
            return _bad(f"'endpoint' must be one of {', '.join(ENDPOINTS)}")
        if body.get("completion_window") != "24h":
            return _bad("'completion_window' must be '24h'")
        if file_id not in self.files:
            return _not_found("file", str(file_id))
        hold = self.sim.config.batch_create_hold_s
        if hold:
            await asyncio.sleep(hold)
            if request.transport is None or request.transport.is_closing():
                return web.Response(status=499)  # the client is gone: as if the request never got through
        now = int(time.time())
        batch: dict[str, Any] = {
            "id": self._id("batch"), "object": "batch", "endpoint": endpoint, "errors": None,
            "input_file_id": file_id, "completion_window": "24h", "status": "validating",
            "output_file_id": None, "error_file_id": None, "created_at": now, "in_progress_at": None,
            "expires_at": now + 86_400, "finalizing_at": None, "completed_at": None, "failed_at": None,
            "expired_at": None, "cancelling_at": None, "cancelled_at": None,
            "request_counts": {"total": 0, "completed": 0, "failed": 0},
            "metadata": body.get("metadata") or None,
        }
        self.batches[batch["id"]] = batch
        stats = self.sim.stats
        stats.batches_created += 1
        stats.batches_by_input_file[file_id] += 1
        task = asyncio.create_task(self._process(batch))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        if self._drops_left > 0:
            self._drops_left -= 1
            stats.injected["batch_reply_dropped"] += 1
            if request.transport is not None:
                request.transport.abort()  # made, but the client never hears of it
            raise asyncio.CancelledError
        return web.json_response(batch)

    async def list_batches(self, request: web.Request) -> web.Response:
        """GET /v1/batches?limit=&after= (newest first)."""
        limit = max(1, min(100, int(request.query.get("limit", "20"))))
        ordered = list(reversed(self.batches.values()))
        after = request.query.get("after")
        if after is not None:
            ids = [b["id"] for b in ordered]
            ordered = ordered[ids.index(after) + 1:] if after in ids else []
        page = ordered[:limit]
        return web.json_response({"object": "list", "data": page, "has_more": len(ordered) > limit,
                                  "first_id": page[0]["id"] if page else None,
                                  "last_id": page[-1]["id"] if page else None})

    async def get_batch(self, request: web.Request) -> web.Response:
        """GET /v1/batches/{id}."""
        self.sim.stats.batch_polls += 1
        b = self.batches.get(request.match_info["id"])
        return web.json_response(b) if b else _not_found("batch", request.match_info["id"])

    async def cancel(self, request: web.Request) -> web.Response:
        """POST /v1/batches/{id}/cancel: unfinished lines end in the error file as ``batch_cancelled``."""
        b = self.batches.get(request.match_info["id"])
        if b is None:
            return _not_found("batch", request.match_info["id"])
        if b["status"] in FINAL:
            return _bad(f"Cannot cancel a batch with status '{b['status']}'.")
        if b["status"] != "cancelling":
            b["status"], b["cancelling_at"] = "cancelling", int(time.time())
        return web.json_response(b)

    # -- the background work -----------------------------------------------------------------------------------

    def _check(self, data: bytes, endpoint: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """The lines of an input file, and what is wrong with it (as the batch's ``errors.data``)."""
        problems: list[dict[str, Any]] = []
        lines: list[dict[str, Any]] = []
        seen: set[str] = set()
        if len(data) > MAX_FILE_BYTES:
            problems.append({"code": "file_too_large", "message": f"The file is larger than {MAX_FILE_BYTES} bytes.",
                             "param": None, "line": None})
        for n, raw in enumerate(data.splitlines(), 1):
            if not raw.strip():
                continue
            try:
                line = orjson.loads(raw)
            except orjson.JSONDecodeError:
                problems.append({"code": "invalid_json_line", "message": "This line is not valid JSON.",
                                 "param": None, "line": n})
                continue
            cid = line.get("custom_id") if isinstance(line, dict) else None
            if not isinstance(cid, str) or cid in seen:
                problems.append({"code": "duplicate_custom_id" if cid in seen else "missing_custom_id",
                                 "message": "custom_id must be a unique string.", "param": "custom_id", "line": n})
                continue
            if line.get("method") != "POST" or line.get("url") != endpoint or not isinstance(line.get("body"), dict):
                problems.append({"code": "invalid_request", "message": f"Each line must POST to {endpoint} with a "
                                 "JSON body.", "param": "url", "line": n})
                continue
            seen.add(cid)
            lines.append(line)
        if len(lines) > MAX_LINES:
            problems.append({"code": "too_many_requests", "message": f"The file has more than {MAX_LINES} requests.",
                             "param": None, "line": None})
        if not lines and not problems:
            problems.append({"code": "empty_file", "message": "The file has no requests.", "param": None, "line": None})
        return lines, problems

    def _answer(self, line: dict[str, Any], endpoint: str) -> tuple[bool, dict[str, Any]]:
        """One line's result line: (ok, line as written to the output or error file)."""
        sim = self.sim
        rid = f"batch_req_{sim.stats.batch_lines:08d}"
        sim.stats.batch_lines += 1
        try:
            rate = sim.config.batch_line_error_rate
            if rate and sim.rng.random() < rate:
                sim.stats.injected["batch_line_error"] += 1
                raise SimFailure(500, "The server had an error while processing your request (injected).",
                                 "server_error")
            body = sim.answer_body(endpoint, line["body"])
            status, ok = 200, True
        except SimFailure as f:
            body, status, ok = f.body(), f.status, False
        return ok, {"id": rid, "custom_id": line["custom_id"],
                    "response": {"status_code": status, "request_id": f"req_{rid}", "body": body}, "error": None}

    async def _process(self, b: dict[str, Any]) -> None:
        cfg = self.sim.config
        step = cfg.batch_delay_s / (SLICES + 2)
        await asyncio.sleep(step)
        lines, problems = self._check(self.files[b["input_file_id"]].data, b["endpoint"])
        if cfg.batch_fail:
            problems.append({"code": "simulated_failure", "message": "The batch failed (injected by the simulator).",
                             "param": None, "line": None})
        if problems:
            b["status"], b["failed_at"] = "failed", int(time.time())
            b["errors"] = {"object": "list", "data": problems[:100]}
            return
        if b["status"] == "cancelling":
            return self._close(b, [], [], lines, "cancelled")
        counts = b["request_counts"]
        counts["total"] = len(lines)
        b["status"], b["in_progress_at"] = "in_progress", int(time.time())
        out: list[dict[str, Any]] = []
        err: list[dict[str, Any]] = []
        per_slice = max(1, -(-len(lines) // SLICES))
        expire_at = (int(len(lines) * cfg.batch_expire_fraction) if cfg.batch_expire_fraction is not None
                     else None)
        done = 0
        while done < len(lines):
            await asyncio.sleep(step)
            if b["status"] == "cancelling":
                return self._close(b, out, err, lines[done:], "cancelled")
            end = min(len(lines), done + per_slice)
            if expire_at is not None:
                end = min(end, expire_at)
                if done >= expire_at:
                    return self._close(b, out, err, lines[done:], "expired")
            for line in lines[done:end]:
                ok, result = self._answer(line, b["endpoint"])
                (out if ok else err).append(result)
                counts["completed" if ok else "failed"] += 1
            done = end
        self._close(b, out, err, [], "completed")

    def _close(self, b: dict[str, Any], out: list[dict[str, Any]], err: list[dict[str, Any]],
               unfinished: list[dict[str, Any]], status: str) -> None:
        """Write the output and error files and end the batch; unfinished lines go to the error file."""
        code = {"expired": "batch_expired", "cancelled": "batch_cancelled"}.get(status)
        for line in unfinished:
            err.append({"id": None, "custom_id": line["custom_id"], "response": None,
                        "error": {"code": code, "message": f"This request could not be executed before the batch "
                                                           f"was {status}."}})
        b["request_counts"]["failed"] += len(unfinished)
        out.reverse()  # the real API does not keep input order either: clients must join on custom_id
        now = int(time.time())
        b["finalizing_at"] = now
        for name, results in (("output_file_id", out), ("error_file_id", err)):
            if results:
                f = _File(self._id("file"), f"{b['id']}_{name[:-8]}.jsonl", "batch_output",
                          b"".join(orjson.dumps(r) + b"\n" for r in results))
                self.files[f.id] = f
                b[name] = f.id
        b["status"], b[f"{status}_at"] = status, now

