"""The Optuna engine: one worker process runs trials of a study until its budget is used.

Many workers (local processes, or processes on other machines) share one study database; each
asks Optuna for parameters, runs the two-phase schedule, reports every epoch for pruning, and
records the result. A trial whose worker dies stops sending heartbeats, is failed with that
reason by the next worker that looks, and is retried as a new trial.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import sys
import threading
import time
import warnings
from typing import TYPE_CHECKING, Any, Callable, Mapping

from optuna.trial import TrialState

from autofinetune.errors import ConfigError, ExitCode, FatalError, PruneTrial
from autofinetune.engines.trial_path import INTERRUPTED
from autofinetune.store.retries import queue_retry
from autofinetune.store.outages import StorageUnavailableError
from autofinetune.trial.session import TrialSession
from autofinetune.store.optuna_internals import (
    reserve_trial,
    sample_reserved_trial,
    stale_trial_ids,
    storage_engine,
    storage_of,
    trial_id,
)

if TYPE_CHECKING:
    from autofinetune.data.sources import ImageData

logger = logging.getLogger(__name__)

STALE_REASON = (
    "worker stopped sending heartbeats (killed or lost) for more than {grace} s; "
    "the trial was failed and queued again"
)


class OptunaReporter:
    """Reports the objective of every epoch to an Optuna trial and prunes when it says so.

    In a study of several objectives (``objective.pareto_with``) nothing is pruned, and Optuna's
    ``Trial.report`` refuses: the main metric's epochs are written to the storage directly, as
    the Ray and keras-tuner engines write them, so every engine records the same curve.
    """

    def __init__(self, trial, objective: str, on_epoch: Callable[[int, Mapping[str, float]], None] | None = None):
        self.trial = trial
        self.objective = objective
        self.on_epoch = on_epoch
        self.multi = len(trial.study.directions) > 1

    def report(self, step: int, metrics: Mapping[str, float]) -> None:
        value = metrics.get(self.objective)
        if value is not None and math.isfinite(value):
            if self.multi:
                self.trial.storage.set_trial_intermediate_value(trial_id(self.trial), step, value)
            else:
                self.trial.report(value, step)
        if self.on_epoch is not None:
            self.on_epoch(step, metrics)
        if not self.multi and self.trial.should_prune():
            raise PruneTrial(step)


def fail_stale_trials(recording, *, grace: int) -> list[int]:
    """End running trials whose heartbeat is older than the grace period, with a reason.

    A stale trial that recorded its outcome before its worker died is finished with it (its
    value is not lost, nothing runs again). Any other is recorded as failed with the reason
    while it is still RUNNING and can take attributes (Optuna's own ``fail_stale_trials`` says
    nothing), set FAIL, and queued again by the storage's stale-trial callback.

    Args:
        recording: The study's :class:`~autofinetune.engines.trial_path.TrialRecording`.
        grace: The heartbeat grace period in seconds (for the reason).

    Returns:
        Numbers of the trials this call ended.
    """
    import optuna

    from autofinetune.engines.trial_path import record_ended_trial
    from autofinetune.store.outages import outage_policy_of
    from autofinetune.store.trial_writer import finish_from_outcome
    from autofinetune.store.study import main_value
    from autofinetune.viewing.trial_views import write_trial_views

    study = recording.study
    storage = storage_of(study)  # an RDBStorage, possibly behind Optuna's caching wrapper
    if getattr(storage, "get_heartbeat_interval", lambda: None)() is None:
        return []
    outage = outage_policy_of(storage)
    if outage is not None and outage.recently_recovered(within=grace):
        # Heartbeats could not be written while the database was away: give every worker one
        # grace period to beat again before any trial is taken for a dead worker's.
        return []
    reason = STALE_REASON.format(grace=grace)
    callback = storage.get_heartbeat_stale_trial_callback()
    ended = []
    for stale_id in stale_trial_ids(study):
        frozen = storage.get_trial(stale_id)
        try:
            finished = finish_from_outcome(storage, frozen)
            if finished is None:
                record_ended_trial(recording, frozen, reason, kind="lost")
                if not storage.set_trial_state_values(stale_id, state=TrialState.FAIL):
                    continue
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # another worker ended it first
        ended.append(frozen.number)
        if finished is not None:
            logger.warning("trial %d: its worker stopped after recording its outcome; finished as %s", frozen.number, finished)
            # Finished now, so it takes no curve; its note can still be written (a study attribute).
            done = storage.get_trial(stale_id)
            write_trial_views(study, stale_id, state=finished, value=main_value(done))
            continue
        logger.warning("trial %d: %s", frozen.number, reason)
        if callback is not None:
            callback(study, storage.get_trial(stale_id))
    return ended


class Heartbeat:
    """Records a running trial's heartbeat every interval, in a background thread.

    Args:
        storage: An ``RDBStorage`` opened with a heartbeat interval (else this does nothing).
        trial_id: The storage's id of the running trial.
    """

    def __init__(self, storage, trial_id: int) -> None:
        self.storage = storage
        self.trial_id = trial_id
        self.interval = storage.get_heartbeat_interval() if hasattr(storage, "get_heartbeat_interval") else None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _beat(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.storage.record_heartbeat(self.trial_id)
            except Exception as error:
                # The storage waits out an outage itself; past its grace the trial's own next
                # write stops the worker. A heartbeat thread never dies of it.
                logger.debug("heartbeat of trial id %d not recorded: %s", self.trial_id, error)

    def __enter__(self) -> "Heartbeat":
        if self.interval:
            self.storage.record_heartbeat(self.trial_id)
            self._thread = threading.Thread(target=self._beat, name="trial-heartbeat", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


class OptunaWorker:
    """Runs trials of one study in this process.

    Args:
        study_name: The study to work on.
        storage_url: The study database's SQLAlchemy URL.
        worker_index: Distinguishes workers (sampler seeds, logs).
        deadline: Unix time after which no new trial starts (``--timeout``).
        artifacts: Where checkpoints go (see :func:`autofinetune.store.artifacts.artifacts_location`).
        progress: Draw progress bars for trials and epochs (one foreground worker).
    """

    def __init__(
        self,
        study_name: str,
        storage_url: str,
        *,
        worker_index: int = 0,
        deadline: float | None = None,
        artifacts: str | None = None,
        progress: bool = False,
    ) -> None:
        import optuna

        from autofinetune.engines.trial_path import TrialRecording
        from autofinetune.search.algorithms import make_pruner, make_sampler
        from autofinetune.store.artifacts import artifacts_location
        from autofinetune.store.database import load_study, open_storage, redact_url
        from autofinetune.store.outages import OutagePolicy, outage_grace_from_env
        from autofinetune.store.study import spec_from_study
        from autofinetune.store.warm_start import warm_start_sources

        # Heartbeats without Study.optimize are intended: this worker runs its own ask/tell loop.
        warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")
        self.storage_url = storage_url
        self.deadline = deadline
        self.worker_index = worker_index
        # One policy for every storage call of this process: a worker started while the database
        # is down waits for it (the launch passes the study's grace before the spec is read).
        self.outage = OutagePolicy(outage_grace_from_env(), where=redact_url(storage_url))
        # The spec (stored on the study) says how to open the storage with heartbeats.
        spec_storage = open_storage(storage_url, create=False, outage=self.outage, wait_to_connect=True)
        stored = load_study(study_name, spec_storage)
        self.spec = spec_from_study(stored, check_files=True)
        existing = len(stored.get_trials(deepcopy=False))
        # Close its connections now: on a server, a worker holds only those of the storage below.
        storage_engine(spec_storage).dispose()
        search = self.spec.search
        self.outage.grace = float(search.outage_grace)
        self.storage = open_storage(
            storage_url,
            heartbeat_interval=search.heartbeat_interval,
            grace_period=search.heartbeat_grace,
            max_retry=search.max_retries,
            create=False,
            outage=self.outage,
            wait_to_connect=True,
        )
        # Each worker process, and each recycled one, gets its own seed: the same seed would
        # replay the same random start-up samples.
        seed = self.spec.seed + 7919 * existing + 104729 * worker_index
        self.study = optuna.load_study(
            study_name=study_name,
            storage=self.storage,
            sampler=make_sampler(self.spec, seed=seed, sources=warm_start_sources(self.spec)),
            pruner=make_pruner(self.spec),
        )
        self.recording = TrialRecording.at(self.study, self.spec, artifacts=artifacts_location(storage_url, artifacts))
        self.progress = progress
        # The backbone, compiled parts and feature cache this worker's trials reuse.
        self.session = TrialSession()
        self.stop_requested = threading.Event()
        self.stop_reason = f"{INTERRUPTED}; queued again"

    def request_stop(self, reason: str) -> None:
        """Stop after the current batch: the running trial fails with ``reason``; no new one starts."""
        self.stop_reason = reason
        self.stop_requested.set()

    # -- the loop -------------------------------------------------------------------------

    def run(self) -> ExitCode:
        """Run trials until the budget is used, the deadline passes, or it is time to recycle.

        Returns:
            ``DONE``, ``RECYCLE`` (more trials remain; start a fresh process, which keeps memory
            flat) or ``INTERRUPTED`` (a stop was requested).
        """
        from autofinetune.engines.progress import TrialProgressBar
        from autofinetune.store.study import load_study_data, study_budget

        data = load_study_data(self.study, self.spec)
        n_trials = study_budget(self.study)
        bar = TrialProgressBar(self.study, n_trials, enabled=self.progress)
        trials_run = 0
        try:
            while True:
                if self.stop_requested.is_set():
                    return ExitCode.INTERRUPTED
                if self.deadline is not None and time.time() >= self.deadline:
                    return ExitCode.DONE
                if trials_run >= self.spec.search.trials_per_process:
                    return ExitCode.RECYCLE
                trial = self._claim_next_trial(n_trials)
                if trial is None:
                    return ExitCode.DONE
                self._run_one_trial(trial, data, bar)
                trials_run += 1
                bar.refresh()
        finally:
            bar.close()

    def _claim_next_trial(self, n_trials: int):
        """Fail stale trials (queuing their retries), then ask for the next trial; when the budget
        is used while trials still run, wait for them to finish or turn stale.

        Returns:
            The asked ``optuna.Trial`` (a queued one first), or ``None`` when the budget is used
            and nothing is queued.
        """
        from optuna.trial import TrialState

        from autofinetune.store.database import claim_lock
        from autofinetune.store.study import budget_used

        interval = self.storage.get_heartbeat_interval()
        while True:
            reserved = None
            if not self._nothing_to_claim(n_trials):
                with claim_lock(self.storage_url, storage=self.storage, study_name=self.study.study_name):
                    fail_stale_trials(self.recording, grace=self.spec.search.heartbeat_grace)
                    counted, waiting = budget_used(self.study)
                    if counted < n_trials or waiting > 0:
                        reserved = reserve_trial(self.study, queued=waiting > 0)
                        if interval is not None:
                            # A worker that dies before its first heartbeat still leaves a stale trial.
                            self.storage.record_heartbeat(reserved)
            if reserved is not None:
                # Sampled after the lock: workers do not wait on each other's sampler.
                return sample_reserved_trial(self.study, reserved)
            running = self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
            # The budget is used but trials still run elsewhere. Their worker may be dead: stay
            # until they finish or turn stale, to run the retry; else a trial of a worker lost
            # near the end of a study stays RUNNING with nobody left to notice.
            if not running or interval is None:
                return None
            if self.deadline is not None and time.time() >= self.deadline:
                return None
            if self.stop_requested.wait(interval):
                return None

    def _nothing_to_claim(self, n_trials: int) -> bool:
        """The budget is used, nothing is queued and no running trial is stale: checked without
        the claim lock, so that the workers ending a study do not each wait for it. (Trials are
        only ever added, so a budget found used stays used.)"""
        from autofinetune.store.study import budget_used

        counted, waiting = budget_used(self.study)
        if counted < n_trials or waiting > 0:
            return False
        return self.storage.get_heartbeat_interval() is None or not stale_trial_ids(self.study)

    # -- one trial ------------------------------------------------------------------------

    def _run_one_trial(self, trial, data: "ImageData", bar) -> None:
        """Run an asked trial through the one trial path with heartbeats, then tell its outcome.

        Like ``study.optimize(n_trials=1)``, except that stale trials are ended only by
        :func:`fail_stale_trials`, which records why.

        Raises:
            KeyboardInterrupt: a stop was requested; the trial failed with that reason and is
                queued again.
            FatalError: the search must stop (bad input, a broken node, or too many unexpected
                errors in a row).
        """
        from autofinetune.engines.trial_path import record_ended_trial, run_recorded_trial
        from autofinetune.search.space import suggest_params

        storage_id = trial_id(trial)
        with Heartbeat(self.storage, storage_id):
            try:
                params = suggest_params(trial, self.spec)
            except Exception as error:  # the sampler failed: recorded like any trial that ends early
                record_ended_trial(self.recording, self.storage.get_trial(storage_id), f"{type(error).__name__}: {error}")
                self.study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
                raise
            logger.info("trial %d started: %s", trial.number, ", ".join(f"{k}={v!r}" for k, v in params.items()))
            bar.start_trial(trial.number, self.spec.schedule.total_epochs)
            outcome = run_recorded_trial(
                self.recording, self.spec, params, data, trial_id=storage_id, number=trial.number,
                reporter=OptunaReporter(trial, self.spec.objective.metric, on_epoch=bar.epoch_done),
                stop_event=self.stop_requested, stop_reason=lambda: self.stop_reason, session=self.session,
            )
        if outcome.kind == "taken_over":
            return
        self.study.tell(trial, outcome.told, state=outcome.optuna_state, skip_if_finished=True)
        best = outcome.result.best_value if outcome.result is not None else None
        bar.trial_done(trial.number, outcome.state, best, outcome.reason)
        logger.info("trial %d finished: %s%s", trial.number, outcome.optuna_state.name,
                    "" if outcome.value is None else f", value {outcome.value:.6g}")
        if outcome.kind == "interrupted":
            # Our own search stopped it (Ctrl-C, or the supervisor's SIGTERM): it runs again on
            # resume, in place of this one, so the budget stays whole.
            queue_retry(self.study, self.storage.get_trial(storage_id), max_retry=None)
            raise KeyboardInterrupt(outcome.reason)
        if outcome.stop_search is not None:
            raise FatalError(outcome.stop_search) from outcome.error


def run_worker(study_name: str, storage_url: str, **options: Any) -> ExitCode:
    """Run one worker in this process and return its exit code."""
    # Optuna's verbosity follows the command line's (autofinetune.logs.configure_logging).
    # Retracing warnings are expected: every trial builds a new model.
    logging.getLogger("tensorflow").setLevel(logging.ERROR)
    from autofinetune.trial.devices import prepare_devices

    try:
        prepare_devices()  # before anything touches a GPU: workers may share a card
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        if visible is not None:
            print(f"worker {options.get('worker_index', 0)}: CUDA_VISIBLE_DEVICES={visible}", file=sys.stderr, flush=True)
        worker = OptunaWorker(study_name, storage_url, **options)
        # Signals only set a flag; the trial stops at its next batch (see run_trial's stop_event).
        signal.signal(signal.SIGINT, lambda *_: worker.request_stop(f"{INTERRUPTED}; queued again"))
        signal.signal(signal.SIGTERM, lambda *_: worker.request_stop("stopped (SIGTERM) while running; queued again"))
        return worker.run()
    except StorageUnavailableError as error:
        print(f"error: {error}", flush=True, file=sys.stderr)
        return ExitCode.DATABASE_UNREACHABLE
    except (ConfigError, FatalError) as error:
        print(f"error: {error}", flush=True, file=sys.stderr)
        return ExitCode.BAD_INPUT
    except KeyboardInterrupt:
        return ExitCode.INTERRUPTED
