"""The driver's handle on a study while Ray Tune runs it: shared by searcher, schedulers, callbacks.

The storage URL (which may hold a password) never enters a pickle that Ray writes to its
experiment folder: the searcher and schedulers (pickled with the experiment, restored from it)
find the open storage through :func:`get_link`, in the context where
:func:`~autofinetune.engines.ray.driver.drive_study` opened the study (:func:`open_link`).
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from autofinetune.engines.ray.options import OPTUNA_TRIAL_ID_KEY
from autofinetune.engines.trial_path import ConsecutiveFailures, TrialRecording


@dataclass
class StudyLink:
    """What the driver-side Ray objects share about one study while it runs in this process.

    Attributes:
        spec: The study's spec.
        storage: The open study database.
        recording: Records the trials that end in the driver (Ray gave them up, or their
            driver stopped) as the trial actors record theirs.
        deadline: Unix time after which no new trial starts.
        max_retries: ``search.max_retries`` (Ray's ``max_failures``).
        errors: Optuna trial id -> why Ray gave the trial up (from the scheduler's error hook,
            read when the searcher records the failure right after).
        stop_reason: Set when the search must stop (a fatal trial error); no new trial starts.
        failures: Unexpected trial errors in a row.
        search_finished: The searcher said no more trials (budget, deadline or stop reason).
        progress: The launch's bar of the study's trials (a driver in the launching process).
    """

    spec: Any
    storage: Any
    recording: TrialRecording
    deadline: float | None
    max_retries: int
    errors: dict[int, str] = field(default_factory=dict)
    stop_reason: str | None = None
    failures: ConsecutiveFailures = field(default_factory=ConsecutiveFailures)
    search_finished: bool = False
    progress: Any = None


#: The study Tune's driver runs in this context (Tune calls searcher, schedulers and callbacks
#: from the thread that called ``Tuner.fit``).
_OPEN_LINK: ContextVar[StudyLink | None] = ContextVar("autofinetune_ray_study_link", default=None)


@contextmanager
def open_link(link: StudyLink) -> Iterator[StudyLink]:
    """Make ``link`` the one :func:`get_link` finds, for the duration of the block."""
    token = _OPEN_LINK.set(link)
    try:
        yield link
    finally:
        _OPEN_LINK.reset(token)


def get_link(study_name: str) -> StudyLink:
    """The link of the study that Tune's driver runs here.

    Raises:
        RuntimeError: no study of that name is open in this context.
    """
    link = _OPEN_LINK.get()
    if link is None or link.spec.name != study_name:
        raise RuntimeError(
            f"study {study_name!r} is not open here; the Ray engine's searcher and "
            "schedulers run only inside autofinetune.engines.ray.driver.drive_study"
        )
    return link


def optuna_trial_id(trial) -> int | None:
    value = trial.config.get(OPTUNA_TRIAL_ID_KEY)
    return None if value is None else int(value)


def error_summary(trial) -> str:
    """The last error Ray recorded for a Tune trial, in one short line."""
    text = None
    try:
        if trial.error_file and os.path.exists(trial.error_file):
            text = Path(trial.error_file).read_text(errors="replace")
        else:
            text = trial.get_error()
    except Exception:  # the error file is informative only
        text = None
    if not text:
        return "no error text recorded by Ray"
    last = str(text).split("Failure # ")[-1]
    lines = [line.strip() for line in last.splitlines()[1:] if line.strip()]
    # Ray's actor-death messages say what happened first, then list ids; keep the gist.
    picked = lines[:1] + [line for line in lines[1:] if "exit" in line.lower() or "Error" in line][:2]
    return " ".join(picked)[:600] or last[:600]
