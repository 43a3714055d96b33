"""Search-space parameters of a study spec: their two forms and the values each may take.

A parameter is written in TOML as a fixed value, a list of choices or a range table; it is
read into a :class:`ChoiceParam` or a :class:`RangeParam`. :data:`PARAM_RULES` lists every
parameter a trial takes with its allowed values, which every form is checked against.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal, Mapping, Union

from pydantic import Field

from autofinetune.spec.base import StrictModel


class ChoiceParam(StrictModel):
    """A categorical parameter: one of ``choices``."""

    kind: Literal["choice"] = "choice"
    choices: tuple[Union[int, float, str, bool], ...]


class RangeParam(StrictModel):
    """A numeric range with inclusive bounds; ``log`` samples on a log scale."""

    kind: Literal["range"] = "range"
    low: float
    high: float
    log: bool = False
    step: float | None = None
    integer: bool = False


ParamSpec = Annotated[Union[ChoiceParam, RangeParam], Field(discriminator="kind")]


class _ParamRule:
    """What values one searchable parameter may take."""

    def __init__(
        self,
        *,
        integer: bool,
        low: float,
        high: float = math.inf,
        high_inclusive: bool = True,
        low_inclusive: bool = True,
        default: Any,
        description: str,
    ) -> None:
        self.integer = integer
        self.low = low
        self.high = high
        self.low_inclusive = low_inclusive
        self.high_inclusive = high_inclusive
        self.default = default
        self.description = description

    def allowed(self) -> str:
        kind = "an integer" if self.integer else "a number"
        left = "[" if self.low_inclusive else "("
        right = "]" if self.high_inclusive else ")"
        high = "inf" if math.isinf(self.high) else format_number(self.high)
        return f"{kind} in {left}{format_number(self.low)}, {high}{right}"

    def admits(self, value: Any) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if self.integer and not float(value).is_integer():
            return False
        if not math.isfinite(float(value)):
            return False
        above = value >= self.low if self.low_inclusive else value > self.low
        below = value <= self.high if self.high_inclusive else value < self.high
        return above and below


def format_number(value: float) -> str:
    """A bound as a person writes it: ``3`` rather than ``3.0``, else the float's repr."""
    return str(int(value)) if float(value).is_integer() and abs(value) < 1e15 else repr(value)


#: Every parameter a trial takes, with its allowed values and the seed tutorial's value.
PARAM_RULES: dict[str, _ParamRule] = {
    # Bounded: a head of a billion units passed validation and failed every trial out of memory.
    "head_units": _ParamRule(integer=True, low=1, high=65536, default=1024, description="units of the Dense head layer"),
    "unfreeze_depth": _ParamRule(
        integer=True, low=0, default=3, description="residual blocks unfrozen from the top in phase 2"
    ),
    "phase1_lr": _ParamRule(
        integer=False, low=0, low_inclusive=False, high=10, default=1e-3, description="phase-1 learning rate"
    ),
    "phase1_momentum": _ParamRule(
        integer=False, low=0, high=1, high_inclusive=False, default=0.0, description="phase-1 momentum"
    ),
    "phase2_lr": _ParamRule(
        integer=False, low=0, low_inclusive=False, high=10, default=1e-4, description="phase-2 learning rate"
    ),
    "phase2_momentum": _ParamRule(
        integer=False, low=0, high=1, high_inclusive=False, default=0.9, description="phase-2 momentum"
    ),
    "dropout": _ParamRule(
        integer=False, low=0, high=1, high_inclusive=False, default=0.0, description="dropout before the softmax"
    ),
    "label_smoothing": _ParamRule(
        integer=False, low=0, high=1, high_inclusive=False, default=0.0, description="label smoothing of the loss"
    ),
}


def parse_param(name: str, raw: Any) -> ChoiceParam | RangeParam:
    """Turn the TOML form of a parameter (scalar, list or table) into a param spec."""
    rule = PARAM_RULES[name]
    where = f"search.{name}"
    if isinstance(raw, (ChoiceParam, RangeParam)):
        return raw
    if isinstance(raw, (list, tuple)):
        if not raw:
            raise ValueError(f"{where}: got an empty list; give at least one choice, {rule.allowed()}")
        bad = [v for v in raw if not rule.admits(v)]
        if bad:
            raise ValueError(f"{where}: choice {bad[0]!r} is not allowed; each choice must be {rule.allowed()}")
        if len(set(raw)) != len(raw):
            raise ValueError(f"{where}: choices {list(raw)!r} repeat a value; list each value once")
        values = tuple(int(v) if rule.integer else float(v) for v in raw)
        return ChoiceParam(choices=values)
    if isinstance(raw, Mapping):
        unknown = set(raw) - {"low", "high", "log", "step"}
        if unknown:
            raise ValueError(
                f"{where}: unknown key(s) {sorted(unknown)!r}; a range takes low, high, log, step"
            )
        if "low" not in raw or "high" not in raw:
            raise ValueError(f"{where}: a range needs both `low` and `high`, but got {dict(raw)!r}")
        low, high = raw["low"], raw["high"]
        for key, value in (("low", low), ("high", high)):
            if not rule.admits(value):
                raise ValueError(f"{where}.{key}: got {value!r}; must be {rule.allowed()}")
        if not low <= high:
            raise ValueError(f"{where}: `low <= high` must hold, but got (low={low!r}, high={high!r})")
        log = raw.get("log", False)
        if not isinstance(log, bool):
            raise ValueError(f"{where}.log: got {log!r}; must be true or false")
        if log and low <= 0:
            raise ValueError(f"{where}: a log range needs low > 0, but got low={low!r}")
        step = raw.get("step")
        if step is not None:
            if isinstance(step, bool) or not isinstance(step, (int, float)) or step <= 0:
                raise ValueError(f"{where}.step: got {step!r}; must be a positive number")
            if log:
                raise ValueError(f"{where}: `step` and `log = true` cannot be combined (got step={step!r})")
            if rule.integer and not float(step).is_integer():
                raise ValueError(f"{where}.step: got {step!r}; must be an integer for an integer parameter")
            if step > high - low and high > low:
                # Optuna would shrink the range to `low` alone and the search would not see it.
                raise ValueError(
                    f"{where}.step: got {step!r}; must be at most high - low ({format_number(high - low)}), or the "
                    f"range holds only low = {low!r}"
                )
        return RangeParam(low=low, high=high, log=log, step=step, integer=rule.integer)
    if rule.admits(raw):
        return ChoiceParam(choices=(int(raw) if rule.integer else float(raw),))
    raise ValueError(
        f"{where}: got {raw!r}; give a fixed value, a list of choices, or a table "
        f"{{ low = ..., high = ..., log = false }}, each value {rule.allowed()}"
    )


def param_to_toml(param: ChoiceParam | RangeParam) -> Any:
    """The TOML form of a parameter (a list of choices or a range table); parses back to it."""
    if isinstance(param, ChoiceParam):
        return list(param.choices)
    table: dict[str, Any] = {"low": param.low, "high": param.high, "log": param.log}
    if param.integer:
        table["low"], table["high"] = int(param.low), int(param.high)
    if param.step is not None:
        table["step"] = int(param.step) if param.integer else param.step
    return table
