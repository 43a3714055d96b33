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

import copy
import dataclasses
import functools
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Mapping, Protocol

import numpy as np

from autofinetune.errors import PruneTrial
from autofinetune.trial.results import EpochRecord, PhaseSummary, TrialResult, best_of

if TYPE_CHECKING:
    from autofinetune.trial.features import FeatureCache


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
                source = weights_of if weights_of is not None else self.model
                progress.best_weights = [np.array(w) for w in source.get_weights()]
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


def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    """The order training examples are visited in during ``epoch`` (0-based, global).

    The schedule shuffles by itself instead of through ``fit(shuffle=True)``: the backend RNG's
    order depends on what else drew from it, and the cached and uncached runs of a trial must
    see the very same batches.
    """
    return np.random.default_rng([seed, epoch]).permutation(n)


@functools.cache
def _batches_class():
    import keras

    class EpochBatches(keras.utils.PyDataset):
        """Batches of ``(x, y)``: training ones in a seeded order per epoch, or in order.

        A training dataset is endless (``fit`` gets ``steps_per_epoch``): batch ``i`` belongs to
        epoch ``first_epoch + i // batches_per_epoch``, so the order does not depend on when
        Keras asks for a batch (it prefetches across epoch boundaries).
        """

        def __init__(self, x, y, *, batch_size: int, seed: int | None, first_epoch: int = 0) -> None:
            super().__init__()
            self.x, self.y = x, y
            self.batch_size = batch_size
            self.seed = seed
            self.first_epoch = first_epoch
            self.per_epoch = max(1, math.ceil(len(y) / batch_size))
            self._orders: dict[int, np.ndarray] = {}

        @property
        def num_batches(self) -> int | None:
            return None if self.seed is not None else self.per_epoch

        def __len__(self) -> int:
            return self.per_epoch

        def __getitem__(self, index: int):
            epoch, batch = divmod(int(index), self.per_epoch)
            start = batch * self.batch_size
            if self.seed is None:
                rows = np.arange(start, min(start + self.batch_size, len(self.y)))
            else:
                epoch += self.first_epoch
                if epoch not in self._orders:
                    self._orders = {epoch: epoch_order(self.seed, epoch, len(self.y))}
                rows = self._orders[epoch][start : start + self.batch_size]
            x = self.x[rows]
            if x.dtype == np.float16:  # float16 cache: the model computes in float32
                x = x.astype(np.float32)
            return x, self.y[rows]

    return EpochBatches


def _fit_data(x_train, y_train, x_val, y_val, *, batch_size, seed, initial_epoch, performance) -> dict[str, Any]:
    """The data arguments of ``model.fit`` for one phase.

    The default (``performance.input_pipeline = "numpy"``) is the schedule's own seeded batch
    order, the same with and without the feature cache; the other pipelines
    (:mod:`autofinetune.trial.inputs`) trade that exact order for feeding a GPU faster.
    """
    from autofinetune.trial.inputs import make_fit_inputs

    if performance.input_pipeline == "numpy":
        batches = _batches_class()
        train = batches(x_train, y_train, batch_size=batch_size, seed=seed, first_epoch=initial_epoch)
        val = batches(x_val, y_val, batch_size=batch_size, seed=None)
        # shuffle=False: the batches come in the schedule's own seeded order.
        return {"x": train, "steps_per_epoch": train.per_epoch, "validation_data": val, "shuffle": False}
    inputs = make_fit_inputs(
        x_train, y_train, x_val, y_val, batch_size=batch_size, pipeline=performance.input_pipeline,
        workers=performance.input_workers, seed=seed + initial_epoch,
    )
    return dict(inputs.fit_kwargs)


