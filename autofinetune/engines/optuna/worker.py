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
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping

from autofinetune.trial.devices import device_description
from autofinetune.errors import ConfigError, ExitCode, FatalError, PruneTrial, TrialError
from autofinetune.store.optuna_internals import (
    reserve_trial,
    sample_reserved_trial,
    stale_trial_ids,
    storage_engine,
    storage_of,
    trial_id,
)

logger = logging.getLogger(__name__)

STALE_REASON = (
    "worker stopped sending heartbeats (killed or lost) for more than {grace} s; "
    "the trial was failed and queued again"
)


class OptunaReporter:
    """Reports the objective of every epoch to an Optuna trial and prunes when it says so."""

    def __init__(self, trial, objective: str, on_epoch: Callable[[int, Mapping[str, float]], None] | None = None):
        self.trial = trial
        self.objective = objective
        self.on_epoch = on_epoch

    def report(self, step: int, metrics: Mapping[str, float]) -> None:
        value = metrics.get(self.objective)
        if value is not None and math.isfinite(value):
            self.trial.report(value, step)
        if self.on_epoch is not None:
            self.on_epoch(step, metrics)
        if self.trial.should_prune():
            raise PruneTrial(step)


def fail_stale_trials(recorder, *, grace: int) -> list[int]:
    """Fail running trials whose heartbeat is older than the grace period, with a reason.

    Optuna's own ``fail_stale_trials`` fails them without saying why; the reason is written
    first, while the trial is still RUNNING and can take attributes. The storage's
    stale-trial callback then queues each one again.

    Args:
        recorder: The study's :class:`~autofinetune.engines.recorder.TrialRecorder`.
        grace: The heartbeat grace period in seconds (for the reason).

    Returns:
        Numbers of the trials this call failed.
    """
    import optuna
    from optuna.trial import TrialState

    study = recorder.study
    storage = storage_of(study)  # an RDBStorage, possibly behind Optuna's caching wrapper
    if getattr(storage, "get_heartbeat_interval", lambda: None)() is None:
        return []
    reason = STALE_REASON.format(grace=grace)
    failed = []
    for stale_id in stale_trial_ids(study):
        try:
            recorder.fail(stale_id, reason)
            if storage.set_trial_state_values(stale_id, state=TrialState.FAIL):
                failed.append(stale_id)
        except optuna.exceptions.UpdateFinishedTrialError:
            pass  # another worker failed it first
    callback = storage.get_heartbeat_stale_trial_callback()
    numbers = []
    for failed_id in failed:
        # The trial is FAIL already: its note can still be written (a study attribute), no curve.
        recorder.write_views(failed_id, state="FAIL")
        frozen = storage.get_trial(failed_id)
        numbers.append(frozen.number)
        logger.warning("trial %d: %s", frozen.number, reason)
        if callback is not None:
            callback(study, frozen)
    return numbers


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
        while not self._stop.is_set():
            self.storage.record_heartbeat(self.trial_id)
            self._stop.wait(self.interval)

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
        artifacts: Where checkpoints go (see :func:`autofinetune.store.database.artifacts_location`).
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
        from autofinetune.search.algorithms import make_pruner, make_sampler
        from autofinetune.store.database import artifacts_location, load_study, open_storage
        from autofinetune.engines.recorder import TrialRecorder
        from autofinetune.store.study import spec_from_study

        import optuna

        # Heartbeats without Study.optimize are intended: this worker runs its own ask/tell loop.
        warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")
        self.storage_url = storage_url
        self.deadline = deadline
        self.worker_index = worker_index
        # The spec (stored on the study) says how to open the storage with heartbeats.
        spec_storage = open_storage(storage_url, create=False)
        stored = load_study(study_name, spec_storage)
        self.spec = spec_from_study(stored, check_files=True)
        existing = len(stored.get_trials(deepcopy=False))
        # Close its connections now: on a server, a worker holds only those of the storage below.
        storage_engine(spec_storage).dispose()
        search = self.spec.search
        self.storage = open_storage(
            storage_url,
            heartbeat_interval=search.heartbeat_interval,
            grace_period=search.heartbeat_grace,
            max_retry=search.max_retries,
            create=False,
        )
        # Each worker process, and each recycled one, gets its own seed: the same seed would
        # replay the same random start-up samples.
        seed = self.spec.seed + 7919 * existing + 104729 * worker_index
        self.study = optuna.load_study(
            study_name=study_name,
            storage=self.storage,
            sampler=make_sampler(self.spec, seed=seed),
            pruner=make_pruner(self.spec),
        )
        self.recorder = TrialRecorder.at(self.study, self.spec, artifacts=artifacts_location(storage_url, artifacts))
        self.progress = progress
        self.data = None
        self.stop_requested = threading.Event()
        self.stop_reason = "interrupted (Ctrl-C) while running"

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
        from autofinetune.store.study import study_budget

        self.data = self.recorder.load_data()
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
                self._run_one_trial(trial, bar)
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
                    fail_stale_trials(self.recorder, grace=self.spec.search.heartbeat_grace)
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

    def _run_one_trial(self, trial, bar) -> None:
        """Run an asked trial with heartbeats, then tell. Like ``study.optimize(n_trials=1)``,
        except that stale trials are failed only by :func:`fail_stale_trials`, which records why."""
        import optuna
        from optuna.trial import TrialState

        value, state = None, TrialState.FAIL
        with Heartbeat(self.storage, trial_id(trial)):
            try:
                value, state = self._objective(trial, bar), TrialState.COMPLETE
            except optuna.exceptions.UpdateFinishedTrialError:
                # Another worker failed it as stale (this process missed its heartbeats, e.g.
                # while swapping); that worker queued the retry, so this result is dropped.
                logger.warning("trial %d was failed as stale by another worker; dropping this run", trial.number)
                return
            except optuna.TrialPruned:
                state = TrialState.PRUNED
            except TrialError:
                pass
            except KeyboardInterrupt:
                # Wherever the stop lands (asking for params, training, recording the result),
                # the trial fails with the reason; a second Ctrl-C must not interrupt this.
                signal.signal(signal.SIGINT, signal.SIG_IGN)
                self.recorder.fail(trial_id(trial), self.stop_reason)
                self.study.tell(trial, state=TrialState.FAIL)
                raise
            except BaseException:
                self.study.tell(trial, state=TrialState.FAIL)
                raise
        self.study.tell(trial, value, state=state)
        logger.info("trial %d finished: %s%s", trial.number, state.name, "" if value is None else f", value {value:.6g}")

    def _objective(self, trial, bar) -> float:
        import optuna

        from autofinetune.search.space import suggest_params
        from autofinetune.trial.schedule import run_trial

        recorder, storage_id = self.recorder, trial_id(trial)
        recorder.start(storage_id, device=device_description())
        params = suggest_params(trial, self.spec)
        logger.info("trial %d started: %s", trial.number, ", ".join(f"{k}={v!r}" for k, v in params.items()))
        bar.start_trial(trial.number, self.spec.schedule.total_epochs)
        reporter = recorder.reporter(
            storage_id, OptunaReporter(trial, self.spec.objective.metric, on_epoch=bar.epoch_done)
        )
        with tempfile.TemporaryDirectory(prefix="autofinetune-") as scratch:
            checkpoint = Path(scratch) / "model.keras" if recorder.keeps_checkpoints else None
            try:
                schedule_started = time.perf_counter()
                result = run_trial(
                    self.spec, params, self.data, reporter=reporter, checkpoint_path=checkpoint,
                    keep_checkpoint=recorder.checkpoint_wanted(storage_id), stop_event=self.stop_requested,
                )
                trial.set_user_attr("schedule_seconds", round(time.perf_counter() - schedule_started, 3))
            except (ConfigError, FatalError) as error:
                recorder.fail(storage_id, str(error))
                raise
            except optuna.exceptions.UpdateFinishedTrialError:
                raise
            except Exception as error:  # an unexpected error fails this trial; repeated ones stop the worker
                reason = recorder.fail(storage_id, f"{type(error).__name__}: {error}")
                bar.trial_done(trial.number, "failed", None, reason)
                stop = recorder.failures.failed(reason)
                if stop is not None:
                    raise FatalError(stop) from error
                raise TrialError(reason) from error
            recorder.failures.succeeded()
            recorder.finish(storage_id, result, checkpoint_path=checkpoint)
        bar.trial_done(trial.number, result.state, result.best_value, result.error)
        if result.state == "pruned":
            raise optuna.TrialPruned(f"pruned after step {result.pruned_at_step}")
        if result.state == "failed":
            raise TrialError(result.error)
        return float(result.best_value)


