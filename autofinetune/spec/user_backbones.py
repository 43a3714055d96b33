"""A backbone a user writes: a ``module:function`` named in the spec instead of a catalogue name.

``backbone.name = "my_nets.small:build"`` (or a choice of ``search.backbone``) names a function
called as ``build(image_size=..., weights=...)``. ``weights`` is ``None`` (random
initialization) or the path of a weights file, as a string; the function returns
``(model, block_names)``: a headless ``keras.Model`` from ``(image_size, image_size, 3)``
images to a 4-D feature map, and its blocks from the bottom (input side) to the top, the units
that unfreeze one by one from the top. A layer belongs to a block when its name is the block's
name or starts with it and ``_`` (``blk2`` holds ``blk2_conv``, ``blk2_bn``).

This module imports that function and checks what it returns, without importing Keras itself
(the spec never does): the model is looked at through its ``layers``, ``input_shape`` and
``outputs``. :mod:`autofinetune.spec.backbones` turns the result into a catalogue entry, and
:mod:`autofinetune.trial.backbones` calls the function to build the backbone.
"""

from __future__ import annotations

import hashlib
import importlib
import re
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from autofinetune.errors import ConfigError

#: ``package.module:function``: what tells a user backbone from a catalogue name.
USER_BACKBONE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*")
#: What the function must return, said in every message about a wrong return value.
RETURN_SHAPE = "must return (keras.Model, list of block names)"
#: Held while a spec's folder is on ``sys.path``: trials of one process may run in threads.
_IMPORT_LOCK = threading.RLock()


def is_user_backbone_name(name: str) -> bool:
    """Whether ``name`` is a ``module:function`` rather than a catalogue name."""
    return USER_BACKBONE_NAME.fullmatch(name) is not None


@dataclass(frozen=True)
class UserBackbone:
    """What one call of a user's backbone function showed.

    Args:
        block_names: Its blocks, bottom to top, as the function returned them.
        layer_names: The model's layers, in Keras's order (``model.layers``).
        source_sha256: SHA-256 of the module's file ("" when it has none): a feature cached
            for an older version of the function is never read for a newer one.
    """

    block_names: tuple[str, ...]
    layer_names: tuple[str, ...]
    source_sha256: str


def load_user_function(name: str, *, field: str, base_dir: str | Path | None = None) -> Callable[..., Any]:
    """Import the function of a ``module:function`` name.

    Args:
        name: The ``module:function`` name.
        field: The spec field that named it, for the messages.
        base_dir: The spec file's folder: on the import path while the module is imported, so
            a ``my_nets.py`` next to the ``study.toml`` is found (the module's own imports run then).

    Raises:
        ConfigError: the module cannot be imported, has no such attribute, or it is not callable.
    """
    module_name, function_name = name.split(":")
    module = _import(module_name, name, field=field, base_dir=base_dir)
    function = getattr(module, function_name, None)
    if function is None:
        raise ConfigError(
            f"{field}: {name!r}: module {module_name!r} ({getattr(module, '__file__', '?')}) has no attribute "
            f"{function_name!r}; name a function of it as 'module:function'"
        )
    if not callable(function):
        raise ConfigError(f"{field}: {name!r}: {function_name!r} is a {type(function).__name__}, not a function")
    return function


def _import(module_name: str, name: str, *, field: str, base_dir: str | Path | None) -> Any:
    folder = None if base_dir is None else str(Path(base_dir).resolve())
    with _IMPORT_LOCK:
        added = folder is not None and folder not in sys.path
        if added:
            sys.path.insert(0, str(folder))
        try:
            return importlib.import_module(module_name)
        except Exception as error:  # ImportError, or whatever the module's own code raises
            where = f" (looked in {folder} and the Python path)" if folder else ""
            raise ConfigError(
                f"{field}: {name!r}: cannot import module {module_name!r}{where}: {type(error).__name__}: {error}"
            ) from None
        finally:
            if added:
                sys.path.remove(str(folder))


def call_user_function(
    function: Callable[..., Any], name: str, *, field: str, image_size: int, weights: str | None = None
) -> tuple[Any, list[str]]:
    """Call a user's backbone function and check the shape of what it returns.

    Args:
        function: From :func:`load_user_function`.
        name: Its ``module:function`` name, for the messages.
        field: The spec field that named it (``backbone.weights`` when a weights file fails).
        image_size: Height and width of the input images, in pixels.
        weights: ``None`` or the path of a weights file.

    Returns:
        The model and its block names, bottom to top.

    Raises:
        ConfigError: the call fails, or returns something else than a model with one 4-D
            output on ``(image_size, image_size, 3)`` images and a non-empty list of unique names.
    """
    try:
        returned = function(image_size=image_size, weights=weights)
    except Exception as error:  # the user's code: any error is a problem of the spec's value
        raise ConfigError(
            f"{field}: {name!r} failed when called with image_size={image_size}, weights={weights!r}: "
            f"{type(error).__name__}: {error}"
        ) from None
    if not (isinstance(returned, tuple) and len(returned) == 2):
        raise ConfigError(f"{field}: {name!r} {RETURN_SHAPE}, but returned a {type(returned).__name__}")
    model, blocks = returned
    if not hasattr(model, "layers") or len(getattr(model, "outputs", None) or ()) != 1:
        raise ConfigError(f"{field}: {name!r} {RETURN_SHAPE}, but its model is a {type(model).__name__}")
    if not isinstance(blocks, (list, tuple)) or not blocks or not all(isinstance(b, str) and b for b in blocks):
        raise ConfigError(f"{field}: {name!r} {RETURN_SHAPE}, but its block names are {blocks!r}")
    if len(set(blocks)) != len(blocks):
        raise ConfigError(f"{field}: {name!r}: its block names repeat a name: {list(blocks)}")
    _check_shapes(model, name, field=field, image_size=image_size)
    return model, list(blocks)


def _check_shapes(model: Any, name: str, *, field: str, image_size: int) -> None:
    """The classifier feeds the model ``(size, size, 3)`` images and pools its 4-D output."""
    expected = (image_size, image_size, 3)
    received = tuple(getattr(model, "input_shape", ())[1:])
    if received != expected:
        raise ConfigError(
            f"{field}: {name!r}: its model takes inputs of shape {received}; expected {expected} "
            "(keras.Input(shape=(image_size, image_size, 3)))"
        )
    rank = len(model.outputs[0].shape)
    if rank != 4:
        raise ConfigError(
            f"{field}: {name!r}: its model outputs a {rank}-D tensor; expected a 4-D feature map "
            "(batch, height, width, channels), which the head pools: leave out the pooling"
        )


def inspect_user_backbone(name: str, *, field: str, base_dir: str | Path | None, image_size: int) -> UserBackbone:
    """Import and call a user's backbone function once (random weights) to learn its blocks.

    Args:
        name: The ``module:function`` name.
        field: The spec field that named it, for the messages.
        base_dir: The spec file's folder (see :func:`load_user_function`).
        image_size: The spec's ``data.image_size``: a size the function rejects fails here.

    Raises:
        ConfigError: see :func:`load_user_function` and :func:`call_user_function`.
    """
    function = load_user_function(name, field=field, base_dir=base_dir)
    model, blocks = call_user_function(function, name, field=field, image_size=image_size)
    return UserBackbone(
        block_names=tuple(blocks),
        layer_names=tuple(layer.name for layer in model.layers),
        source_sha256=_source_sha256(function),
    )


def _source_sha256(function: Callable[..., Any]) -> str:
    path = getattr(sys.modules.get(getattr(function, "__module__", "")), "__file__", None)
    if not path or not Path(path).is_file():
        return ""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()
