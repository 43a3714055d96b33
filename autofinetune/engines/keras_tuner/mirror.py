"""Mirroring keras-tuner trials into the study database: one study trial per keras-tuner trial.

A trial stopped by its budget is COMPLETED in keras-tuner
  (Hyperband ranks and promotes only completed trials) and PRUNED in the study database, with
  ``pruned_at_step`` = e: Hyperband stopped it early, and its value is not a full trial's.
  Each keras-tuner trial (a promotion too) is one study trial, with the keras-tuner trial id in
  ``keras_tuner_trial_id``.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any, Mapping

from autofinetune.engines.keras_tuner.hypermodel import keras_tuner  # reports a missing extra
from autofinetune.engines.keras_tuner.project import Project
from autofinetune.trial.devices import device_description
from autofinetune.errors import ConfigError
from autofinetune.store.optuna_internals import storage_of, study_id
from autofinetune.store.optuna_internals import trial_id as storage_id_of

logger = logging.getLogger(__name__)

# User attributes of a mirrored trial (besides those every engine writes).
KT_TRIAL_ID_ATTR = "keras_tuner_trial_id"
KT_PROJECT_ATTR = "keras_tuner_project"
KT_DIR_ATTR = "keras_tuner_dir"


class StudyMirror:
    """Keeps one study trial per keras-tuner trial: opened when it starts, finished when it ends.

    A mirrored trial is RUNNING while keras-tuner runs it (the dashboard shows its epochs as they
    come), then COMPLETE, PRUNED or FAIL with the record every engine writes. It also decides
    whether keras-tuner may start another trial (the study's trial budget and ``--timeout``),
    and hands keras-tuner the study's queued (WAITING) trials, the baseline first.

    Args:
        study: The Optuna study.
        spec: Its spec.
        recorder: Records each trial as every engine does (the best models kept, curves, notes).
        project: The keras-tuner project searched.
        deadline: Unix time after which no trial starts.
        progress: The progress display (:class:`~autofinetune.engines.progress.TrialProgressBar`).
    """

    def __init__(self, study, spec, recorder, project: Project, *, deadline: float | None, progress) -> None:
        from autofinetune.search.space import optuna_distributions

        self.study = study
        self.spec = spec
        self.recorder = recorder
        self.project = project
        self.deadline = deadline
        self.progress = progress
        self.distributions = optuna_distributions(spec)
        self.stop_reason: str | None = None
        #: keras-tuner trial id -> the Optuna Trial of each open mirror.
        self._open: dict[str, Any] = {}
        #: keras-tuner trial id -> why its run raised.
        self._errors: dict[str, str] = {}
        #: Queued trials found not to fit the space (warned about once).
        self._unfit: set[int] = set()

    @property
    def storage(self):
        """The study's storage (mirrored trials are written by storage id)."""
        return storage_of(self.study)

    def mirrors_of(self, kt_trial_id: str | None = None) -> list:
        """The study's trials mirrored from this project (of one keras-tuner trial, if given)."""
        return [
            trial
            for trial in self.study.get_trials(deepcopy=False)
            if trial.user_attrs.get(KT_PROJECT_ATTR) == self.project.id
            and (kt_trial_id is None or trial.user_attrs.get(KT_TRIAL_ID_ATTR) == kt_trial_id)
        ]

    # -- what keras-tuner runs next -------------------------------------------------------

    def next_queued(self, exclude: set[int]) -> tuple[int, dict[str, Any]] | None:
        """The oldest WAITING study trial keras-tuner can run: ``(storage trial id, values)``.

        Queued trials (the baseline, retries queued by Optuna workers, ``enqueue_trial``) run
        before keras-tuner samples its own. One whose params do not cover the spec's space is
        left to the Optuna engine.
        """
        from optuna.trial import TrialState

        from autofinetune.search.space import params_from_keras_tuner

        for trial in self.study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
            if storage_id_of(trial) in exclude or storage_id_of(trial) in self._unfit:
                continue
            given = {**trial.params, **trial.system_attrs.get("fixed_params", {})}
            try:
                return storage_id_of(trial), params_from_keras_tuner(given, self.spec)
            except ConfigError as error:
                self._unfit.add(storage_id_of(trial))
                logger.warning("queued trial %d is left for the Optuna engine: %s", trial.number, error)
        return None

    def may_start_trial(self, claimed: set[int], *, retry: bool = False) -> bool:
        """Whether keras-tuner may start a trial: before the deadline, within the study's budget.

        Args:
            claimed: Storage ids of the queued trials keras-tuner has taken already.
            retry: keras-tuner is about to run an interrupted trial again. Its record replaces
                the failed one in the budget, so only the deadline applies.
        """
        from autofinetune.store.study import budget_used, study_budget

        if self.deadline is not None and time.time() >= self.deadline:
            self.stop_reason = "the --timeout has passed"
            return False
        if retry:
            return True
        counted, _ = budget_used(self.study)
        if counted < study_budget(self.study) or self.next_queued(claimed) is not None:
            return True  # a queued trial is counted already: running it uses no more budget
        self.stop_reason = "the study's trial budget is used"
        return False

    # -- one trial ------------------------------------------------------------------------

    def open(self, kt_trial, claimed_trial_id: int | None) -> None:
        """Start the study trial of a keras-tuner trial that starts.

        Args:
            kt_trial: The keras-tuner ``Trial``.
            claimed_trial_id: The storage id of the WAITING study trial whose params it runs,
                or ``None`` for params keras-tuner chose.
        """
        import optuna
        from optuna.trial import TrialState

        from autofinetune.search.space import params_from_keras_tuner
        from autofinetune.store.database import BASELINE_ATTR, FAIL_REASON_ATTR

        kt_id = kt_trial.trial_id
        values = kt_trial.hyperparameters.values
        params = params_from_keras_tuner(values, self.spec)
        previous = self.mirrors_of(kt_id)
        if any(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in previous):
            # Only when the keras-tuner project lags behind the study database (e.g. restored
            # from a copy): the trial's result is in the database already; keep one record.
            logger.warning("keras-tuner trial %s is in the study database already; not mirrored again", kt_id)
            return
        attrs: dict[str, Any] = {
            KT_TRIAL_ID_ATTR: kt_id,
            KT_PROJECT_ATTR: self.project.id,
            KT_DIR_ATTR: str(self.project.path),
        }
        if "tuner/epochs" in values:
            attrs["keras_tuner_epochs"] = int(values["tuner/epochs"])
            attrs["keras_tuner_bracket"] = int(values.get("tuner/bracket", 0))
            attrs["keras_tuner_round"] = int(values.get("tuner/round", 0))
        if "tuner/trial_id" in values:
            attrs["keras_tuner_promoted_from"] = values["tuner/trial_id"]
        system_attrs: dict[str, Any] = {}
        failed = [t for t in previous if t.state == TrialState.FAIL]
        if failed:
            # keras-tuner runs an interrupted trial again: the new record is its retry, so the
            # failed one no longer counts towards the budget (as for Optuna's retries).
            system_attrs = {"failed_trial": failed[0].number, "retry_history": [t.number for t in failed]}
            attrs["retry_reason"] = failed[-1].user_attrs.get(FAIL_REASON_ATTR, "interrupted")

        trial_id = self._take_waiting(claimed_trial_id)
        if trial_id is not None:
            for name, value in params.items():
                distribution = self.distributions[name]
                self.storage.set_trial_param(trial_id, name, distribution.to_internal_repr(value), distribution)
            for key, value in system_attrs.items():
                self.storage.set_trial_system_attr(trial_id, key, value)
        else:
            if claimed_trial_id is not None and self.storage.get_trial(claimed_trial_id).user_attrs.get(BASELINE_ATTR):
                attrs[BASELINE_ATTR] = True  # a retry of the baseline is the baseline
            template = optuna.trial.create_trial(
                state=TrialState.RUNNING,
                params=params,
                distributions=self.distributions,
                system_attrs=system_attrs,
            )
            trial_id = self.storage.create_new_trial(study_id(self.study), template_trial=template)
        self.recorder.start(trial_id, device=device_description())
        for key, value in attrs.items():
            self.storage.set_trial_user_attr(trial_id, key, value)
        trial = optuna.trial.Trial(self.study, trial_id)
        self._open[kt_id] = trial
        self.progress.start_trial(trial.number, int(values.get("tuner/epochs", self.spec.schedule.total_epochs)))

    def _take_waiting(self, trial_id: int | None) -> int | None:
        """Make the WAITING study trial RUNNING; ``None`` when it is gone (another worker took it)."""
        import optuna
        from optuna.trial import TrialState

        if trial_id is None:
            return None
        try:
            if self.storage.set_trial_state_values(trial_id, state=TrialState.RUNNING):
                return trial_id
        except optuna.exceptions.UpdateFinishedTrialError:
            pass
        return None

    def report(self, kt_trial_id: str, step: int, metrics: Mapping[str, Any]) -> None:
        """One epoch of a running trial: its objective value at the global step (and every
        metric to the recorder's trackers)."""
        opened = self._open.get(kt_trial_id)
        if opened is None:
            return
        self.recorder.epoch(storage_id_of(opened), step, {k: float(v) for k, v in metrics.items()})
        value = metrics.get(self.spec.objective.metric)
        if value is not None and math.isfinite(float(value)):
            opened.report(float(value), step)
        self.progress.epoch_done(step, {k: float(v) for k, v in metrics.items()})

    def note_error(self, kt_trial_id: str, error: BaseException) -> None:
        """Remember why a trial's run raised (the reason its study trial fails with)."""
        if isinstance(error, (keras_tuner.errors.FailedTrialError, keras_tuner.errors.FatalError)):
            reason = str(error)
        else:
            reason = f"{type(error).__name__}: {error}"
        self._errors[kt_trial_id] = reason

    def close(self, kt_trial, result) -> None:
        """Finish the study trial of a keras-tuner trial that ended (after keras-tuner's bookkeeping).

        Args:
            kt_trial: The keras-tuner ``Trial``; its status is keras-tuner's verdict.
            result: The :class:`~autofinetune.trial.results.TrialResult` of its run, or ``None`` when
                the run raised before the schedule returned.
        """
        from optuna.trial import TrialState

        trial = self._open.pop(kt_trial.trial_id, None)
        reason = self._errors.pop(kt_trial.trial_id, None)
        if trial is None:
            return
        storage_id = storage_id_of(trial)
        completed = kt_trial.status == keras_tuner.engine.trial.TrialStatus.COMPLETED
        if result is not None:
            self.recorder.finish(storage_id, result, checkpoint_path=result.checkpoint_path if completed else None)
            reported = set(self.storage.get_trial(storage_id).intermediate_values)
            for record in result.history:  # an epoch a callback did not forward
                value = record.metrics.get(result.objective)
                if record.step not in reported and value is not None and math.isfinite(value):
                    trial.report(value, record.step)
        if completed and result is not None and result.state == "complete" and result.best_value is not None:
            self.study.tell(trial, result.best_value, state=TrialState.COMPLETE)
            self.progress.trial_done(trial.number, "complete", result.best_value, None)
        elif completed and result is not None and result.state == "pruned":
            self.study.tell(trial, state=TrialState.PRUNED)
            self.progress.trial_done(trial.number, f"pruned after step {result.pruned_at_step}", result.best_value, None)
        else:
            reason = (result.error if result is not None else None) or reason or last_line(kt_trial.message)
            reason = self.recorder.fail(storage_id, reason or f"keras-tuner marked the trial {kt_trial.status}")
            self.study.tell(trial, state=TrialState.FAIL)
            self.progress.trial_done(trial.number, "failed", None, reason)
        if result is not None and result.checkpoint_path is not None:
            Path(result.checkpoint_path).unlink(missing_ok=True)  # uploaded, or not among the best
        self.progress.refresh()

    def fail_open(self, reason: str) -> None:
        """Fail every open study trial with ``reason`` (the search stopped while they ran)."""
        from optuna.trial import TrialState

        for kt_id in list(self._open):
            trial = self._open.pop(kt_id)
            self.recorder.fail(storage_id_of(trial), reason)
            self.study.tell(trial, state=TrialState.FAIL)
            self.progress.trial_done(trial.number, "failed", None, reason)

    def recover(self, oracle) -> list[int]:
        """Fail the study trials a previous search left RUNNING (it was killed), with a reason.

        keras-tuner runs a trial it had not finished again on resume; that run's record is a
        retry of the failed one. Only this project's trials are touched: the project lock means
        no other process runs them.

        Returns:
            Numbers of the trials failed.
        """
        from optuna.trial import TrialState

        finished = {keras_tuner.engine.trial.TrialStatus.COMPLETED, keras_tuner.engine.trial.TrialStatus.FAILED}
        failed = []
        for trial in self.mirrors_of():
            if trial.state != TrialState.RUNNING:
                continue
            kt_trial = oracle.trials.get(trial.user_attrs.get(KT_TRIAL_ID_ATTR))
            if kt_trial is not None and kt_trial.status in finished:
                reason = "the keras-tuner search stopped (killed) after this trial ended, before its result was recorded"
            else:
                reason = "the keras-tuner search stopped (killed) while this trial ran; keras-tuner runs it again"
            self.recorder.fail(storage_id_of(trial), reason)
            self.storage.set_trial_state_values(storage_id_of(trial), state=TrialState.FAIL)
            logger.warning("trial %d: %s", trial.number, reason)
            failed.append(trial.number)
        return failed


def last_line(message: str | None) -> str | None:
    """The exception line at the end of a traceback keras-tuner stored as a trial's message."""
    lines = [line.strip() for line in (message or "").strip().splitlines() if line.strip()]
    return lines[-1][:2000] if lines else None
