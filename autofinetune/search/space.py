"""The search space of a spec in Optuna's terms, and the parameters of one trial.

The spec's parameter spaces (:class:`~autofinetune.spec.ChoiceParam` /
:class:`~autofinetune.spec.RangeParam`, one per parameter of
:class:`~autofinetune.spec.TrialParams`) as Optuna distributions: every engine records its
trials with them in the study database (:func:`optuna_distributions`), the Optuna engine samples
them (:func:`suggest_params`), and the Ray engine's ``OptunaSearch`` takes them as they are. An
engine that searches in other terms translates in its own package (keras-tuner:
:mod:`autofinetune.engines.keras_tuner.space`). Also here: the baseline trial and the checks of
a hand-given set of parameters.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

from autofinetune.spec import PARAMETERS, ChoiceParam, RangeParam, StudySpec
from autofinetune.errors import ConfigError


def optuna_distribution(name: str, param: ChoiceParam | RangeParam):
    """The Optuna distribution of one parameter (inclusive bounds, log scale, step)."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    if isinstance(param, ChoiceParam):
        return CategoricalDistribution(list(param.choices))
    if param.integer:
        step = int(param.step) if param.step is not None else 1
        return IntDistribution(int(param.low), int(param.high), log=param.log, step=step)
    return FloatDistribution(float(param.low), float(param.high), log=param.log, step=param.step)


def optuna_distributions(spec: StudySpec, params: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The spec's parameters as Optuna distributions, in the spec's order.

    Args:
        params: A trial's parameters: only those active in it (a conditional parameter whose
            condition the trial does not meet has no distribution in its record), each in the
            trial's own space (:func:`trial_space`). ``None``: every parameter, as the whole space.
    """
    if params is None:
        return {name: optuna_distribution(name, param) for name, param in spec.search.params().items()}
    return {
        name: optuna_distribution(name, trial_space(spec, name, params))
        for name in spec.search.params()
        if PARAMETERS[name].is_active(params)
    }


def trial_space(spec: StudySpec, name: str, chosen: Mapping[str, Any]) -> ChoiceParam | RangeParam:
    """The space of parameter ``name`` in a trial whose parameters declared before it are ``chosen``.

    The spec's space, but for an ``unfreeze_depth`` range where the search chooses among
    backbones: up to the chosen backbone's blocks (the spec checks that some depth fits each).
    A list of depths stays whole: Optuna's categorical distributions cannot change between
    trials, so the spec checks that every listed depth fits every backbone.
    """
    space = spec.search.params()[name]
    if name != "unfreeze_depth" or len(spec.backbone_choices) == 1 or "backbone" not in chosen:
        return space
    if isinstance(space, ChoiceParam):
        return space
    return depths_up_to(space, spec.backbone_info(chosen["backbone"]).num_blocks)


def depths_up_to(space: RangeParam, blocks: int) -> RangeParam:
    """An ``unfreeze_depth`` range without its depths above ``blocks`` (itself where none are)."""
    if max(space.integer_values(), default=0) <= blocks:
        return space
    step = int(space.step or 1)
    high = space.low + (blocks - space.low) // step * step  # the last value of the range's grid
    return space.model_copy(update={"high": high, "step": space.step if high > space.low else None})


def suggest_params(trial, spec: StudySpec) -> dict[str, Any]:
    """Ask an Optuna trial for one value of every parameter active in it, define-by-run: a
    conditional parameter is asked for only where the values asked before it meet its condition,
    and each in the trial's own space (:func:`trial_space`)."""
    params: dict[str, Any] = {}
    for name in spec.search.params():
        if not PARAMETERS[name].is_active(params):
            continue
        param = trial_space(spec, name, params)
        if isinstance(param, ChoiceParam):
            params[name] = trial.suggest_categorical(name, list(param.choices))
        elif param.integer:
            step = int(param.step) if param.step is not None else 1
            params[name] = trial.suggest_int(name, int(param.low), int(param.high), step=step, log=param.log)
        else:
            params[name] = trial.suggest_float(name, float(param.low), float(param.high), step=param.step, log=param.log)
    return params


