"""The Ray Tune side of the Ray engine: searcher, schedulers, callback, trainable, driver loop.

This module imports Ray at module level, so that Tune can pickle its classes by reference;
import it only through :mod:`autofinetune.engines.ray.engine`, after
:func:`~autofinetune.engines.ray.engine.require_ray`.

Who writes what into the study database:

* the driver's :class:`StudySearch` (Ray's ``OptunaSearch``) asks for params -- the queued
  baseline first -- and tells each trial's final state;
* the trial actor (:func:`autofinetune_trial`) writes what the Optuna engine's worker writes:
  host attributes, one intermediate value per epoch at the global step, the result attributes,
  the checkpoint, and finally how its schedule ended (``autofinetune:outcome``);
* a scheduler's decision to stop a trial early reaches the actor as a signal on its trial
  (``autofinetune:early_stop``); the actor's schedule then stops itself through the same prune
  path the Optuna engine uses, so the trial is recorded as PRUNED with its full record.
  (Letting Ray stop the actor instead would kill the schedule inside ``tune.report`` before it
  could record anything, and Ray's ``OptunaSearch`` would then tell Optuna COMPLETE with the
  last, truncated value.)

The storage URL (which may hold a password) never enters a pickle that Ray writes to its
experiment folder: the searcher and schedulers find the open storage in this process's
registry (:data:`_LINKS`), and trial actors get the URL through ``tune.with_parameters``
(Ray's object store).
"""

from __future__ import annotations

import logging
import math
import os
import pickle
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import optuna
from optuna.trial import TrialState
from ray import tune
from ray.tune import Callback
from ray.tune.schedulers import AsyncHyperBandScheduler, FIFOScheduler, MedianStoppingRule, TrialScheduler
from ray.tune.search import ConcurrencyLimiter, Searcher
from ray.tune.search.optuna import OptunaSearch

from autofinetune.engines.ray.engine import (
    EARLY_STOP_ATTR,
    GLOBAL_STEP_KEY,
    OPTUNA_TRIAL_ID_KEY,
    OPTUNA_TRIAL_NUMBER_KEY,
    OUTCOME_ATTR,
    RAY_EXPERIMENT_ATTR,
    RAY_TRIAL_ATTR,
    RayLaunchOptions,
    SchedulerPlan,
    default_max_concurrent,
    say,
)
from autofinetune.errors import ConfigError, FatalError, PruneTrial
from autofinetune.store.database import FAIL_REASON_ATTR

logger = logging.getLogger(__name__)

#: After this many unexpected trial errors in a row the search stops (as the Optuna engine does).
MAX_CONSECUTIVE_ERRORS = 3


# --- the driver's handle on the study --------------------------------------------------------


@dataclass
class StudyLink:
    """What the driver-side Ray objects share about one study while it runs in this process.

    Attributes:
        spec: The study's spec.
        storage: The open study database.
        deadline: Unix time after which no new trial starts.
        max_retries: ``search.max_retries`` (Ray's ``max_failures``).
        errors: Optuna trial id -> why Ray gave the trial up (from the scheduler's error hook,
            read when the searcher records the failure right after).
        stop_reason: Set when the search must stop (a fatal trial error); no new trial starts.
        consecutive_errors: Unexpected trial errors in a row.
        search_finished: The searcher said no more trials (budget, deadline or stop reason).
    """

    spec: Any
    storage: Any
    deadline: float | None
    max_retries: int
    errors: dict[int, str] = field(default_factory=dict)
    stop_reason: str | None = None
    consecutive_errors: int = 0
    search_finished: bool = False


#: Study name -> its link, in the process that runs Tune's driver.
_LINKS: dict[str, StudyLink] = {}


def _link(study_name: str) -> StudyLink:
    try:
        return _LINKS[study_name]
    except KeyError:
        raise RuntimeError(
            f"study {study_name!r} is not open in this process; the Ray engine's searcher and "
            "schedulers run only inside autofinetune.engines.ray.components.drive_study"
        ) from None


