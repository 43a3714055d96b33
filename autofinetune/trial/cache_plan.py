"""Which frozen activations a trial reads from the feature cache, and what they cost it.

Each phase trains only its trainable part on activations of the frozen part where that is exact
(no random augmentation, BatchNorm frozen); the pass over the images that computes the pooled
features also fills the cuts of other depths the search allows, within a share of the cache.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from autofinetune.trial.session import TrialSession


@dataclass
class CacheCounters:
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


def cache_blocker(spec, backbone) -> str | None:
    """Why the frozen part cannot be cached exactly for the phase about to run, or ``None``."""
    from keras import layers

    if spec.data.augmentation.enabled:
        return "off: random augmentation is on (data.augmentation or search.augment_*), the backbone sees new inputs every epoch"
    for layer in backbone.layers:
        if isinstance(layer, layers.BatchNormalization) and layer.trainable:
            return f"off: BatchNormalization layer {layer.name!r} is trainable"
    return None


#: Cuts other than the trial's own that the phase-1 pass fills may take this share of the
#: cache's disk budget, in all.
OTHER_CUTS_SHARE = 1 / 16


def depths_with_pooled(spec, backbone, cache, phase2_depth: int, n_images: int) -> tuple[int, ...]:
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


def resolve_cache(spec, feature_cache, session: "TrialSession") -> tuple[Any, str | None]:
    """The cache to use, or ``None`` and why not."""
    if not spec.cache.enabled:
        return None, "off: cache.enabled = false"
    if feature_cache is False:
        return None, "off: feature_cache=False"
    if feature_cache is None:
        return session.feature_cache_for(spec), None
    return feature_cache, None
