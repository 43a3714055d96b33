"""The backbones a spec may name, and what the spec's checks need to know about each.

The catalogue holds facts only (number of residual blocks, smallest image size, whether ImageNet
weights exist), so a spec is checked without importing Keras. The Keras factory that builds each
backbone lives in :mod:`autofinetune.trial.backbones`, which registers every factory together
with its entry here. A new backbone needs both: its :class:`BackboneInfo` and its factory.
"""

from __future__ import annotations

from dataclasses import dataclass

from autofinetune.errors import ConfigError


@dataclass(frozen=True)
class BackboneInfo:
    """What the catalogue knows about a backbone without building it.

    Args:
        name: The name a spec gives in ``backbone.name``.
        num_blocks: Residual blocks of the backbone; ``search.unfreeze_depth`` may not exceed it.
        min_image_size: Smallest ``data.image_size`` the backbone accepts, in pixels.
        has_imagenet_weights: Whether ``backbone.weights = "imagenet"`` is possible.
        description: One line for listings.
    """

    name: str
    num_blocks: int
    min_image_size: int
    has_imagenet_weights: bool
    description: str


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


def get_backbone_info(name: str) -> BackboneInfo:
    """The catalogue entry of ``name``.

    Raises:
        ConfigError: the name is unknown; the message lists the valid names.
    """
    try:
        return _CATALOGUE[name]
    except KeyError:
        raise ConfigError(
            f"backbone.name: unknown backbone {name!r}; allowed: {', '.join(backbone_names())}"
        ) from None


RESNET50 = BackboneInfo(
    name="resnet50",
    num_blocks=16,
    min_image_size=32,
    has_imagenet_weights=True,
    description="Keras ResNet50 (25.6M parameters), ImageNet weights available",
)
TINY_RESNET = BackboneInfo(
    name="tiny_resnet",
    num_blocks=16,
    min_image_size=8,
    has_imagenet_weights=False,
    description="ResNet50's 16 bottleneck blocks with a few channels each; for tests",
)

register_backbone_info(RESNET50)
register_backbone_info(TINY_RESNET)
#: The backbones the package registers itself.
BUILT_IN_BACKBONES = frozenset({RESNET50.name, TINY_RESNET.name})
