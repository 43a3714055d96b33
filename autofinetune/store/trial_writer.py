"""What a trial writes into the study database: its outcome, its attributes, its kept model.

Every engine writes its trials through one :class:`TrialWriter` per process, by the storage's
trial id (a Ray actor and the keras-tuner mirror hold no ``optuna.Trial``), in the order the one
trial path (:mod:`autofinetune.engines.trial_path`) keeps: the outcome first, then the rest.
Whichever engine ran it, a trial holds:

* its params, with the spec's Optuna distributions (the engine's ask);
* one intermediate value per epoch, at the global 1-based step (the engine's reporter);
* :data:`~autofinetune.store.attributes.OUTCOME_ATTR` (state, value, reason; every objective's
  value as ``values`` in a study of several), written first;
* its state: COMPLETE with the best epoch's objective value (and, in a study of several
  objectives, the others after it), PRUNED when stopped early (never
  COMPLETE with a truncated value), FAIL with the reason in ``fail_reason`` (the engine's tell);
* the host attributes (:meth:`TrialWriter.start`), the attributes of :func:`result_attributes`,
  ``trial_seconds``, and ``record_warnings`` when something after the outcome was not recorded;
* for the best trials, the best epoch's model as an artifact, its id in ``checkpoint_artifact_id``.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import time
from typing import Any, Callable, Mapping

from autofinetune.store.attributes import FAIL_REASON_ATTR, OUTCOME_ATTR
from autofinetune.store.optuna_internals import OPTUNA_CONSTRAINTS_KEY, set_trial_user_attrs, storage_of
from autofinetune.store.optuna_internals import trial_id as storage_id_of
from autofinetune.trial.results import TrialResult

logger = logging.getLogger(__name__)


def result_attributes(result: TrialResult, *, phase1_epochs: int) -> dict[str, Any]:
    """The user attributes that describe a schedule's result (JSON-serializable)."""
    attrs: dict[str, Any] = {
        "phase_boundary_step": phase1_epochs,
        "unfrozen_blocks": list(result.unfrozen_blocks),
        "best_step": result.best_step,
        "history": [{"step": r.step, "phase": r.phase, **{k: _finite(v) for k, v in r.metrics.items()}} for r in result.history],
        "fit_seconds": round(result.total_seconds, 3),
    }
    for phase in result.phases:
        prefix = f"phase{phase.phase}_"
        attrs[prefix + "best"] = _finite(phase.best_value)
        attrs[prefix + "trainable_params"] = phase.trainable_params
        attrs[prefix + "seconds"] = round(phase.seconds, 3)
        attrs[prefix + "images_per_second"] = round(phase.images_per_second, 2)
        attrs[prefix + "epochs"] = phase.epochs_run
        if phase.cache_note or phase.cached:
            attrs[prefix + "cached"] = phase.cached
        if phase.cache_note:
            attrs[prefix + "cache_note"] = phase.cache_note
    if result.pruned_at_step is not None:
        attrs["pruned_at_step"] = result.pruned_at_step
    if result.error:
        attrs[FAIL_REASON_ATTR] = result.error
    for key, value in result.extra.items():
        attrs[key] = value
    return attrs


def _finite(value: Any) -> Any:
    # JSON has no NaN; the dashboard's parser rejects it.
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def host_attributes(*, device: str | None = None) -> dict[str, Any]:
    """Where a trial ran: host name, process id and, when known, the accelerator it used."""
    attrs: dict[str, Any] = {"host": socket.gethostname(), "pid": os.getpid()}
    if device is not None:
        attrs["device"] = device
    return attrs


