"""What one process keeps between its trials: one explicit object, made by the engine.

A worker runs trial after trial, and building ResNet50, loading its weights and tracing its
compiled parts cost seconds each time, as much as a few epochs on cached features. A
:class:`TrialSession` keeps, for the trials run with it:

* the backbone, built once and handed to each trial with its weights as loaded
  (:meth:`TrialSession.backbone`);
* the classifiers and compiled parts built on it, per head shape
  (:class:`~autofinetune.trial.reuse.KeptModels`);
* the feature cache, with the hashes of the weight files its keys name.

An engine makes one per process that runs trials (an Optuna worker, keras-tuner's launch, an
``autofinetune.objective``) and passes it to every trial; ``run_trial`` without one keeps
nothing past its own trial.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

if TYPE_CHECKING:
    from autofinetune.trial.features import FeatureCache
    from autofinetune.trial.reuse import KeptModels


def _new_kept_models() -> "KeptModels":
    from autofinetune.trial.reuse import KeptModels

    return KeptModels()


@dataclass
class _KeptBackbone:
    """A built backbone kept for the session's next trial, with its weights as loaded."""

    key: tuple
    model: Any
    initial_weights: list
    busy: bool = True
    #: Indices (in ``model.weights``) of what the last trial could train: the weights of the
    #: layers trainable when it ended (the schedule only ever unfreezes more within a trial,
    #: and BatchNormalization stays frozen, so nothing else moved); ``None``: all of them.
    trained: list[int] | None = None
    #: Classifiers and compiled parts built on this backbone, kept for later trials.
    models: "KeptModels" = field(default_factory=_new_kept_models)


class TrialSession:
    """What the trials of one process share: a kept backbone, its models, the feature cache.

    Args:
        feature_cache: The cache every trial of the session uses; ``None``: made from the
            first trial's spec (:meth:`feature_cache_for`).
    """

    def __init__(self, feature_cache: "FeatureCache | None" = None) -> None:
        self._feature_cache = feature_cache
        self._kept: _KeptBackbone | None = None
        self._lock = threading.Lock()

    # -- the feature cache ---------------------------------------------------------------------

    def feature_cache_for(self, spec) -> "FeatureCache":
        """The session's feature cache: the one it was given, else the spec's ``[cache]``
        (made once: it remembers the weight files it hashed)."""
        from autofinetune.trial.features import FeatureCache

        if self._feature_cache is None:
            self._feature_cache = FeatureCache.from_spec(spec)
        return self._feature_cache

    # -- the backbone ----------------------------------------------------------------------------

    @property
    def models(self) -> "KeptModels | None":
        """The classifiers and compiled parts kept with the session's backbone (``None`` before
        its first trial)."""
        return self._kept.models if self._kept is not None else None

    def kept_models(self, backbone) -> "KeptModels | None":
        """The models kept with ``backbone``, if it is the session's kept backbone; else ``None``
        (a one-off build for a trial running beside another keeps nothing)."""
        kept = self._kept
        return kept.models if kept is not None and kept.model is backbone else None

    def forget_kept_models(self) -> None:
        """Drop the classifiers and compiled parts kept with the backbone (the backbone stays):
        the next trial of every shape builds, compiles and traces anew."""
        with self._lock:
            if self._kept is not None:
                self._kept.models = _new_kept_models()

    @contextmanager
    def backbone(
        self, name: str, *, image_size: int, weights: str | Path | None = None, base_dir: str | Path | None = None
    ) -> Iterator[Any]:
        """The backbone of one trial: built once per session, then reused with its weights reset.

        The kept backbone is handed back with every weight as loaded and every layer trainable,
        as a fresh build would be. A second trial running at the same time in another thread
        gets a fresh build.

        Args:
            name, image_size, weights, base_dir: As for
                :func:`~autofinetune.trial.backbones.build_backbone`.

        Yields:
            The backbone, for the duration of the trial (its model is saved within it).
        """
        from autofinetune.trial.backbones import build_backbone

        key = _reuse_key(name, image_size, weights)
        with self._lock:
            kept = self._kept if self._kept is not None and self._kept.key == key and not self._kept.busy else None
            if kept is not None:
                kept.busy = True
        if kept is None:
            model = build_backbone(name, image_size=image_size, weights=weights, base_dir=base_dir)
            with self._lock:
                if self._kept is None or not self._kept.busy:
                    # Keep the latest build only: one backbone's weights, twice, per session.
                    kept = self._kept = _KeptBackbone(key, model, [_copy(v) for v in model.weights])
        else:
            model = kept.model
            _reset(kept)
        try:
            yield model
        finally:
            if kept is not None:
                position = {id(variable): index for index, variable in enumerate(model.weights)}
                trained = [position[id(variable)] for variable in model.trainable_weights]
                with self._lock:
                    kept.trained = trained
                    kept.busy = False


def _reset(kept: _KeptBackbone) -> None:
    """Every layer trainable, and the weights the last trial could train as loaded."""
    model = kept.model
    model.trainable = True
    for layer in model.layers:  # the container's flag alone leaves per-layer flags as they were
        layer.trainable = True
    weights = model.weights
    # Only what the last trial trained is reset: the whole ResNet50 takes ~0.1 s to assign.
    for index in range(len(weights)) if kept.trained is None else kept.trained:
        weights[index].assign(kept.initial_weights[index])


def _reuse_key(name: str, image_size: int, weights: str | Path | None) -> tuple:
    """What makes two builds the same: name, size, weights (a file by its size and mtime), the
    Keras backend and dtype policy."""
    import keras

    weights_id: Any = "none" if weights in (None, "none") else str(weights)
    if weights_id not in ("none", "imagenet"):
        try:
            stat = Path(weights_id).stat()
            weights_id = (str(Path(weights_id).resolve()), stat.st_size, stat.st_mtime_ns)
        except OSError:
            pass  # build_backbone names the missing file
    return name, int(image_size), weights_id, keras.backend.backend(), keras.config.dtype_policy().name


def _copy(variable):
    import numpy as np

    return np.array(variable)
