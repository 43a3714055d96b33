"""The samplers and pruners a spec may name, and the options each one takes.

The catalogue maps a spec name to its Optuna class. It lives with the spec because it is what
the spec may say: ``search.sampler`` / ``search.pruner`` are checked against the names here and
``search.sampler_options`` / ``search.pruner_options`` against the class's constructor, before
anything trains. :mod:`autofinetune.search.algorithms` builds the objects from the same classes.
Optuna is imported only when a class is looked up.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Literal, Mapping

#: Sampler names a spec may give, in the order error messages list them.
SAMPLERS = ("tpe", "gp", "cmaes", "random", "qmc", "nsgaii")
#: Samplers that search several objectives at once (``objective.pareto_with``).
MULTI_OBJECTIVE_SAMPLERS = ("tpe", "gp", "random", "qmc", "nsgaii")
#: Pruner names a spec may give; ``"none"`` prunes nothing.
PRUNERS = ("hyperband", "median", "successive_halving", "percentile", "threshold", "none")

#: Constructor options autofinetune sets itself; a spec may not set them.
RESERVED_OPTIONS: dict[str, frozenset[str]] = {"sampler": frozenset({"seed"}), "pruner": frozenset()}

AlgorithmKind = Literal["sampler", "pruner"]


def sampler_class(name: str) -> Callable[..., Any]:
    """The Optuna sampler class of a name in :data:`SAMPLERS`.

    Raises:
        KeyError: the name is not in the catalogue.
    """
    import optuna

    return {
        "tpe": optuna.samplers.TPESampler,
        "gp": optuna.samplers.GPSampler,
        "cmaes": optuna.samplers.CmaEsSampler,
        "random": optuna.samplers.RandomSampler,
        "qmc": optuna.samplers.QMCSampler,
        "nsgaii": optuna.samplers.NSGAIISampler,
    }[name]


def pruner_class(name: str) -> Callable[..., Any]:
    """The Optuna pruner class of a name in :data:`PRUNERS`.

    Raises:
        KeyError: the name is not in the catalogue.
    """
    import optuna

    return {
        "hyperband": optuna.pruners.HyperbandPruner,
        "median": optuna.pruners.MedianPruner,
        "successive_halving": optuna.pruners.SuccessiveHalvingPruner,
        "percentile": optuna.pruners.PercentilePruner,
        "threshold": optuna.pruners.ThresholdPruner,
        "none": optuna.pruners.NopPruner,
    }[name]


def check_name(kind: AlgorithmKind, name: str) -> str:
    """Return ``name`` if the catalogue knows it.

    Raises:
        ValueError: an unknown name; the message lists the allowed ones.
    """
    allowed = SAMPLERS if kind == "sampler" else PRUNERS
    if name not in allowed:
        raise ValueError(f"unknown {kind} {name!r}; allowed: {', '.join(allowed)}")
    return name


def check_options(kind: AlgorithmKind, name: str, options: Mapping[str, Any]) -> None:
    """Check ``search.<kind>_options`` against the constructor of the named class.

    Args:
        kind: ``"sampler"`` or ``"pruner"``.
        name: The spec's sampler or pruner name; an unknown one is left to :func:`check_name`.
        options: Keyword arguments for the constructor.

    Raises:
        ValueError: an option the constructor does not take.
    """
    if name not in (SAMPLERS if kind == "sampler" else PRUNERS):
        return  # the name itself is reported by its own validator
    cls = sampler_class(name) if kind == "sampler" else pruner_class(name)
    accepted = [
        p.name
        for p in inspect.signature(cls).parameters.values()
        if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) and p.name not in RESERVED_OPTIONS[kind]
    ]
    for key in options:
        if key not in accepted:
            raise ValueError(
                f"search.{kind}_options: {cls.__name__} takes no option {key!r}; "
                f"allowed: {', '.join(accepted) or 'none'}"
            )
