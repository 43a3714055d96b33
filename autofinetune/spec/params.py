"""The searchable parameters of a trial, each declared once, and the forms a spec gives them.

:class:`TrialParams` declares every parameter a trial takes, one field each: its type, the values
it may take, its default search space, the seed tutorial's value, its phase and its doc.
:data:`PARAMETERS` is the table made from those fields, which the spec's ``[search]`` section,
the engines' translations and the baseline trial are made from. In a spec's TOML a parameter's
space is a fixed value, a list of choices or a range table, read into a :class:`ChoiceParam` or
a :class:`RangeParam` and checked against the parameter's rule.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Mapping, Union

from pydantic import Field

from autofinetune.spec.base import StrictModel


class ChoiceParam(StrictModel):
    """A categorical parameter: one of ``choices``."""

    kind: Literal["choice"] = "choice"
    choices: tuple[Union[int, float, str, bool], ...]

    def integer_values(self) -> list[int]:
        """The integer choices, ascending (for ``unfreeze_depth``: the depths a search can ask for)."""
        numbers = (c for c in self.choices if isinstance(c, (int, float)) and not isinstance(c, bool))
        return sorted({int(c) for c in numbers if float(c).is_integer()})


class RangeParam(StrictModel):
    """A numeric range with inclusive bounds; ``log`` samples on a log scale."""

    kind: Literal["range"] = "range"
    low: float
    high: float
    log: bool = False
    step: float | None = None
    integer: bool = False

    def integer_values(self) -> list[int]:
        """Every integer of an integer range, ascending; ``[]`` for a range of real numbers."""
        if not self.integer:
            return []
        step = int(self.step or 1)
        return list(range(math.ceil(self.low), math.floor(self.high) + 1, max(step, 1)))


ParamSpec = Annotated[Union[ChoiceParam, RangeParam], Field(discriminator="kind")]


def format_number(value: float) -> str:
    """A bound as a person writes it: ``3`` rather than ``3.0``, else the float's repr."""
    return str(int(value)) if float(value).is_integer() and abs(value) < 1e15 else repr(value)


#: Where a trial parameter's declaration sits in its :class:`TrialParams` field's metadata.
_DECLARATION = "autofinetune.parameter"


def searchable(
    *,
    low: float,
    high: float = math.inf,
    low_inclusive: bool = True,
    high_inclusive: bool = True,
    space: Any,
    seed: Any,
    phase: int,
    doc: str,
    follows: str | None = None,
    active_when: tuple[str, tuple[Any, ...]] | None = None,
) -> Any:
    """Declare one field of :class:`TrialParams` as a searchable parameter.

    Args:
        low, high, low_inclusive, high_inclusive: The values the parameter may take at all
            (its rule): every value of a spec's space and of a hand-given trial must obey it.
        space: Its default search space, in the spec's TOML form (a list of choices, or a table
            ``{low, high, log, step}``).
        seed: The seed tutorial's value: the baseline trial runs it (moved into the space).
        phase: The phase that uses it (1: the head, 2: the fine-tuning, 0: both).
        doc: One line for a person.
        follows: A field of the spec (``"data.batch_size"``) that is also the parameter: where
            the spec's ``[search]`` leaves the parameter out, its space is that field's value
            alone, and a trial's spec (:meth:`~autofinetune.spec.StudySpec.for_trial`) holds the
            trial's value there. A dotted path of any depth (``"data.augmentation.zoom"``).
        active_when: ``(parameter, values)``: the parameter exists only in trials whose
            ``parameter`` (declared above it) takes one of ``values`` -- a conditional parameter,
            as Optuna's define-by-run spaces and keras-tuner's ``conditional_scope`` have them.
            Other trials neither sample nor record it; their :class:`TrialParams` hold its seed.
    """
    declaration = {
        "low": low, "high": high, "low_inclusive": low_inclusive, "high_inclusive": high_inclusive,
        "space": space, "seed": seed, "phase": phase, "doc": doc, "follows": follows, "active_when": active_when,
    }
    return dataclasses.field(metadata={_DECLARATION: declaration})


def choosable(
    *, space: list[str], seed: str, phase: int, doc: str, follows: str | None = None,
    names: tuple[str, ...] | None = None,
) -> Any:
    """Declare one field of :class:`TrialParams` as a parameter whose values are names (a
    categorical choice).

    Args:
        space: Its default choices, in the spec's TOML form.
        seed: The seed tutorial's value; the baseline trial runs it where the space holds it,
            else the space's first choice.
        phase, doc, follows: As for :func:`searchable`.
        names: The names it may take; ``None`` where the spec checks them elsewhere (the
            backbone, against the catalogue, which can grow).
    """
    declaration = {
        "low": 0, "high": 0, "low_inclusive": True, "high_inclusive": True,
        "space": space, "seed": seed, "phase": phase, "doc": doc, "follows": follows, "names": names,
    }
    return dataclasses.field(metadata={_DECLARATION: declaration})