def snap_into(param: ChoiceParam | RangeParam, value: Any) -> Any:
    """The value of the space nearest to ``value`` (log-distance for log ranges); a name is kept
    where the space holds it, else the first choice."""
    if isinstance(param, ChoiceParam) and isinstance(value, str):
        return value if value in param.choices else param.choices[0]
    if isinstance(param, ChoiceParam):
        numeric = [c for c in param.choices if isinstance(c, (int, float)) and not isinstance(c, bool)]
        if not numeric:
            return param.choices[0]
        if param_is_log_like(numeric) and value > 0:
            return min(numeric, key=lambda c: abs(math.log(c) - math.log(value)) if c > 0 else math.inf)
        return min(numeric, key=lambda c: abs(c - value))
    clipped = min(max(value, param.low), param.high)
    if param.step is not None:
        clipped = param.low + round((clipped - param.low) / param.step) * param.step
        clipped = min(clipped, param.high)
    if param.integer:
        clipped = int(round(clipped))
    return clipped


def param_is_log_like(values: list[float]) -> bool:
    positive = [v for v in values if v > 0]
    return len(positive) == len(values) and len(values) > 2 and max(values) / min(values) >= 100


def baseline_params(spec: StudySpec) -> dict[str, Any]:
    """The seed tutorial's recipe, each value moved to the nearest value the space allows.

    Head 1024, phase-1 RMSprop at its default rate (1e-3, no momentum), phase-2 SGD at 1e-4
    with momentum 0.9, the top 3 residual blocks unfrozen.
    """
    result: dict[str, Any] = {}
    for name in spec.search.params():
        if PARAMETERS[name].is_active(result):
            result[name] = PARAMETERS[name].cast(snap_into(trial_space(spec, name, result), PARAMETERS[name].seed))
    return result


def complete_params(spec: StudySpec, given: Mapping[str, Any]) -> dict[str, Any]:
    """Fill the parameters ``given`` leaves out with the baseline, and check every value.

    Values outside the spec's search space are allowed (a user may try a value by hand), but
    each must obey the parameter's own rule (e.g. ``0 <= momentum < 1``).

    Raises:
        ConfigError: an unknown parameter name or a value its rule forbids.
    """
    unknown = sorted(set(given) - set(PARAMETERS))
    if unknown:
        raise ConfigError(f"unknown parameter {unknown[0]!r}; allowed: {', '.join(PARAMETERS)}")
    for name, value in given.items():
        parameter = PARAMETERS[name]
        if not parameter.admits(value):
            raise ConfigError(f"parameter {name}: got {value!r}; must be {parameter.allowed()}")
    params: dict[str, Any] = {}
    for name in spec.search.params():
        parameter = PARAMETERS[name]
        if parameter.is_active(params):
            # As baseline_params does, in the space the values before it leave (its backbone's depths).
            value = given[name] if name in given else snap_into(trial_space(spec, name, params), parameter.seed)
            params[name] = parameter.cast(value)
        elif name in given:
            parent = PARAMETERS[name].active_when
            assert parent is not None
            raise ConfigError(
                f"parameter {name}: given, but a trial has it only where {parent[0]} is one of "
                f"{list(parent[1])!r}, and its {parent[0]} is {params[parent[0]]!r}"
            )
    backbone = spec.backbone_info(params["backbone"])  # an unknown name: a ConfigError listing the known
    if params["unfreeze_depth"] > backbone.num_blocks:
        raise ConfigError(
            f"parameter unfreeze_depth: got {params['unfreeze_depth']}; backbone "
            f"{backbone.name!r} has {backbone.num_blocks} blocks, so it must be in [0, {backbone.num_blocks}]"
        )
    if spec.data.image_size < backbone.min_image_size:
        raise ConfigError(
            f"parameter backbone: {backbone.name!r} needs images of at least {backbone.min_image_size} pixels; "
            f"data.image_size is {spec.data.image_size}"
        )
    return params


def parse_param_assignments(items: list[str]) -> dict[str, Any]:
    """Parse ``name=value`` strings from the command line.

    Raises:
        ConfigError: an item without ``=``, an unknown name, or a value that is not a number.
    """
    result: dict[str, Any] = {}
    for item in items:
        name, sep, text = item.partition("=")
        name = name.strip()
        if not sep:
            raise ConfigError(f"--param {item!r}: expected name=value, e.g. head_units=256")
        if name not in PARAMETERS:
            raise ConfigError(f"--param {item!r}: unknown parameter {name!r}; allowed: {', '.join(PARAMETERS)}")
        if PARAMETERS[name].named:
            result[name] = text.strip()
            continue
        try:
            value = float(text)
        except ValueError:
            raise ConfigError(f"--param {item!r}: value {text!r} is not a number") from None
        result[name] = int(value) if PARAMETERS[name].integer and value.is_integer() else value
    return result
