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
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Literal, Mapping, Protocol, Sequence

import numpy as np

from autofinetune.errors import ConfigError, PruneTrial
from autofinetune.trial.results import EpochRecord, PhaseSummary, TrialResult, best_of

if TYPE_CHECKING:
    from autofinetune.spec import TrialParams
    from autofinetune.trial.features import FeatureCache
    from autofinetune.trial.session import TrialSession


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
        for variable in model.weights:
            if variable.path in self.best_weights:
                variable.assign(self.best_weights[variable.path])

    def is_improvement(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        if self.best_value is None:
            return True
        return value > self.best_value if self.direction == "maximize" else value < self.best_value


def _epoch_callback(progress: _TrialProgress, reporter: Reporter, phase: int, weights_of=None, stop_event=None):
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


def _looks_like_out_of_memory(error: BaseException) -> bool:
    text = f"{type(error).__name__} {error}".lower()
    return any(marker in text for marker in ("resourceexhausted", "out of memory", "oom when allocating"))


def _fit_phase(model, fit_data: Mapping[str, Any], *, initial_epoch, epochs, callback, progress, user_callbacks=()):
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
        if not _looks_like_out_of_memory(error):
            raise
        progress.error = f"out of memory: {type(error).__name__}: {str(error).splitlines()[0][:300]}"
    return time.perf_counter() - started, len(progress.history) - epochs_before


@dataclass
class _CacheCounters:
    """What the frozen part of the backbone cost a trial, in the units the benchmark predicts with.

    An image-pass is one image through the frozen part once; a block-pass is one image through
    one residual block once (frozen: forward only; trained: forward + backward).
    """

    hits: int = 0
    misses: int = 0
    backbone_image_passes: int = 0
    frozen_block_passes: int = 0
    trained_block_passes: int = 0
    eval_block_passes: int = 0
    feature_seconds: float = 0.0

    def add_epochs(self, epochs: int, n_train: int, n_val: int, *, frozen_blocks: int, trained_blocks: int, cached: bool) -> None:
        if not cached:
            self.backbone_image_passes += epochs * (n_train + n_val)
            self.frozen_block_passes += epochs * (n_train + n_val) * frozen_blocks
        self.trained_block_passes += epochs * n_train * trained_blocks
        self.eval_block_passes += epochs * n_val * trained_blocks

    def add_lookup(self, features, n_images: int, frozen_blocks: int) -> None:
        if features.hit:
            self.hits += 1
            return
        self.misses += 1
        self.backbone_image_passes += n_images
        self.frozen_block_passes += n_images * frozen_blocks
        self.feature_seconds += features.seconds


def _cache_blocker(spec, backbone) -> str | None:
    """Why the frozen part cannot be cached exactly for the phase about to run, or ``None``."""
    from keras import layers

    if spec.data.augmentation.enabled:
        return "off: random augmentation is on (data.augmentation), the backbone sees new inputs every epoch"
    for layer in backbone.layers:
        if isinstance(layer, layers.BatchNormalization) and layer.trainable:
            return f"off: BatchNormalization layer {layer.name!r} is trainable"
    return None


#: Cuts other than the trial's own that the phase-1 pass fills may take this share of the
#: cache's disk budget, in all.
OTHER_CUTS_SHARE = 1 / 16


def _depths_with_pooled(spec, backbone, cache, phase2_depth: int, n_images: int) -> tuple[int, ...]:
    """Depths whose cuts the pass over the images that computes the pooled features fills too.

    Every cut lies on the way to the pooled output, so one pass gives them all. The trial's
    own phase-2 depth always (its phase 2 then reads them from the cache); the other depths
    the search space allows while they take at most :data:`OTHER_CUTS_SHARE` of the cache's
    disk budget, so a later trial at such a depth finds its features instead of paying a pass.

    Args:
        phase2_depth: The trial's unfreeze depth; 0 when it has no phase 2 or trains the head only.
        n_images: Training and validation images, the rows of every entry.
    """
    from autofinetune.trial.backbones import residual_block_names
    from autofinetune.trial.model import frozen_cut_shape

    blocks = len(residual_block_names(backbone))
    depths = [phase2_depth] if 0 < phase2_depth <= blocks else []
    budget = cache.max_bytes * OTHER_CUTS_SHARE
    for depth in spec.search.params()["unfreeze_depth"].integer_values():
        if depth <= 0 or depth > blocks or depth in depths:
            continue
        size = n_images * math.prod(frozen_cut_shape(backbone, depth)) * cache.dtype.itemsize
        if size > budget:
            break  # deeper cuts are larger (more spatial positions) or as large
        budget -= size
        depths.append(depth)
    return tuple(depths)


def _resolve_cache(spec, feature_cache, session: "TrialSession") -> tuple[Any, str | None]:
    """The cache to use, or ``None`` and why not."""
    if not spec.cache.enabled:
        return None, "off: cache.enabled = false"
    if feature_cache is False:
        return None, "off: feature_cache=False"
    if feature_cache is None:
        return session.feature_cache_for(spec), None
    return feature_cache, None


def run_trial(
    spec,
    params: "TrialParams | Mapping[str, Any]",
    data,
    *,
    reporter: Reporter | None = None,
    checkpoint_path: str | Path | None = None,
    keep_checkpoint: Callable[[str, float], bool] | None = None,
    feature_cache: "FeatureCache | Literal[False] | None" = None,
    stop_event=None,
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
    # The Keras session restores the caller's dtype policy when the trial ends.
    with keras_session(spec.performance):
        return _run_trial(
            spec, params, data, reporter=reporter, checkpoint_path=checkpoint_path,
            keep_checkpoint=keep_checkpoint, feature_cache=feature_cache, stop_event=stop_event,
            callbacks=tuple(callbacks), session=session or TrialSession(),
        )


@dataclass(frozen=True)
class _Phase:
    """What one phase trains and with what; all else is the same for both phases.

    Attributes:
        number: 1 (frozen backbone, new head) or 2 (top blocks unfrozen).
        depth: Residual blocks trained from the top (0: the head only).
        optimizer: ``"rmsprop"`` or ``"sgd"``.
        learning_rate: The optimizer's learning rate.
        momentum: The optimizer's momentum.
        initial_epoch: Epochs of the trial before this phase (``model.fit``'s ``initial_epoch``):
            phase 2 continues phase 1's step count.
        end_epoch: The trial's epoch count at the end of this phase (``model.fit``'s ``epochs``).
    """

    number: int
    depth: int
    optimizer: str
    learning_rate: float
    momentum: float
    initial_epoch: int
    end_epoch: int


@dataclass
class _TrialRun:
    """What the phases of one trial share: its models, data, feature cache and record."""

    spec: Any
    data: Any
    backbone: Any
    model: Any
    reporter: Reporter
    progress: _TrialProgress
    one_hot_train: np.ndarray
    one_hot_val: np.ndarray
    label_smoothing: float
    num_blocks: int
    cache: Any
    cache_off: str | None
    stop_event: Any = None
    #: The user's Keras callbacks, added to every phase's ``fit``.
    user_callbacks: tuple[Any, ...] = ()
    counters: _CacheCounters = field(default_factory=_CacheCounters)
    layers_used: list[str] = field(default_factory=list)
    #: The phase-1 features, reused by phase 2 at depth 0.
    pooled: Any = None
    #: Depths whose cuts the pass that computes the pooled features fills too.
    depths_with_pooled: tuple[int, ...] = ()
    #: Models kept with the backbone for later trials (``None``: this trial keeps none).
    kept: Any = None
    #: Phases that trained a model compiled, and its steps traced, by an earlier trial.
    phases_on_kept_models: int = 0


def _phase_inputs(run: _TrialRun, depth: int) -> tuple[Any, Any, Any, bool, str]:
    """(model to fit, train inputs, val inputs, cached?, note) for the phase about to run.

    The model is the full classifier when the phase runs uncached, ``None`` when it trains its
    trainable part on cached features (see :func:`_compiled_part`).
    """
    from autofinetune.trial.features import cached_features_together
    from autofinetune.trial.model import build_cuts_extractor, frozen_cut

    spec, data, model = run.spec, run.data, run.model
    blocker = run.cache_off or _cache_blocker(spec, run.backbone)
    if blocker is not None:
        return model, data.x_train, data.x_val, False, blocker
    layer = frozen_cut(run.backbone, depth)
    if depth == 0 and run.pooled is not None:
        features = dataclasses.replace(run.pooled, hit=True, seconds=0.0)
    else:
        depths = [depth, *(run.depths_with_pooled if depth == 0 else ())]
        extractor = build_cuts_extractor(model, depths)
        if extractor.trainable_weights:  # never in this schedule; exactness first
            return model, data.x_train, data.x_val, False, f"off: a layer below {layer!r} is trainable"
        keys = [run.cache.key_for(spec, data, frozen_cut(run.backbone, d)) for d in depths]
        try:
            features = cached_features_together(run.cache, keys, extractor, data)[0]
        except OSError as error:  # a full or read-only cache folder costs speed, not the trial
            return model, data.x_train, data.x_val, False, f"off: cache folder {str(run.cache.directory)!r}: {error}"
    if depth == 0:
        run.pooled = features
    run.counters.add_lookup(features, len(data.x_train) + len(data.x_val), run.num_blocks - depth)
    run.layers_used.append(layer)
    if features.hit:
        note = f"{layer}: read from the cache"
    else:
        note = f"{layer}: computed in {features.seconds:.2f} s"
        note += " and stored" if features.stored else ", larger than cache.max_bytes, not stored"
    return None, features.train, features.val, True, note


def _compiled_part(run: _TrialRun, phase: _Phase, options: dict[str, Any]) -> tuple[Any, bool]:
    """The phase's trainable part, compiled; kept from an earlier trial of this process where one
    of the same shape ran (its steps already traced), else built now.

    Returns:
        The part and whether it was kept from an earlier trial.
    """
    from autofinetune.trial.model import build_trainable_part, compile_for_training, make_optimizer

    def build():
        optimizer = make_optimizer(
            phase.optimizer, learning_rate=phase.learning_rate, momentum=phase.momentum, retunable=True
        )
        return compile_for_training(
            build_trainable_part(run.model, phase.depth), optimizer, label_smoothing=run.label_smoothing, **options
        )

    if run.kept is None:
        return build(), False
    key = (phase.depth, phase.optimizer, run.label_smoothing, tuple(sorted(options.items())))
    return run.kept.compiled_part(run.model, key, build, learning_rate=phase.learning_rate, momentum=phase.momentum)


def _run_phase(run: _TrialRun, phase: _Phase) -> tuple[Any, PhaseSummary]:
    """Compile and fit one phase on the backbone as it is set up now (frozen or unfrozen).

    Every epoch is recorded and reported on the trial's global step; a prune, a non-finite loss
    or running out of memory ends the phase early and is left on ``run.progress``.

    Returns:
        The model that was fit (the training view of the full classifier, or of its trainable
        part on cached features) and the phase's summary.
    """
    from autofinetune.trial.inputs import make_fit_inputs
    from autofinetune.trial.model import compile_for_training, count_trainable_params, make_optimizer
    from autofinetune.trial.performance import compile_options

    spec, perf = run.spec, run.spec.performance
    n_train, n_val = len(run.data.x_train), len(run.data.x_val)
    started = time.perf_counter()
    fit_model, x_train, x_val, cached, note = _phase_inputs(run, phase.depth)
    options = compile_options(perf)
    if cached and phase.depth == 0:
        # The head alone on cached features: a step is tiny and Keras's per-step dispatch
        # dominates, so an epoch's steps run in one call (same batches, same updates). With
        # residual blocks to train, tracing that loop costs more than the dispatch it saves.
        options["steps_per_execution"] = max(1, math.ceil(n_train / spec.data.batch_size))
    if cached:
        fit_model, reused = _compiled_part(run, phase, options)
        run.phases_on_kept_models += int(reused)
    else:
        optimizer = make_optimizer(phase.optimizer, learning_rate=phase.learning_rate, momentum=phase.momentum)
        fit_model = compile_for_training(fit_model, optimizer, label_smoothing=run.label_smoothing, **options)
    trainable = count_trainable_params(run.model)
    inputs = make_fit_inputs(
        x_train, run.one_hot_train, x_val, run.one_hot_val,
        batch_size=spec.data.batch_size, pipeline=perf.input_pipeline, workers=perf.input_workers,
        seed=spec.seed, first_epoch=phase.initial_epoch,
    )
    run.progress.carry_snapshot_into(run.model)
    callback = _epoch_callback(
        run.progress, run.reporter, phase=phase.number, weights_of=run.model, stop_event=run.stop_event
    )
    try:
        _, ran = _fit_phase(
            fit_model, inputs.fit_kwargs, initial_epoch=phase.initial_epoch, epochs=phase.end_epoch,
            callback=callback, progress=run.progress, user_callbacks=run.user_callbacks,
        )
    except BaseException:
        _forget_kept(run, fit_model)
        raise
    if run.progress.error is not None:
        _forget_kept(run, fit_model)
    seconds = time.perf_counter() - started
    run.counters.add_epochs(
        ran, n_train, n_val, frozen_blocks=run.num_blocks - phase.depth, trained_blocks=phase.depth, cached=cached
    )
    summary = _summary(phase.number, ran, seconds, n_train, trainable, run.progress, cached=cached, note=note)
    return fit_model, summary


def _forget_kept(run: _TrialRun, model) -> None:
    """A model whose fit failed or was interrupted is not kept for later trials."""
    if run.kept is not None:
        run.kept.forget(model)


def _run_trial(
    spec, params, data, *, reporter, checkpoint_path, keep_checkpoint, feature_cache, stop_event, callbacks, session
) -> TrialResult:
    """The body of :func:`run_trial`, inside its Keras session."""
    import keras

    weights = spec.weights_path or spec.backbone.weights
    keras.utils.set_random_seed(spec.seed)
    with session.backbone(spec.backbone.name, image_size=spec.data.image_size, weights=weights) as backbone:
        return _run_trial_on(
            backbone, spec, params, data, reporter=reporter, checkpoint_path=checkpoint_path,
            keep_checkpoint=keep_checkpoint, feature_cache=feature_cache, stop_event=stop_event, callbacks=callbacks,
            session=session,
        )


def _run_trial_on(
    backbone, spec, params, data, *, reporter, checkpoint_path, keep_checkpoint, feature_cache, stop_event, callbacks,
    session,
) -> TrialResult:
    """Both phases on ``backbone`` (fresh or reused with its weights reset: the same to a trial)."""
    import keras

    from autofinetune.spec import get_backbone_info
    from autofinetune.trial.model import build_classifier, freeze_backbone, unfreeze_top_blocks

    objective = spec.objective.metric
    direction = spec.objective.resolved_direction
    # Reseeded after the backbone: the head starts the same whether the backbone was built now.
    keras.utils.set_random_seed(spec.seed)
    model = build_classifier(
        backbone,
        num_classes=data.num_classes,
        head_units=params.head_units,
        dropout=params.dropout,
        augmentation=spec.data.augmentation,
    )
    cache, cache_off = _resolve_cache(spec, feature_cache, session)
    kept = None
    if cache is not None and not spec.data.augmentation.enabled:
        # Phases train parts on cached features: keep them, and this head's classifier, for
        # later trials (those run uncached compile the classifier itself, every trial anew).
        kept = session.kept_models(backbone)
    if kept is not None:
        model = kept.classifier_like(model)
    run = _TrialRun(
        spec=spec,
        data=data,
        backbone=backbone,
        model=model,
        reporter=reporter or NullReporter(),
        progress=_TrialProgress(objective, direction, keep_best_weights=checkpoint_path is not None),
        one_hot_train=keras.utils.to_categorical(data.y_train, data.num_classes).astype("float32"),
        one_hot_val=keras.utils.to_categorical(data.y_val, data.num_classes).astype("float32"),
        label_smoothing=params.label_smoothing,
        num_blocks=get_backbone_info(spec.backbone.name).num_blocks,
        cache=cache,
        cache_off=cache_off,
        stop_event=stop_event,
        user_callbacks=callbacks,
        kept=kept,
    )
    progress = run.progress
    e1, e2 = spec.schedule.phase1_epochs, spec.schedule.phase2_epochs
    if cache is not None:
        phase2_depth = params.unfreeze_depth if e2 > 0 else 0
        run.depths_with_pooled = _depths_with_pooled(spec, backbone, cache, phase2_depth, len(data.x_train) + len(data.x_val))
    phases: list[PhaseSummary] = []

    # Phase 1: frozen backbone, new head.
    freeze_backbone(backbone)
    phase1 = _Phase(
        number=1,
        depth=0,
        optimizer=spec.schedule.phase1_optimizer,
        learning_rate=params.phase1_lr,
        momentum=params.phase1_momentum,
        initial_epoch=0,
        end_epoch=e1,
    )
    fit_model, summary = _run_phase(run, phase1)
    phases.append(summary)

    # Phase 2: unfreeze the top blocks, recompile with SGD + momentum, continue the step count.
    unfrozen: list[str] = []
    if e2 > 0 and not progress.stopped:
        depth = params.unfreeze_depth
        unfrozen = unfreeze_top_blocks(backbone, depth)
        phase2 = _Phase(
            number=2,
            depth=depth,
            optimizer="sgd",
            learning_rate=params.phase2_lr,
            momentum=params.phase2_momentum,
            initial_epoch=e1,
            end_epoch=e1 + e2,
        )
        fit_model, summary = _run_phase(run, phase2)
        phases.append(summary)

    saved = None
    wanted = (
        checkpoint_path is not None
        and progress.best_weights is not None
        and (keep_checkpoint is None or keep_checkpoint(progress.state, progress.best_value))
    )
    if wanted:
        progress.restore_best(model)
        saved = str(checkpoint_path)
        Path(saved).parent.mkdir(parents=True, exist_ok=True)
        model.save(saved)

    return _trial_result(run, params, phases=phases, unfrozen=unfrozen, checkpoint=saved, last_fit_model=fit_model)


def _trial_result(
    run: _TrialRun, params: "TrialParams", *, phases, unfrozen, checkpoint: str | None, last_fit_model
) -> TrialResult:
    """Freeze what the phases recorded into the trial's result."""
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
        },
    )


def _pipeline_name(pipeline: str) -> str:
    from autofinetune.trial.inputs import resolve_pipeline

    return resolve_pipeline(pipeline)


def _summary(
    phase: int, epochs_run: int, seconds: float, n_train: int, trainable: int, progress, *, cached: bool, note: str
) -> PhaseSummary:
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
        cached=cached,
        cache_note=note,
    )
