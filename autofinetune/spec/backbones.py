"""The backbones a spec may name, and what the spec's checks need to know about each.

The catalogue holds facts only (number of residual blocks, smallest image size, whether ImageNet
weights exist), so a spec is checked without importing Keras. The Keras factory that builds each
backbone lives in :mod:`autofinetune.trial.backbones`, which registers every factory together
with its entry here. A new backbone needs both: its :class:`BackboneInfo` and its factory.

A ``module:function`` name (a user's backbone, :mod:`autofinetune.spec.user_backbones`) needs
neither: :func:`get_backbone_info` calls the function once, on first use in each process, and
registers its entry (the trial builds it by calling the function again).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from pathlib import Path
from typing import Iterable, Literal, Mapping, Sequence

from autofinetune.errors import ConfigError
from autofinetune.spec.user_backbones import inspect_user_backbone, is_user_backbone_name


#: Residual blocks of Keras's ResNet and ResNetV2: ``conv4_block6_2_conv`` -> ``conv4_block6``.
RESNET_BLOCKS = r"^(conv\d+_block\d+)_"
#: Blocks of Keras's EfficientNetV2: ``block6h_expand_conv`` -> ``block6h``.
EFFICIENTNET_BLOCKS = r"^(block\d+[a-z]+)_"
#: Blocks of Keras's ConvNeXt: ``convnext_tiny_stage_3_block_2_depthwise_conv`` -> ``..._block_2``.
CONVNEXT_BLOCKS = r"^(convnext_[a-z]+_stage_\d+_block_\d+)_"
#: Inverted residual blocks of Keras's MobileNetV3: ``expanded_conv_10_project`` -> ``expanded_conv_10``.
MOBILENET_V3_BLOCKS = r"^(expanded_conv(?:_\d+)?)_"

#: What a backbone expects of the classifier's ``preprocess`` layer, given raw 0..255 RGB pixels:
#: ``caffe`` (RGB -> BGR, ImageNet means subtracted: ResNet), ``tf`` (scaled to [-1, 1]:
#: ResNetV2) or ``none`` (the backbone preprocesses inside: EfficientNetV2, ConvNeXt, MobileNetV3).
Preprocessing = Literal["caffe", "tf", "none"]


@dataclass(frozen=True)
class BackboneInfo:
    """What the catalogue knows about a backbone without building it.

    Args:
        name: The name a spec gives in ``backbone.name``.
        num_blocks: Blocks of the backbone that unfreeze one by one; ``search.unfreeze_depth``
            may not exceed it.
        min_image_size: Smallest ``data.image_size`` the backbone accepts, in pixels.
        has_imagenet_weights: Whether ``backbone.weights = "imagenet"`` is possible.
        description: One line for listings.
        family: The family it belongs to, for listings (``ResNet``, ``ConvNeXt``...).
        block_pattern: A regular expression whose first group is the block a layer's name
            belongs to; layers after the first block that match none (a stage's downsampling,
            the top convolution) belong to the block before them.
        preprocessing: See :data:`Preprocessing`.
        weights_file: The file Keras downloads for ``weights = "imagenet"`` (named in the
            message when it cannot be had).
        keras_application: The ``keras.applications`` function that builds it, if one does.
        source_sha256: A user backbone's module file hash (part of its features' cache key).
    """

    name: str
    num_blocks: int
    min_image_size: int
    has_imagenet_weights: bool
    description: str
    family: str = "ResNet"
    block_pattern: str = RESNET_BLOCKS
    preprocessing: Preprocessing = "caffe"
    weights_file: str = ""
    keras_application: str = ""
    source_sha256: str = ""

    def __post_init__(self) -> None:
        pattern = re.compile(self.block_pattern)
        if pattern.groups < 1:
            raise ValueError(f"backbone {self.name!r}: block_pattern {self.block_pattern!r} needs a group (the block)")


_CATALOGUE: dict[str, BackboneInfo] = {}


def register_backbone_info(info: BackboneInfo) -> None:
    """Add a backbone to the catalogue; registering the same entry again changes nothing.

    Raises:
        ValueError: another backbone of that name is registered already.
    """
    known = _CATALOGUE.get(info.name)
    if known is not None and known != info:
        raise ValueError(f"backbone {info.name!r} is already registered")
    _CATALOGUE[info.name] = info


def unregister_backbone_info(name: str) -> None:
    """Remove a backbone added with :func:`register_backbone_info` (the built-in ones stay).

    Raises:
        ValueError: ``name`` is a built-in backbone.
    """
    if name in BUILT_IN_BACKBONES:
        raise ValueError(f"backbone {name!r} is built in and cannot be unregistered")
    _CATALOGUE.pop(name, None)


def backbone_names() -> list[str]:
    """Names of every registered backbone."""
    return sorted(_CATALOGUE)


def get_backbone_info(
    name: str, *, field: str = "backbone.name", base_dir: str | Path | None = None, image_size: int = 224
) -> BackboneInfo:
    """The catalogue entry of ``name``; a ``module:function`` name is registered on first use.

    Args:
        field: The spec field that named it, for the message.
        base_dir: The spec file's folder, where a user backbone's module is looked for too.
        image_size: The size a user backbone's function is first called at (the spec's).

    Raises:
        ConfigError: the name is unknown, or a user backbone fails its checks; the message
            names ``field`` and the value (an unknown name: the valid names too).
    """
    known = _CATALOGUE.get(name)
    if known is not None:
        return known
    if is_user_backbone_name(name):
        return _register_user_backbone(name, field=field, base_dir=base_dir, image_size=image_size)
    raise ConfigError(
        f"{field}: unknown backbone {name!r}; allowed: {', '.join(backbone_names())}, "
        "or a backbone function of your own as 'module:function'"
    )


def _register_user_backbone(name: str, *, field: str, base_dir: str | Path | None, image_size: int) -> BackboneInfo:
    """Call a user's function once, check its blocks name its layers in order, and register it."""
    user = inspect_user_backbone(name, field=field, base_dir=base_dir, image_size=image_size)
    missing = [block for block in user.block_names if not any(_in_block(layer, block) for layer in user.layer_names)]
    if missing:
        raise ConfigError(
            f"{field}: {name!r}: block {missing[0]!r} names no layer; a block's layers are named "
            f"'<block>' or '<block>_...' (layers: {', '.join(user.layer_names[:12])}...)"
        )
    # Longest first, so that block "blk1_a" wins over "blk1" for the layer "blk1_a_conv".
    names = sorted(user.block_names, key=len, reverse=True)
    pattern = "^(" + "|".join(map(re.escape, names)) + ")(?:_|$)"
    info = BackboneInfo(
        name=name, num_blocks=len(user.block_names), min_image_size=8, has_imagenet_weights=False,
        description=f"your function {name}", family="user", block_pattern=pattern, preprocessing="none",
        source_sha256=user.source_sha256,
    )
    found = blocks_in_order(blocks_of_layers(user.layer_names, block_pattern_for(user.layer_names, extra=[pattern])))
    if found != list(user.block_names):
        raise ConfigError(
            f"{field}: {name!r}: its layers give the blocks {found}, but it returned {list(user.block_names)}; "
            "list every block once, from the input side to the output side"
        )
    register_backbone_info(info)
    return info


