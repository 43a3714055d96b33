"""One trial: the two-phase fine-tuning schedule.

Phase 1 trains a new head on the frozen backbone. Phase 2 unfreezes the top ``unfreeze_depth``
residual blocks (BatchNormalization stays frozen), recompiles with SGD + momentum and goes on
training, continuing the epoch count so that pruners see one increasing step across both phases.

Where exact (no random augmentation, BatchNorm frozen), each phase trains only its trainable
part -- the head, or the unfrozen blocks + head -- on activations of the frozen part read from
the feature cache (:mod:`autofinetune.trial.features`); the full classifier shares those layers, so it
is trained all the same. Both paths visit the training images in the same seeded order.

The schedule never imports an engine: it reports each epoch to a :class:`Reporter`, which may
raise :class:`~autofinetune.errors.PruneTrial` to stop the trial.
"""

from __future__ import annotations

import dataclasses
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Literal, Mapping, Optional, Sequence

from autofinetune.errors import ConfigError
from autofinetune.trial.cache_plan import depths_with_pooled, resolve_cache
from autofinetune.trial.phases import Phase, TrialRun, run_phase
from autofinetune.trial.progress import NullReporter, Reporter, TrialProgress
from autofinetune.trial.results import EpochRecord, PhaseSummary, TrialResult, best_of

if TYPE_CHECKING:
    from autofinetune.data.sources import ImageData
    from autofinetune.spec import ObjectiveSpec, StudySpec, TrialParams
    from autofinetune.trial.features import FeatureCache
    from autofinetune.trial.session import TrialSession

#: Asked with a finished trial's state and best value whether to save its model.
KeepCheckpoint = Callable[[str, Optional[float]], bool]


def run_trial(
    spec: "StudySpec",
    params: "TrialParams | Mapping[str, Any]",
    data: "ImageData",
    *,
    reporter: Reporter | None = None,
    checkpoint_path: str | Path | None = None,
    keep_checkpoint: KeepCheckpoint | None = None,
    feature_cache: "FeatureCache | Literal[False] | None" = None,
    stop_event: threading.Event | None = None,
    callbacks: Sequence[Any] = (),
    session: "TrialSession | None" = None,
) -> TrialResult:
    """Run the two-phase schedule once, in a fresh Keras session with the spec's dtype policy.

    With the feature cache (the default where exact), phase 1 trains the head on the backbone's
    pooled features and phase 2 trains the unfrozen blocks + head on the activations of the
    frozen blocks below them, both read from :mod:`autofinetune.trial.features` instead of recomputed
    every epoch. The trainable part shares its layers with the full classifier, so the
    checkpoint is the same model either way: raw images in, class probabilities out.

    Args:
        spec: The study's :class:`~autofinetune.spec.StudySpec`.
        params: The trial's :class:`~autofinetune.spec.TrialParams`, or a mapping of every one
            (:func:`autofinetune.search.space.complete_params` fills those a user leaves out).
        data: The :class:`~autofinetune.data.sources.ImageData` to train and validate on.
        reporter: Hears every epoch and may prune; defaults to one that never prunes.
        checkpoint_path: Where to save the best epoch's full model (a ``.keras`` file), or
            ``None`` to save nothing.
        keep_checkpoint: Asked with the trial's state (``"complete"``, ``"pruned"``,
            ``"failed"``) and best value before the model is saved; ``False`` skips the save
            (about a second for ResNet50), e.g. for a trial the study will not keep. ``None``
            always saves.
        feature_cache: A :class:`~autofinetune.trial.features.FeatureCache` to use; ``None``:
            the session's (made from the spec's ``[cache]`` section); ``False`` turns caching
            off. ``cache.enabled = false`` in the spec always turns it off.
        stop_event: A ``threading.Event``; once set, training stops after the current batch
            and ``KeyboardInterrupt`` is raised (a signal handler sets it: raising from the
            handler itself can land in a destructor, where Python swallows it).
        callbacks: The user's ``keras.callbacks.Callback`` objects, added to both phases'
            ``fit``. Phase 2 continues the epoch count (``initial_epoch``), so
            ``on_epoch_end(epoch, logs)`` sees one global 0-based epoch index across both
            phases (the trial's step is ``epoch + 1``). Each phase fits its own model: the
            classifier, or its trainable part when the frozen features are cached.
        session: The :class:`~autofinetune.trial.session.TrialSession` of the process's trials
            (an engine makes one per worker): the backbone, models and feature cache the trial
            reuses and leaves for the next. ``None``: a session of this trial alone.

    Returns:
        The trial's :class:`~autofinetune.trial.results.TrialResult`; a pruned trial or one whose
        loss went NaN / ran out of memory returns with ``state`` ``"pruned"`` / ``"failed"``.
        ``extra["cache"]`` holds the cache's hits, misses and the backbone passes spent.

    Raises:
        ConfigError: a parameter is missing or unknown, or the backbone's weights cannot be loaded.
    """
    from autofinetune.spec import TrialParams
    from autofinetune.trial.performance import keras_session
    from autofinetune.trial.session import TrialSession

    if not isinstance(params, TrialParams):
        try:
            params = TrialParams.from_values(params)
        except ValueError as error:
            raise ConfigError(f"run_trial: {error} (complete_params fills the rest with the seed recipe's)") from None
    # From here on the spec holds the trial's backbone, batch size, optimizer and augmentation:
    # what it builds, caches and records.
    spec = spec.for_trial(params)
    # The Keras session restores the caller's dtype policy when the trial ends.
    with keras_session(spec.performance):
        return _run_trial(_TrialCall(
            spec, params, data, reporter=reporter, checkpoint_path=checkpoint_path, keep_checkpoint=keep_checkpoint,
            feature_cache=feature_cache, stop_event=stop_event, callbacks=tuple(callbacks),
            session=session or TrialSession(),
        ))