#: The phase-1 optimizers, and those whose step has a momentum (Adam's is its ``beta_1``).
PHASE1_OPTIMIZERS = ("rmsprop", "sgd", "adam")
_WITH_MOMENTUM = ("rmsprop", "sgd")
#: ``data.augmentation.flip``'s values.
FLIP_MODES = ("none", "horizontal", "vertical", "horizontal_and_vertical")


@dataclass(frozen=True)
class TrialParams:
    """The parameters of one trial, read by attribute (``params.phase2_lr``).

    Each field is the one declaration of a searchable parameter: its name and type, the values it
    may take, its default search space, the seed tutorial's value, its phase and its doc (see
    :func:`searchable`). The spec's ``[search]`` fields and their validation, every engine's
    translation and the baseline trial are made from these (:data:`PARAMETERS`); adding a
    parameter is one field here plus the code that uses it.
    """

    # Where [search] leaves them out, the spec's own field is the one value (a study that
    # searches no backbone records the one it uses on every trial).
    backbone: str = choosable(
        space=["resnet50"], seed="resnet50", phase=0, follows="backbone.name",
        doc="the pretrained backbone (a catalogue name); defaults to backbone.name",
    )
    batch_size: int = searchable(
        low=1, high=65_536, space=[32], seed=32, phase=0, follows="data.batch_size",
        doc="images per training step in both phases; defaults to data.batch_size",
    )
    head_units: int = searchable(
        low=1, high=65_536, space=[128, 256, 512, 1024], seed=1024, phase=1, doc="units of the Dense head layer"
    )
    unfreeze_depth: int = searchable(
        low=0, space={"low": 0, "high": 6}, seed=3, phase=2, doc="residual blocks unfrozen from the top in phase 2"
    )
    phase1_optimizer: str = choosable(
        space=["rmsprop"], seed="rmsprop", phase=1, follows="schedule.phase1_optimizer", names=PHASE1_OPTIMIZERS,
        doc="the phase-1 optimizer; defaults to schedule.phase1_optimizer",
    )
    # The learning-rate spaces were chosen on the suite's two tuning tasks, the digits and the
    # textures (docs/benchmarks/search_defaults.md): on both, the best phase-2 rates lie from
    # 1e-3 to 1e-2 and phase-1 rates up to 3e-2 stay good, and the search over these ranges
    # scored at or above the narrower ones on every seed of both tasks.
    phase1_lr: float = searchable(
        low=0, low_inclusive=False, high=10, space={"low": 1e-4, "high": 3e-2, "log": True}, seed=1e-3, phase=1,
        doc="phase-1 learning rate",
    )
    phase1_momentum: float = searchable(
        low=0, high=1, high_inclusive=False, space={"low": 0.0, "high": 0.95}, seed=0.0, phase=1,
        active_when=("phase1_optimizer", _WITH_MOMENTUM), doc="phase-1 momentum (RMSprop, SGD)",
    )
    phase1_beta_1: float = searchable(
        low=0, high=1, high_inclusive=False, space={"low": 0.8, "high": 0.95}, seed=0.9, phase=1,
        active_when=("phase1_optimizer", ("adam",)), doc="phase-1 Adam's decay of its first moment (beta_1)",
    )
    phase2_lr: float = searchable(
        low=0, low_inclusive=False, high=10, space={"low": 1e-4, "high": 1e-2, "log": True}, seed=1e-4, phase=2,
        doc="phase-2 learning rate",
    )
    phase2_momentum: float = searchable(
        low=0, high=1, high_inclusive=False, space={"low": 0.5, "high": 0.99}, seed=0.9, phase=2,
        doc="phase-2 momentum",
    )
    # Decoupled, as Keras's optimizers apply ``weight_decay``: each step first shrinks every weight
    # the phase trains by ``learning_rate * weight_decay`` (SGDW / AdamW style, not an L2 loss term).
    phase1_weight_decay: float = searchable(
        low=0, high=1, high_inclusive=False, space=[0.0], seed=0.0, phase=1,
        doc="phase-1 weight decay (decoupled, on the head)",
    )
    phase2_weight_decay: float = searchable(
        low=0, high=1, high_inclusive=False, space=[0.0], seed=0.0, phase=2,
        doc="phase-2 weight decay (decoupled, on the unfrozen blocks and the head)",
    )
    dropout: float = searchable(
        low=0, high=1, high_inclusive=False, space=[0.0], seed=0.0, phase=1, doc="dropout before the softmax"
    )
    label_smoothing: float = searchable(
        low=0, high=1, high_inclusive=False, space=[0.0], seed=0.0, phase=1, doc="label smoothing of the loss"
    )
    # Random augmentation of the training images, inside the model. Where [search] leaves them
    # out, data.augmentation's values; a trial with any on trains without the feature cache.
    augment_flip: str = choosable(
        space=["none"], seed="none", phase=0, follows="data.augmentation.flip", names=FLIP_MODES,
        doc="random flips; defaults to data.augmentation.flip",
    )
    augment_rotation: float = searchable(
        low=0, high=0.5, space=[0.0], seed=0.0, phase=0, follows="data.augmentation.rotation",
        doc="random rotation, as a fraction of a full turn; defaults to data.augmentation.rotation",
    )
    augment_zoom: float = searchable(
        low=0, high=1, high_inclusive=False, space=[0.0], seed=0.0, phase=0, follows="data.augmentation.zoom",
        doc="random zoom factor; defaults to data.augmentation.zoom",
    )
    augment_contrast: float = searchable(
        low=0, high=1, high_inclusive=False, space=[0.0], seed=0.0, phase=0, follows="data.augmentation.contrast",
        doc="random contrast factor; defaults to data.augmentation.contrast",
    )

    @classmethod
    def from_values(cls, values: Mapping[str, Any]) -> "TrialParams":
        """A trial's parameters from a mapping (an engine's, a user's): every active parameter
        by name, each value cast to its parameter's type; an inactive conditional parameter,
        where left out, holds its seed (no step reads it).

        Raises:
            ValueError: an active parameter is missing, or a name is unknown.
        """
        missing = [name for name in PARAMETERS if name not in values and PARAMETERS[name].is_active(values)]
        unknown = sorted(set(values) - set(PARAMETERS))
        if missing or unknown:
            raise ValueError(f"trial parameters: missing {missing!r}, unknown {unknown!r}; expected {list(PARAMETERS)}")
        cast: dict[str, Any] = {
            name: parameter.cast(values[name] if name in values else parameter.seed)
            for name, parameter in PARAMETERS.items()
        }
        return cls(**cast)

    def to_dict(self) -> dict[str, Any]:
        """Active parameter name -> value, in the declaration's order: what a trial records
        (Optuna records no value for a conditional parameter its trial did not ask for)."""
        values = dataclasses.asdict(self)
        return {name: value for name, value in values.items() if PARAMETERS[name].is_active(values)}


