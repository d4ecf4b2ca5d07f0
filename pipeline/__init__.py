"""pipeline: send every row of a table to an OpenAI-compatible API and get a clean Parquet table back.

The public names load on first use (PEP 562), so ``import pipeline`` is light and changes nothing in the caller's
process; the ``pipeline`` command sets what it wants for its own process (its allocators, ``cli.own_process``)
before anything heavy is imported.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipeline.errors import PipelineError
    from pipeline.estimate import Estimate
    from pipeline.frames import amap, estimate, map
    from pipeline.job import Job
    from pipeline.run import RunResult, run

_EXPORTS = {"PipelineError": "pipeline.errors", "Estimate": "pipeline.estimate", "Job": "pipeline.job",
            "RunResult": "pipeline.run", "run": "pipeline.run", "amap": "pipeline.frames",
            "estimate": "pipeline.frames", "map": "pipeline.frames"}
# Functions named like a module of the package: ``pipeline.run(job)`` and ``pipeline.estimate(frame)`` are the
# functions, while ``from pipeline.run import ...`` still reaches the modules (through sys.modules).
_FUNCTIONS = frozenset({"run", "estimate"})


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


class _Package(types.ModuleType):
    """The package keeps its functions when the modules of the same name load: the import system sets each
    submodule as an attribute of its package, which would put the module ``pipeline.run`` where the function
    ``pipeline.run`` is."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _FUNCTIONS and isinstance(value, types.ModuleType):
            return  # the module stays in sys.modules; the attribute is the function, loaded by __getattr__
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package

__all__ = ["Estimate", "Job", "PipelineError", "RunResult", "amap", "estimate", "map", "run"]
