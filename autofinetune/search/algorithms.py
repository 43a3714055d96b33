"""Samplers and pruners by name, with options checked against their constructors."""

from __future__ import annotations

import inspect
from typing import Any, Callable, Mapping

from autofinetune.errors import ConfigError


def _sampler_classes() -> dict[str, Callable[..., Any]]:
    import optuna

    return {
        "tpe": optuna.samplers.TPESampler,
        "gp": optuna.samplers.GPSampler,
        "cmaes": optuna.samplers.CmaEsSampler,
        "random": optuna.samplers.RandomSampler,
        "qmc": optuna.samplers.QMCSampler,
    }


def _pruner_classes() -> dict[str, Callable[..., Any]]:
    import optuna

    return {
        "hyperband": optuna.pruners.HyperbandPruner,
        "median": optuna.pruners.MedianPruner,
        "successive_halving": optuna.pruners.SuccessiveHalvingPruner,
        "percentile": optuna.pruners.PercentilePruner,
        "threshold": optuna.pruners.ThresholdPruner,
        "none": optuna.pruners.NopPruner,
    }


#: Options autofinetune sets itself; a spec may not set them.
_RESERVED = {"sampler": {"seed"}, "pruner": set()}


def check_options(kind: str, name: str, options: Mapping[str, Any]) -> None:
    """Check ``search.<kind>_options`` against the constructor of the named class.

    Args:
        kind: ``"sampler"`` or ``"pruner"``.
        name: The spec's sampler or pruner name (already known to be valid).
        options: Keyword arguments for the constructor.

    Raises:
        ValueError: an option the constructor does not take.
    """
    classes = _sampler_classes() if kind == "sampler" else _pruner_classes()
    cls = classes.get(name)
    if cls is None:
        return  # the name itself is reported by its own validator
    accepted = [
        p.name
        for p in inspect.signature(cls).parameters.values()
        if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) and p.name not in _RESERVED[kind]
    ]
    for key in options:
        if key not in accepted:
            raise ValueError(
                f"search.{kind}_options: {cls.__name__} takes no option {key!r}; "
                f"allowed: {', '.join(accepted) or 'none'}"
            )


def make_sampler(spec, *, seed: int):
    """The spec's sampler, seeded (give each worker process its own seed)."""
    name = spec.search.sampler
    cls = _sampler_classes()[name]
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
    cls = _pruner_classes()[name]
    try:
        return cls(**options)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"search.pruner_options: {cls.__name__} rejected {options!r}: {error}") from None


def _require(module: str, what: str, install: str) -> None:
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise ConfigError(f"search.sampler: {what} needs the {module!r} package; {install}")