def _optuna_id(trial) -> int | None:
    value = trial.config.get(OPTUNA_TRIAL_ID_KEY)
    return None if value is None else int(value)


def _error_summary(trial) -> str:
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


# --- search: Ray's OptunaSearch on the study database ----------------------------------------


class StudySearch(OptunaSearch):
    """Ray's ``OptunaSearch`` on the study itself, recording each trial as the Optuna engine does.

    What it changes in ``OptunaSearch``, and why:

    * ``suggest`` stops at the study's trial budget (finished, running and queued trials count,
      so a resumed study runs only the missing trials) and at the deadline, tags the Optuna
      trial with its Ray trial, and passes the Optuna trial id to the actor in the config;
    * ``on_trial_result`` reports nothing: the actor writes each epoch at its global step
      (``training_iteration`` restarts when Ray retries a trial, and Optuna ignores a repeated
      step);
    * ``on_trial_complete`` tells the state the actor's schedule ended in -- COMPLETE with the
      best epoch's value, PRUNED, or FAIL with a reason -- instead of COMPLETE with the last
      reported value;
    * pickles (Tune's experiment state) hold no storage, hence no database password.

    Args:
        spec: The study's spec (its search space, sampler and objective).
        link: The open study (see :class:`StudyLink`).
        experiment: Name of the Ray experiment, recorded on each trial.
        seed: The sampler's seed.
    """

    def __init__(self, spec, link: StudyLink, *, experiment: str, seed: int) -> None:
        from autofinetune.search.algorithms import make_sampler
        from autofinetune.search.space import optuna_distributions

        direction = spec.objective.resolved_direction
        super().__init__(
            space=optuna_distributions(spec),  # the Optuna engine's exact distributions
            metric=spec.objective.metric,
            mode="max" if direction == "maximize" else "min",
            sampler=make_sampler(spec, seed=seed),
            study_name=spec.name,
            storage=link.storage,
        )
        self._experiment = experiment
        #: Tune trial id -> [Optuna trial id, Optuna trial number].
        self._trial_ids: dict[str, list[int]] = {}

    # -- pickling without the storage --

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_storage"] = None
        state["_ot_study"] = None
        state["_ot_trials"] = {}
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as file:
            pickle.dump(self.__getstate__(), file)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as file:
            state = pickle.load(file)
        self.__dict__.update(state)
        self._ot_study = None  # reopened from this process's link on first use

    @property
    def _study(self):
        if self._ot_study is None:
            link = _link(self._study_name)
            self._storage = link.storage
            self._ot_study = optuna.load_study(
                study_name=self._study_name, storage=link.storage, sampler=self._sampler,
                pruner=optuna.pruners.NopPruner(),
            )
        return self._ot_study

    # -- asking --

    def suggest(self, trial_id: str) -> dict[str, Any] | str | None:
        from autofinetune.store.study import budget_used, study_budget

        link = _link(self._study_name)
        if trial_id in self._trial_ids:  # asked again for a trial it already handed out
            optuna_id, number = self._trial_ids[trial_id]
            return self._config(link.storage.get_trial(optuna_id).params, optuna_id, number)
        if link.stop_reason is not None or (link.deadline is not None and time.time() >= link.deadline):
            link.search_finished = True
            return Searcher.FINISHED
        counted, waiting = budget_used(self._study)
        if waiting == 0 and counted >= study_budget(self._study):
            link.search_finished = True
            return Searcher.FINISHED
        # ask() pops a queued trial first (the baseline, a retry), else samples a new one.
        ot_trial = self._study.ask(fixed_distributions=self._space)
        link.storage.set_trial_system_attr(
            ot_trial._trial_id, RAY_TRIAL_ATTR, {"experiment": self._experiment, "tune_trial": trial_id}
        )
        self._trial_ids[trial_id] = [ot_trial._trial_id, ot_trial.number]
        return self._config(ot_trial.params, ot_trial._trial_id, ot_trial.number)

    @staticmethod
    def _config(params: Mapping[str, Any], optuna_id: int, number: int) -> dict[str, Any]:
        return {**params, OPTUNA_TRIAL_ID_KEY: optuna_id, OPTUNA_TRIAL_NUMBER_KEY: number}

    # -- telling --

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        return None  # the trial actor writes each epoch itself, at its global step

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id in self._completed_trials:
            return
        self._completed_trials.add(trial_id)
        ids = self._trial_ids.get(trial_id)
        if ids is not None:
            self._record_end(ids[0], ids[1], error=error)

    def _record_end(self, optuna_id: int, number: int, *, error: bool) -> None:
        link = _link(self._study_name)
        storage = link.storage
        frozen = storage.get_trial(optuna_id)
        if frozen.state.is_finished():
            return  # recorded by an earlier driver, before a crash and resume
        outcome = frozen.system_attrs.get(OUTCOME_ATTR)
        value = None
        if outcome is None:
            # The actor never finished its schedule: Ray gave the trial up (actor or node died
            # more than max_failures times) or ended it.
            reason = link.errors.pop(optuna_id, None) or (
                "Ray reported the trial as failed" if error else "Ray ended the trial before its schedule finished"
            )
            if FAIL_REASON_ATTR not in frozen.user_attrs:
                storage.set_trial_user_attr(optuna_id, FAIL_REASON_ATTR, reason)
            state = TrialState.FAIL
        elif outcome.get("state") == "complete" and outcome.get("value") is not None:
            state, value = TrialState.COMPLETE, float(outcome["value"])
        elif outcome.get("state") == "pruned":
            state = TrialState.PRUNED  # Optuna stores the last intermediate value, as for the Optuna engine
        else:
            state = TrialState.FAIL
        self._count_errors(link, outcome, storage.get_trial_user_attrs(optuna_id).get(FAIL_REASON_ATTR, ""), error=error)
        try:
            self._study.tell(number, value, state=state)
        except Exception as exc:  # e.g. finished meanwhile by another process; never stop the search for it
            logger.warning("could not record the end of trial %d: %s", number, exc)

    @staticmethod
    def _count_errors(link: StudyLink, outcome: Mapping[str, Any] | None, reason: str, *, error: bool) -> None:
        if outcome and outcome.get("fatal"):
            link.stop_reason = link.stop_reason or reason or "a trial failed with a fatal error"
        elif (outcome and outcome.get("unexpected")) or (outcome is None and error):
            # Trials Ray gave up on count too: nodes that cannot reach the database or the
            # data fail every trial, each after its retries.
            link.consecutive_errors += 1
            if link.consecutive_errors >= MAX_CONSECUTIVE_ERRORS and link.stop_reason is None:
                link.stop_reason = f"{MAX_CONSECUTIVE_ERRORS} trials in a row failed; last: {reason}"
        elif outcome is not None:
            link.consecutive_errors = 0