def _in_block(layer: str, block: str) -> bool:
    return layer == block or layer.startswith(block + "_")


def block_pattern_for(layer_names: Sequence[str], *, extra: Iterable[str] = ()) -> str | None:
    """The ``block_pattern`` that finds the blocks of a model with these layers.

    The built-in families' patterns come first (they name disjoint layers, so a Keras
    application is never read with a user's pattern); then, of the other registered patterns
    and ``extra``, the one that names the most layers.

    Args:
        layer_names: The model's layers, in order.
        extra: Patterns to consider beyond the registered ones (one about to be registered).

    Returns:
        The pattern, or ``None`` when none names a layer.
    """
    built_in = dict.fromkeys(_CATALOGUE[name].block_pattern for name in sorted(BUILT_IN_BACKBONES))
    for pattern in built_in:
        if any(re.match(pattern, layer) for layer in layer_names):
            return pattern
    others = dict.fromkeys(
        [*(info.block_pattern for info in _CATALOGUE.values() if info.name not in BUILT_IN_BACKBONES), *extra]
    )
    named = {pattern: sum(bool(re.match(pattern, layer)) for layer in layer_names) for pattern in others}
    best = max(named, key=named.__getitem__, default=None)  # the first of equals: registered first
    return best if best is not None and named[best] > 0 else None