@dataclass(frozen=True)
class Parameter:
    """One searchable parameter, as :class:`TrialParams` declares it (see :func:`searchable`)."""

    name: str
    integer: bool
    #: Whether the values are names (strings) rather than numbers.
    named: bool
    low: float
    high: float
    low_inclusive: bool
    high_inclusive: bool
    space: Any
    seed: Any
    phase: int
    doc: str
    follows: str | None = None
    #: ``(parameter, values)``: see :func:`searchable`; ``None``: in every trial.
    active_when: tuple[str, tuple[Any, ...]] | None = None
    #: The names a named parameter may take; ``None``: checked elsewhere.
    names: tuple[str, ...] | None = None

    def is_active(self, values: Mapping[str, Any]) -> bool:
        """Whether a trial whose parameters are ``values`` has this parameter (its condition's
        parameter, where ``values`` lacks it, counts as its seed)."""
        if self.active_when is None:
            return True
        parent, allowed = self.active_when
        return values.get(parent, PARAMETERS[parent].seed) in allowed

    def allowed(self) -> str:
        """The values the parameter may take, in words."""
        if self.names is not None:
            return "one of " + ", ".join(repr(name) for name in self.names)
        if self.named:
            return "a non-empty name"
        kind = "an integer" if self.integer else "a number"
        left = "[" if self.low_inclusive else "("
        right = "]" if self.high_inclusive else ")"
        high = "inf" if math.isinf(self.high) else format_number(self.high)
        return f"{kind} in {left}{format_number(self.low)}, {high}{right}"

    def admits(self, value: Any) -> bool:
        """Whether ``value`` obeys the parameter's rule."""
        if self.names is not None:
            return value in self.names
        if self.named:
            return isinstance(value, str) and bool(value.strip())
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if self.integer and not float(value).is_integer():
            return False
        if not math.isfinite(float(value)):
            return False
        above = value >= self.low if self.low_inclusive else value > self.low
        below = value <= self.high if self.high_inclusive else value < self.high
        return above and below

    def cast(self, value: Any) -> int | float | str:
        """``value`` as the parameter's type."""
        if self.named:
            return str(value)
        return int(value) if self.integer else float(value)

    @property
    def default_space(self) -> "ChoiceParam | RangeParam":
        """Its default search space, parsed."""
        return parse_param(self.name, self.space)


#: Every searchable parameter, in declaration order: the one table the spec, the engines and the
#: trial are made from.
PARAMETERS: dict[str, Parameter] = {
    declared.name: Parameter(
        name=declared.name, integer=declared.type in (int, "int"), named=declared.type in (str, "str"),
        **declared.metadata[_DECLARATION],
    )
    for declared in dataclasses.fields(TrialParams)
}


def parse_param(name: str, raw: Any) -> ChoiceParam | RangeParam:
    """Turn the TOML form of a parameter (scalar, list or table) into a param spec."""
    rule = PARAMETERS[name]
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
        values = tuple(rule.cast(v) for v in raw)
        return ChoiceParam(choices=values)
    if isinstance(raw, Mapping) and rule.named:
        raise ValueError(f"{where}: got a range {dict(raw)!r}; give a name or a list of names")
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
        return ChoiceParam(choices=(rule.cast(raw),))
    if rule.named:
        raise ValueError(f"{where}: got {raw!r}; give a name or a list of names")
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
