"""Reading a study spec: from a TOML file or a mapping, with errors that name the field.

A spec is read with :func:`load_spec` (from a file) or :func:`parse_spec` (from a mapping).
Every problem becomes a :class:`~autofinetune.errors.ConfigError` that names the file, the
field, the value received and what is allowed. Relative paths in the spec (an image folder, a
weights file) are resolved against the folder that holds the spec file, and those files are
checked here, before anything trains.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any, Mapping

from pydantic import BaseModel, ValidationError

from autofinetune.errors import ConfigError
from autofinetune.spec.base import StrictModel
from autofinetune.spec.sections import (
    AugmentationSpec,
    BackboneSpec,
    CacheSpec,
    DataSpec,
    ObjectiveSpec,
    PerformanceSpec,
    ScheduleSpec,
    SearchSpec,
)
from autofinetune.spec.study_spec import StudySpec
from autofinetune.spec.tracking import TrackingSpec


def _format_validation_error(error: ValidationError, origin: str) -> str:
    lines = []
    for item in error.errors():
        loc = ".".join(str(part) for part in item["loc"] if not str(part).startswith("function-"))
        # Discriminated-union locations add the tag ("choice"/"range") or validator names.
        loc = re.sub(r"\.(choice|range)(?=\.|$)", "", loc)
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = "unknown field" + _allowed_fields_hint(item["loc"])
            lines.append(f"{origin}: {loc}: {message}")
            continue
        if message.startswith(("search.", loc + ":")) or message.startswith(loc):
            lines.append(f"{origin}: {message}")
            continue
        received = item.get("input")
        shown = "" if isinstance(received, (dict, BaseModel)) else f"got {received!r}; "
        lines.append(f"{origin}: {loc}: {shown}{message}")
    return "\n".join(lines)


_SECTIONS: dict[str, type[StrictModel]] = {
    "data": DataSpec,
    "backbone": BackboneSpec,
    "schedule": ScheduleSpec,
    "search": SearchSpec,
    "objective": ObjectiveSpec,
    "performance": PerformanceSpec,
    "augmentation": AugmentationSpec,
    "cache": CacheSpec,
    "tracking": TrackingSpec,
}


def _allowed_fields_hint(loc: tuple[Any, ...]) -> str:
    parent = str(loc[-2]) if len(loc) >= 2 else ""
    model = _SECTIONS.get(parent, StudySpec)
    allowed = [name for name in model.model_fields if name != "base_dir"]
    return f"; allowed: {', '.join(allowed)}"


def parse_spec(raw: Mapping[str, Any], *, base_dir: str | Path = ".", origin: str = "study spec") -> StudySpec:
    """Validate a spec given as a mapping (the parsed TOML).

    Args:
        raw: The spec's fields.
        base_dir: Folder that relative paths in the spec are resolved against.
        origin: How to name the spec in error messages (usually its file name).

    Raises:
        ConfigError: naming the field, the value received and what is allowed.
    """
    data = dict(raw)
    if "base_dir" in data:
        raise ConfigError(f"{origin}: base_dir: unknown field")
    data["base_dir"] = str(base_dir)
    try:
        spec = StudySpec.model_validate(data)
    except ValidationError as error:
        raise ConfigError(_format_validation_error(error, origin)) from None
    except ConfigError as error:
        raise ConfigError(f"{origin}: {error}") from None
    _check_data_source(spec, origin)
    _check_weights(spec, origin)
    _check_input_pipeline(spec, origin)
    return spec


def load_spec(path: str | Path) -> StudySpec:
    """Read and validate a study spec TOML file.

    Raises:
        ConfigError: the file is missing, is not TOML, or a field is invalid.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"study spec {str(path)!r}: no such file")
    try:
        text = path.read_text(encoding="utf-8")
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path}: not valid TOML: {_toml_error(text, error)}") from None
    except UnicodeDecodeError as error:
        raise ConfigError(f"{path}: not valid TOML: {error}") from None
    return parse_spec(raw, base_dir=path.resolve().parent, origin=str(path))


_ERROR_LINE = re.compile(r"\(at line (\d+), column \d+\)")
_TABLE_HEADER = re.compile(r"^\s*\[\[?\s*([^\]]+?)\s*\]\]?\s*(#.*)?$")


def _toml_error(text: str, error: tomllib.TOMLDecodeError) -> str:
    """``tomllib``'s message, naming the key when it says only "Cannot overwrite a value"."""
    message = str(error)
    match = _ERROR_LINE.search(message)
    if not message.startswith("Cannot overwrite a value") or match is None:
        return message
    lines = text.splitlines()
    number = int(match.group(1))
    if not 1 <= number <= len(lines) or "=" not in lines[number - 1]:
        return message
    key = lines[number - 1].split("=", 1)[0].strip().strip("\"'")
    table = next((m.group(1) for m in map(_TABLE_HEADER.match, reversed(lines[: number - 1])) if m), None)
    name = f"{table}.{key}" if table else key
    return f"{name} is given twice (the second time at line {number}); TOML allows each key once: keep one of them"


def _check_data_source(spec: StudySpec, origin: str) -> None:
    folder = spec.image_folder
    if folder is None:
        return
    from autofinetune.data.sources import scan_image_folder

    try:
        scan_image_folder(folder)
    except ConfigError as error:
        raise ConfigError(f"{origin}: data.source: {error}") from None


def _check_weights(spec: StudySpec, origin: str) -> None:
    path = spec.weights_path
    if path is not None and not path.is_file():
        raise ConfigError(
            f"{origin}: backbone.weights: got {spec.backbone.weights!r}, but {str(path)!r} is not a file; "
            'allowed: "imagenet", "none", or the path of a weights file (.weights.h5 or .h5)'
        )


def _check_input_pipeline(spec: StudySpec, origin: str) -> None:
    # Looked up without importing: TensorFlow's import costs seconds, and GPU machines may
    # run JAX without it.
    import importlib.util

    if spec.performance.input_pipeline == "tf_data" and importlib.util.find_spec("tensorflow") is None:
        raise ConfigError(
            f"{origin}: performance.input_pipeline: got 'tf_data', but TensorFlow is not installed; "
            "allowed here: 'numpy', 'auto' or 'py_dataset'"
        )
