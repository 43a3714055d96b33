"""The search space in keras-tuner's terms: a spec's parameters as ``HyperParameters``, and back.

The keras-tuner engine's own translation of the spec's space (the Optuna one, which every engine
records its trials with, is :mod:`autofinetune.search.space`):

* :func:`keras_tuner_hyperparameter` / :func:`keras_tuner_params` declare the space on a
  ``keras_tuner.HyperParameters`` and read a trial's values;
* :func:`params_from_keras_tuner` turns a keras-tuner trial's values back into the study's
  parameters, checked against the space.

The traps the translation must get right: bounds are inclusive on both ends (also for integer
ranges and for float ranges with a step), ``log`` ranges sample on a log scale, a ``step`` range
takes exactly the values ``low, low + step, ...`` up to ``high``, and a single choice is a fixed
value. Nothing here imports keras-tuner: it works on the ``hp`` it is given.
"""

from __future__ import annotations

import decimal
import math
from typing import Any, Mapping

from autofinetune.errors import ConfigError
from autofinetune.search.space import baseline_params, snap_into, trial_space
from autofinetune.spec import PARAMETERS, ChoiceParam, RangeParam, StudySpec


#: A float range with a step becomes a keras-tuner ``Choice`` of its values; a longer list is
#: refused rather than copied into keras-tuner's file of every trial.
MAX_KERAS_TUNER_GRID = 10_000


