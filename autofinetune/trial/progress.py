"""A running trial's record: each epoch recorded, checked, reported, and the best one kept.

The schedule never imports an engine: it reports each epoch to a :class:`Reporter`, which may
raise :class:`~autofinetune.errors.PruneTrial` to stop the trial.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping, Protocol

import numpy as np

from autofinetune.errors import PruneTrial
from autofinetune.spec import ObjectiveSpec
from autofinetune.trial.results import EpochRecord, PhaseSummary


class Reporter(Protocol):
    """What an engine gives the schedule to hear about each epoch."""

    def report(self, step: int, metrics: Mapping[str, float]) -> None:
        """Called after every epoch with the global step (1-based) and the epoch's metrics.

        May raise :class:`~autofinetune.errors.PruneTrial` to stop the trial after this epoch.
        """


class NullReporter:
    """A reporter that never prunes."""

    def report(self, step: int, metrics: Mapping[str, float]) -> None:
        return None


@dataclass
class TrialProgress:
    """Mutable bookkeeping of a running trial; frozen into a TrialResult at the end."""

    objective: str
    direction: str
    keep_best_weights: bool
    history: list[EpochRecord] = field(default_factory=list)
    pruned_at_step: int | None = None
    error: str | None = None
    best_value: float | None = None
    #: The best epoch's value of every variable trained so far, by variable path.
    best_weights: dict[str, np.ndarray] | None = None

    @property
    def stopped(self) -> bool:
        return self.pruned_at_step is not None or self.error is not None

    @property
    def state(self) -> Literal["complete", "pruned", "failed"]:
        if self.error is not None:
            return "failed"
        return "pruned" if self.pruned_at_step is not None else "complete"

    def snapshot(self, model) -> None:
        """Keep the weights of the best epoch: only the trainable ones, all others are as they
        were when the phase began (the backbone below the cut and BatchNorm stay frozen)."""
        self.best_weights = {variable.path: np.array(variable) for variable in model.trainable_weights}

    def carry_snapshot_into(self, model) -> None:
        """Before a phase that trains more variables: add their values, which the best epoch of
        an earlier phase had too (they were frozen then), so the snapshot restores the model."""
        if self.best_weights is not None:
            for variable in model.trainable_weights:
                self.best_weights.setdefault(variable.path, np.array(variable))

    def restore_best(self, model) -> None:
        """Put the best epoch's weights back into ``model``."""
        if self.best_weights is None:
            return
        for variable in model.weights:
            if variable.path in self.best_weights:
                variable.assign(self.best_weights[variable.path])

    def is_improvement(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        if self.best_value is None:
            return True
        return ObjectiveSpec(direction=self.direction).is_better(value, self.best_value)


def epoch_callback(progress: TrialProgress, reporter: Reporter, phase: int, weights_of=None, stop_event=None):
    """A Keras callback that records, checks and reports each epoch.

    Args:
        weights_of: The model whose weights are the trial's checkpoint (the full classifier);
            defaults to the model being fit.
        stop_event: Once set, training stops after the current batch (``KeyboardInterrupt``).
    """
    import keras

    class EpochReporter(keras.callbacks.Callback):
        """Records each epoch, fails on a non-finite loss, lets the reporter prune, and stops
        after the current batch once ``stop_event`` is set."""

        def on_train_batch_end(self, batch: int, logs=None) -> None:
            if stop_event is not None and stop_event.is_set():
                raise KeyboardInterrupt("stop requested")

        def on_epoch_end(self, epoch: int, logs: Mapping[str, Any] | None = None) -> None:
            step = epoch + 1
            metrics = {name: float(value) for name, value in (logs or {}).items()}
            progress.history.append(EpochRecord(step=step, phase=phase, metrics=metrics))
            loss = metrics.get("loss", math.nan)
            if not math.isfinite(loss):
                progress.error = f"training loss became {loss} at step {step} (phase {phase})"
                self.model.stop_training = True
                return
            value = metrics.get(progress.objective)
            if progress.keep_best_weights and value is not None and progress.is_improvement(value):
                progress.best_value = value
                # The trainable part shares its layers with the classifier: its weights are live.
                progress.snapshot(weights_of if weights_of is not None else self.model)
            elif value is not None and progress.is_improvement(value):
                progress.best_value = value
            try:
                reporter.report(step, metrics)
            except PruneTrial:
                progress.pruned_at_step = step
                self.model.stop_training = True

    return EpochReporter()


def looks_like_out_of_memory(error: BaseException) -> bool:
    text = f"{type(error).__name__} {error}".lower()
    return any(marker in text for marker in ("resourceexhausted", "out of memory", "oom when allocating"))


def fit_phase(model, fit_data: Mapping[str, Any], *, initial_epoch, epochs, callback, progress, user_callbacks=()):
    """Run ``model.fit`` for one phase; returns (seconds, epochs run).

    The schedule's own callback goes first: a user's callback then sees an epoch already
    recorded (and a prune already decided, ``model.stop_training``).
    """
    epochs_before = len(progress.history)
    started = time.perf_counter()
    try:
        model.fit(
            **fit_data,
            epochs=epochs,
            initial_epoch=initial_epoch,
            callbacks=[callback, *user_callbacks],
            verbose=0,
        )
    except Exception as error:
        if not looks_like_out_of_memory(error):
            raise
        progress.error = f"out of memory: {type(error).__name__}: {str(error).splitlines()[0][:300]}"
    return time.perf_counter() - started, len(progress.history) - epochs_before


def phase_summary(
    phase: int, epochs_run: int, seconds: float, n_train: int, trainable: int, progress, *, cached: bool, note: str
) -> PhaseSummary:
    values = [r.metrics[progress.objective] for r in progress.history if r.phase == phase and progress.objective in r.metrics]
    best = ObjectiveSpec(direction=progress.direction).best(values)
    return PhaseSummary(
        phase=phase,
        epochs_run=epochs_run,
        best_value=best,
        trainable_params=trainable,
        seconds=seconds,
        images_per_second=(epochs_run * n_train / seconds) if seconds > 0 else 0.0,
        cached=cached,
        cache_note=note,
    )
