"""The three kinds of error autofinetune distinguishes, and the prune signal.

* :class:`ConfigError` -- bad input, found before anything trains. The CLI exits with code 2
  and nothing is written to the study database.
* :class:`TrialError` -- one trial cannot finish (NaN loss, out of memory, a corrupt batch).
  That trial fails with the reason stored on it; the study goes on.
* :class:`FatalError` -- the search cannot go on (storage unreachable, dataset gone). The
  search stops cleanly; finished trials stay in the study database.

:class:`PruneTrial` is not an error: a reporter raises it to ask the schedule to stop a trial
early. Engines translate it into their own prune mechanism.
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    """How a command, an engine's launch or an Optuna worker process ends.

    The CLI exits with these; the worker supervisor reads them from its worker processes.
    """

    #: The budget is used, the deadline passed, or there is nothing left to run.
    DONE = 0
    #: An unexpected error; for a launch, worker processes that kept crashing (their lines say why).
    CRASHED = 1
    #: Bad input or a fatal error stopped the search; finished trials are kept.
    BAD_INPUT = 2
    #: A worker process ran its ``trials_per_process``; more trials remain, start a fresh one.
    RECYCLE = 3
    #: The study database stayed unreachable past ``search.outage_grace``; finished trials are
    #: kept, and launching again resumes the study once it is back (sysexits' EX_TEMPFAIL).
    DATABASE_UNREACHABLE = 75
    #: Ctrl-C (or SIGTERM): the running trials failed with that reason.
    INTERRUPTED = 130


class AutofinetuneError(Exception):
    """Base class of every error raised on purpose by autofinetune."""


class ConfigError(AutofinetuneError, ValueError):
    """Invalid study spec, parameter or command-line input.

    The message names the field (or file), the value received and what is allowed.
    """


class TrialError(AutofinetuneError):
    """One trial failed; the study continues with the next trial."""


class FatalError(AutofinetuneError):
    """The search cannot continue; finished trials are kept."""


class PruneTrial(Exception):
    """Raised by a reporter to stop the running trial early (pruning / early stopping)."""

    def __init__(self, step: int, message: str = "") -> None:
        super().__init__(message or f"pruned at step {step}")
        self.step = step