def step_grid(param: RangeParam) -> list[float]:
    """Every value of a float range with a step: ``low, low + step, ...`` up to ``high``.

    Computed in decimal arithmetic, like Optuna's ``FloatDistribution``, so ``high`` is included
    when the range is a whole number of steps, and each value is the short decimal the spec
    means (``0.3``, not ``0.30000000000000004``).
    """
    if param.step is None:
        raise ValueError(f"step_grid needs a range with a step, but got {param!r}")
    low, high, step = (decimal.Decimal(str(v)) for v in (param.low, param.high, param.step))
    count = int((high - low) // step) + 1
    return [float(low + i * step) for i in range(count)]


def describe_param(param: ChoiceParam | RangeParam) -> str:
    """The values a parameter spec allows, in words (for error messages)."""
    if isinstance(param, ChoiceParam):
        return f"one of {list(param.choices)!r}"
    kind = "an integer" if param.integer else "a number"
    text = f"{kind} in [{param.low:g}, {param.high:g}]"
    if param.step is not None:
        text += f" in steps of {param.step:g} from {param.low:g}"
    return text


def keras_tuner_value(param: ChoiceParam | RangeParam, value: Any) -> Any:
    """``value`` as keras-tuner holds it for ``param``.

    The matching choice (keras-tuner finds a ``Choice`` value by equality of its type), an
    ``int`` for an integer range, the nearest grid value for a float range with a step (see
    :func:`step_grid`), else a ``float``.
    """
    if isinstance(param, ChoiceParam):
        for choice in param.choices:
            if choice == value and type(choice) is type(value):
                return choice
        return snap_into(param, value)
    if param.integer:
        return int(round(value))
    if param.step is not None:
        return min(step_grid(param), key=lambda grid_value: abs(grid_value - value))
    return float(value)


def keras_tuner_hyperparameter(hp, name: str, param: ChoiceParam | RangeParam, *, default: Any = None) -> Any:
    """Declare one parameter on a ``keras_tuner.HyperParameters`` and return its value.

    ============================== ===================================================
    spec                           keras-tuner
    ============================== ===================================================
    one value                      ``Fixed``
    list of choices                ``Choice`` (ordered for numbers)
    integer range (``step``)       ``Int`` (max included; ``step``; ``sampling="log"``)
    float range                    ``Float`` (``sampling="log"`` for ``log = true``)
    float range with ``step``      ``Choice`` of :func:`step_grid`, ordered
    ============================== ===================================================

    Args:
        hp: A ``keras_tuner.HyperParameters``: a trial's, or an empty one to declare the space.
        name: The parameter's name (``search.<name>`` in the spec).
        param: The parameter's spec.
        default: The value keras-tuner takes when it has none for the parameter (the first
            trial of ``GridSearch``, an inactive value in ``BayesianOptimization``); moved onto
            the space with :func:`keras_tuner_value`. ``None``: keras-tuner's default (the
            first choice, or ``low``).

    Returns:
        The parameter's value in ``hp`` (its default when ``hp`` has no value yet).

    Raises:
        ConfigError: a float range with a step has more than ``MAX_KERAS_TUNER_GRID`` values.
    """
    if default is not None:
        default = keras_tuner_value(param, default)
    if isinstance(param, ChoiceParam):
        if len(param.choices) == 1:
            # A fixed value is not searched, and BayesianOptimization leaves it out of its model.
            return hp.Fixed(name, param.choices[0])
        return hp.Choice(name, list(param.choices), default=default)
    sampling = "log" if param.log else "linear"
    if param.integer:
        # keras-tuner's Int includes max_value; without a step, linear sampling takes every integer.
        step = int(param.step) if param.step is not None else None
        return hp.Int(name, int(param.low), int(param.high), step=step, sampling=sampling, default=default)
    if param.step is not None:
        # hp.Float(step=...) counts its values by float floor division: [0, 0.9] in steps of 0.1
        # loses 0.9 and yields 0.30000000000000004. The exact grid as an ordered Choice takes the
        # values of the study's Optuna distribution, and samples them the same way (uniform index).
        grid = step_grid(param)
        if len(grid) > MAX_KERAS_TUNER_GRID:
            raise ConfigError(
                f"search.{name}: a step of {param.step:g} over [{param.low:g}, {param.high:g}] gives "
                f"{len(grid)} values; the keras-tuner engine lists them as a Choice and allows at most "
                f"{MAX_KERAS_TUNER_GRID}; use a larger step, or no step"
            )
        return hp.Choice(name, grid, ordered=True, default=default)
    return hp.Float(name, float(param.low), float(param.high), sampling=sampling, default=default)


def keras_tuner_params(hp, spec: StudySpec, *, defaults: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Declare every parameter of the spec on ``hp`` and return this trial's values.

    Args:
        hp: A ``keras_tuner.HyperParameters``.
        spec: The study spec whose search space is declared.
        defaults: keras-tuner's default of each parameter; by default the seed recipe
            (:func:`baseline_params`), so a tuner that starts from defaults starts from it.

    Returns:
        Parameter name -> value, in the spec's order.

    Raises:
        ConfigError: see :func:`keras_tuner_hyperparameter`.
    """
    defaults = baseline_params(spec) if defaults is None else defaults
    values: dict[str, Any] = {}
    for name, param in spec.search.params().items():
        default = defaults.get(name, PARAMETERS[name].seed)
        condition = scope_of(spec, name)
        if condition is None:
            value = keras_tuner_hyperparameter(hp, name, param, default=default)
        elif condition[1]:
            # Active (a value, not None) only where the condition's parameter takes one of its values.
            with hp.conditional_scope(*condition):
                value = keras_tuner_hyperparameter(hp, name, param, default=default)
        else:
            value = None  # the condition's parameter never takes a value that activates it
        if value is not None:
            # A value the trial's own space lacks (a depth beyond its backbone's blocks) moves to
            # its nearest: the trial runs, and records, that one.
            values[name] = into_trial_space(spec, name, values, value)
    return values


def into_trial_space(spec: StudySpec, name: str, chosen: Mapping[str, Any], value: Any) -> Any:
    """``value`` where the trial's own space (:func:`~autofinetune.search.space.trial_space`)
    holds it, else that space's nearest value."""
    own = trial_space(spec, name, chosen)
    return value if admits(own, value) else snap_into(own, value)


def scope_of(spec: StudySpec, name: str) -> tuple[str, list[Any]] | None:
    """The ``conditional_scope`` keras-tuner declares parameter ``name`` in: ``None`` for an
    unconditional one, else ``(parameter, values)`` with the values of its condition that the
    spec's space holds (none: it is never active).

    ``unfreeze_depth`` is declared once, over the spec's range, whatever the backbone: keras-tuner
    loses the value of a name declared in two scopes, one inactive, so a depth its trial's
    backbone lacks moves to the nearest it has (:func:`keras_tuner_params`).
    """
    condition = PARAMETERS[name].active_when
    if condition is None:
        return None
    parent, allowed = condition
    parent_space = spec.search.params()[parent]
    held = [value for value in allowed if isinstance(parent_space, ChoiceParam) and value in parent_space.choices]
    return parent, held


def params_from_keras_tuner(values: Mapping[str, Any], spec: StudySpec) -> dict[str, Any]:
    """The study's parameters of a keras-tuner trial, checked against the spec's space.

    Args:
        values: ``trial.hyperparameters.values`` of a keras-tuner trial (Hyperband's
            ``tuner/...`` entries are ignored).
        spec: The study spec.

    Returns:
        Parameter name -> value, each inside the spec's Optuna distribution.

    Raises:
        ConfigError: a parameter is missing or outside the space (the trial searched another space).
    """
    params: dict[str, Any] = {}
    for name in spec.search.params():
        if not PARAMETERS[name].is_active(params):
            continue  # an inactive conditional parameter: keras-tuner may hold a stale value
        param = spec.search.params()[name]
        if name not in values:
            raise ConfigError(
                f"keras-tuner trial: no value for parameter {name!r}; its search space is not this spec's"
            )
        value = values[name]
        if not isinstance(param, ChoiceParam) and not isinstance(value, bool) and isinstance(value, (int, float)):
            value = PARAMETERS[name].cast(value)
        if not admits(param, value):
            raise ConfigError(
                f"keras-tuner trial: parameter {name}: got {value!r}; the spec's search space allows "
                f"{describe_param(param)}"
            )
        # In the trial's own space: a depth beyond its backbone's blocks is its nearest (see scope_of).
        params[name] = keras_tuner_value(param, into_trial_space(spec, name, params, value))
    return params


def admits(param: ChoiceParam | RangeParam, value: Any) -> bool:
    """Whether ``value`` lies in the parameter's space."""
    if isinstance(param, ChoiceParam):
        return value in param.choices
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return False
    if not param.low <= value <= param.high:
        return False
    if param.integer and not float(value).is_integer():
        return False
    if param.step is not None:
        steps = (value - param.low) / param.step
        return abs(steps - round(steps)) < 1e-9
    return True
