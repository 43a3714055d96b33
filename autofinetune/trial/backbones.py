"""Backbone factories: name -> a headless convolutional network, built with Keras.

What the spec knows about each backbone (its catalogue entry: blocks, smallest image size,
preprocessing) is in :mod:`autofinetune.spec.backbones`; each factory here is registered together
with that entry by :func:`register_backbone`.

A backbone is a stack of blocks that unfreeze one by one from the top; its catalogue entry's
``block_pattern`` finds each layer's block by name (``conv4_block6`` of ResNet50, ``block6h``
of EfficientNetV2...), so the schedule unfreezes blocks by name and the feature cache cuts the
network at a block boundary (:func:`block_map`).

The Keras applications are built by Keras; ``tiny_resnet`` has ResNet50's 16 bottleneck blocks
with a few channels each, and works on images down to 8x8 pixels: it makes tests fast. A user's
``module:function`` backbone (:mod:`autofinetune.spec.user_backbones`) is built by calling that
function, which gets the weights file itself.
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path
from typing import Any, Callable


from autofinetune.errors import ConfigError
from autofinetune.spec.backbones import (
    KERAS_APPLICATIONS,
    TINY_RESNET,
    BackboneInfo,
    backbone_names,
    block_pattern_for,
    blocks_in_order,
    blocks_of_layers,
    get_backbone_info,
    register_backbone_info,
    unregister_backbone_info,
)
from autofinetune.spec.user_backbones import call_user_function, load_user_function


#: A backbone factory: ``factory(image_size=..., weights=None | "imagenet")`` -> ``keras.Model``.
BackboneFactory = Callable[..., Any]

_FACTORIES: dict[str, BackboneFactory] = {}


def register_backbone(info: BackboneInfo, *, factory: BackboneFactory) -> None:
    """Make a backbone buildable: its catalogue entry (for the spec) and its Keras factory.

    Args:
        info: What the spec's checks need to know; added to the catalogue of
            :mod:`autofinetune.spec.backbones` unless that exact entry is there already.
        factory: Builds the headless backbone; named and shaped like Keras's ResNet layers.

    Raises:
        ValueError: the name has a factory already, or another entry of that name.
    """
    if info.name in _FACTORIES:
        raise ValueError(f"backbone {info.name!r} is already registered")
    register_backbone_info(info)
    _FACTORIES[info.name] = factory


def unregister_backbone(name: str) -> None:
    """Remove a backbone added with :func:`register_backbone`: its factory and catalogue entry.

    Raises:
        ValueError: ``name`` is a built-in backbone.
    """
    unregister_backbone_info(name)
    _FACTORIES.pop(name, None)


def _factory(info: BackboneInfo, base_dir: str | Path | None) -> BackboneFactory:
    if info.family == "user":
        return _user_factory(info.name, base_dir)
    try:
        return _FACTORIES[info.name]
    except KeyError:
        raise ConfigError(
            f"backbone.name: backbone {info.name!r} is in the catalogue but has no factory; register "
            "one with autofinetune.trial.backbones.register_backbone"
        ) from None


def _user_factory(name: str, base_dir: str | Path | None) -> BackboneFactory:
    """A user's ``module:function`` as a factory (imported already, by its catalogue entry)."""
    function = load_user_function(name, field="backbone.name", base_dir=base_dir)

    def build(*, image_size: int, weights: str | None):
        field = "backbone.name" if weights is None else "backbone.weights"
        return call_user_function(function, name, field=field, image_size=image_size, weights=weights)[0]

    return build


def build_backbone(
    name: str, *, image_size: int, weights: str | Path | None = None, base_dir: str | Path | None = None
):
    """Build a headless backbone for square RGB images.

    Args:
        name: A registered backbone name (see :func:`~autofinetune.spec.backbones.backbone_names`)
            or a user's ``module:function``.
        image_size: Height and width of the input images, in pixels.
        weights: ``"imagenet"``, ``None`` / ``"none"`` for random initialization, or the path of
            a weights file saved from the same architecture (a user's function loads it itself).
        base_dir: The spec file's folder, where a user backbone's module is looked for too.

    Returns:
        A ``keras.Model`` from preprocessed images to the last feature map.

    Raises:
        ConfigError: unknown name, missing weights file, or ImageNet weights that cannot be had.
    """
    info = get_backbone_info(name, base_dir=base_dir, image_size=image_size)
    factory = _factory(info, base_dir)
    if weights in (None, "none"):
        return factory(image_size=image_size, weights=None)
    if weights == "imagenet":
        if not info.has_imagenet_weights:
            raise ConfigError(
                f"backbone.weights: backbone {name!r} has no ImageNet weights; "
                'use "none" or the path of a weights file'
            )
        return _build_with_imagenet_weights(info, factory, image_size)
    path = Path(weights)
    if not path.is_file():
        raise ConfigError(
            f"backbone.weights: {str(path)!r} is not a file; allowed: \"imagenet\", \"none\", or a weights file path"
        )
    if info.family == "user":
        return factory(image_size=image_size, weights=str(path))
    model = factory(image_size=image_size, weights=None)
    try:
        with warnings.catch_warnings():
            # A file of another architecture makes Keras warn once per layer before it fails;
            # the error below says it once.
            warnings.filterwarnings("ignore", message="Skipping nested container")
            model.load_weights(str(path))
    except Exception as error:  # Keras raises ValueError, OSError, KeyError... for a bad file
        raise ConfigError(
            f"backbone.weights: could not load {str(path)!r} into backbone {name!r}: {error}. "
            "The file must hold weights saved from the same architecture"
            + (f" (Keras's {name} without its top: {info.weights_file})" if info.weights_file else "")
        ) from None
    return model


