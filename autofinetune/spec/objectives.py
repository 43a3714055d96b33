"""What a trial is scored by: ``[objective]``, and the metrics a trial logs that it may name.

Every trial logs, each epoch, the metrics of :data:`EPOCH_METRICS` (Keras's names; ``val_``
ones on the validation split), and once, on its finished model, the measures of
:data:`~autofinetune.spec.constraints.MEASURES` that its spec names. ``objective.metric`` is
one of the epoch metrics: its best epoch's value is the trial's value. ``objective.pareto_with``
adds objectives (epoch metrics at that best epoch, or measures) and makes the study
multi-objective: its best trials are then a Pareto front, and nothing is pruned (Optuna's pruners
compare one value).
"""

from __future__ import annotations

import math
from typing import Iterable, Literal

from pydantic import Field, field_validator, model_validator

from autofinetune.spec.base import StrictModel
from autofinetune.spec.constraints import MEASURES, Constraint, parse_constraint

Direction = Literal["maximize", "minimize"]

#: ``k`` of the top-k accuracy a trial logs. With ``k`` classes or fewer it is always 1.
TOP_K = 5

_TRAINING_METRICS = {
    "loss": "categorical cross-entropy (with the trial's label smoothing)",
    "accuracy": "fraction of images whose most likely class is right",
    f"top_{TOP_K}_accuracy": (
        f"fraction of images whose class is among the {TOP_K} most likely; always 1 with {TOP_K} classes or fewer"
    ),
    "f1": "macro-averaged F1 score: the mean over classes of each class's F1 (weighs rare classes alike)",
}

#: The metrics a trial logs every epoch, name -> what it is: each on the training images, and
#: with ``val_`` in front on the validation split.
EPOCH_METRICS: dict[str, str] = {
    **_TRAINING_METRICS,
    **{f"val_{name}": f"{doc}, on the validation split" for name, doc in _TRAINING_METRICS.items()},
}

#: Every name a trial logs: its epoch metrics, and its model's measures.
LOGGED_METRICS: dict[str, str] = {**EPOCH_METRICS, **MEASURES}

#: The trial attribute holding its best-epoch model's score on ``data.selection_split``:
#: ``{"metric", "value", "images", "among"}`` (the metric is the objective's, on those images).
SELECTION_SCORE_ATTR = "selection_score"


def default_direction(name: str) -> Direction:
    """A logged metric's direction unless the spec says otherwise: losses and the model's
    measures (parameters, size, latency) are to minimize, the others to maximize."""
    return "minimize" if name.endswith("loss") or name in MEASURES else "maximize"


def check_metric(field: str, name: str, *, measures: bool) -> str:
    """``name`` when a trial logs it (and, with ``measures=False``, logs it every epoch).

    Raises:
        ValueError: naming the field, the value and the allowed names.
    """
    allowed = LOGGED_METRICS if measures else EPOCH_METRICS
    if name in allowed:
        return name
    if name in MEASURES:
        raise ValueError(
            f"{field}: got {name!r}, a measure of the trial's finished model, not of an epoch: it can only be "
            f"an extra objective (objective.pareto_with = [{name!r}]); allowed here: {', '.join(allowed)}"
        )
    raise ValueError(f"{field}: got {name!r}, which a trial does not log; allowed: {', '.join(allowed)}")


class ObjectiveSpec(StrictModel):
    """The metric a trial is scored by; its best epoch's value is the trial's value.

    Attributes:
        metric: An epoch metric (:data:`EPOCH_METRICS`).
        direction: ``"maximize"`` or ``"minimize"``; default: :func:`default_direction`.
        pareto_with: More objectives, each an epoch metric (its value at the main metric's best
            epoch) or a measure of the model (:data:`~autofinetune.spec.constraints.MEASURES`):
            the study is then multi-objective, its best trials a Pareto front, and
            ``search.pruner`` must be ``"none"``.
        pareto_directions: The direction of each of ``pareto_with``; default: each one's
            :func:`default_direction`.
        constraints: Limits on the trial's model (see :mod:`autofinetune.spec.constraints`): the
            best trials are the best feasible ones, and samplers that can (TPE, GP, NSGA-II)
            sample towards feasible ones.
        final_choice_among: With ``data.selection_split``: how many of the best trials by
            ``metric`` compete on the held-back selection images for the study's best trial.
    """

    metric: str = "val_accuracy"
    direction: Direction | None = None
    pareto_with: tuple[str, ...] = ()
    pareto_directions: tuple[Direction, ...] | None = None
    constraints: tuple[str, ...] = ()
    final_choice_among: int = Field(3, ge=1, le=1000)

    @field_validator("metric")
    @classmethod
    def _logged_every_epoch(cls, value: str) -> str:
        return check_metric("objective.metric", value, measures=False)

    @field_validator("pareto_with")
    @classmethod
    def _logged(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for name in value:
            check_metric("objective.pareto_with", name, measures=True)
        return value

    @field_validator("constraints")
    @classmethod
    def _parsed_constraints(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for text in value:
            parse_constraint(text)
        return value

    @model_validator(mode="after")
    def _distinct_objectives(self) -> "ObjectiveSpec":
        names = [self.metric, *self.pareto_with]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValueError(f"objective.pareto_with: got {list(self.pareto_with)}; each objective once ({repeated} twice)")
        if self.pareto_directions is not None and len(self.pareto_directions) != len(self.pareto_with):
            raise ValueError(
                f"objective.pareto_directions: got {list(self.pareto_directions)}; give one direction for each of "
                f"objective.pareto_with ({len(self.pareto_with)}), or leave it out"
            )
        return self

    @property
    def limits(self) -> list[Constraint]:
        """The constraints, parsed, in the spec's order."""
        return [parse_constraint(text) for text in self.constraints]

    @property
    def resolved_direction(self) -> Direction:
        """The main metric's direction."""
        return self.direction if self.direction is not None else default_direction(self.metric)

    @property
    def is_multi(self) -> bool:
        """Whether the study has more than one objective (a Pareto front, no pruning)."""
        return bool(self.pareto_with)

    @property
    def names(self) -> list[str]:
        """Every objective's name, the main metric first (the order of a trial's values)."""
        return [self.metric, *self.pareto_with]

    @property
    def directions(self) -> list[Direction]:
        """Every objective's direction, in the order of :attr:`names`."""
        extra = self.pareto_directions or tuple(default_direction(name) for name in self.pareto_with)
        return [self.resolved_direction, *extra]

    @property
    def measures(self) -> list[str]:
        """The measures of the model a trial takes: those its constraints limit or that are objectives."""
        wanted = {limit.measure for limit in self.limits} | {name for name in self.pareto_with if name in MEASURES}
        return sorted(wanted)

    @property
    def maximize(self) -> bool:
        """Whether a higher value of the main metric is better."""
        return self.resolved_direction == "maximize"

    @property
    def mode(self) -> Literal["max", "min"]:
        """The main metric's direction as Ray Tune and keras-tuner name it."""
        return "max" if self.maximize else "min"

    @property
    def modes(self) -> list[Literal["max", "min"]]:
        """Every objective's direction as Ray Tune names it."""
        return ["max" if direction == "maximize" else "min" for direction in self.directions]

    def is_better(self, value: float, than: float) -> bool:
        """Whether ``value`` beats ``than`` in this direction (a tie is not better)."""
        return value > than if self.maximize else value < than

    def best(self, values: Iterable[float]) -> float | None:
        """The best finite value of ``values``; ``None`` when there is none."""
        finite = [value for value in values if math.isfinite(value)]
        if not finite:
            return None
        return max(finite) if self.maximize else min(finite)
