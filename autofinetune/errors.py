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
