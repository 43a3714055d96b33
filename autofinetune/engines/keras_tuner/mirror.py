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
from autofinetune.errors import ConfigError
from autofinetune.store.optuna_internals import set_trial_user_attrs, storage_of, study_id
from autofinetune.store.retries import retry_marks
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
        recording: Records each trial as every engine does (the one trial path; the best models
            kept, curves, notes).
        project: The keras-tuner project searched.
        deadline: Unix time after which no trial starts.
        progress: The progress display (:class:`~autofinetune.engines.progress.TrialProgressBar`).
    """

    def __init__(self, study, spec, recording, project: Project, *, deadline: float | None, progress) -> None:
        self.study = study
        self.spec = spec
        self.recording = recording
        self.project = project
        self.deadline = deadline
        self.progress = progress
        self.stop_reason: str | None = None
        #: keras-tuner trial id -> (storage id, number) of the study trial of each open mirror.
        self._open: dict[str, tuple[int, int]] = {}
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

        from autofinetune.engines.keras_tuner.space import params_from_keras_tuner

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

        from autofinetune.engines.keras_tuner.space import params_from_keras_tuner
        from autofinetune.search.space import optuna_distributions
        from autofinetune.store.attributes import BASELINE_ATTR, FAIL_REASON_ATTR

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
            system_attrs = retry_marks([t.number for t in failed])
            attrs["retry_reason"] = failed[-1].user_attrs.get(FAIL_REASON_ATTR, "interrupted")

        # The trial's own distributions: its active parameters, its backbone's depth range.
        distributions = optuna_distributions(self.spec, params)
        trial_id = self._take_waiting(claimed_trial_id)
        if trial_id is not None:
            for name, value in params.items():
                distribution = distributions[name]
                self.storage.set_trial_param(trial_id, name, distribution.to_internal_repr(value), distribution)
            for key, value in system_attrs.items():
                self.storage.set_trial_system_attr(trial_id, key, value)
        else:
            if claimed_trial_id is not None and self.storage.get_trial(claimed_trial_id).user_attrs.get(BASELINE_ATTR):
                attrs[BASELINE_ATTR] = True  # a retry of the baseline is the baseline
            template = optuna.trial.create_trial(
                state=TrialState.RUNNING,
                params=params,
                distributions=distributions,
                system_attrs=system_attrs,
            )
            trial_id = self.storage.create_new_trial(study_id(self.study), template_trial=template)
        set_trial_user_attrs(self.storage, trial_id, attrs)
        number = self.storage.get_trial(trial_id).number
        self._open[kt_id] = (trial_id, number)
        self.progress.start_trial(number, int(values.get("tuner/epochs", self.spec.schedule.total_epochs)))

    def study_trial_of(self, kt_trial_id: str) -> tuple[int, int] | None:
        """The storage id and number of the study trial that mirrors a running keras-tuner
        trial (``None`` when it is not mirrored: its result is in the study already)."""
        return self._open.get(kt_trial_id)

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
        """One epoch of a running trial: its objective value at the global step (the trial
        path's reporter has given every metric to the trackers already)."""
        opened = self._open.get(kt_trial_id)
        if opened is None:
            return
        value = metrics.get(self.spec.objective.metric)
        if value is not None and math.isfinite(float(value)):
            self.storage.set_trial_intermediate_value(opened[0], step, float(value))
        self.progress.epoch_done(step, {k: float(v) for k, v in metrics.items()})

    def note_error(self, kt_trial_id: str, error: BaseException) -> None:
        """Remember why a trial's run raised (the reason its study trial fails with)."""
        if isinstance(error, (keras_tuner.errors.FailedTrialError, keras_tuner.errors.FatalError)):
            reason = str(error)
        else:
            reason = f"{type(error).__name__}: {error}"
        self._errors[kt_trial_id] = reason

    def close(self, kt_trial, outcome) -> None:
        """Tell the study how a keras-tuner trial ended (after keras-tuner's bookkeeping).

        The trial path recorded the trial when ``fit`` ran it; a trial whose run raised before
        an outcome (``build`` failed, keras-tuner gave it up) is recorded here, as such trials
        are by every engine.

        Args:
            kt_trial: The keras-tuner ``Trial``; its status is keras-tuner's verdict.
            outcome: The :class:`~autofinetune.engines.trial_path.TrialOutcome` of its ``fit``, or
                ``None`` when its run raised before one.
        """
        from optuna.trial import TrialState

        from autofinetune.engines.trial_path import record_ended_trial

        opened = self._open.pop(kt_trial.trial_id, None)
        raised = self._errors.pop(kt_trial.trial_id, None)
        if opened is None:
            return
        trial_id, number = opened
        completed = kt_trial.status == keras_tuner.engine.trial.TrialStatus.COMPLETED
        if outcome is None or outcome.kind == "taken_over":
            reason = raised or last_line(kt_trial.message) or f"keras-tuner marked the trial {kt_trial.status}"
            outcome = record_ended_trial(self.recording, self.storage.get_trial(trial_id), reason)
        result = outcome.result
        if result is not None:
            reported = set(self.storage.get_trial(trial_id).intermediate_values)
            for record in result.history:  # an epoch a callback did not forward
                value = record.metrics.get(result.objective)
                if record.step not in reported and value is not None and math.isfinite(value):
                    self.storage.set_trial_intermediate_value(trial_id, record.step, value)
        if completed and outcome.state == "complete" and outcome.value is not None:
            self.study.tell(number, outcome.told, state=TrialState.COMPLETE, skip_if_finished=True)
            self.progress.trial_done(number, "complete", outcome.value, None)
        elif completed and outcome.state == "pruned":
            self.study.tell(number, state=TrialState.PRUNED, skip_if_finished=True)
            best = result.best_value if result is not None else None
            self.progress.trial_done(number, f"pruned after step {result.pruned_at_step if result else '?'}", best, None)
        else:
            self.study.tell(number, state=TrialState.FAIL, skip_if_finished=True)
            self.progress.trial_done(number, "failed", None, outcome.reason or raised)
        if result is not None and result.checkpoint_path is not None:
            Path(result.checkpoint_path).unlink(missing_ok=True)  # uploaded, or not among the best
        self.progress.refresh()

    def fail_open(self, reason: str) -> None:
        """Fail every open study trial with ``reason`` (the search stopped while they ran);
        those the trial path recorded already (Ctrl-C inside ``fit``) keep their record."""
        from optuna.trial import TrialState

        from autofinetune.engines.trial_path import record_ended_trial
        from autofinetune.store.trial_writer import stored_outcome

        for kt_id in list(self._open):
            trial_id, number = self._open.pop(kt_id)
            frozen = self.storage.get_trial(trial_id)
            recorded = stored_outcome(frozen)
            if recorded is None:
                record_ended_trial(self.recording, frozen, reason, kind="interrupted")
            self.study.tell(number, state=TrialState.FAIL, skip_if_finished=True)
            self.progress.trial_done(number, "failed", None, (recorded or {}).get("reason") or reason)

    def recover(self, oracle) -> list[int]:
        """End the study trials a previous search left RUNNING (it was killed), with a reason.

        A trial that recorded its outcome before the kill is finished with it. keras-tuner runs
        a trial it had not finished again on resume; that run's record is a retry of the failed
        one. Only this project's trials are touched: the project lock means no other process
        runs them.

        Returns:
            Numbers of the trials ended.
        """
        from optuna.trial import TrialState

        from autofinetune.engines.trial_path import record_ended_trial
        from autofinetune.store.trial_writer import finish_from_outcome

        finished = {keras_tuner.engine.trial.TrialStatus.COMPLETED, keras_tuner.engine.trial.TrialStatus.FAILED}
        ended = []
        for trial in self.mirrors_of():
            if trial.state != TrialState.RUNNING:
                continue
            state = finish_from_outcome(self.storage, trial)
            if state is not None:
                logger.warning("trial %d: the keras-tuner search stopped after recording its outcome; %s", trial.number, state)
                ended.append(trial.number)
                continue
            kt_trial = oracle.trials.get(trial.user_attrs.get(KT_TRIAL_ID_ATTR))
            if kt_trial is not None and kt_trial.status in finished:
                reason = "the keras-tuner search stopped (killed) after this trial ended, before its result was recorded"
            else:
                reason = "the keras-tuner search stopped (killed) while this trial ran; keras-tuner runs it again"
            record_ended_trial(self.recording, trial, reason, kind="lost")
            self.storage.set_trial_state_values(storage_id_of(trial), state=TrialState.FAIL)
            logger.warning("trial %d: %s", trial.number, reason)
            ended.append(trial.number)
        return ended


def last_line(message: str | None) -> str | None:
    """The exception line at the end of a traceback keras-tuner stored as a trial's message."""
    lines = [line.strip() for line in (message or "").strip().splitlines() if line.strip()]
    return lines[-1][:2000] if lines else None