def run_worker(study_name: str, storage_url: str, **options: Any) -> ExitCode:
    """Run one worker in this process and return its exit code."""
    # Optuna's verbosity follows the command line's (autofinetune.logs.configure_logging).
    # Retracing warnings are expected: every trial builds a new model.
    logging.getLogger("tensorflow").setLevel(logging.ERROR)
    from autofinetune.trial.devices import enable_memory_growth

    try:
        enable_memory_growth()  # before anything touches a GPU: workers may share a card
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        if visible is not None:
            print(f"worker {options.get('worker_index', 0)}: CUDA_VISIBLE_DEVICES={visible}", file=sys.stderr, flush=True)
        worker = OptunaWorker(study_name, storage_url, **options)
        # Signals only set a flag; the trial stops at its next batch (see run_trial's stop_event).
        signal.signal(signal.SIGINT, lambda *_: worker.request_stop("interrupted (Ctrl-C) while running"))
        signal.signal(signal.SIGTERM, lambda *_: worker.request_stop("stopped (SIGTERM) while running"))
        return worker.run()
    except (ConfigError, FatalError) as error:
        print(f"error: {error}", flush=True, file=sys.stderr)
        return ExitCode.BAD_INPUT
    except KeyboardInterrupt:
        return ExitCode.INTERRUPTED