@dataclass(frozen=True)
class _TrialCall:
    """What :func:`run_trial` was asked to do, handed down its steps whole."""

    spec: "StudySpec"
    params: "TrialParams"
    data: "ImageData"
    reporter: Reporter | None
    checkpoint_path: str | Path | None
    keep_checkpoint: KeepCheckpoint | None
    feature_cache: "FeatureCache | Literal[False] | None"
    stop_event: "threading.Event | None"
    callbacks: tuple[Any, ...]
    session: "TrialSession"


def _run_trial(call: _TrialCall) -> TrialResult:
    """The body of :func:`run_trial`, inside its Keras session."""
    import keras

    spec = call.spec
    weights = spec.weights_path or spec.backbone.weights
    keras.utils.set_random_seed(spec.seed)
    with call.session.backbone(
        spec.backbone.name, image_size=spec.data.image_size, weights=weights, base_dir=spec.base_dir
    ) as backbone:
        return _run_trial_on(backbone, call)


def _run_trial_on(backbone: Any, call: _TrialCall) -> TrialResult:
    """Both phases on ``backbone`` (fresh or reused with its weights reset: the same to a trial)."""
    from autofinetune.trial.model import freeze_backbone, unfreeze_top_blocks

    run = _start_run(backbone, call)
    phases: list[PhaseSummary] = []
    unfrozen: list[str] = []
    fit_model = None
    for phase in phase_plan(call.spec, call.params):
        if run.progress.stopped:
            break  # pruned, or failed (a non-finite loss, out of memory): no phase 2
        if phase.number == 1:
            freeze_backbone(backbone)
        else:
            unfrozen = unfreeze_top_blocks(backbone, phase.depth)
        fit_model, summary = run_phase(run, phase)
        phases.append(summary)
    selection = _selection_record(run)
    saved = _save_best_epoch(run, call.checkpoint_path, call.keep_checkpoint)
    return _trial_result(
        run, call.params, phases=phases, unfrozen=unfrozen, checkpoint=saved, last_fit_model=fit_model,
        selection=selection,
    )