def _fit_phase(model, fit_data: Mapping[str, Any], *, initial_epoch, epochs, callback, progress):
    """Run ``model.fit`` for one phase; returns (seconds, epochs run)."""
    epochs_before = len(progress.history)
    started = time.perf_counter()
    try:
        model.fit(
            **fit_data,
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


def _resolve_cache(spec, feature_cache) -> tuple[Any, str | None]:
    """The cache to use, or ``None`` and why not."""
    from autofinetune.trial.features import FeatureCache

    if not spec.cache.enabled:
        return None, "off: cache.enabled = false"
    if feature_cache is False:
        return None, "off: feature_cache=False"
    if feature_cache is None:
        return FeatureCache.from_spec(spec), None
    return feature_cache, None


def run_trial(
    spec,
    params: Mapping[str, Any],
    data,
    *,
    reporter: Reporter | None = None,
    checkpoint_path: str | Path | None = None,
    feature_cache: "FeatureCache | Literal[False] | None" = None,
    stop_event=None,
) -> TrialResult:
    """Run the two-phase schedule once, in a fresh Keras session with the spec's dtype policy.

    With the feature cache (the default where exact), phase 1 trains the head on the backbone's
    pooled features and phase 2 trains the unfrozen blocks + head on the activations of the
    frozen blocks below them, both read from :mod:`autofinetune.trial.features` instead of recomputed
    every epoch. The trainable part shares its layers with the full classifier, so the
    checkpoint is the same model either way: raw images in, class probabilities out.

    Args:
        spec: The study's :class:`~autofinetune.spec.StudySpec`.
        params: A complete set of parameters (see :func:`autofinetune.search.space.complete_params`).
        data: The :class:`~autofinetune.data.sources.ImageData` to train and validate on.
        reporter: Hears every epoch and may prune; defaults to one that never prunes.
        checkpoint_path: Where to save the best epoch's full model (a ``.keras`` file), or
            ``None`` to save nothing.
        feature_cache: A :class:`~autofinetune.trial.features.FeatureCache` to share between trials
            (an engine makes one per worker); ``None`` makes one from the spec's ``[cache]``
            section; ``False`` turns caching off. ``cache.enabled = false`` in the spec always
            turns it off.
        stop_event: A ``threading.Event``; once set, training stops after the current batch
            and ``KeyboardInterrupt`` is raised (a signal handler sets it: raising from the
            handler itself can land in a destructor, where Python swallows it).

    Returns:
        The trial's :class:`~autofinetune.trial.results.TrialResult`; a pruned trial or one whose
        loss went NaN / ran out of memory returns with ``state`` ``"pruned"`` / ``"failed"``.
        ``extra["cache"]`` holds the cache's hits, misses and the backbone passes spent.

    Raises:
        ConfigError: the backbone's weights cannot be loaded.
    """
    from autofinetune.trial.performance import trial_session

    # The session restores the caller's dtype policy when the trial ends.
    with trial_session(spec.performance):
        return _run_trial(
            spec, params, data, reporter=reporter, checkpoint_path=checkpoint_path,
            feature_cache=feature_cache, stop_event=stop_event,
        )


def _run_trial(spec, params, data, *, reporter, checkpoint_path, feature_cache, stop_event) -> TrialResult:
    """The body of :func:`run_trial`, inside its session."""
    import keras

    from autofinetune.spec import get_backbone_info
    from autofinetune.trial.backbones import build_backbone
    from autofinetune.trial.features import cached_features, feature_key
    from autofinetune.trial.model import (
        build_classifier,
        build_feature_extractor,
        build_trainable_part,
        compile_classifier,
        count_trainable_params,
        freeze_backbone,
        frozen_cut,
        make_optimizer,
        unfreeze_top_blocks,
    )
    from autofinetune.trial.performance import compile_options, describe_compiled

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
    n_train, n_val = len(data.x_train), len(data.x_val)
    num_blocks = get_backbone_info(spec.backbone.name).num_blocks
    cache, cache_off = _resolve_cache(spec, feature_cache)
    counters = _CacheCounters()
    perf = spec.performance
    layers_used: list[str] = []
    phases: list[PhaseSummary] = []
    pooled = None  # the phase-1 features, reused by phase 2 at depth 0

    def inputs_for(depth: int):
        """(model to fit, train inputs, val inputs, cached?, note) for the phase about to run."""
        nonlocal pooled
        blocker = cache_off or _cache_blocker(spec, backbone)
        if blocker is not None:
            return model, data.x_train, data.x_val, False, blocker
        layer = frozen_cut(backbone, depth)
        frozen_blocks = num_blocks - depth
        if depth == 0 and pooled is not None:
            features = dataclasses.replace(pooled, hit=True, seconds=0.0)
        else:
            extractor = build_feature_extractor(model, depth)
            if extractor.trainable_weights:  # never in this schedule; exactness first
                return model, data.x_train, data.x_val, False, f"off: a layer below {layer!r} is trainable"
            key = feature_key(spec, data, layer, float16=cache.float16)
            try:
                features = cached_features(cache, key, extractor, data)
            except OSError as error:  # a full or read-only cache folder costs speed, not the trial
                return model, data.x_train, data.x_val, False, f"off: cache folder {str(cache.directory)!r}: {error}"
        if depth == 0:
            pooled = features
        counters.add_lookup(features, n_train + n_val, frozen_blocks)
        layers_used.append(layer)
        if features.hit:
            note = f"{layer}: read from the cache"
        else:
            note = f"{layer}: computed in {features.seconds:.2f} s"
            note += " and stored" if features.stored else ", larger than cache.max_bytes, not stored"
        return build_trainable_part(model, depth), features.train, features.val, True, note

    # Phase 1: frozen backbone, new head.
    freeze_backbone(backbone)
    e1 = spec.schedule.phase1_epochs
    started = time.perf_counter()
    fit_model, x_train, x_val, cached, note = inputs_for(0)
    optimizer = make_optimizer(
        spec.schedule.phase1_optimizer,
        learning_rate=float(params["phase1_lr"]),
        momentum=float(params["phase1_momentum"]),
    )
    compile_classifier(fit_model, optimizer, label_smoothing=label_smoothing, **compile_options(perf))
    trainable_phase1 = count_trainable_params(model)
    fit_data = _fit_data(
        x_train, one_hot_train, x_val, one_hot_val,
        batch_size=batch_size, seed=spec.seed, initial_epoch=0, performance=perf,
    )
    _, ran = _fit_phase(
        fit_model, fit_data, initial_epoch=0, epochs=e1,
        callback=_epoch_callback(progress, reporter, phase=1, weights_of=model, stop_event=stop_event),
        progress=progress,
    )
    seconds = time.perf_counter() - started
    counters.add_epochs(ran, n_train, n_val, frozen_blocks=num_blocks, trained_blocks=0, cached=cached)
    phases.append(_summary(1, ran, seconds, n_train, trainable_phase1, progress, cached=cached, note=note))

    # Phase 2: unfreeze the top blocks, recompile with SGD + momentum, continue the step count.
    unfrozen: list[str] = []
    if spec.schedule.phase2_epochs > 0 and not progress.stopped:
        depth = int(params["unfreeze_depth"])
        unfrozen = unfreeze_top_blocks(backbone, depth)
        started = time.perf_counter()
        fit_model, x_train, x_val, cached, note = inputs_for(depth)
        optimizer = make_optimizer(
            "sgd", learning_rate=float(params["phase2_lr"]), momentum=float(params["phase2_momentum"])
        )
        compile_classifier(fit_model, optimizer, label_smoothing=label_smoothing, **compile_options(perf))
        trainable_phase2 = count_trainable_params(model)
        fit_data = _fit_data(
            x_train, one_hot_train, x_val, one_hot_val,
            batch_size=batch_size, seed=spec.seed, initial_epoch=e1, performance=perf,
        )
        _, ran = _fit_phase(
            fit_model, fit_data, initial_epoch=e1, epochs=e1 + spec.schedule.phase2_epochs,
            callback=_epoch_callback(progress, reporter, phase=2, weights_of=model, stop_event=stop_event),
            progress=progress,
        )
        seconds = time.perf_counter() - started
        counters.add_epochs(
            ran, n_train, n_val, frozen_blocks=num_blocks - depth, trained_blocks=depth, cached=cached
        )
        phases.append(_summary(2, ran, seconds, n_train, trainable_phase2, progress, cached=cached, note=note))

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
    cache_record = {
        "enabled": cache is not None,
        "dir": str(cache.directory) if cache is not None else None,
        "layers": layers_used,
        **dataclasses.asdict(counters),
    }
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
        extra={
            "cache": cache_record,
            "performance": describe_compiled(fit_model, input_pipeline=_pipeline_name(perf.input_pipeline)),
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
