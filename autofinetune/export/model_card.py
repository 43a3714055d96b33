"""The model card of an exported model: where it came from, what it takes, how well it did.

Written beside the model as JSON (``model_card.json``, read back by ``predict``) and as
Markdown (``MODEL_CARD.md``, for people).
"""

from __future__ import annotations

import datetime as _dt
import platform
import socket
from typing import Any, Mapping

from autofinetune.viewing.notes import fmt

CARD_JSON = "model_card.json"
CARD_MARKDOWN = "MODEL_CARD.md"
CARD_VERSION = 1

#: What the exported model expects; the card repeats it for whoever deploys the model.
INPUT_CONTRACT = (
    "RGB pixels on the 0..255 scale (not rescaled), float32, shape (batch, size, size, 3); "
    "the model applies its backbone's preprocessing itself (ResNet: RGB->BGR, ImageNet channel "
    "means subtracted; ResNetV2: scaled to [-1, 1]; the others inside the backbone)"
)


def library_versions() -> dict[str, str]:
    """Versions of what built and can load the model."""
    from importlib.metadata import PackageNotFoundError, version

    import keras

    found = {"python": platform.python_version(), "keras_backend": keras.backend.backend()}
    for package in ("autofinetune", "keras", "tensorflow", "optuna", "numpy", "tf2onnx", "onnx"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            continue
    return found


def _phase_metrics(attrs: Mapping[str, Any]) -> list[dict[str, Any]]:
    phases = []
    history = attrs.get("history") or []
    for phase in (1, 2):
        steps = [h["step"] for h in history if h.get("phase") == phase]
        if f"phase{phase}_epochs" not in attrs and not steps:
            continue
        phases.append(
            {
                "phase": phase,
                "steps": [min(steps), max(steps)] if steps else None,
                "epochs": attrs.get(f"phase{phase}_epochs", len(steps)),
                "best": attrs.get(f"phase{phase}_best"),
                "trainable_params": attrs.get(f"phase{phase}_trainable_params"),
                "seconds": attrs.get(f"phase{phase}_seconds"),
                "images_per_second": attrs.get(f"phase{phase}_images_per_second"),
            }
        )
    return phases


def build_model_card(
    study,
    trial,
    *,
    fmt_name: str,
    model_file: str,
    class_names: list[str],
    image_size: int,
    weights_source: dict[str, Any],
    storage_url: str,
    test_score: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The model card's data: where the model came from, what it takes, how well it did.

    Args:
        fmt_name: The export format.
        model_file: The model's file (or folder) name in the export.
        test_score: The model's score on the study's held-back test split, if it has one.
    """
    from autofinetune.store.attributes import BASELINE_ATTR, STUDY_FINGERPRINT_ATTR
    from autofinetune.store.database import redact_url
    from autofinetune.store.optuna_internals import study_id, trial_id
    from autofinetune.store.study import main_value, spec_from_study

    spec = spec_from_study(study)
    attrs = trial.user_attrs
    return {
        "autofinetune_model_card": CARD_VERSION,
        "format": fmt_name,
        "model_file": model_file,
        "study": {
            "name": study.study_name,
            "id": study_id(study),
            "storage": redact_url(storage_url),
            "direction": study.directions[0].name.lower(),
            "objectives": spec.objective.names,  # several: the trial is the Pareto front's best on the first
        },
        "trial": {
            "number": trial.number,
            "id": trial_id(trial),
            "state": trial.state.name,
            "value": main_value(trial),
            "values": list(trial.values) if trial.values else None,
            "best_step": attrs.get("best_step"),
            "baseline": bool(attrs.get(BASELINE_ATTR, False)),
        },
        "params": dict(trial.params),
        "metrics": _card_metrics(spec, trial, test_score),
        "unfrozen_blocks": list(attrs.get("unfrozen_blocks") or []),
        "classes": list(class_names),
        "input": {
            "height": image_size,
            "width": image_size,
            "channels": 3,
            "color": "RGB",
            "dtype": "float32",
            "range": [0, 255],
            "contract": INPUT_CONTRACT,
        },
        "output": "softmax probabilities, one per class, in the order of `classes`",
        # The trial's own where the search chose among backbones.
        "backbone": {"name": trial.params.get("backbone", spec.backbone.name), "weights": spec.backbone.weights},
        "data": {
            "source": spec.data.source,
            "image_size": spec.data.image_size,
            "validation_split": spec.data.validation_split,
            "fingerprint": study.user_attrs.get(STUDY_FINGERPRINT_ATTR),
        },
        "weights_source": weights_source,
        "versions": library_versions(),
        "exported_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "exported_on": socket.gethostname(),
    }


def _card_metrics(spec, trial, test_score: Mapping[str, Any] | None) -> dict[str, Any]:
    """The card's ``metrics``: the objective's value, each phase's, the test split's and the final choice's."""
    from autofinetune.store.attributes import SELECTION_SCORE_ATTR
    from autofinetune.store.study import main_value

    attrs = trial.user_attrs
    return {
        "objective": spec.objective.metric,
        "value": main_value(trial),
        "phase_boundary_step": attrs.get("phase_boundary_step"),
        "phases": _phase_metrics(attrs),
        "test": dict(test_score) if test_score else None,
        "test_split": spec.data.test_split,
        # The final choice's score (data.selection_split), where the study made one.
        "selection": attrs.get(SELECTION_SCORE_ATTR),
    }


def model_card_markdown(card: Mapping[str, Any]) -> str:
    """A short human-readable model card."""
    study, trial, metrics = card["study"], card["trial"], card["metrics"]
    source = card["weights_source"]
    if source.get("kind") == "checkpoint":
        origin = f"the trial's kept checkpoint (artifact `{source.get('artifact_id')}`)"
    else:
        origin = "a new training run of the trial's params" + (
            " on training **and** validation images (its validation metrics are not held out)"
            if source.get("train_on_all")
            else ""
        )
        if source.get("value") is not None:
            origin += f"; that run reached {metrics['objective']} {fmt(source['value'])}"
    lines = [
        f"# {study['name']}, trial {trial['number']}",
        "",
        f"An image classifier of {len(card['classes'])} classes: a `{card['backbone']['name']}` backbone "
        f"(initial weights: `{card['backbone']['weights']}`) fine-tuned in two phases by autofinetune.",
        "",
        f"- **model**: `{card['model_file']}` ({card['format']}), weights from {origin}",
        f"- **input**: {card['input']['height']}x{card['input']['width']} {INPUT_CONTRACT}",
        f"- **output**: {card['output']}",
        f"- **classes**: {', '.join(f'`{c}`' for c in card['classes'])}",
        f"- **{metrics['objective']}**: {fmt(metrics['value'])} at step {fmt(trial['best_step'])} "
        f"(study direction: {study['direction']}); the search selected on it",
        *_selection_lines(metrics),
        "- **test split**: " + _test_line(metrics),
        "",
        "| phase | steps | best | trainable params | images/s |",
        "| --- | --- | --- | --- | --- |",
    ]
    for phase in metrics["phases"]:
        steps = "-" if not phase["steps"] else f"{phase['steps'][0]}-{phase['steps'][1]}"
        lines.append(
            f"| {phase['phase']} | {steps} | {fmt(phase['best'])} | {fmt(phase['trainable_params'])} | "
            f"{fmt(phase['images_per_second'])} |"
        )
    lines += [
        "",
        f"- **unfrozen blocks**: {', '.join(card['unfrozen_blocks']) or 'none'}",
        "- **params**: " + ", ".join(f"{k} = {fmt(v)}" for k, v in card["params"].items()),
        f"- **data**: `{card['data']['source']}` (fingerprint `{(card['data']['fingerprint'] or '-')[:16]}`)",
        f"- **study**: `{study['name']}` (id {study['id']}) in `{study['storage']}`; trial id {trial['id']}",
        "- **versions**: " + ", ".join(f"{k} {v}" for k, v in card["versions"].items()),
        f"- **exported**: {card['exported_at']} on {card['exported_on']}",
        "",
        f"Predict: `autofinetune predict {'<this folder>'} IMAGE_OR_FOLDER...`",
        "",
    ]
    return "\n".join(lines)


def _selection_lines(metrics: Mapping[str, Any]) -> list[str]:
    selection = metrics.get("selection")
    if not selection:
        return []
    return [
        f"- **final choice**: {selection.get('metric')} {fmt(selection.get('value'))} on {selection.get('images')} "
        f"selection images no trial trained or validated on, the best of the study's best {selection.get('among')} "
        "by validation there"
    ]


def _test_line(metrics: Mapping[str, Any]) -> str:
    test = metrics.get("test")
    if test:
        return (f"accuracy {fmt(test['accuracy'])}, loss {fmt(test['loss'])} on {test['images']} images no trial saw "
                f"(measured {test.get('measured', 'when the launch ended')})")
    if metrics.get("test_split"):
        return "held back, but not measured here (the images are not here, and the launch scored another model)"
    return "none held back (data.test_split = 0): the value above is the only estimate, and the search chose by it"