def phase_plan(spec: "StudySpec", params: "TrialParams") -> list[Phase]:
    """The trial's phases: the new head on the frozen backbone, then (with ``phase2_epochs``)
    the top blocks unfrozen, trained with SGD + momentum on the continued step count."""
    e1, e2 = spec.schedule.phase1_epochs, spec.schedule.phase2_epochs
    # Adam's beta_1 is its momentum: the decay of its running mean of the gradients.
    momentum = params.phase1_beta_1 if params.phase1_optimizer == "adam" else params.phase1_momentum
    phases = [Phase(
        number=1, depth=0, optimizer=params.phase1_optimizer, learning_rate=params.phase1_lr,
        momentum=momentum, weight_decay=params.phase1_weight_decay, initial_epoch=0, end_epoch=e1,
    )]
    if e2 > 0:
        phases.append(Phase(
            number=2, depth=params.unfreeze_depth, optimizer="sgd", learning_rate=params.phase2_lr,
            momentum=params.phase2_momentum, weight_decay=params.phase2_weight_decay, initial_epoch=e1,
            end_epoch=e1 + e2,
        ))
    return phases


def _start_run(backbone: Any, call: _TrialCall) -> TrialRun:
    """The trial's classifier (kept from an earlier trial of the session where one of its head
    ran on cached features), its cache plan and its record, before the first phase."""
    import keras

    from autofinetune.trial.model import build_classifier

    spec, params, data, session = call.spec, call.params, call.data, call.session
    # Reseeded after the backbone: the head starts the same whether the backbone was built now.
    keras.utils.set_random_seed(spec.seed)
    model = build_classifier(
        backbone, num_classes=data.num_classes, head_units=params.head_units, dropout=params.dropout,
        augmentation=spec.data.augmentation, preprocessing=spec.backbone_info().preprocessing,
    )
    cache, cache_off = resolve_cache(spec, call.feature_cache, session)
    kept = None
    if cache is not None and not spec.data.augmentation.enabled:
        # Phases train parts on cached features: keep them, and this head's classifier, for
        # later trials (those run uncached compile the classifier itself, every trial anew).
        kept = session.kept_models(backbone)
    if kept is not None:
        model = kept.classifier_like(model)
    with_pooled: tuple[int, ...] = ()
    if cache is not None:
        phase2_depth = params.unfreeze_depth if spec.schedule.phase2_epochs > 0 else 0
        with_pooled = depths_with_pooled(spec, backbone, cache, phase2_depth, len(data.x_train) + len(data.x_val))
    objective = spec.objective
    return TrialRun(
        spec=spec,
        data=data,
        backbone=backbone,
        model=model,
        reporter=call.reporter or NullReporter(),
        progress=TrialProgress(
            objective.metric, objective.resolved_direction,
            # The checkpoint and the selection split's score are both of the best epoch.
            keep_best_weights=call.checkpoint_path is not None or data.has_selection_split,
        ),
        one_hot_train=keras.utils.to_categorical(data.y_train, data.num_classes).astype("float32"),
        one_hot_val=keras.utils.to_categorical(data.y_val, data.num_classes).astype("float32"),
        label_smoothing=params.label_smoothing,
        num_blocks=spec.backbone_info().num_blocks,
        cache=cache,
        cache_off=cache_off,
        stop_event=call.stop_event,
        user_callbacks=call.callbacks,
        kept=kept,
        depths_with_pooled=with_pooled,
    )


def _save_best_epoch(
    run: TrialRun, checkpoint_path: str | Path | None, keep_checkpoint: KeepCheckpoint | None
) -> str | None:
    """Save the full classifier with its best epoch's weights, where wanted; returns the path."""
    progress = run.progress
    wanted = (
        checkpoint_path is not None
        and progress.best_weights is not None
        and (keep_checkpoint is None or keep_checkpoint(progress.state, progress.best_value))
    )
    if not wanted or checkpoint_path is None:
        return None
    progress.restore_best(run.model)
    Path(checkpoint_path).parent.mkdir(parents=True, exist_ok=True)
    run.model.save(str(checkpoint_path))
    return str(checkpoint_path)


