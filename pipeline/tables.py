"""Reading a TOML table key by key, so every error names its exact key path (``jobs/x.toml: [limits].concurrency
...``), with a did-you-mean for misspelled keys; shared by the job file's parser and each endpoint's ``[request]``
keys. Defaults come from the spec classes (``spec.py``), written once there.
"""

from __future__ import annotations

import builtins
import dataclasses
import difflib
import json
import os
from pathlib import Path
from typing import Any, overload

from pipeline.errors import JobError


def default_of(spec: type, name: str) -> Any:
    """A field's default as its spec class declares it: each default is written once, in ``spec.py``."""
    return next(f.default for f in dataclasses.fields(spec) if f.name == name)


def type_name(value: object) -> str:
    return {str: "a string", bool: "a boolean", int: "an integer", float: "a number", list: "a list",
            dict: "a table"}.get(type(value), type(value).__name__)


def shown(value: object) -> str:
    return json.dumps(value) if isinstance(value, str) else repr(value)


class Table:
    """Reads one TOML table key by key, so each error can name its exact key path; leftovers are unknown keys."""

    def __init__(self, file: str, name: str, raw: object) -> None:
        self.file, self.name = file, name
        if not isinstance(raw, dict):
            raise JobError(f"{file}: [{name}] must be a table, got {type_name(raw)}")
        self.raw: dict[str, Any] = dict(raw)
        self.seen: set[str] = set()

    def where(self, key: str) -> str:
        return f"{self.file}: [{self.name}].{key}" if self.name else f"{self.file}: {key}"

    def fail(self, key: str, what: str) -> JobError:
        return JobError(f"{self.where(key)} {what}")

    def has(self, key: str) -> bool:
        return key in self.raw

    def get(self, key: str) -> Any:
        self.seen.add(key)
        return self.raw.get(key)

    @overload
    def str(self, key: str, default: str, *, required: bool = False) -> str: ...

    @overload
    def str(self, key: str, default: None = None, *, required: bool = False) -> str | None: ...

    def str(self, key: str, default: str | None = None, *, required: bool = False) -> str | None:
        value = self.get(key)
        if value is None:
            if required:
                typo = difflib.get_close_matches(key, [k for k in self.raw if k not in self.seen], n=1, cutoff=0.75)
                if typo:  # `promt = ...`: the key the user meant is there, misspelled
                    raise self.fail(typo[0], f"is not a known key; did you mean {key!r}?")
                raise self.fail(key, "is required")
            return default
        if value == "" and default is not None:  # an empty setting means the default
            return default
        if not isinstance(value, builtins.str) or (required and not value.strip()):
            raise self.fail(key, f"must be a non-empty string, got {shown(value)}")
        return value

    @overload
    def int(self, key: builtins.str, default: int, *, minimum: int = 1) -> int: ...

    @overload
    def int(self, key: builtins.str, default: None = None, *, minimum: int = 1) -> int | None: ...

    def int(self, key: builtins.str, default: int | None = None, *, minimum: int = 1) -> int | None:
        value = self.get(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            kind = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
            raise self.fail(key, f"must be {kind}, got {shown(value)}")
        return value

    @overload
    def number(self, key: builtins.str, default: float, *, low: float = 0.0, high: float | None = None,
               strict_low: bool = True) -> float: ...

    @overload
    def number(self, key: builtins.str, default: None = None, *, low: float = 0.0, high: float | None = None,
               strict_low: bool = True) -> float | None: ...

    def number(self, key: builtins.str, default: float | None = None, *, low: float = 0.0,
               high: float | None = None, strict_low: bool = True) -> float | None:
        value = self.get(key)
        if value is None:
            return default
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        ok = ok and (value > low if strict_low else value >= low) and (high is None or value <= high)
        if not ok:
            bound = f"> {low:g}" if strict_low else f">= {low:g}"
            rng = f"a number {bound}" + (f" and <= {high:g}" if high is not None else "")
            raise self.fail(key, f"must be {rng}, got {shown(value)}")
        return float(value)

    def bool(self, key: builtins.str, default: bool = False) -> bool:
        value = self.get(key)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise self.fail(key, f"must be true or false, got {shown(value)}")
        return value

    def str_list(self, key: builtins.str) -> tuple[builtins.str, ...]:
        value = self.get(key)
        if value is None:
            return ()
        if isinstance(value, builtins.str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, builtins.str) and v for v in value):
            raise self.fail(key, f"must be a list of strings, got {shown(value)}")
        return tuple(value)

    def done(self) -> None:
        unknown = sorted(set(self.raw) - self.seen)
        if unknown:
            near = difflib.get_close_matches(unknown[0], sorted(self.seen), n=1, cutoff=0.75)
            if near:
                raise self.fail(unknown[0], f"is not a known key; did you mean {near[0]!r}?")
            raise self.fail(unknown[0], "is not a known key" + known_hint(self))


def known_hint(table: Table) -> str:
    known = sorted(table.seen)
    return f" (known keys: {', '.join(known)})" if known else ""


def resolve_path(base: Path, value: str) -> str:
    from pipeline.storage import is_url

    if is_url(value):
        return value
    p = Path(value).expanduser()
    return os.path.normpath(p if p.is_absolute() else (base / p))