def blocks_of_layers(layer_names: Sequence[str], pattern: str | None) -> dict[str, str | None]:
    """Layer name -> the block it belongs to, ``None`` for the stem below the first block.

    A layer whose name ``pattern`` does not match belongs to the block of the layer before it:
    layers between two blocks and after the last one unfreeze with the block below them.
    """
    compiled = re.compile(pattern) if pattern is not None else None
    blocks: dict[str, str | None] = {}
    current: str | None = None
    for layer in layer_names:
        match = compiled.match(layer) if compiled is not None else None
        if match:
            current = match.group(1)
        blocks[layer] = current
    return blocks


def blocks_in_order(block_of: Mapping[str, str | None]) -> list[str]:
    """The blocks of a :func:`blocks_of_layers` map, from the bottom (input side) to the top."""
    return [block for block in dict.fromkeys(block_of.values()) if block is not None]


def _keras_application(
    name: str, constructor: str, family: str, blocks: int, parameters: str, *,
    pattern: str = RESNET_BLOCKS, preprocessing: Preprocessing = "caffe", weights_file: str = "",
) -> BackboneInfo:
    return BackboneInfo(
        name=name, num_blocks=blocks, min_image_size=32, has_imagenet_weights=True,
        description=f"Keras {constructor} ({parameters} parameters)", family=family, block_pattern=pattern,
        preprocessing=preprocessing, weights_file=weights_file or f"{name}_notop.h5", keras_application=constructor,
    )


def _resnet(name: str, constructor: str, blocks: int, parameters: str) -> BackboneInfo:
    v2 = constructor.endswith("V2")
    return _keras_application(
        name, constructor, "ResNetV2" if v2 else "ResNet", blocks, parameters, preprocessing="tf" if v2 else "caffe",
        weights_file=f"{name}_weights_tf_dim_ordering_tf_kernels_notop.h5",
    )


def _efficientnet_v2(variant: str, blocks: int, parameters: str) -> BackboneInfo:
    return _keras_application(
        f"efficientnetv2-{variant}", f"EfficientNetV2{variant.upper()}", "EfficientNetV2", blocks, parameters,
        pattern=EFFICIENTNET_BLOCKS, preprocessing="none",
    )


RESNET50 = _resnet("resnet50", "ResNet50", 16, "23.6M")
TINY_RESNET = BackboneInfo(
    name="tiny_resnet",
    num_blocks=16,
    min_image_size=8,
    has_imagenet_weights=False,
    description="ResNet50's 16 bottleneck blocks with a few channels each; for tests",
)
#: Keras's applications the package builds, each with its blocks, preprocessing and weights file
#: (block counts checked against the built models by the tests).
KERAS_APPLICATIONS = (
    RESNET50,
    _resnet("resnet101", "ResNet101", 33, "42.7M"),
    _resnet("resnet152", "ResNet152", 50, "58.4M"),
    _resnet("resnet50v2", "ResNet50V2", 16, "23.6M"),
    _efficientnet_v2("b0", 21, "5.9M"),
    _efficientnet_v2("b1", 27, "6.9M"),
    _efficientnet_v2("b2", 28, "8.8M"),
    _efficientnet_v2("b3", 32, "12.9M"),
    _efficientnet_v2("s", 40, "20.3M"),
    _keras_application(
        "convnext_tiny", "ConvNeXtTiny", "ConvNeXt", 18, "27.8M", pattern=CONVNEXT_BLOCKS, preprocessing="none"
    ),
    _keras_application(
        "convnext_small", "ConvNeXtSmall", "ConvNeXt", 36, "49.5M", pattern=CONVNEXT_BLOCKS, preprocessing="none"
    ),
    _keras_application(
        "mobilenetv3_small", "MobileNetV3Small", "MobileNetV3", 11, "0.9M", pattern=MOBILENET_V3_BLOCKS,
        preprocessing="none", weights_file="weights_mobilenet_v3_small_224_1.0_float_no_top_v2.h5",
    ),
)

#: The backbones the package registers itself.
BUILT_IN_BACKBONES = frozenset(info.name for info in (*KERAS_APPLICATIONS, TINY_RESNET))


def _register_built_ins() -> None:
    for info in (*KERAS_APPLICATIONS, TINY_RESNET):
        register_backbone_info(info)


_register_built_ins()
