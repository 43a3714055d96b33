"""Ray schedulers that stop a trial by signal, so its schedule records a pruned trial itself.

A scheduler's decision to stop a trial early reaches the actor as a signal on its Optuna trial
(``autofinetune:early_stop``); the actor's schedule then stops itself through the same prune
path the Optuna engine uses, so the trial is recorded as PRUNED with its full record. (Letting
Ray stop the actor instead would kill the schedule inside ``tune.report`` before it could
record anything, and Ray's ``OptunaSearch`` would then tell Optuna COMPLETE with the last,
truncated value.) Import only after :func:`~autofinetune.engines.ray.options.require_ray`.
"""

from __future__ import annotations

from typing import Any

import optuna
from ray.tune import Callback
from ray.tune.schedulers import AsyncHyperBandScheduler, FIFOScheduler, MedianStoppingRule, TrialScheduler

from autofinetune.engines.ray.link import error_summary, get_link, optuna_trial_id
from autofinetune.engines.ray.options import EARLY_STOP_ATTR, GLOBAL_STEP_KEY, SchedulerPlan


class _StopBySignal(TrialScheduler):
    """Turns a scheduler's STOP into a signal the trial actor obeys after the current epoch.

    Ray stops a function trainable by raising ``SystemExit`` inside ``tune.report`` and then
    ending the actor, before the schedule could record the trial. Instead, the decision is
    written on the Optuna trial and the scheduler answers CONTINUE; ``tune.report`` in the actor
    returns only after the driver handled the result (function trainables report
    synchronously), so the actor reads the signal right away, raises the schedule's prune signal
    and records a pruned trial. A trial that keeps reporting after the signal is stopped the
    hard way. The last epoch is never signalled: the trial ends by itself.
    """

    # Buffered results would let the actor run on before the decision is made.
    _supports_buffered_results = False
    #: How the stop signal names the scheduler.
    label = "Ray's scheduler"

    def _init_signal(self, study_name: str, max_step: int) -> None:
        self._study_name = study_name
        self._max_step = max_step
        #: Tune trial id -> the step after which it was told to stop.
        self._signalled: dict[str, int] = {}

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        decision = super().on_trial_result(tune_controller, trial, result)
        if decision != TrialScheduler.STOP:
            return decision
        optuna_id, step = optuna_trial_id(trial), result.get(GLOBAL_STEP_KEY)
        if optuna_id is None or step is None:
            return decision
        step = int(step)
        signalled = self._signalled.get(trial.trial_id)
        if signalled is not None and step > signalled:
            return decision  # it did not stop when told to
        if step >= self._max_step:
            return TrialScheduler.CONTINUE  # its last epoch: it finishes and records itself
        self._signalled[trial.trial_id] = step
        get_link(self._study_name).storage.set_trial_system_attr(
            optuna_id, EARLY_STOP_ATTR, {"step": step, "scheduler": self.label}
        )
        return TrialScheduler.CONTINUE

    def on_trial_error(self, tune_controller, trial) -> None:
        # Called before the searcher records the failure: keep Ray's reason for it.
        optuna_id = optuna_trial_id(trial)
        if optuna_id is not None:
            link = get_link(self._study_name)
            link.errors[optuna_id] = (
                f"the trial's Ray actor failed {trial.run_metadata.num_failures} time(s) "
                f"(search.max_retries = {link.max_retries}); last error: {error_summary(trial)}"
            )
        super().on_trial_error(tune_controller, trial)


class SignalASHA(_StopBySignal, AsyncHyperBandScheduler):
    """ASHA on the global epoch, stopping trials through the prune signal.

    Args:
        study_name: The study (to find its link).
        max_step: The last global step of a trial.
        **kwargs: ``AsyncHyperBandScheduler``'s arguments.
    """

    label = "ASHA"

    def __init__(self, *, study_name: str, max_step: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._init_signal(study_name, max_step)


class SignalMedianStopping(_StopBySignal, MedianStoppingRule):
    """Ray's median stopping rule on the global epoch, stopping through the prune signal."""

    label = "the median stopping rule"

    def __init__(self, *, study_name: str, max_step: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._init_signal(study_name, max_step)


class SignalFIFO(_StopBySignal, FIFOScheduler):
    """No early stopping; only keeps Ray's reason when a trial is given up."""

    def __init__(self, *, study_name: str, max_step: int) -> None:
        super().__init__()
        self._init_signal(study_name, max_step)


def make_scheduler(plan: SchedulerPlan, spec) -> TrialScheduler:
    """The Ray scheduler of a :class:`~autofinetune.engines.ray.options.SchedulerPlan`."""
    common = {"study_name": spec.name, "max_step": plan.max_step}
    if plan.kind == "fifo":
        return SignalFIFO(**common)
    metric = spec.objective.metric
    mode = spec.objective.mode
    if plan.kind == "median":
        return SignalMedianStopping(**common, time_attr=GLOBAL_STEP_KEY, metric=metric, mode=mode, **plan.options)
    # stop_last_trials=False: a trial's end is its own business (see _StopBySignal).
    return SignalASHA(
        **common, time_attr=GLOBAL_STEP_KEY, metric=metric, mode=mode, stop_last_trials=False, **plan.options
    )


class RecordRestarts(Callback):
    """Writes on the Optuna trial why Ray restarted it (its actor or node died).

    Args:
        study_name: The study (to find its link).
    """

    def __init__(self, study_name: str) -> None:
        self._study_name = study_name

    def on_trial_recover(self, iteration: int, trials: list, trial, **info: Any) -> None:
        optuna_id = optuna_trial_id(trial)
        if optuna_id is None:
            return
        storage = get_link(self._study_name).storage
        failures = trial.run_metadata.num_failures
        try:
            storage.set_trial_user_attr(optuna_id, "ray_restarts", failures)
            storage.set_trial_user_attr(
                optuna_id, "retry_reason", f"Ray restarted the trial (failure {failures}) after: {error_summary(trial)}"
            )
        except optuna.exceptions.UpdateFinishedTrialError:
            pass


class StudyProgress(Callback):
    """Refreshes the launch's bar of the study's trials whenever Ray ends one.

    Args:
        study_name: The study (its link holds the bar: a callback is pickled with the
            experiment, a bar is not).
    """

    def __init__(self, study_name: str) -> None:
        self._study_name = study_name

    def _refresh(self) -> None:
        progress = get_link(self._study_name).progress
        if progress is not None:
            progress.poll()

    def on_trial_complete(self, iteration: int, trials: list, trial, **info: Any) -> None:
        self._refresh()

    def on_trial_error(self, iteration: int, trials: list, trial, **info: Any) -> None:
        self._refresh()
