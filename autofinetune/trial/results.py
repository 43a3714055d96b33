"""The immutable record of one trial, carried from the schedule to the engines and storage."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Mapping

from autofinetune.spec import ObjectiveSpec

TrialState = Literal["complete", "pruned", "failed"]


@dataclass(frozen=True)
class EpochRecord:
    """Metrics after one epoch.

    Attributes:
        step: Global epoch count across both phases, starting at 1 (phase 2 continues it).
        phase: 1 (frozen backbone) or 2 (top blocks unfrozen).
        metrics: Keras logs of the epoch (``loss``, ``accuracy``, ``val_loss``, ``val_accuracy``).
    """

    step: int
    phase: int
    metrics: Mapping[str, float]


@dataclass(frozen=True)
class PhaseSummary:
    """What one phase cost and achieved."""

    phase: int
    epochs_run: int
    best_value: float | None
    trainable_params: int
    seconds: float
    images_per_second: float
    cached: bool = False
    cache_note: str = ""


@dataclass(frozen=True)
class TrialResult:
    """One full run of the two-phase schedule.

    Attributes:
        params: The parameters the trial ran with.
        objective: Name of the metric the trial is scored by.
        direction: ``"maximize"`` or ``"minimize"``.
        history: One record per epoch run, in order.
        best_value: Best objective value over all epochs (``None`` if no epoch finished).
        best_step: Global step of that value.
        unfrozen_blocks: Residual blocks trained in phase 2, from the top down.
        phases: A summary per phase that started.
        state: ``"complete"``, ``"pruned"`` or ``"failed"``.
        pruned_at_step: Step after which the trial was pruned.
        error: Why the trial failed.
        checkpoint_path: The saved best-epoch model, when one was asked for.
        extra: Engine-neutral details (e.g. feature-cache statistics).
        objective_values: Each objective's value in a study of several (``objective.pareto_with``),
            the main one first: its best epoch's value, then each other metric's value at that
            epoch or the model's measure (``None`` where there is none); empty with one objective.
    """

    params: Mapping[str, Any]
    objective: str
    direction: str
    history: tuple[EpochRecord, ...]
    best_value: float | None
    best_step: int | None
    unfrozen_blocks: tuple[str, ...]
    phases: tuple[PhaseSummary, ...]
    state: TrialState = "complete"
    pruned_at_step: int | None = None
    error: str | None = None
    checkpoint_path: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)
    objective_values: tuple[float | None, ...] = ()

    def values(self, metric: str | None = None) -> list[float]:
        """Per-epoch values of ``metric`` (the objective by default)."""
        name = metric or self.objective
        return [record.metrics[name] for record in self.history if name in record.metrics]

    @property
    def total_seconds(self) -> float:
        return sum(p.seconds for p in self.phases)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-friendly data."""
        data = asdict(self)
        data["params"] = dict(self.params)
        data["history"] = [
            {"step": r.step, "phase": r.phase, "metrics": dict(r.metrics)} for r in self.history
        ]
        data["extra"] = dict(self.extra)
        return data


def best_of(values: list[tuple[int, float]], direction: str) -> tuple[int | None, float | None]:
    """``(step, value)`` of the best finite value; ``(None, None)`` when there is none."""
    best = ObjectiveSpec(direction=direction).best(value for _, value in values)
    if best is None:
        return None, None
    # Ties go to the earliest step: the same score with less training.
    return min(step for step, value in values if value == best), best
