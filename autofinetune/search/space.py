"""The search space of a spec, and the parameters of one trial.

The one place that turns the spec's parameter definitions (:class:`~autofinetune.spec.ChoiceParam`
/ :class:`~autofinetune.spec.RangeParam`) into an engine's own types, and that checks a set of
parameters. Each engine has a function for one parameter and one for the whole spec:

* Optuna: :func:`optuna_distribution` / :func:`optuna_distributions` (also the distributions
  every engine records its trials with in the study database);
* keras-tuner: :func:`keras_tuner_hyperparameter` / :func:`keras_tuner_params`, and
  :func:`params_from_keras_tuner` back to the study's parameters;
* Ray Tune: the Optuna distributions themselves, which the Ray engine's ``OptunaSearch`` takes
  as they are, so its trials carry the same distributions.

The traps the translations must get right: bounds are inclusive on both ends (also for integer
ranges and for float ranges with a step), ``log`` ranges sample on a log scale, a ``step`` range
takes exactly the values ``low, low + step, ...`` up to ``high``, and a single choice is a fixed
value.
"""

from __future__ import annotations

import decimal
import math
from typing import Any, Mapping

from autofinetune.spec import PARAM_RULES, ChoiceParam, RangeParam, StudySpec, get_backbone_info
from autofinetune.errors import ConfigError


def _cast(name: str, value: Any) -> Any:
    return int(value) if PARAM_RULES[name].integer else float(value)


def optuna_distribution(name: str, param: ChoiceParam | RangeParam):
    """The Optuna distribution of one parameter (inclusive bounds, log scale, step)."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    if isinstance(param, ChoiceParam):
        return CategoricalDistribution(list(param.choices))
    if param.integer:
        step = int(param.step) if param.step is not None else 1
        return IntDistribution(int(param.low), int(param.high), log=param.log, step=step)
    return FloatDistribution(float(param.low), float(param.high), log=param.log, step=param.step)


def optuna_distributions(spec: StudySpec) -> dict[str, Any]:
    """Every parameter of the spec as an Optuna distribution, in the spec's order."""
    return {name: optuna_distribution(name, param) for name, param in spec.search.params().items()}


def suggest_params(trial, spec: StudySpec) -> dict[str, Any]:
    """Ask an Optuna trial for one value of every parameter."""
    params: dict[str, Any] = {}
    for name, param in spec.search.params().items():
        if isinstance(param, ChoiceParam):
            params[name] = trial.suggest_categorical(name, list(param.choices))
        elif param.integer:
            step = int(param.step) if param.step is not None else 1
            params[name] = trial.suggest_int(name, int(param.low), int(param.high), step=step, log=param.log)
        else:
            params[name] = trial.suggest_float(name, float(param.low), float(param.high), step=param.step, log=param.log)
    return params


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


def integer_values(param: ChoiceParam | RangeParam) -> list[int]:
    """Every integer the parameter may take, ascending (``[]`` for a range of real numbers).

    For ``unfreeze_depth`` these are the depths the search can ask for.
    """
    if isinstance(param, ChoiceParam):
        values = {int(c) for c in param.choices if isinstance(c, (int, float)) and not isinstance(c, bool) and float(c).is_integer()}
        return sorted(values)
    if not param.integer:
        return []
    step = int(param.step or 1)
    return list(range(math.ceil(param.low), math.floor(param.high) + 1, max(step, 1)))


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
    return {
        name: keras_tuner_hyperparameter(hp, name, param, default=defaults.get(name))
        for name, param in spec.search.params().items()
    }


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
    for name, param in spec.search.params().items():
        if name not in values:
            raise ConfigError(
                f"keras-tuner trial: no value for parameter {name!r}; its search space is not this spec's"
            )
        value = values[name]
        if not isinstance(param, ChoiceParam) and not isinstance(value, bool) and isinstance(value, (int, float)):
            value = _cast(name, value)
        if not admits(param, value):
            raise ConfigError(
                f"keras-tuner trial: parameter {name}: got {value!r}; the spec's search space allows "
                f"{describe_param(param)}"
            )
        params[name] = keras_tuner_value(param, value)
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


def snap_into(param: ChoiceParam | RangeParam, value: float) -> Any:
    """The value of the space nearest to ``value`` (log-distance for log ranges)."""
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
    for name, param in spec.search.params().items():
        value = snap_into(param, PARAM_RULES[name].default)
        result[name] = value if isinstance(value, str) else _cast(name, value)
    return result


def complete_params(spec: StudySpec, given: Mapping[str, Any]) -> dict[str, Any]:
    """Fill the parameters ``given`` leaves out with the baseline, and check every value.

    Values outside the spec's search space are allowed (a user may try a value by hand), but
    each must obey the parameter's own rule (e.g. ``0 <= momentum < 1``).

    Raises:
        ConfigError: an unknown parameter name or a value its rule forbids.
    """
    unknown = sorted(set(given) - set(PARAM_RULES))
    if unknown:
        raise ConfigError(f"unknown parameter {unknown[0]!r}; allowed: {', '.join(PARAM_RULES)}")
    params = baseline_params(spec)
    for name, value in given.items():
        rule = PARAM_RULES[name]
        if not rule.admits(value):
            raise ConfigError(f"parameter {name}: got {value!r}; must be {rule.allowed()}")
        params[name] = _cast(name, value)
    blocks = get_backbone_info(spec.backbone.name).num_blocks
    if params["unfreeze_depth"] > blocks:
        raise ConfigError(
            f"parameter unfreeze_depth: got {params['unfreeze_depth']}; backbone "
            f"{spec.backbone.name!r} has {blocks} residual blocks, so it must be in [0, {blocks}]"
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
        if name not in PARAM_RULES:
            raise ConfigError(f"--param {item!r}: unknown parameter {name!r}; allowed: {', '.join(PARAM_RULES)}")
        try:
            value = float(text)
        except ValueError:
            raise ConfigError(f"--param {item!r}: value {text!r} is not a number") from None
        result[name] = int(value) if PARAM_RULES[name].integer and value.is_integer() else value
    return result
