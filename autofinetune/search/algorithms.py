"""The spec's sampler and pruner, built from the catalogue of :mod:`autofinetune.spec.algorithms`.

The spec checked the names and the options' keys; this module adds what autofinetune sets itself
(the seed, Hyperband's budget and first rung, the median pruner's warm-up) and turns a
constructor's rejection of an option's value into a ConfigError.
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING

from autofinetune.errors import ConfigError
from autofinetune.spec.constraints import CONSTRAINT_VIOLATIONS_ATTR
from autofinetune.spec.algorithms import pruner_class, sampler_class

if TYPE_CHECKING:
    from autofinetune.search.warm_start import SourceReader


def make_sampler(spec, *, seed: int, sources: "SourceReader | None" = None):
    """The spec's sampler, seeded (give each worker process its own seed); with
    ``objective.constraints``, a sampler that can take them samples towards feasible trials.

    Args:
        sources: Reads the ``search.warm_start`` studies (:mod:`autofinetune.store.warm_start`):
            given, and the spec names some, the sampler starts from their trials
            (:class:`~autofinetune.search.warm_start.WarmStartSampler`).
    """
    name = spec.search.sampler
    cls = sampler_class(name)
    if name == "gp":
        _require("torch", "the gp sampler", "pip install torch")
    if name == "cmaes":
        _require("cmaes", "the cmaes sampler", "pip install cmaes")
    options = dict(spec.search.sampler_options)
    if spec.objective.constraints and "constraints_func" in inspect.signature(cls).parameters:
        options["constraints_func"] = constraint_violations
    try:
        sampler = cls(seed=seed, **options)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"search.sampler_options: {cls.__name__} rejected {spec.search.sampler_options!r}: {error}") from None
    if sources is not None and spec.search.warm_start:
        from autofinetune.search.warm_start import WarmStartSampler  # imports Optuna: only when asked

        return WarmStartSampler(sampler, spec, sources)
    return sampler


def constraint_violations(trial) -> list[float]:
    """A finished trial's constraint violations, as its trial path recorded them (Optuna's
    ``constraints_func``; a trial that recorded none counts as feasible, as Optuna counts it)."""
    return [float(value) for value in trial.user_attrs.get(CONSTRAINT_VIOLATIONS_ATTR, [])]


def hyperband_min_resource(schedule) -> int:
    """Hyperband's default first rung: the last epoch of phase 1 (epoch 1 without a phase 2).

    Phase 1 trains the head alone, on cached features for a fraction of a second an epoch; every
    phase-2 epoch pays for the unfrozen blocks. Ranked at the phase boundary, a weak trial stops
    before any fine-tuning is paid for. With Optuna's ``min_resource = 1`` the rung after epoch 1
    is followed by one after the first phase-2 epoch, where a stopped trial has paid for most of
    it. Measured by ``benchmarks/search_quality.py`` (docs/benchmarks/search_defaults.md):
    more trials finished in the same time, and a better final model on the held-back test split.

    Args:
        schedule: The spec's :class:`~autofinetune.spec.sections.ScheduleSpec`.
    """
    return schedule.phase1_epochs if schedule.phase2_epochs > 0 else 1


def make_pruner(spec):
    """The spec's pruner; Hyperband's budget is the epochs of both phases, its first rung the
    end of phase 1 (:func:`hyperband_min_resource`)."""
    name = spec.search.pruner
    options = dict(spec.search.pruner_options)
    if name == "hyperband":
        options.setdefault("min_resource", hyperband_min_resource(spec.schedule))
        options.setdefault("max_resource", spec.schedule.total_epochs)
    if name in ("median", "percentile"):
        options.setdefault("n_startup_trials", 3)
        options.setdefault("n_warmup_steps", 1)
    if name == "percentile" and "percentile" not in options:
        raise ConfigError("search.pruner_options: the percentile pruner needs `percentile` (0..100), e.g. 25.0")
    cls = pruner_class(name)
    try:
        return cls(**options)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"search.pruner_options: {cls.__name__} rejected {options!r}: {error}") from None


def _require(module: str, what: str, install: str) -> None:
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise ConfigError(f"search.sampler: {what} needs the {module!r} package; {install}")
