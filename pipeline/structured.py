"""Structured outputs: the job's JSON Schema checked before the run, each answer checked after, typed columns.

OpenAI's strict mode accepts a subset of JSON Schema: every object lists all its properties in ``required``
and sets ``additionalProperties: false``. A schema outside that subset is refused by the API on the first
request, so it is refused here, before any request, with the exact place to fix. Each answer is parsed and
validated against the schema; its top-level properties become typed output columns.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, Protocol

import jsonschema
import orjson
import polars as pl

from pipeline.errors import JobError

_SIMPLE = {"string": pl.String(), "integer": pl.Int64(), "number": pl.Float64(), "boolean": pl.Boolean()}


def _walk(schema: Any, path: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """Every sub-schema with its key path, so strict-mode errors can say where they are."""
    if not isinstance(schema, dict):
        return
    yield path, schema
    for key in ("properties", "$defs", "definitions"):
        for name, sub in (schema.get(key) or {}).items():
            yield from _walk(sub, f"{path}.{key}.{name}")
    if isinstance(schema.get("items"), dict):
        yield from _walk(schema["items"], f"{path}.items")
    for key in ("anyOf", "oneOf", "allOf"):
        for i, sub in enumerate(schema.get(key) or []):
            yield from _walk(sub, f"{path}.{key}[{i}]")


def _types(schema: Mapping[str, Any]) -> set[str]:
    t = schema.get("type")
    return set(t) if isinstance(t, list) else {t} if isinstance(t, str) else set()


def check_valid_schema(schema: Mapping[str, Any], where: str) -> None:
    """Fail with a JobError unless ``schema`` is valid JSON Schema for an object (what tools and structured
    outputs both take)."""
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as e:
        loc = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in e.absolute_path)
        raise JobError(f"{where}{loc} is not valid JSON Schema: {e.message}") from None
    if "object" not in _types(schema):
        raise JobError(f"{where} must be an object schema (type = \"object\")")


def check_schema(schema: Mapping[str, Any], where: str) -> None:
    """Fail with a JobError unless ``schema`` is valid JSON Schema inside the strict-mode subset."""
    check_valid_schema(schema, where)
    for path, sub in _walk(schema, where):
        if "object" in _types(sub) or "properties" in sub:
            props = list((sub.get("properties") or {}).keys())
            if sub.get("additionalProperties") is not False:
                raise JobError(f"{path}: strict mode needs additionalProperties = false")
            missing = [p for p in props if p not in (sub.get("required") or [])]
            if missing:
                raise JobError(f"{path}: strict mode needs every property in required; missing: "
                               f"{', '.join(missing)}")


def dtype_of(schema: Mapping[str, Any]) -> pl.DataType:
    """The polars dtype of one JSON Schema value: enums are strings, arrays lists, objects structs."""
    if "enum" in schema:
        values = schema["enum"]
        if all(isinstance(v, str) for v in values):
            return pl.String()
        if all(isinstance(v, bool) for v in values):
            return pl.Boolean()
        if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            return pl.Int64()
    kinds = _types(schema) - {"null"}
    if len(kinds) == 1:
        kind = kinds.pop()
        if kind in _SIMPLE:
            return _SIMPLE[kind]
        if kind == "array" and isinstance(schema.get("items"), dict):
            return pl.List(dtype_of(schema["items"]))
        if kind == "object" and schema.get("properties"):
            return pl.Struct({k: dtype_of(v) for k, v in schema["properties"].items()})
    return pl.String()  # anything else (unions, free-form objects) stays JSON text


def columns_of(schema: Mapping[str, Any]) -> dict[str, pl.DataType]:
    """One typed output column per top-level property."""
    return {name: dtype_of(sub) for name, sub in (schema.get("properties") or {}).items()}


class Checker(Protocol):
    """What checks a job's answers and turns them into its typed columns (a schema's, or the tools')."""

    def problem(self, content: str | None, tool_calls: str | None = None) -> str | None:
        """None for a valid answer, else why it is not."""
        ...

    def values(self, content: str | None, tool_calls: str | None = None) -> list[Any]:
        """The answer's typed column values (None each when there is no answer)."""
        ...


class AnswerChecker:
    """Parses an answer and validates it against the schema; the reason is what goes in the error column."""

    def __init__(self, schema: Mapping[str, Any]) -> None:
        self._validator = jsonschema.validators.validator_for(schema)(schema)
        self._columns = columns_of(schema)

    def problem(self, content: str | None, tool_calls: str | None = None) -> str | None:
        """None when ``content`` is valid JSON matching the schema, else why not."""
        if content is None:
            return "the answer has no content"
        try:
            value = orjson.loads(content)
        except orjson.JSONDecodeError as e:
            return f"the answer is not valid JSON: {e}"
        return schema_problem(self._validator, value, "the answer does not match the schema")

    def values(self, content: str | None, tool_calls: str | None = None) -> list[Any]:
        """The typed column values of a valid answer (None for each when there is none)."""
        if content is None:
            return [None] * len(self._columns)
        try:
            data = orjson.loads(content)
        except orjson.JSONDecodeError:
            return [None] * len(self._columns)
        return column_values(self._columns, data)


def schema_problem(validator: Any, value: Any, what: str) -> str | None:
    """Why ``value`` is not valid for the validator's schema (the best match, with its place), or None."""
    error = jsonschema.exceptions.best_match(validator.iter_errors(value))
    if error is None:
        return None
    where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error.absolute_path) or "answer"
    return f"{what} at {where.lstrip('.')}: {error.message}"


def column_values(columns: Mapping[str, pl.DataType], data: Any) -> list[Any]:
    """An object's top-level properties as typed column values (nested values as JSON text where the column
    is a string)."""
    out = []
    for name, dtype in columns.items():
        v = data.get(name) if isinstance(data, dict) else None
        out.append(orjson.dumps(v).decode() if dtype == pl.String() and isinstance(v, dict | list) else v)
    return out
