"""The Ray Tune engine: trials run as Ray actors, searched by Optuna, into the same study database.

``autofinetune launch SPEC --engine ray`` hands the study to Ray Tune:

* each trial is the two-phase schedule in its own actor process, with the requested CPUs and
  (possibly fractional) GPUs;
* Ray's ``OptunaSearch``, with the spec's sampler, asks the study database itself for params, so
  the queued baseline trial runs first and the params land with the Optuna engine's
  distributions;
* ASHA (or the median rule) stops weak trials on the global epoch across both phases; a stopped
  trial is recorded as PRUNED, never as COMPLETE with a truncated value;
* a trial whose actor or node dies is retried (``search.max_retries``), and running ``launch``
  again after the driver died resumes the Ray experiment instead of starting over.

This module imports Ray only inside functions, so the rest of autofinetune works without the
``ray`` extra. The parts Ray loads by reference: :mod:`.search` (the searcher on the study),
:mod:`.schedulers` (early stopping by signal), :mod:`.trainable` (one trial in an actor) and
:mod:`.driver` (one Ray experiment per launch, resumed after a crash); :mod:`.options` holds
what all of them share.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any
from pathlib import Path

from autofinetune.engines.base import EarlyStart, Engine
from autofinetune.engines.ray.options import (
    EARLY_STOP_ATTR,
    RAY_EXPERIMENT_ATTR,
    RAY_STORAGE_ENV,
    RAY_TRIAL_ATTR,
    RayLaunchOptions,
    require_ray,
    scheduler_plan,
)
from autofinetune.errors import ConfigError, ExitCode

__all__ = [
    "EARLY_STOP_ATTR", "RAY_EXPERIMENT_ATTR", "RAY_TRIAL_ATTR", "RayEngine", "RayLaunchOptions",
    "launch_with_ray", "ray_storage_location", "scheduler_plan",
]

def ray_storage_location(storage_url: str, override: str | None = None) -> str | None:
    """Where Ray keeps the experiment state: ``--ray-storage``, ``$AUTOFINETUNE_RAY_STORAGE``,
    else ``<db>.ray/`` beside a SQLite database, else ``None`` (Ray's default, ``~/ray_results``
    on the machine of the driver).

    On a cluster, give a path every node sees (a shared folder) or ``s3://bucket/prefix``.
    """
    from autofinetune.store.database import sqlite_path

    chosen = override or os.environ.get(RAY_STORAGE_ENV)
    if chosen:
        return chosen if "://" in chosen else str(Path(chosen).expanduser().resolve())
    path = sqlite_path(storage_url)
    if path is not None:
        return str(path.with_name(path.name + ".ray"))
    return None


def _absolute_location(location: str) -> str:
    # Trial actors change their working directory; a relative folder must not move with them.
    return location if "://" in location else str(Path(location).expanduser().resolve())


class RayEngine(Engine[RayLaunchOptions]):
    """Trials as Ray Tune actors on this machine or a cluster, searched by Optuna (``--engine ray``)."""

    name = "ray"
    extra = "ray"
    options_type = RayLaunchOptions

    def check(self, spec, options: RayLaunchOptions) -> None:
        require_ray()
        options.check()
        scheduler_plan(spec)

    def launch(self, spec, url: str, study, options: RayLaunchOptions, early: EarlyStart | None = None) -> ExitCode:
        return launch_with_ray(spec, url, study, options)


def launch_with_ray(spec, url: str, study, options: RayLaunchOptions | None = None) -> ExitCode:
    """Run the study's missing trials with Ray Tune, recording them in the study database.

    The study must exist already (``launch`` created or resumed it and queued the baseline).
    A Ray instance is started on this machine unless ``options.address`` names a cluster (or
    ``$RAY_ADDRESS`` does, or this process already called ``ray.init``).

    Args:
        spec: The study's spec, passed to every trial unchanged.
        url: The study database's URL; every Ray node must reach it.
        study: The study (read for its name).
        options: Trial resources, cluster address, deadline and where state goes (default:
            one CPU per trial on a local instance).

    Returns:
        ``DONE`` when the budget is used (or the deadline passed), ``BAD_INPUT`` when the
        search stopped on a fatal error, ``INTERRUPTED`` when it was interrupted.

    Raises:
        ConfigError: Ray is not installed, an option is invalid, the pruner has no Ray
            counterpart, or the cluster cannot run a trial as asked.
    """
    from autofinetune.store.artifacts import artifacts_location
    from autofinetune.store.database import redact_url, sqlite_path

    require_ray()
    options = options or RayLaunchOptions()
    options = dataclasses.replace(options, storage_path=ray_storage_location(url, options.storage_path))
    options.check()
    plan = scheduler_plan(spec)  # refuse an untranslatable pruner before Ray starts
    if options.uses_ray_client and sqlite_path(url) is not None:
        raise ConfigError(
            f"storage: {redact_url(url)!r} is a SQLite file on this machine, which the Ray cluster "
            "behind --address ray://... cannot reach; use a PostgreSQL database every node reaches"
        )
    artifact_location = _absolute_location(artifacts_location(url, options.artifacts))

    import ray

    started_here = False
    if not ray.is_initialized():
        started_here = _init_ray(options)
    try:
        _check_cluster(options, url)
        from autofinetune.engines.ray import driver

        if options.uses_ray_client:
            # Through Ray Client this process is not part of the cluster: the search (Tune's
            # driver, the searcher and the scheduler) runs as a task on the head node instead,
            # where the study database URL arrives as a task argument, never in a file.
            on_head_node: Any = ray.remote(num_cpus=0, resources={"node:__internal_head__": 0.001})
            drive = on_head_node(driver.drive_study)
            return ExitCode(ray.get(drive.remote(spec, url, artifacts=artifact_location, options=options, plan=plan)))
        return ExitCode(driver.drive_study(spec, url, artifacts=artifact_location, options=options, plan=plan))
    finally:
        if started_here:
            ray.shutdown()


def _worker_env() -> dict[str, str]:
    # Trial actors on other nodes do not see this shell's environment: pass on what shapes a
    # trial (the Keras backend) and what keeps TensorFlow's start-up chatter out of the log.
    # The log level and log file of the command line go along (see autofinetune.logs).
    from autofinetune.logs import FILE_ENV, LEVEL_ENV

    env = {"TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2")}
    for key in ("KERAS_BACKEND", "ABSL_MIN_LOG_LEVEL", "GLOG_minloglevel", LEVEL_ENV, FILE_ENV):
        if key in os.environ:
            env[key] = os.environ[key]
    return env


def _init_ray(options: RayLaunchOptions) -> bool:
    """Start a local Ray instance, or connect to ``options.address`` / ``$RAY_ADDRESS``.

    Returns:
        Whether this call started (or connected) Ray, so the caller shuts it down again.
    """
    import ray

    runtime_env = {"env_vars": _worker_env()}
    address = options.address or os.environ.get("RAY_ADDRESS")
    try:
        if address:
            ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
        else:
            # A new local instance sized to the CPUs this process may use (taskset, cgroups);
            # Ray finds the GPUs itself (CUDA_VISIBLE_DEVICES is respected). "local": without
            # it, ray.init joins whatever cluster `ray start` last left on this machine.
            cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
            ray.init(address="local", num_cpus=cpus or 1, runtime_env=runtime_env, log_to_driver=True)
    except ConnectionError as error:
        raise ConfigError(f"--address: cannot connect to the Ray cluster at {address!r}: {error}") from None
    return True


def _check_cluster(options: RayLaunchOptions, url: str) -> None:
    """Refuse what cannot work on this cluster: a trial bigger than any node, SQLite across nodes."""
    import ray

    from autofinetune.store.database import redact_url, sqlite_path

    nodes = [node for node in ray.nodes() if node.get("Alive")]
    if len(nodes) > 1 and sqlite_path(url) is not None:
        raise ConfigError(
            f"storage: {redact_url(url)!r} is a SQLite file, which the other {len(nodes) - 1} node(s) of "
            "this Ray cluster cannot share; use a PostgreSQL database every node reaches"
        )
    if options.address or os.environ.get("RAY_ADDRESS"):
        return  # an autoscaling cluster may add the resources a trial needs later
    total = ray.cluster_resources()
    for key, flag in (("CPU", "--cpus-per-trial"), ("GPU", "--gpus-per-trial")):
        want = options.resources[key.lower()]
        have = total.get(key, 0.0)
        if want > have:
            raise ConfigError(f"{flag}: got {want:g}, but this machine's Ray instance has {have:g} {key}(s)")
