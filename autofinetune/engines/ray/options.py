"""The Ray engine's names, options and scheduler plan: plain Python, no Ray import.

Both sides of the Ray engine import this module: :mod:`~autofinetune.engines.ray.engine` (the
launcher, which runs without Ray until it starts it) and the modules Ray loads in the driver and
the trial actors (:mod:`.search`, :mod:`.schedulers`, :mod:`.trainable`, :mod:`.driver`).
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Any

from autofinetune.engines.base import EngineOptions, option
from autofinetune.errors import ConfigError
from autofinetune.search.algorithms import hyperband_min_resource

RAY_EXTRA = "pip install 'autofinetune[ray]'"

#: The time axis Ray's schedulers see: the global epoch (1-based, phase 2 continues phase 1).
GLOBAL_STEP_KEY = "global_step"
#: Keys the searcher adds to a Ray trial's config so the actor finds its Optuna trial.
OPTUNA_TRIAL_ID_KEY = "optuna_trial_id"
OPTUNA_TRIAL_NUMBER_KEY = "optuna_trial"

#: Study system attribute: the Ray experiment of the study's latest Ray run
#: (``{"path", "name", "storage_path", "finished"}``), read to resume it after a crash.
RAY_EXPERIMENT_ATTR = "autofinetune:ray_experiment"
#: Trial system attribute: which Ray experiment and Tune trial run this Optuna trial.
RAY_TRIAL_ATTR = "autofinetune:ray_trial"
#: Trial system attribute: the scheduler's decision to stop the trial after ``step``.
EARLY_STOP_ATTR = "autofinetune:early_stop"

RAY_STORAGE_ENV = "AUTOFINETUNE_RAY_STORAGE"

#: The spec's pruner -> the Ray scheduler that plays its part.
SUPPORTED_PRUNERS = ("hyperband", "successive_halving", "median", "none")


def require_ray() -> None:
    """Check that Ray Tune can be imported.

    Raises:
        ConfigError: Ray (or its Tune part) is not installed; the message names the extra.
    """
    try:
        import ray  # noqa: F401
        import ray.tune  # noqa: F401
    except ImportError as error:
        raise ConfigError(
            f"--engine ray: Ray Tune is not installed ({error}); install the extra: {RAY_EXTRA}"
        ) from None


@dataclass(frozen=True)
class RayLaunchOptions(EngineOptions):
    """Where and how big the Ray trials are; checked before Ray starts.

    Attributes:
        deadline: See :class:`~autofinetune.engines.base.EngineOptions`.
        artifacts: See :class:`~autofinetune.engines.base.EngineOptions`.
        address: ``None`` starts a local Ray instance; ``"auto"``, ``"HOST:PORT"`` joins a
            running cluster from this machine; ``"ray://HOST:PORT"`` connects through Ray Client
            (the search then runs on the head node).
        gpus_per_trial: GPUs of one trial; a fraction (e.g. 0.5) lets trials share a GPU.
        cpus_per_trial: CPUs of one trial (also TensorFlow's thread count in the trial).
        max_concurrent: Trials running at once; default: as many as the cluster's CPUs and
            GPUs hold.
        storage_path: Folder or URI of Ray's experiment state (``--ray-storage``); default: see
            :func:`ray_storage_location`.
    """

    address: str | None = option(
        None, metavar="auto|HOST:PORT|ray://HOST:PORT",
        help="Cluster address: auto, or ray://HOST:PORT [default: start a local instance].",
    )
    gpus_per_trial: float = option(0.0, kind=float, minimum=0, help="GPUs per trial (fractions share a GPU).")
    cpus_per_trial: float = option(1.0, kind=float, minimum=0, help="CPUs per trial.")
    max_concurrent: int | None = option(None, kind=int, minimum=1, help="Trials running at once.")
    storage_path: str | None = option(
        None, flag="--ray-storage", metavar="DIR_OR_URI",
        help="Ray's experiment state, for resuming [default: beside a SQLite database, else ~/ray_results].",
    )

    def check(self) -> None:
        """Raises ConfigError naming the option, the value and what is allowed."""
        if self.cpus_per_trial < 0 or not math.isfinite(self.cpus_per_trial):
            raise ConfigError(f"--cpus-per-trial: got {self.cpus_per_trial!r}; must be a number >= 0")
        if self.gpus_per_trial < 0 or not math.isfinite(self.gpus_per_trial):
            raise ConfigError(f"--gpus-per-trial: got {self.gpus_per_trial!r}; must be a number >= 0")
        if self.gpus_per_trial > 1 and not float(self.gpus_per_trial).is_integer():
            # Ray places a trial's GPUs as whole devices, or a fraction of one device.
            raise ConfigError(
                f"--gpus-per-trial: got {self.gpus_per_trial!r}; above 1 it must be a whole number "
                "(a fraction shares one GPU, e.g. 0.5)"
            )
        if self.cpus_per_trial == 0 and self.gpus_per_trial == 0:
            raise ConfigError(
                "--cpus-per-trial and --gpus-per-trial are both 0; a trial needs some resource, "
                "else Ray would start every trial at once"
            )
        if self.max_concurrent is not None and self.max_concurrent < 1:
            raise ConfigError(f"--max-concurrent: got {self.max_concurrent!r}; must be an integer >= 1")
        if self.address is not None and not self.address.strip():
            raise ConfigError("--address: got an empty string; give auto, HOST:PORT or ray://HOST:PORT")

    @property
    def uses_ray_client(self) -> bool:
        return self.address is not None and self.address.startswith("ray://")

    @property
    def resources(self) -> dict[str, float]:
        """The resources of one trial, as ``tune.with_resources`` takes them."""
        return {"cpu": self.cpus_per_trial, "gpu": self.gpus_per_trial}


@dataclass(frozen=True)
class SchedulerPlan:
    """Which Ray scheduler stands in for the spec's pruner, with its arguments.

    Attributes:
        kind: ``"asha"``, ``"median"`` or ``"fifo"`` (no early stopping).
        options: Keyword arguments of the Ray scheduler (without metric, mode and time_attr).
        max_step: The last global step of a trial (both phases' epochs).
    """

    kind: str
    options: dict[str, Any]
    max_step: int


def scheduler_plan(spec) -> SchedulerPlan:
    """Translate ``search.pruner`` and ``search.pruner_options`` into a Ray scheduler.

    ``hyperband`` becomes ASHA with Hyperband's brackets, ``successive_halving`` ASHA with one
    bracket, ``median`` Ray's median stopping rule, ``none`` no early stopping. Options keep
    their Optuna names (``min_resource``, ``reduction_factor``, ...), so one spec serves both
    engines; each is measured in global epochs.

    Raises:
        ConfigError: a pruner or option without a Ray counterpart, or bounds that do not fit
            the schedule's epochs.
    """
    name = spec.search.pruner
    options = dict(spec.search.pruner_options)
    total = spec.schedule.total_epochs
    if name not in SUPPORTED_PRUNERS:
        raise ConfigError(
            f"search.pruner: {name!r} has no Ray Tune scheduler; with --engine ray use one of "
            f"{', '.join(SUPPORTED_PRUNERS)}"
        )

    def take(key: str, default: Any) -> Any:
        return options.pop(key) if key in options else default

    def refuse_rest() -> None:
        if options:
            key = sorted(options)[0]
            raise ConfigError(
                f"search.pruner_options: {key!r} = {options[key]!r} has no counterpart in Ray's "
                f"scheduler for the {name!r} pruner; remove it to use --engine ray"
            )

    if name == "none":
        refuse_rest()
        return SchedulerPlan("fifo", {}, total)
    if name == "median":
        startup = int(take("n_startup_trials", 3))
        warmup = int(take("n_warmup_steps", 1))
        n_min = int(take("n_min_trials", 1))
        if take("interval_steps", 1) != 1:
            raise ConfigError("search.pruner_options: interval_steps must be 1 with --engine ray (Ray checks every epoch)")
        refuse_rest()
        # Optuna prunes only after n_warmup_steps steps; Ray's grace period is the first step
        # at which it may stop a trial.
        return SchedulerPlan(
            "median",
            {"grace_period": warmup + 1, "min_samples_required": max(startup, n_min), "hard_stop": True},
            total,
        )
    # Hyperband's first rung is the Optuna engine's: the end of phase 1 unless set.
    default_min = hyperband_min_resource(spec.schedule) if name == "hyperband" else 1
    min_resource = take("min_resource", default_min)
    min_resource = 1 if min_resource == "auto" else int(min_resource)
    reduction_factor = float(take("reduction_factor", 3))
    if reduction_factor <= 1:
        raise ConfigError(f"search.pruner_options.reduction_factor: got {reduction_factor!r}; must be > 1")
    if take("bootstrap_count", 0) != 0:
        raise ConfigError("search.pruner_options: bootstrap_count has no counterpart in Ray's ASHA; remove it")
    if name == "successive_halving":
        rate = int(take("min_early_stopping_rate", 0))
        grace = int(min_resource * reduction_factor**rate)
        brackets = 1
        max_t = total
    else:
        max_resource = take("max_resource", "auto")
        max_t = total if max_resource == "auto" else int(max_resource)
        grace = min_resource
        # Optuna's Hyperband runs floor(log_rf(max/min)) + 1 brackets; ASHA's brackets are the same idea.
        brackets = max(1, int(math.floor(math.log(max(max_t / grace, 1.0), reduction_factor))) + 1)
    refuse_rest()
    if not 1 <= grace <= max_t:
        raise ConfigError(
            f"search.pruner_options: the first step a trial may be stopped at ({grace}) must be in "
            f"[1, {max_t}] (the schedule has {total} epochs)"
        )
    return SchedulerPlan(
        "asha",
        {"grace_period": grace, "max_t": max_t, "reduction_factor": reduction_factor, "brackets": brackets},
        total,
    )


def default_max_concurrent(options: RayLaunchOptions, cluster_resources: dict[str, float]) -> int:
    """As many trials as the cluster's CPUs and GPUs hold at once (at least 1)."""
    fits = []
    if options.cpus_per_trial > 0:
        fits.append(int(cluster_resources.get("CPU", 0.0) // options.cpus_per_trial))
    if options.gpus_per_trial > 0:
        # Round to cope with fractions such as 1/3 that do not add up exactly.
        fits.append(int(round(cluster_resources.get("GPU", 0.0) / options.gpus_per_trial, 6)))
    return max(1, min(fits)) if fits else 1


def say(line: str) -> None:
    """One line of progress on stderr (stdout is Tune's)."""
    print(line, file=sys.stderr, flush=True)
