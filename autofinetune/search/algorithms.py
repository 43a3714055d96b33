"""The spec's sampler and pruner, built from the catalogue of :mod:`autofinetune.spec.algorithms`.

The spec checked the names and the options' keys; this module adds what autofinetune sets itself
(the seed, Hyperband's budget, the median pruner's warm-up) and turns a constructor's rejection
of an option's value into a ConfigError.
"""

from __future__ import annotations

from autofinetune.errors import ConfigError
from autofinetune.spec.algorithms import pruner_class, sampler_class


def make_sampler(spec, *, seed: int):
    """The spec's sampler, seeded (give each worker process its own seed)."""
    name = spec.search.sampler
    cls = sampler_class(name)
    if name == "gp":
        _require("torch", "the gp sampler", "pip install torch")
    if name == "cmaes":
        _require("cmaes", "the cmaes sampler", "pip install cmaes")
    try:
        return cls(seed=seed, **spec.search.sampler_options)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"search.sampler_options: {cls.__name__} rejected {spec.search.sampler_options!r}: {error}") from None


def make_pruner(spec):
    """The spec's pruner; Hyperband's budget is the total number of epochs of both phases."""
    name = spec.search.pruner
    options = dict(spec.search.pruner_options)
    if name == "hyperband":
        options.setdefault("min_resource", 1)
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