class TrialWriter:
    """Writes the trials of one study from one process: outcome, attributes, checkpoints.

    Args:
        study: The Optuna study.
        spec: Its :class:`~autofinetune.spec.StudySpec`.
        keeper: The :class:`~autofinetune.store.checkpoints.CheckpointKeeper` offered each
            complete trial's best model; ``None`` keeps no models.
    """

    def __init__(self, study, spec, *, keeper=None) -> None:
        self.study = study
        self.spec = spec
        self.keeper = keeper
        self.storage = storage_of(study)
        #: Storage trial id -> ``time.perf_counter()`` at :meth:`start`.
        self._started: dict[int, float] = {}

    @classmethod
    def at(cls, study, spec, *, artifacts: str) -> "TrialWriter":
        """A writer whose kept models go to the artifact store at ``artifacts``.

        Args:
            study: The Optuna study.
            spec: Its spec (``search.keep_checkpoints`` and the objective rank the models).
            artifacts: A folder or bucket URI (see :func:`~autofinetune.store.artifacts.artifacts_location`).
        """
        from autofinetune.store.checkpoints import CheckpointKeeper
        from autofinetune.store.artifacts import open_artifact_store

        keeper = CheckpointKeeper(
            open_artifact_store(artifacts), keep=spec.search.keep_checkpoints, objective=spec.objective
        )
        return cls(study, spec, keeper=keeper)

    @property
    def artifact_store(self):
        """Where this study's artifacts go (the keeper's store), or ``None``."""
        return getattr(self.keeper, "artifact_store", None)

    @property
    def keeps_checkpoints(self) -> bool:
        """Whether a trial should save its best model for :meth:`offer_checkpoint`."""
        return self.keeper is not None and self.keeper.keep > 0

    def checkpoint_wanted(self, trial_id: int) -> Callable[[str, float | None], bool]:
        """The schedule's ``keep_checkpoint`` for a trial: save the model only when the trial
        completed with a value that would rank among the checkpoints the study keeps."""

        def wanted(state: str, value: float | None) -> bool:
            return (
                state == "complete" and value is not None and self.keeper is not None
                and self.keeper.would_keep(self.study, trial_id, value)
            )

        return wanted

    # -- one trial, in the order the trial path writes it -----------------------------------

    def start(self, trial_id: int, *, device: str | None = None) -> None:
        """A RUNNING trial starts here: record where it runs, and start its clock.

        Args:
            trial_id: The storage's id of the trial.
            device: The accelerator the trial trains on (described in the trial's process:
                the study database's side never loads Keras).
        """
        self._started[trial_id] = time.perf_counter()
        set_trial_user_attrs(self.storage, trial_id, host_attributes(device=device))

    def write_outcome(self, trial_id: int, outcome: Mapping[str, Any]) -> None:
        """Record how the (still RUNNING) trial ended, before anything else it produced."""
        self.storage.set_trial_system_attr(trial_id, OUTCOME_ATTR, dict(outcome))

    def write_constraints(self, trial_id: int, violations: list[float]) -> None:
        """Record the trial's constraint violations where Optuna reads them, so that
        ``Study.best_trial`` (status, export, report) is the best feasible trial."""
        self.storage.set_trial_system_attr(trial_id, OPTUNA_CONSTRAINTS_KEY, tuple(float(v) for v in violations))

    def write_attributes(self, trial_id: int, attrs: Mapping[str, Any]) -> None:
        """Several user attributes of a RUNNING trial, in one transaction."""
        set_trial_user_attrs(self.storage, trial_id, attrs)

    def offer_checkpoint(self, trial_id: int, value: float, model_path: str) -> str | None:
        """Keep a complete trial's model when it ranks among the best; its artifact id, or ``None``."""
        if self.keeper is None:
            return None
        return self.keeper.offer(self.study, trial_id, value, model_path)

    def seconds_since_start(self, trial_id: int) -> dict[str, float]:
        """``{"trial_seconds": ...}`` since :meth:`start` ran here for this trial, else empty."""
        started = self._started.pop(trial_id, None)
        return {} if started is None else {"trial_seconds": round(time.perf_counter() - started, 3)}


def stored_outcome(frozen) -> Mapping[str, Any] | None:
    """The outcome a RUNNING trial recorded before its process stopped, if it did."""
    outcome = frozen.system_attrs.get(OUTCOME_ATTR)
    return outcome if isinstance(outcome, Mapping) and outcome.get("state") in _STATES else None


_STATES = ("complete", "pruned", "failed")


def ran_to_its_end(frozen) -> bool:
    """Whether a RUNNING trial recorded the outcome of a run that reached its end: one that was
    interrupted (its process stopped mid-run, Ctrl-C, SIGTERM) runs again instead."""
    outcome = stored_outcome(frozen)
    return outcome is not None and outcome.get("kind") != "interrupted"


def finish_from_outcome(storage, frozen) -> str | None:
    """Finish a RUNNING trial whose process died after recording its outcome, with that outcome.

    Its value is not lost: a complete trial becomes COMPLETE with the value it recorded, a
    pruned one PRUNED with its last reported value (as Optuna's ``tell`` stores it), one its
    schedule failed (a NaN loss) FAIL with its reason. Nothing is queued again: the trial ran
    to its end. A trial interrupted before its end is not finished here: it runs again.

    Args:
        storage: The study's storage.
        frozen: The trial, as read from the storage.

    Returns:
        The Optuna state name it was finished with, or ``None`` when it recorded no outcome
        (its caller then fails it and queues it again).

    Raises:
        optuna.exceptions.UpdateFinishedTrialError: another process finished it first.
    """
    from optuna.trial import TrialState

    outcome = stored_outcome(frozen)
    if outcome is None or not ran_to_its_end(frozen):
        return None
    trial_id, state = storage_id_of(frozen), outcome["state"]
    if state == "complete" and isinstance(outcome.get("value"), (int, float)):
        # A study of several objectives recorded every value; one of one objective, its value.
        values = outcome.get("values") or [outcome["value"]]
        storage.set_trial_state_values(trial_id, state=TrialState.COMPLETE, values=[float(v) for v in values])
        return TrialState.COMPLETE.name
    if state == "pruned":
        steps = sorted(frozen.intermediate_values)
        values = [frozen.intermediate_values[steps[-1]]] if steps else None
        storage.set_trial_state_values(trial_id, state=TrialState.PRUNED, values=values)
        return TrialState.PRUNED.name
    storage.set_trial_state_values(trial_id, state=TrialState.FAIL)
    return TrialState.FAIL.name
