"""Tune's driver for a study: one Ray experiment per launch, resumed after a crash.

Who writes what into the study database: the driver's :class:`~.search.StudySearch` asks for
params (the queued baseline first) and tells each trial's final state; each trial actor
(:func:`~.trainable.autofinetune_trial`) records its own trial; trials Ray gave up on, or that
a stopped driver left RUNNING, are failed here with a reason and queued again. Import only
after :func:`~autofinetune.engines.ray.options.require_ray`.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import optuna
from optuna.trial import TrialState
from ray import tune
from ray.tune.search import ConcurrencyLimiter

from autofinetune.engines.ray.link import StudyLink, open_link
from autofinetune.engines.ray.options import (
    OPTUNA_TRIAL_ID_KEY,
    OPTUNA_TRIAL_NUMBER_KEY,
    RAY_EXPERIMENT_ATTR,
    RAY_TRIAL_ATTR,
    RayLaunchOptions,
    SchedulerPlan,
    default_max_concurrent,
    say,
)
from autofinetune.engines.ray.schedulers import RecordRestarts, StudyProgress, make_scheduler
from autofinetune.engines.ray.search import StudySearch
from autofinetune.engines.ray.trainable import TrialContext, autofinetune_trial
from autofinetune.engines.trial_path import INTERRUPTED, TrialRecording, record_ended_trial
from autofinetune.errors import ExitCode
from autofinetune.store.optuna_internals import study_id
from autofinetune.store.optuna_internals import trial_id as storage_id_of
from autofinetune.store.outages import storage_unavailable


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
    """End the RUNNING trials a Ray experiment left behind, and queue them again.

    A trial whose actor recorded its outcome before the experiment stopped is finished with it;
    any other is failed with a reason and queued again (the driver stopped it, not the trial).

    Args:
        experiment: Only this experiment's trials; ``None``: every Ray experiment's (before a
            new experiment starts, the old ones are over).
        reason: The ``fail_reason`` of a trial (given its frozen trial).

    Returns:
        Numbers of the trials ended.
    """
    from autofinetune.store.retries import queue_retry
    from autofinetune.store.trial_writer import finish_from_outcome

    storage = link.storage
    reaped = []
    for frozen in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        tag = frozen.system_attrs.get(RAY_TRIAL_ATTR)
        if not tag or (experiment is not None and tag.get("experiment") != experiment):
            continue  # run by another engine, or by another experiment
        try:
            finished = finish_from_outcome(storage, frozen)
            if finished is not None:
                reaped.append(frozen.number)
                say(f"trial {frozen.number}: its actor recorded its outcome before the experiment stopped; {finished}")
                continue
            why = reason(frozen)
            record_ended_trial(link.recording, frozen, why, kind="interrupted")
            storage.set_trial_state_values(storage_id_of(frozen), state=TrialState.FAIL)
        except optuna.exceptions.UpdateFinishedTrialError:
            continue
        queue_retry(study, storage.get_trial(storage_id_of(frozen)), max_retry=None)
        reaped.append(frozen.number)
        say(f"trial {frozen.number}: {why}")
    return reaped


def _set_experiment(link: StudyLink, study, record: dict[str, Any]) -> None:
    link.storage.set_study_system_attr(study_id(study), RAY_EXPERIMENT_ATTR, record)


INTERRUPTED_REASON = f"{INTERRUPTED}; queued again"
ORPHANED = "its Ray driver stopped before Ray took the trial over; queued again"


def _fit(link: StudyLink, study, tuner, record: dict[str, Any], *, restored: bool) -> ExitCode:
    """Run one Ray experiment to its end and clean up what it left RUNNING.

    Every trial Tune ends normally is told to Optuna by the searcher. A trial that is still
    RUNNING afterwards was either stopped by Tune without an end (Ctrl-C: Tune stops the trials
    and returns), or never reached Tune (its driver died between asking Optuna and saving the
    experiment); both are failed with that reason and queued again.

    Returns:
        ``DONE``, ``BAD_INPUT`` after a fatal trial error, ``INTERRUPTED`` when interrupted.
    """
    _set_experiment(link, study, {**record, "finished": False})
    link.search_finished = False
    results = tuner.fit()
    known = {int(r.config[OPTUNA_TRIAL_ID_KEY]) for r in results if r.config and OPTUNA_TRIAL_ID_KEY in r.config}
    interrupted: list[int] = []

    def reason(frozen) -> str:
        if storage_id_of(frozen) in known:
            interrupted.append(frozen.number)
            return INTERRUPTED_REASON
        return ORPHANED

    _reap(link, study, experiment=record["name"], reason=reason)
    _set_experiment(link, study, {**record, "finished": True})
    if link.stop_reason is not None:
        say(f"fatal: {link.stop_reason}")
        return ExitCode.BAD_INPUT
    # A new experiment ends only once its searcher said FINISHED; a restored one may have said
    # so before the crash, so only its stopped trials tell.
    if interrupted or (not restored and not link.search_finished):
        return ExitCode.INTERRUPTED
    return ExitCode.DONE


def drive_study(
    spec,
    url: str,
    *,
    artifacts: str,
    options: RayLaunchOptions,
    plan: SchedulerPlan,
) -> ExitCode:
    """Run the study's missing trials as a Ray Tune experiment (in the process of Tune's driver).

    If the study's last Ray experiment did not finish (its driver died), it is restored and
    resumed first: its unfinished trials run again under their own Optuna trials, so no trial
    is duplicated. Then, while the budget has room, a new experiment runs the rest.

    Args:
        spec: The study's spec.
        url: The study database's URL.
        artifacts: Absolute checkpoint location.
        options: Trial resources, the deadline, and where the experiment state lives.
        plan: The scheduler standing in for the spec's pruner.

    Returns:
        The exit code (see :func:`~autofinetune.engines.ray.engine.launch_with_ray`).
    """
    from autofinetune.engines.progress import StudyProgressMonitor, progress_wanted
    from autofinetune.store.database import load_study, open_storage, redact_url
    from autofinetune.store.outages import OutagePolicy
    from autofinetune.store.study import study_budget

    deadline = options.deadline
    outage = OutagePolicy(spec.search.outage_grace, where=redact_url(url))
    storage = open_storage(url, create=False, outage=outage, wait_to_connect=True)
    study = load_study(spec.name, storage)
    recording = TrialRecording.at(study, spec, artifacts=artifacts)
    link = StudyLink(
        spec=spec, storage=storage, recording=recording, deadline=deadline, max_retries=spec.search.max_retries
    )
    # The bar of the study's trials, where this driver runs in the launching process.
    link.progress = StudyProgressMonitor(study, study_budget(study), enabled=progress_wanted(options.progress))
    context = TrialContext(spec=spec, storage_url=url, artifacts=artifacts, cpus=options.cpus_per_trial)
    trainable = tune.with_resources(tune.with_parameters(autofinetune_trial, context=context), options.resources)
    try:
        with open_link(link):
            return _run_experiments(link, study, trainable, options, plan)
    except Exception as error:
        # Ray Tune called the storage (its searcher, the schedulers) and may have wrapped this.
        unavailable = storage_unavailable(error)
        if unavailable is None:
            raise
        say(f"fatal: {unavailable}")
        return ExitCode.DATABASE_UNREACHABLE
    finally:
        link.progress.close()


def _run_experiments(link: StudyLink, study, trainable, options: RayLaunchOptions, plan: SchedulerPlan) -> ExitCode:
    """Resume the study's unfinished Ray experiment, if any, then run a new one for the rest."""
    import ray

    from autofinetune.store.study import budget_used, study_budget

    spec, storage, deadline = link.spec, link.storage, options.deadline
    storage_path = options.storage_path or str(Path("~/ray_results").expanduser())
    resumed = False
    record = storage.get_study_system_attrs(study_id(study)).get(RAY_EXPERIMENT_ATTR)
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
        return ExitCode.DONE
    if deadline is not None and time.time() >= deadline:
        return ExitCode.DONE
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
            callbacks=[RecordRestarts(spec.name), StudyProgress(spec.name)],
            verbose=1,
        ),
    )
    say(f"Ray experiment {_experiment_path(storage_path, name)}: up to {concurrency} trial(s) at once, "
        f"{options.cpus_per_trial:g} CPU and {options.gpus_per_trial:g} GPU each")
    record = {"path": _experiment_path(storage_path, name), "name": name, "storage_path": storage_path}
    return _fit(link, study, tuner, record, restored=False)
