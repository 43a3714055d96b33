"""One trial: the two-phase fine-tuning schedule.

Phase 1 trains a new head on the frozen backbone. Phase 2 unfreezes the top ``unfreeze_depth``
residual blocks (BatchNormalization stays frozen), recompiles with SGD + momentum and goes on
training, continuing the epoch count so that pruners see one increasing step across both phases.

The schedule never imports an engine: it reports each epoch to a :class:`Reporter`, which may
raise :class:`~autofinetune.errors.PruneTrial` to stop the trial.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Protocol

import numpy as np

from autofinetune.errors import PruneTrial
from autofinetune.results import EpochRecord, PhaseSummary, TrialResult, best_of


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
class _TrialProgress:
    """Mutable bookkeeping of a running trial; frozen into a TrialResult at the end."""

    objective: str
    direction: str
    keep_best_weights: bool
    history: list[EpochRecord] = field(default_factory=list)
    pruned_at_step: int | None = None
    error: str | None = None
    best_value: float | None = None
    best_weights: list[np.ndarray] | None = None

    @property
    def stopped(self) -> bool:
        return self.pruned_at_step is not None or self.error is not None

    def is_improvement(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        if self.best_value is None:
            return True
        return value > self.best_value if self.direction == "maximize" else value < self.best_value


def _epoch_callback(progress: _TrialProgress, reporter: Reporter, phase: int, stop_event=None):
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
                progress.best_weights = [np.array(w) for w in self.model.get_weights()]
            elif value is not None and progress.is_improvement(value):
                progress.best_value = value
            try:
                reporter.report(step, metrics)
            except PruneTrial:
                progress.pruned_at_step = step
                self.model.stop_training = True

    return EpochReporter()


def _looks_like_out_of_memory(error: BaseException) -> bool:
    text = f"{type(error).__name__} {error}".lower()
    return any(marker in text for marker in ("resourceexhausted", "out of memory", "oom when allocating"))


def _fit_phase(model, inputs, *, initial_epoch, epochs, callback, progress):
    """Run ``model.fit`` for one phase on ``inputs`` (a FitInputs); returns (seconds, epochs run)."""
    epochs_before = len(progress.history)
    started = time.perf_counter()
    try:
        model.fit(
            **inputs.fit_kwargs,
            epochs=epochs,
            initial_epoch=initial_epoch,
            callbacks=[callback],
            verbose=0,
        )
    except Exception as error:
        if not _looks_like_out_of_memory(error):
            raise
        progress.error = f"out of memory: {type(error).__name__}: {str(error).splitlines()[0][:300]}"
    return time.perf_counter() - started, len(progress.history) - epochs_before


def run_trial(
    spec,
    params: Mapping[str, Any],
    data,
    *,
    reporter: Reporter | None = None,
    checkpoint_path: str | Path | None = None,
    stop_event=None,
) -> TrialResult:
    """Run the two-phase schedule once, in a fresh Keras session with the spec's dtype policy.

    The caller's dtype policy is restored when the trial ends (see
    :func:`autofinetune.performance.trial_session`).

    Args:
        spec: The study's :class:`~autofinetune.config.StudySpec`.
        params: A complete set of parameters (see :func:`autofinetune.search_space.complete_params`).
        data: The :class:`~autofinetune.data.ImageData` to train and validate on.
        reporter: Hears every epoch and may prune; defaults to one that never prunes.
        checkpoint_path: Where to save the best epoch's full model (a ``.keras`` file), or
            ``None`` to save nothing.
        stop_event: A ``threading.Event``; once set, training stops after the current batch
            and ``KeyboardInterrupt`` is raised (a signal handler sets it: raising from the
            handler itself can land in a destructor, where Python swallows it).

    Returns:
        The trial's :class:`~autofinetune.results.TrialResult`; a pruned trial or one whose
        loss went NaN / ran out of memory returns with ``state`` ``"pruned"`` / ``"failed"``.

    Raises:
        ConfigError: the backbone's weights cannot be loaded.
    """
    from autofinetune.performance import trial_session

    with trial_session(spec.performance):
        return _run_trial(
            spec, params, data, reporter=reporter, checkpoint_path=checkpoint_path, stop_event=stop_event
        )


def _run_trial(
    spec,
    params: Mapping[str, Any],
    data,
    *,
    reporter: Reporter | None,
    checkpoint_path: str | Path | None,
    stop_event,
) -> TrialResult:
    """The body of :func:`run_trial`, inside its session."""
    import keras

    from autofinetune.backbones import build_backbone
    from autofinetune.inputs import make_fit_inputs
    from autofinetune.model import (
        build_classifier,
        compile_classifier,
        count_trainable_params,
        freeze_backbone,
        make_optimizer,
        unfreeze_top_blocks,
    )
    from autofinetune.performance import compile_options, describe_compiled

    reporter = reporter or NullReporter()
    params = dict(params)
    objective = spec.objective.metric
    direction = spec.objective.resolved_direction
    keras.utils.set_random_seed(spec.seed)

    weights = spec.weights_path or spec.backbone.weights
    backbone = build_backbone(spec.backbone.name, image_size=spec.data.image_size, weights=weights)
    model = build_classifier(
        backbone,
        num_classes=data.num_classes,
        head_units=int(params["head_units"]),
        dropout=float(params.get("dropout", 0.0)),
        augmentation=spec.data.augmentation,
    )
    one_hot_train = keras.utils.to_categorical(data.y_train, data.num_classes).astype("float32")
    one_hot_val = keras.utils.to_categorical(data.y_val, data.num_classes).astype("float32")
    progress = _TrialProgress(objective, direction, keep_best_weights=checkpoint_path is not None)
    label_smoothing = float(params.get("label_smoothing", 0.0))
    batch_size = spec.data.batch_size
    perf = spec.performance
    inputs = make_fit_inputs(
        data.x_train, one_hot_train, data.x_val, one_hot_val,
        batch_size=batch_size, pipeline=perf.input_pipeline, workers=perf.input_workers, seed=spec.seed,
    )
    n_train = len(data.x_train)
    phases: list[PhaseSummary] = []

    # Phase 1: frozen backbone, new head.
    freeze_backbone(backbone)
    optimizer = make_optimizer(
        spec.schedule.phase1_optimizer,
        learning_rate=float(params["phase1_lr"]),
        momentum=float(params["phase1_momentum"]),
    )
    compile_classifier(model, optimizer, label_smoothing=label_smoothing, **compile_options(perf))
    trainable_phase1 = count_trainable_params(model)
    e1 = spec.schedule.phase1_epochs
    seconds, ran = _fit_phase(
        model, inputs, initial_epoch=0, epochs=e1,
        callback=_epoch_callback(progress, reporter, phase=1, stop_event=stop_event), progress=progress,
    )
    phases.append(_summary(1, ran, seconds, n_train, trainable_phase1, progress))

    # Phase 2: unfreeze the top blocks, recompile with SGD + momentum, continue the step count.
    unfrozen: list[str] = []
    if spec.schedule.phase2_epochs > 0 and not progress.stopped:
        unfrozen = unfreeze_top_blocks(backbone, int(params["unfreeze_depth"]))
        optimizer = make_optimizer(
            "sgd", learning_rate=float(params["phase2_lr"]), momentum=float(params["phase2_momentum"])
        )
        compile_classifier(model, optimizer, label_smoothing=label_smoothing, **compile_options(perf))
        trainable_phase2 = count_trainable_params(model)
        seconds, ran = _fit_phase(
            model, inputs, initial_epoch=e1, epochs=e1 + spec.schedule.phase2_epochs,
            callback=_epoch_callback(progress, reporter, phase=2, stop_event=stop_event), progress=progress,
        )
        phases.append(_summary(2, ran, seconds, n_train, trainable_phase2, progress))

    saved = None
    if checkpoint_path is not None and progress.best_weights is not None:
        model.set_weights(progress.best_weights)
        saved = str(checkpoint_path)
        Path(saved).parent.mkdir(parents=True, exist_ok=True)
        model.save(saved)

    step_values = [(r.step, r.metrics[objective]) for r in progress.history if objective in r.metrics]
    best_step, best_value = best_of(step_values, direction)
    if progress.error is not None:
        state = "failed"
    elif progress.pruned_at_step is not None:
        state = "pruned"
    else:
        state = "complete"
    return TrialResult(
        params=copy.deepcopy(params),
        objective=objective,
        direction=direction,
        history=tuple(progress.history),
        best_value=best_value,
        best_step=best_step,
        unfrozen_blocks=tuple(unfrozen),
        phases=tuple(phases),
        state=state,
        pruned_at_step=progress.pruned_at_step,
        error=progress.error,
        checkpoint_path=saved,
        extra={"performance": describe_compiled(model, input_pipeline=inputs.pipeline)},
    )


def _summary(phase: int, epochs_run: int, seconds: float, n_train: int, trainable: int, progress) -> PhaseSummary:
    values = [
        r.metrics[progress.objective]
        for r in progress.history
        if r.phase == phase and progress.objective in r.metrics and math.isfinite(r.metrics[progress.objective])
    ]
    best = None
    if values:
        best = max(values) if progress.direction == "maximize" else min(values)
    return PhaseSummary(
        phase=phase,
        epochs_run=epochs_run,
        best_value=best,
        trainable_params=trainable,
        seconds=seconds,
        images_per_second=(epochs_run * n_train / seconds) if seconds > 0 else 0.0,
    )
