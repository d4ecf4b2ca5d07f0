"""The one exception hierarchy of the project.

Errors are classed by what the caller can do about them, so decisions test a type, never a message::

    PipelineError                 root; every message names the file, key or row it is about
    ├── UsageError                the user must fix something before anything is sent (exit 2)
    │   ├── JobError              the job file: names the file and the key path
    │   ├── InputError            the input data: names the file (and the row when known)
    │   ├── TemplateError         a prompt template: names the template and the row
    │   └── OutputError           the output folder or journal cannot be used
    │       ├── RunLocked         another run of the same job holds the output's lock
    │       └── JournalUnusable   the journal is damaged, or missing beside an output that needs it
    ├── ProviderError             an HTTP outcome from the API
    │   ├── TransientError        worth retrying (5xx, timeouts, dropped connections)
    │   │   └── RateLimited       a 429: every worker pauses, not just the one that got it
    │   └── TerminalError         not worth retrying
    │       ├── RowError          fails only its row (400, 422, unparseable answer, refusal)
    │       └── AbortError        fails the whole run (401, 403, unknown model, quota exhausted)
    └── StopRun                   the run stopped on purpose (exit 3)
        ├── BudgetExceeded        spend would cross [budget].max_cost_usd
        └── Interrupted           SIGINT / SIGTERM

Only ``cli.py`` turns these into messages and exit codes; the library raises and never prints.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pipeline.rates import RateInfo


class PipelineError(Exception):
    """Root of every error the project raises on purpose."""

    exit_code = 1


class UsageError(PipelineError):
    """Something the user must fix before any request is sent."""

    exit_code = 2


class JobError(UsageError):
    """The job file is invalid; the message names the file and key path."""


class InputError(UsageError):
    """The input data cannot be read or lacks what the job needs."""


class TemplateError(UsageError):
    """A prompt template does not parse or does not fit the input."""


class OutputError(UsageError):
    """The output location, or the journal beside it, cannot be used."""


class RunLocked(OutputError):
    """Another run of the same job (same output) is going on; this one sent nothing."""


class JournalUnusable(OutputError):
    """The journal cannot be trusted to say what was paid for (damaged, or missing beside answers); nothing was
    sent, and only the user can choose between restoring it and paying again (``--fresh``)."""


class ProviderError(PipelineError):
    """An unsuccessful answer (or no answer) from the API.

    ``kind`` is a short stable label (``rate_limit``, ``server_error``, ``timeout``...) used for counting
    errors per type in the manifest and the report.
    """

    def __init__(self, message: str, *, kind: str, status: int | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.status = status
        self.rate: RateInfo | None = None  # the server's view of our limits on that response, when it said one


class TransientError(ProviderError):
    """Worth retrying; ``retry_after`` is the wait the server asked for, in seconds, when it said one."""

    def __init__(
        self, message: str, *, kind: str, status: int | None = None, retry_after: float | None = None
    ) -> None:
        super().__init__(message, kind=kind, status=status)
        self.retry_after = retry_after


class RateLimited(TransientError):
    """The server's rate budget is spent (429): the shared pause and the limiter's correction test this type."""


class TerminalError(ProviderError):
    """Not worth retrying."""


class RowError(TerminalError):
    """Fails only the row that asked; the run goes on."""


class AbortError(TerminalError):
    """Systemic: every other row would fail the same way, so the run stops."""

    exit_code = 3


class StopRun(PipelineError):
    """The run stopped on purpose; everything answered so far is on disk and a rerun resumes."""

    exit_code = 3


class BudgetExceeded(StopRun):
    """Spending more would cross ``[budget].max_cost_usd``."""


class Interrupted(StopRun):
    """The user (or the scheduler) asked the run to stop."""
