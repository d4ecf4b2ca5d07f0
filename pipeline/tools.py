"""Tool calls as typed extraction: the model picks a function and fills its arguments; nothing is executed.

A single-turn tool job is routing (which tool was called: ``tool_name``) and extraction (its arguments, checked
against that tool's JSON Schema and spread into typed columns, as a ``response_schema`` answer is). Every call
of a row is kept in ``tool_calls``, a list of ``{id, name, arguments}``. An answer whose calls break the rules
(an unknown tool, arguments that are not valid JSON or do not match the schema, no call where ``tool_choice``
demands one) is asked again like an invalid structured answer, then fails its row with the reason.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jsonschema
import orjson
import polars as pl

from pipeline.spec import ToolSpec
from pipeline.structured import column_values, columns_of, schema_problem

TOOL_CALL = pl.Struct({"id": pl.String(), "name": pl.String(), "arguments": pl.String()})


def tool_columns(tools: Sequence[ToolSpec]) -> dict[str, pl.DataType]:
    """``tool_name``, each tool's argument columns (``<tool>_<argument>`` when there are several tools), and
    ``tool_calls``."""
    columns: dict[str, pl.DataType] = {"tool_name": pl.String()}
    for t in tools:
        for name, dtype in columns_of(t.parameters).items():
            columns[f"{t.name}_{name}" if len(tools) > 1 else name] = dtype
    columns["tool_calls"] = pl.List(TOOL_CALL)
    return columns


def argument_columns(tools: Sequence[ToolSpec]) -> list[str]:
    """The argument columns alone, in output order (they may clash with other columns; the rest cannot)."""
    return [c for c in tool_columns(tools) if c not in ("tool_name", "tool_calls")]


class ToolChecker:
    """Checks an answer's calls against the tools and gives the row's typed column values."""

    def __init__(self, tools: Sequence[ToolSpec], choice: str) -> None:
        self.tools = {t.name: t for t in tools}
        self.choice = choice
        self._validators = {t.name: jsonschema.validators.validator_for(t.parameters)(t.parameters) for t in tools}
        self._columns = {t.name: columns_of(t.parameters) for t in tools}
        self.columns = tool_columns(tools)

    @staticmethod
    def calls(tool_calls: str | None) -> list[dict[str, Any]]:
        """The calls of an answer, as the provider module wrote them."""
        return orjson.loads(tool_calls) if tool_calls else []

    def problem(self, content: str | None, tool_calls: str | None = None) -> str | None:
        """None when the answer's calls are valid for the job's tools, else why not."""
        calls = self.calls(tool_calls)
        if not calls:
            if self.choice == "auto":
                return None
            return f"the model called no tool (tool_choice = {self.choice!r})"
        for call in calls:
            name = call.get("name")
            if name not in self.tools:
                return f"the model called {name!r}, which is not one of the job's tools ({', '.join(self.tools)})"
            if self.choice not in ("auto", "required") and name != self.choice:
                return f"the model called {name!r}, not {self.choice!r} (tool_choice)"
            try:
                args = orjson.loads(call.get("arguments") or "")
            except orjson.JSONDecodeError as e:
                return f"the arguments of {name!r} are not valid JSON: {e}"
            problem = schema_problem(self._validators[name], args, f"the arguments of {name!r} do not match its "
                                                                  "parameters")
            if problem is not None:
                return problem.replace(" at answer:", ":")
        return None

    def values(self, content: str | None, tool_calls: str | None = None) -> list[Any]:
        """The row's ``tool_name``, argument columns (the first call of each tool) and ``tool_calls``."""
        calls = self.calls(tool_calls)
        first: dict[str, Any] = {}
        for call in calls:
            if call.get("name") in self.tools and call["name"] not in first:
                try:
                    first[call["name"]] = orjson.loads(call.get("arguments") or "null")
                except orjson.JSONDecodeError:
                    first[call["name"]] = None
        out: list[Any] = [calls[0].get("name") if calls else None]
        for name, columns in self._columns.items():
            out.extend(column_values(columns, first.get(name)))
        out.append([{"id": c.get("id"), "name": c.get("name"), "arguments": c.get("arguments")} for c in calls]
                   if calls else None)
        return out