def keras_weights_cache_dir() -> Path:
    """Where Keras looks for (and downloads) pretrained weights files."""
    return Path(os.environ.get("KERAS_HOME", Path.home() / ".keras")) / "models"


def _build_with_imagenet_weights(info: BackboneInfo, factory: BackboneFactory, image_size: int):
    try:
        return factory(image_size=image_size, weights="imagenet")
    except Exception as error:  # keras.utils.get_file raises a bare Exception when offline
        cache = keras_weights_cache_dir()
        raise ConfigError(
            f"backbone.weights: could not get the ImageNet weights of {info.name!r} ({error}). "
            f"If this machine is offline, download {info.weights_file} elsewhere and either copy "
            f"it to {cache}/ (Keras's weights cache) or set backbone.weights to the file's path."
        ) from None


def block_pattern_of(backbone) -> re.Pattern[str]:
    """The ``block_pattern`` of the registered backbone whose blocks ``backbone`` has: a built-in
    family's that names one of its layers, else the user pattern that names the most
    (:func:`~autofinetune.spec.backbones.block_pattern_for`).

    Raises:
        ValueError: no registered pattern matches any layer.
    """
    pattern = block_pattern_for([layer.name for layer in backbone.layers])
    if pattern is None:
        patterns = dict.fromkeys(get_backbone_info(name).block_pattern for name in backbone_names())
        raise ValueError(
            f"backbone {backbone.name!r}: no layer is named like a block of a registered backbone "
            f"(patterns: {', '.join(patterns)})"
        )
    return re.compile(pattern)


def block_map(backbone) -> dict[str, str | None]:
    """Layer name -> the block it belongs to, ``None`` for the stem below the first block.

    A layer whose name the pattern does not match belongs to the block of the layer before it:
    layers between two blocks (a stage's downsampling in ConvNeXt) and after the last one (the
    top convolution of EfficientNetV2, the final norm of ConvNeXt) unfreeze with the block below
    them, and the cut below a block (:func:`~autofinetune.trial.model.frozen_cut`) stays on a
    block boundary.
    """
    return blocks_of_layers([layer.name for layer in backbone.layers], block_pattern_of(backbone).pattern)


def residual_block_names(backbone) -> list[str]:
    """Names of the backbone's blocks, from the bottom (input side) to the top."""
    return blocks_in_order(block_map(backbone))


# --- factories ---------------------------------------------------------------------------


def keras_application(constructor: str) -> BackboneFactory:
    """A factory of ``keras.applications.<constructor>`` without its top, on square RGB images."""

    def build(*, image_size: int, weights: str | None):
        import keras

        return getattr(keras.applications, constructor)(
            include_top=False, weights=weights, input_shape=(image_size, image_size, 3)
        )

    return build


def _bottleneck_block(x, filters: int, *, stride: int, conv_shortcut: bool, name: str):
    """A ResNet-v1 bottleneck block with Keras's layer names (``{name}_1_conv``...)."""
    from keras import layers

    if conv_shortcut:
        shortcut = layers.Conv2D(4 * filters, 1, strides=stride, name=f"{name}_0_conv")(x)
        shortcut = layers.BatchNormalization(epsilon=1.001e-5, name=f"{name}_0_bn")(shortcut)
    else:
        shortcut = x
    x = layers.Conv2D(filters, 1, strides=stride, name=f"{name}_1_conv")(x)
    x = layers.BatchNormalization(epsilon=1.001e-5, name=f"{name}_1_bn")(x)
    x = layers.Activation("relu", name=f"{name}_1_relu")(x)
    x = layers.Conv2D(filters, 3, padding="same", name=f"{name}_2_conv")(x)
    x = layers.BatchNormalization(epsilon=1.001e-5, name=f"{name}_2_bn")(x)
    x = layers.Activation("relu", name=f"{name}_2_relu")(x)
    x = layers.Conv2D(4 * filters, 1, name=f"{name}_3_conv")(x)
    x = layers.BatchNormalization(epsilon=1.001e-5, name=f"{name}_3_bn")(x)
    x = layers.Add(name=f"{name}_add")([shortcut, x])
    return layers.Activation("relu", name=f"{name}_out")(x)


def _tiny_resnet(*, image_size: int, weights: str | None):
    import keras
    from keras import layers

    if weights is not None:
        raise ConfigError("backbone.weights: tiny_resnet has no pretrained weights")
    inputs = keras.Input(shape=(image_size, image_size, 3))
    x = layers.Conv2D(8, 3, padding="same", name="conv1_conv")(inputs)
    x = layers.BatchNormalization(epsilon=1.001e-5, name="conv1_bn")(x)
    x = layers.Activation("relu", name="conv1_relu")(x)
    x = layers.MaxPooling2D(2, strides=2, name="pool1_pool")(x)
    # Same block counts as ResNet50 (3, 4, 6, 3), a few channels each.
    for stage, (blocks, filters, stride) in enumerate(((3, 2, 1), (4, 4, 2), (6, 4, 2), (3, 8, 2)), start=2):
        for index in range(1, blocks + 1):
            x = _bottleneck_block(
                x,
                filters,
                stride=stride if index == 1 else 1,
                conv_shortcut=index == 1,
                name=f"conv{stage}_block{index}",
            )
    return keras.Model(inputs, x, name="tiny_resnet")


def _register_built_ins() -> None:
    for info in KERAS_APPLICATIONS:
        register_backbone(info, factory=keras_application(info.keras_application))
    register_backbone(TINY_RESNET, factory=_tiny_resnet)


_register_built_ins()