# --- schedulers: stop by signal, so the schedule records a pruned trial itself ---------------


class _StopBySignal:
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
        optuna_id, step = _optuna_id(trial), result.get(GLOBAL_STEP_KEY)
        if optuna_id is None or step is None:
            return decision
        step = int(step)
        signalled = self._signalled.get(trial.trial_id)
        if signalled is not None and step > signalled:
            return decision  # it did not stop when told to
        if step >= self._max_step:
            return TrialScheduler.CONTINUE  # its last epoch: it finishes and records itself
        self._signalled[trial.trial_id] = step
        _link(self._study_name).storage.set_trial_system_attr(
            optuna_id, EARLY_STOP_ATTR, {"step": step, "scheduler": self.label}
        )
        return TrialScheduler.CONTINUE

    def on_trial_error(self, tune_controller, trial) -> None:
        # Called before the searcher records the failure: keep Ray's reason for it.
        optuna_id = _optuna_id(trial)
        if optuna_id is not None:
            link = _link(self._study_name)
            link.errors[optuna_id] = (
                f"the trial's Ray actor failed {trial.run_metadata.num_failures} time(s) "
                f"(search.max_retries = {link.max_retries}); last error: {_error_summary(trial)}"
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
    """The Ray scheduler of a :class:`~autofinetune.engines.ray.engine.SchedulerPlan`."""
    common = {"study_name": spec.name, "max_step": plan.max_step}
    if plan.kind == "fifo":
        return SignalFIFO(**common)
    metric = spec.objective.metric
    mode = "max" if spec.objective.resolved_direction == "maximize" else "min"
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
        optuna_id = _optuna_id(trial)
        if optuna_id is None:
            return
        storage = _link(self._study_name).storage
        failures = trial.run_metadata.num_failures
        try:
            storage.set_trial_user_attr(optuna_id, "ray_restarts", failures)
            storage.set_trial_user_attr(
                optuna_id, "retry_reason", f"Ray restarted the trial (failure {failures}) after: {_error_summary(trial)}"
            )
        except optuna.exceptions.UpdateFinishedTrialError:
            pass


# --- the trainable: one trial in its own actor ------------------------------------------------


@dataclass(frozen=True)
class TrialContext:
    """What every trial actor needs besides its params (sent through Ray's object store).

    Attributes:
        spec: The study's spec, unchanged.
        storage_url: The study database's URL.
        artifacts: Where checkpoints go (an absolute folder or a bucket URI).
        cpus: CPUs of the trial (TensorFlow's thread count).
    """

    spec: Any
    storage_url: str
    artifacts: str
    cpus: float


def _configure_backend(cpus: float) -> None:
    """TensorFlow only: grow GPU memory on demand (trials may share a GPU) and use the
    trial's CPUs, not the whole machine's. Must run before TensorFlow touches a device."""
    import keras

    if keras.backend.backend() != "tensorflow":
        return
    import tensorflow as tf

    try:
        for gpu in tf.config.list_physical_devices("GPU"):
            tf.config.experimental.set_memory_growth(gpu, True)
        if cpus >= 1:
            tf.config.threading.set_intra_op_parallelism_threads(int(math.ceil(cpus)))
            tf.config.threading.set_inter_op_parallelism_threads(int(math.ceil(cpus)))
    except RuntimeError:  # devices already initialized in this process; keep what is there
        pass


class RayReporter:
    """Writes each epoch to the Optuna trial and to Ray, and obeys the scheduler's stop signal.

    Args:
        storage: The study database.
        trial_id: The Optuna trial's storage id.
        objective: The metric that is the trial's value.
    """

    def __init__(self, storage, trial_id: int, objective: str) -> None:
        self.storage = storage
        self.trial_id = trial_id
        self.objective = objective
        self.reported = False

    def report_nothing_happened(self) -> None:
        """For a trial that ends before its first epoch: Tune rejects a trial whose results
        never hold the objective, so report it once, as NaN at step 0, which no rung records."""
        if not self.reported:
            tune.report({GLOBAL_STEP_KEY: 0, self.objective: math.nan})

    def report(self, step: int, metrics: Mapping[str, float]) -> None:
        self.reported = True
        value = metrics.get(self.objective)
        if value is not None and math.isfinite(value):
            # Straight to the storage, which overwrites a step: a retried attempt replaces the
            # values of the attempt whose actor died.
            self.storage.set_trial_intermediate_value(self.trial_id, step, value)
        tune.report({GLOBAL_STEP_KEY: step, **metrics})
        # tune.report returned, so the driver has made its decision about this epoch.
        signal = self.storage.get_trial_system_attrs(self.trial_id).get(EARLY_STOP_ATTR)
        if signal is not None and step >= int(signal["step"]):
            raise PruneTrial(step, f"stopped by {signal.get('scheduler', 'the scheduler')} after step {step}")


def _load_checked_data(spec, study):
    """The spec's images, checked against the fingerprint the study started with."""
    from autofinetune.data.sources import load_data
    from autofinetune.store.database import STUDY_FINGERPRINT_ATTR

    data = load_data(spec)
    known = study.user_attrs.get(STUDY_FINGERPRINT_ATTR)
    if known is None:
        study.set_user_attr(STUDY_FINGERPRINT_ATTR, data.fingerprint)
    elif known != data.fingerprint:
        raise FatalError(
            f"the data this Ray node sees ({data.source}) differs from the data the study started with "
            f"(fingerprint {data.fingerprint[:12]} != {known[:12]}); every node must see the same images"
        )
    return data


def autofinetune_trial(config: dict[str, Any], context: TrialContext) -> None:
    """One trial of the two-phase schedule, in a Ray actor; records itself in the study database.

    Args:
        config: The params, plus the Optuna trial's id and number (from :class:`StudySearch`).
        context: See :class:`TrialContext`.
    """
    from autofinetune.store.checkpoints import CheckpointKeeper
    from autofinetune.store.recorder import host_attributes, record_result
    from autofinetune.trial.schedule import run_trial
    from autofinetune.store.database import open_artifact_store, open_storage

    started = time.perf_counter()
    _configure_backend(context.cpus)
    spec = context.spec
    optuna_id = int(config[OPTUNA_TRIAL_ID_KEY])
    storage = open_storage(context.storage_url, create=False)
    reporter = RayReporter(storage, optuna_id, spec.objective.metric)
    if storage.get_trial(optuna_id).state.is_finished():
        # A resumed experiment re-ran a trial whose result was recorded before the crash.
        reporter.report_nothing_happened()
        return
    study = optuna.load_study(study_name=spec.name, storage=storage)
    trial = optuna.trial.Trial(study, optuna_id)
    for key, value in host_attributes().items():
        storage.set_trial_user_attr(optuna_id, key, value)
    storage.set_trial_user_attr(optuna_id, "ray_trial_id", tune.get_context().get_trial_id())
    # On a cluster, which node ran (the last attempt of) the trial; host names may repeat.
    import ray

    storage.set_trial_user_attr(optuna_id, "ray_node", ray.get_runtime_context().get_node_id())
    params = {name: config[name] for name in spec.search.params()}
    outcome: dict[str, Any]
    try:
        data = _load_checked_data(spec, study)
        keeper = CheckpointKeeper(
            open_artifact_store(context.artifacts),
            keep=spec.search.keep_checkpoints,
            direction=spec.objective.resolved_direction,
        )
        with tempfile.TemporaryDirectory(prefix="autofinetune-") as scratch:
            checkpoint = Path(scratch) / "model.keras" if keeper.keep > 0 else None
            result = run_trial(spec, params, data, reporter=reporter, checkpoint_path=checkpoint)
            record_result(study, optuna_id, result, phase1_epochs=spec.schedule.phase1_epochs)
            if result.state == "complete" and checkpoint is not None and result.best_value is not None:
                keeper.offer(study, trial, result.best_value, str(checkpoint))
        outcome = {"state": result.state, "value": result.best_value}
    except (ConfigError, FatalError) as error:
        # Bad input or a broken node: this trial fails and the search stops starting new ones.
        storage.set_trial_user_attr(optuna_id, FAIL_REASON_ATTR, str(error)[:2000])
        outcome = {"state": "failed", "fatal": True}
    except Exception as error:  # an unexpected error fails this trial; repeated ones stop the search
        storage.set_trial_user_attr(optuna_id, FAIL_REASON_ATTR, f"{type(error).__name__}: {error}"[:2000])
        outcome = {"state": "failed", "unexpected": True}
    storage.set_trial_user_attr(optuna_id, "trial_seconds", round(time.perf_counter() - started, 3))
    # Last: the driver reads this when Ray reports the trial done, and tells Optuna its state.
    storage.set_trial_system_attr(optuna_id, OUTCOME_ATTR, outcome)
    reporter.report_nothing_happened()


# --- the driver: one Ray experiment per launch, resumed after a crash -------------------------


def trial_name(trial) -> str:
    """Tune's name of a trial: the Optuna trial number it runs, then Tune's own id."""
    return f"trial_{trial.config.get(OPTUNA_TRIAL_NUMBER_KEY, 'new')}_{trial.trial_id}"


def _experiment_path(storage_path: str, name: str) -> str:
    return f"{storage_path.rstrip('/')}/{name}"


def _has_experiment_state(path: str) -> bool:
    """Whether Tune saved the experiment's state there (it does so every 10 s or more; a driver
    that died sooner left only ``tuner.pkl``, from which ``Tuner.restore`` cannot resume)."""
    import pyarrow.fs

    if not tune.Tuner.can_restore(path):
        return False
    if "://" in path:
        fs, fs_path = pyarrow.fs.FileSystem.from_uri(path)
    else:
        fs, fs_path = pyarrow.fs.LocalFileSystem(), path
    infos = fs.get_file_info(pyarrow.fs.FileSelector(fs_path, allow_not_found=True))
    return any(Path(info.path).name.startswith("experiment_state-") for info in infos)


def _reap(link: StudyLink, study, *, experiment: str | None, reason: Callable[[Any], str]) -> list[int]:
    """Fail the RUNNING trials a Ray experiment left behind, with a reason, and queue them again.

    Args:
        experiment: Only this experiment's trials; ``None``: every Ray experiment's (before a
            new experiment starts, the old ones are over).
        reason: The ``fail_reason`` of a trial (given its frozen trial).

    Returns:
        Numbers of the trials failed.
    """
    from autofinetune.store.database import RetryStaleTrial

    storage = link.storage
    retry = RetryStaleTrial(max_retry=link.max_retries)
    reaped = []
    for frozen in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        tag = frozen.system_attrs.get(RAY_TRIAL_ATTR)
        if not tag or (experiment is not None and tag.get("experiment") != experiment):
            continue  # run by another engine, or by another experiment
        why = reason(frozen)
        try:
            storage.set_trial_user_attr(frozen._trial_id, FAIL_REASON_ATTR, why)
            storage.set_trial_state_values(frozen._trial_id, state=TrialState.FAIL)
        except optuna.exceptions.UpdateFinishedTrialError:
            continue
        retry(study, storage.get_trial(frozen._trial_id))
        reaped.append(frozen.number)
        say(f"trial {frozen.number}: {why}")
    return reaped


def _set_experiment(link: StudyLink, study, record: dict[str, Any]) -> None:
    link.storage.set_study_system_attr(study._study_id, RAY_EXPERIMENT_ATTR, record)


INTERRUPTED = "interrupted (Ctrl-C) while running; queued again"
ORPHANED = "its Ray driver stopped before Ray took the trial over; queued again"


def _fit(link: StudyLink, study, tuner, record: dict[str, Any], *, restored: bool) -> int:
    """Run one Ray experiment to its end and clean up what it left RUNNING.

    Every trial Tune ends normally is told to Optuna by the searcher. A trial that is still
    RUNNING afterwards was either stopped by Tune without an end (Ctrl-C: Tune stops the trials
    and returns), or never reached Tune (its driver died between asking Optuna and saving the
    experiment); both are failed with that reason and queued again.

    Returns:
        0, 2 after a fatal trial error, 130 when interrupted.
    """
    _set_experiment(link, study, {**record, "finished": False})
    link.search_finished = False
    results = tuner.fit()
    known = {int(r.config[OPTUNA_TRIAL_ID_KEY]) for r in results if r.config and OPTUNA_TRIAL_ID_KEY in r.config}
    interrupted: list[int] = []

    def reason(frozen) -> str:
        if frozen._trial_id in known:
            interrupted.append(frozen.number)
            return INTERRUPTED
        return ORPHANED

    _reap(link, study, experiment=record["name"], reason=reason)
    _set_experiment(link, study, {**record, "finished": True})
    if link.stop_reason is not None:
        say(f"fatal: {link.stop_reason}")
        return 2
    # A new experiment ends only once its searcher said FINISHED; a restored one may have said
    # so before the crash, so only its stopped trials tell.
    if interrupted or (not restored and not link.search_finished):
        return 130
    return 0


def drive_study(
    spec,
    url: str,
    *,
    deadline: float | None,
    artifacts: str,
    options: RayLaunchOptions,
    plan: SchedulerPlan,
) -> int:
    """Run the study's missing trials as a Ray Tune experiment (in the process of Tune's driver).

    If the study's last Ray experiment did not finish (its driver died), it is restored and
    resumed first: its unfinished trials run again under their own Optuna trials, so no trial
    is duplicated. Then, while the budget has room, a new experiment runs the rest.

    Args:
        spec: The study's spec.
        url: The study database's URL.
        deadline: Unix time after which no new trial starts.
        artifacts: Absolute checkpoint location.
        options: Trial resources and where the experiment state lives.
        plan: The scheduler standing in for the spec's pruner.

    Returns:
        The exit code (see :func:`~autofinetune.engines.ray.engine.launch_with_ray`).
    """
    import ray

    from autofinetune.store.database import load_study, open_storage
    from autofinetune.store.study import budget_used, study_budget

    storage = open_storage(url, create=False)
    study = load_study(spec.name, storage)
    link = StudyLink(spec=spec, storage=storage, deadline=deadline, max_retries=spec.search.max_retries)
    _LINKS[spec.name] = link
    context = TrialContext(spec=spec, storage_url=url, artifacts=artifacts, cpus=options.cpus_per_trial)
    trainable = tune.with_resources(tune.with_parameters(autofinetune_trial, context=context), options.resources)
    storage_path = options.storage_path or str(Path("~/ray_results").expanduser())
    resumed = False
    try:
        record = storage.get_study_system_attrs(study._study_id).get(RAY_EXPERIMENT_ATTR)
        if record and not record.get("finished"):
            if _has_experiment_state(record["path"]):
                say(f"resuming Ray experiment {record['path']} (its driver stopped before it finished)")
                tuner = tune.Tuner.restore(
                    record["path"], trainable=trainable, resume_unfinished=True, resume_errored=False,
                    restart_errored=False,
                )
                code = _fit(link, study, tuner, record, restored=True)
                if code != 0:
                    return code
                resumed = True
            else:
                say(f"Ray experiment {record['path']} cannot be resumed (no experiment state there)")
        _reap(link, study, experiment=None,
              reason=lambda frozen: "its Ray driver stopped and the Ray experiment could not be resumed; queued again")
        counted, waiting = budget_used(study)
        if waiting == 0 and counted >= study_budget(study):
            if not resumed:
                say(f"study {spec.name!r}: all {study_budget(study)} trials are done or running; nothing to start")
            return 0
        if deadline is not None and time.time() >= deadline:
            return 0
        name = f"{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        # A new seed per run: the same seed would replay the sampler's random start-up trials.
        seed = spec.seed + 7919 * len(study.get_trials(deepcopy=False))
        searcher = StudySearch(spec, link, experiment=name, seed=seed)
        concurrency = options.max_concurrent or default_max_concurrent(options, ray.cluster_resources())
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(
                search_alg=ConcurrencyLimiter(searcher, max_concurrent=concurrency),
                scheduler=make_scheduler(plan, spec),
                num_samples=-1,  # the searcher ends the experiment at the study's budget
                reuse_actors=False,  # a fresh process per trial: TensorFlow keeps memory otherwise
                # Short names that match the study database (Tune's default lists every param).
                trial_name_creator=trial_name,
                trial_dirname_creator=trial_name,
            ),
            run_config=tune.RunConfig(
                name=name,
                storage_path=storage_path,
                failure_config=tune.FailureConfig(max_failures=spec.search.max_retries),
                callbacks=[RecordRestarts(spec.name)],
                verbose=1,
            ),
        )
        say(f"Ray experiment {_experiment_path(storage_path, name)}: up to {concurrency} trial(s) at once, "
            f"{options.cpus_per_trial:g} CPU and {options.gpus_per_trial:g} GPU each")
        record = {"path": _experiment_path(storage_path, name), "name": name, "storage_path": storage_path}
        return _fit(link, study, tuner, record, restored=False)
    finally:
        _LINKS.pop(spec.name, None)
