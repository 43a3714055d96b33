"""The study spec and the ``launch`` options of a search-quality run, as the searches share them.

Every search trains on :func:`spec_dict` (the anchors load their data through it too);
autofinetune launches :func:`spec_toml` of it with the ``--variant`` settings and
:func:`launch_options`, into :data:`STUDY_FILE` in its run folder, as :func:`study_name`.
"""

from __future__ import annotations

import json
from typing import Any

#: autofinetune's study database, in its run folder (``--warm-start-from`` reads it there).
STUDY_FILE = "study.db"


def study_name(seed: int) -> str:
    """The name of autofinetune's study of one seed (its :data:`STUDY_FILE` holds only that one)."""
    return f"quality-seed{seed}"


def spec_dict(config: dict) -> dict:
    """The study spec every search trains on (the anchors load their data through it as well)."""
    return {
        "name": study_name(config["seed"]),
        "seed": config["seed"],
        "data": {"source": config["trainval_dir"], "image_size": config["image_size"],
                 "validation_split": config["validation_split"], "batch_size": config["batch_size"]},
        "backbone": {"name": config["backbone"], "weights": config["weights"]},
        "schedule": {"phase1_epochs": config["phase1_epochs"], "phase2_epochs": config["phase2_epochs"]},
    }


def toml_value(value: Any) -> str:
    """``value`` as a TOML value (strings, numbers, booleans, lists and inline tables)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(item) for item in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{key} = {toml_value(item)}" for key, item in value.items()) + "}"
    raise TypeError(f"no TOML form for {value!r}")


def spec_toml(config: dict) -> str:
    """The autofinetune spec: the shared one, a search without a trial limit, and the variant's settings.

    ``config["spec_overrides"]`` maps a section (``"search"``, ``"schedule"``, ...) to the keys a
    variant (``search_quality.py --variant``) sets in it; its ``"launch"`` entry holds command-line
    options (:func:`launch_options`), not spec keys.
    """
    spec = spec_dict(config)
    spec["search"] = {"n_trials": 100000}
    for section, values in config.get("spec_overrides", {}).items():
        if section != LAUNCH_OPTIONS:
            spec.setdefault(section, {}).update(values)
    lines = [f"{key} = {toml_value(value)}" for key, value in spec.items() if not isinstance(value, dict)]
    for section, values in spec.items():
        if isinstance(values, dict):
            lines += ["", f"[{section}]", *(f"{key} = {toml_value(item)}" for key, item in values.items())]
    return "\n".join(lines) + "\n"


#: The ``--variant`` section whose keys are ``autofinetune launch`` options (``launch.workers=2``).
LAUNCH_OPTIONS = "launch"


def launch_options(config: dict) -> list[str]:
    """``--key value`` for each ``launch.key=value`` of the variant (underscores become dashes)."""
    options = []
    for key, value in config.get("spec_overrides", {}).get(LAUNCH_OPTIONS, {}).items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            options.append(flag)
        elif value is not False:
            options += [flag, str(value)]
    return options