def _selection_record(run: TrialRun) -> dict[str, Any]:
    """A finished trial's best-epoch model scored on the selection split, for the study's final
    choice (:mod:`autofinetune.trial.selection`); empty for a pruned or failed trial, or
    without the split."""
    from autofinetune.trial.selection import selection_record

    progress = run.progress
    if progress.state != "complete" or progress.best_weights is None or not run.data.has_selection_split:
        return {}
    progress.restore_best(run.model)
    return selection_record(run.model, run.data, run.spec.objective)


def _trial_result(
    run: TrialRun, params: "TrialParams", *, phases: list[PhaseSummary], unfrozen: list[str], checkpoint: str | None,
    last_fit_model: Any, selection: dict[str, Any],
) -> TrialResult:
    """Freeze what the phases recorded into the trial's result.

    Args:
        selection: The best epoch's score on the selection split (:func:`_selection_record`).
    """
    from autofinetune.spec.constraints import CONSTRAINT_MEASURES_ATTR
    from autofinetune.trial.performance import describe_compiled

    progress, cache = run.progress, run.cache
    objective, direction = progress.objective, progress.direction
    step_values = [(r.step, r.metrics[objective]) for r in progress.history if objective in r.metrics]
    best_step, best_value = best_of(step_values, direction)
    state = progress.state
    cache_record = {
        "enabled": cache is not None,
        "dir": str(cache.directory) if cache is not None else None,
        "layers": run.layers_used,
        **dataclasses.asdict(run.counters),
    }
    pipeline = _pipeline_name(run.spec.performance.input_pipeline)
    measured = _constraint_record(run)
    return TrialResult(
        params=params.to_dict(),
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
        checkpoint_path=checkpoint,
        extra={
            "cache": cache_record,
            "performance": {
                **describe_compiled(last_fit_model, input_pipeline=pipeline),
                "phases_on_kept_models": run.phases_on_kept_models,
            },
            **measured,
            **selection,
        },
        objective_values=objective_values(
            run.spec.objective, progress.history, best_step, measured.get(CONSTRAINT_MEASURES_ATTR, {})
        ),
    )


def _constraint_record(run: TrialRun) -> dict[str, Any]:
    """The measures the spec's constraints limit or its objectives name, taken on the trial's
    classifier, and the violation of each constraint (empty without either, or when the trial
    failed)."""
    from autofinetune.spec.constraints import CONSTRAINT_MEASURES_ATTR, CONSTRAINT_VIOLATIONS_ATTR
    from autofinetune.trial.constraints import measure_model

    objective = run.spec.objective
    if not objective.measures or run.progress.error is not None:
        return {}
    measures = measure_model(run.model, objective.measures)
    record: dict[str, Any] = {CONSTRAINT_MEASURES_ATTR: measures}
    if objective.limits:
        record[CONSTRAINT_VIOLATIONS_ATTR] = [limit.violation(measures[limit.measure]) for limit in objective.limits]
    return record


def objective_values(
    objective: "ObjectiveSpec", history: Sequence[EpochRecord], best_step: int | None, measures: Mapping[str, float]
) -> tuple[float | None, ...]:
    """Each objective's value of a trial in a study of several, the main one first (empty for one).

    The main metric's best epoch is the trial's model (its checkpoint): each other epoch metric
    is read at that epoch, each measure on that model.

    Args:
        objective: The spec's objective.
        history: The trial's epochs.
        best_step: The main metric's best step (``None``: no finite value, nothing to read).
        measures: The model's measures (:func:`_constraint_record`).
    """
    if not objective.is_multi:
        return ()
    at_best = next((record.metrics for record in history if record.step == best_step), None)
    values: list[float | None] = []
    for name in objective.names:
        value = measures.get(name) if name in measures else (at_best or {}).get(name)
        values.append(None if value is None or best_step is None else float(value))
    return tuple(values)


def _pipeline_name(pipeline: str) -> str:
    from autofinetune.trial.inputs import resolve_pipeline

    return resolve_pipeline(pipeline)
