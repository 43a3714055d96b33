"""One phase of a trial: its inputs (images, or cached activations), its compiled model, its fit.

Phase 1 trains a new head on the frozen backbone; phase 2 trains the top ``unfreeze_depth``
residual blocks and the head, continuing the epoch count. A :class:`Phase` says what differs
between them; a :class:`TrialRun` holds what both share.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from autofinetune.trial.cache_plan import CacheCounters, cache_blocker
from autofinetune.trial.progress import Reporter, TrialProgress, epoch_callback, fit_phase, phase_summary
from autofinetune.trial.results import PhaseSummary


@dataclass(frozen=True)
class Phase:
    """What one phase trains and with what; all else is the same for both phases.

    Attributes:
        number: 1 (frozen backbone, new head) or 2 (top blocks unfrozen).
        depth: Residual blocks trained from the top (0: the head only).
        optimizer: ``"rmsprop"``, ``"sgd"`` or ``"adam"``.
        learning_rate: The optimizer's learning rate.
        momentum: The optimizer's momentum (Adam's ``beta_1``).
        weight_decay: The optimizer's decoupled weight decay (0: none).
        initial_epoch: Epochs of the trial before this phase (``model.fit``'s ``initial_epoch``):
            phase 2 continues phase 1's step count.
        end_epoch: The trial's epoch count at the end of this phase (``model.fit``'s ``epochs``).
    """

    number: int
    depth: int
    optimizer: str
    learning_rate: float
    momentum: float
    weight_decay: float
    initial_epoch: int
    end_epoch: int


@dataclass
class TrialRun:
    """What the phases of one trial share: its models, data, feature cache and record."""

    spec: Any
    data: Any
    backbone: Any
    model: Any
    reporter: Reporter
    progress: TrialProgress
    one_hot_train: np.ndarray
    one_hot_val: np.ndarray
    label_smoothing: float
    num_blocks: int
    cache: Any
    cache_off: str | None
    stop_event: Any = None
    #: The user's Keras callbacks, added to every phase's ``fit``.
    user_callbacks: tuple[Any, ...] = ()
    counters: CacheCounters = field(default_factory=CacheCounters)
    layers_used: list[str] = field(default_factory=list)
    #: The phase-1 features, reused by phase 2 at depth 0.
    pooled: Any = None
    #: Depths whose cuts the pass that computes the pooled features fills too.
    depths_with_pooled: tuple[int, ...] = ()
    #: Models kept with the backbone for later trials (``None``: this trial keeps none).
    kept: Any = None
    #: Phases that trained a model compiled, and its steps traced, by an earlier trial.
    phases_on_kept_models: int = 0


def phase_inputs(run: TrialRun, depth: int) -> tuple[Any, Any, Any, bool, str]:
    """(model to fit, train inputs, val inputs, cached?, note) for the phase about to run.

    The model is the full classifier when the phase runs uncached, ``None`` when it trains its
    trainable part on cached features (see :func:`compiled_part`).
    """
    from autofinetune.trial.features import cached_features_together
    from autofinetune.trial.model import build_cuts_extractor, frozen_cut

    spec, data, model = run.spec, run.data, run.model
    blocker = run.cache_off or cache_blocker(spec, run.backbone)
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


def compiled_part(run: TrialRun, phase: Phase, options: dict[str, Any]) -> tuple[Any, bool]:
    """The phase's trainable part, compiled; kept from an earlier trial of this process where one
    of the same shape ran (its steps already traced), else built now.

    Returns:
        The part and whether it was kept from an earlier trial.
    """
    from autofinetune.trial.model import build_trainable_part, compile_for_training, make_optimizer

    def build():
        optimizer = make_optimizer(
            phase.optimizer, learning_rate=phase.learning_rate, momentum=phase.momentum,
            weight_decay=phase.weight_decay, retunable=True,
        )
        return compile_for_training(
            build_trainable_part(run.model, phase.depth), optimizer, label_smoothing=run.label_smoothing, **options
        )

    if run.kept is None:
        return build(), False
    key = (phase.depth, phase.optimizer, run.label_smoothing, tuple(sorted(options.items())))
    return run.kept.compiled_part(
        run.model, key, build, learning_rate=phase.learning_rate, momentum=phase.momentum,
        weight_decay=phase.weight_decay,
    )


def run_phase(run: TrialRun, phase: Phase) -> tuple[Any, PhaseSummary]:
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
    fit_model, x_train, x_val, cached, note = phase_inputs(run, phase.depth)
    options = compile_options(perf)
    if cached and phase.depth == 0:
        # The head alone on cached features: a step is tiny and Keras's per-step dispatch
        # dominates, so an epoch's steps run in one call (same batches, same updates). With
        # residual blocks to train, tracing that loop costs more than the dispatch it saves.
        options["steps_per_execution"] = max(1, math.ceil(n_train / spec.data.batch_size))
    if cached:
        fit_model, reused = compiled_part(run, phase, options)
        run.phases_on_kept_models += int(reused)
    else:
        optimizer = make_optimizer(
            phase.optimizer, learning_rate=phase.learning_rate, momentum=phase.momentum, weight_decay=phase.weight_decay
        )
        fit_model = compile_for_training(fit_model, optimizer, label_smoothing=run.label_smoothing, **options)
    trainable = count_trainable_params(run.model)
    inputs = make_fit_inputs(
        x_train, run.one_hot_train, x_val, run.one_hot_val,
        batch_size=spec.data.batch_size, pipeline=perf.input_pipeline, workers=perf.input_workers,
        seed=spec.seed, first_epoch=phase.initial_epoch,
    )
    run.progress.carry_snapshot_into(run.model)
    callback = epoch_callback(
        run.progress, run.reporter, phase=phase.number, weights_of=run.model, stop_event=run.stop_event
    )
    try:
        _, ran = fit_phase(
            fit_model, inputs.fit_kwargs, initial_epoch=phase.initial_epoch, epochs=phase.end_epoch,
            callback=callback, progress=run.progress, user_callbacks=run.user_callbacks,
        )
    except BaseException:
        forget_kept(run, fit_model)
        raise
    if run.progress.error is not None:
        forget_kept(run, fit_model)
    seconds = time.perf_counter() - started
    run.counters.add_epochs(
        ran, n_train, n_val, frozen_blocks=run.num_blocks - phase.depth, trained_blocks=phase.depth, cached=cached
    )
    summary = phase_summary(phase.number, ran, seconds, n_train, trainable, run.progress, cached=cached, note=note)
    return fit_model, summary


def forget_kept(run: TrialRun, model) -> None:
    """A model whose fit failed or was interrupted is not kept for later trials."""
    if run.kept is not None:
        run.kept.forget(model)
