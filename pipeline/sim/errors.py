"""The simulator's refusals, as OpenAI shapes them: one error body for HTTP answers and Batch API error lines."""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web


def error_body(message: str, type_: str = "invalid_request_error", code: str | None = None,
               param: str | None = None) -> dict[str, Any]:
    """OpenAI's JSON error body."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_response(status: int, message: str, type_: str = "invalid_request_error", code: str | None = None,
                   headers: dict[str, str] | None = None, param: str | None = None) -> web.Response:
    """An HTTP error answer with OpenAI's body."""
    return web.Response(status=status, body=orjson.dumps(error_body(message, type_, code, param)),
                        content_type="application/json", headers=headers)


class SimFailure(Exception):
    """A request the simulator refuses, as an OpenAI error body: an HTTP response online, an error line in
    a batch's error file."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type_, code, param

    def body(self) -> dict[str, Any]:
        """The JSON error body."""
        return error_body(self.message, self.type, self.code, self.param)

    def response(self) -> web.Response:
        """The HTTP answer."""
        return error_response(self.status, self.message, self.type, self.code, param=self.param)
