"""The dashboard's views of a study, written into the study database: notes and learning curves.

Written by the one trial path when a trial ends (whichever engine ran it) and by ``launch``
when it creates a study; ``autofinetune dashboard`` writes those that are missing before it
serves. A note is a study system attribute and a curve an artifact: both live in the study
database, which this module writes through the store layer.

The optional ``optuna_dashboard`` package is imported inside functions only: a worker without it
still runs trials (their notes are then written when ``autofinetune dashboard`` starts).
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Any, Mapping

from autofinetune.store.attributes import RECORD_WARNINGS_ATTR, STUDY_SPEC_ATTR
from autofinetune.store.retries import retried_trial_number
from autofinetune.viewing.curves import learning_curve_svg
from autofinetune.viewing.notes import study_note, trial_note
from autofinetune.store.optuna_internals import storage_of, study_id, study_system_attrs

logger = logging.getLogger(__name__)

LEARNING_CURVE_FILE = "learning_curve.svg"

# optuna-dashboard keeps a note's version in this study system attribute (see its _note.py);
# reading the study's attributes once tells which trials have a note without a query per trial.
TRIAL_NOTE_VERSION_KEY = "dashboard:{trial_id}:note_ver"
STUDY_NOTE_VERSION_KEY = "dashboard:note_ver"


def dashboard_or_none():
    """The ``optuna_dashboard`` module, or ``None`` when it is not installed."""
    try:
        import optuna_dashboard
    except ImportError:
        return None
    return optuna_dashboard


class TrialRef:
    """The parts of an ``optuna.Trial`` that ``optuna_dashboard.save_note`` reads.

    ``optuna.Trial(study, trial_id)`` would also run the sampler's ``before_trial`` hook, which
    must not happen again for a trial that is already running or finished.
    """

    def __init__(self, study, trial_id: int) -> None:
        self.study = study
        self.storage = storage_of(study)
        self._trial_id = trial_id


def _stored_spec(study) -> Mapping[str, Any]:
    stored = study.user_attrs.get(STUDY_SPEC_ATTR) or {}
    return stored.get("spec", {}) if isinstance(stored, Mapping) else {}


def write_study_note(study, *, spec_data: Mapping[str, Any] | None = None) -> bool:
    """Write the study note unless the study has one (a person may have edited it).

    Never raises: a dashboard note is worth less than the search it describes.

    Args:
        study: The study.
        spec_data: The stored spec; read from the study when left out.

    Returns:
        Whether a note was written.
    """
    dashboard = dashboard_or_none()
    if dashboard is None:
        return False
    try:
        if STUDY_NOTE_VERSION_KEY in study_system_attrs(study):
            return False
        spec_data = spec_data if spec_data is not None else _stored_spec(study)
        if not spec_data:
            return False
        dashboard.save_note(study, study_note(spec_data, direction=study.directions[0].name.lower()))
        return True
    except Exception as error:
        logger.warning("could not write the dashboard note of study %r: %s", study.study_name, error)
        return False


def write_trial_views(
    study,
    trial_id: int,
    *,
    state: str,
    value: float | None = None,
    attrs: Mapping[str, Any] | None = None,
    artifact_store=None,
) -> list[str]:
    """Upload a trial's learning curve and write its dashboard note.

    Called by the one trial path (:mod:`autofinetune.engines.trial_path`) once a trial's outcome
    is recorded, while the trial is still RUNNING (artifacts can be attached only then), and by
    ``autofinetune dashboard`` for finished trials that lack a note (a note can be written at
    any time). Never raises: what fails is logged and returned.

    Args:
        study: The study holding the trial.
        trial_id: The storage's id of the trial.
        state: The outcome: ``"COMPLETE"``, ``"PRUNED"`` or ``"FAIL"``.
        value: The objective value, for a complete trial.
        attrs: The trial's user attributes (read from the storage when left out).
        artifact_store: Where to upload ``learning_curve.svg``; ``None`` uploads nothing (a
            finished trial takes no artifact).

    Returns:
        A warning for each view that could not be written (empty when all were).
    """
    try:
        frozen = storage_of(study).get_trial(trial_id)
        attrs = {**frozen.user_attrs, **(attrs or {})}
        spec_data = _stored_spec(study)
        objective = spec_data.get("objective", {}).get("metric", "val_accuracy")
    except Exception as error:
        return _warned(trial_id, "dashboard note not written", error)
    warnings: list[str] = []
    curve_id = None
    curve_attrs = attrs if attrs.get("history") else _reported_history(frozen, spec_data, objective=objective)
    if artifact_store is not None and curve_attrs.get("history"):
        try:
            curve_id = upload_learning_curve(study, frozen, curve_attrs, objective=objective, artifact_store=artifact_store)
        except Exception as error:
            warnings += _warned(frozen.number, "learning curve not uploaded", error)
    curve_id = curve_id or find_learning_curve(frozen)
    dashboard = dashboard_or_none()
    if dashboard is None:
        return warnings
    try:
        body = trial_note(
            number=frozen.number,
            state=state,
            value=value,
            params=frozen.params,
            attrs={**attrs, RECORD_WARNINGS_ATTR: [*attrs.get(RECORD_WARNINGS_ATTR, []), *warnings]},
            objective=objective,
            pruner=spec_data.get("search", {}).get("pruner"),
            retried_from=retried_trial_number(frozen),
            # optuna-dashboard serves a trial's artifacts here; the note shows the plot inline.
            curve_url=f"/artifacts/{study_id(study)}/{trial_id}/{curve_id}" if curve_id else None,
        )
        dashboard.save_note(TrialRef(study, trial_id), body)
    except Exception as error:
        warnings += _warned(frozen.number, "dashboard note not written", error)
    return warnings


def _warned(number: int, what: str, error: BaseException) -> list[str]:
    """One warning, logged: ``what`` and the error's first line."""
    text = str(error).strip().splitlines()
    warning = f"{what}: {type(error).__name__}" + (f": {text[0][:300]}" if text else "")
    logger.warning("trial %d: %s", number, warning)
    return [warning]


def _reported_history(frozen, spec_data: Mapping[str, Any], *, objective: str) -> dict[str, Any]:
    """Curve data of a trial that ended by an exception, before its history was written: the
    objective values it reported per epoch (every engine reports each epoch as it ends)."""
    if not frozen.intermediate_values:
        return {}
    return {
        "history": [{"step": step, objective: value} for step, value in sorted(frozen.intermediate_values.items())],
        "phase_boundary_step": spec_data.get("schedule", {}).get("phase1_epochs"),
    }


def find_learning_curve(frozen) -> str | None:
    """The artifact id of the trial's ``learning_curve.svg``, if it has one."""
    for key, value in frozen.system_attrs.items():
        if not key.startswith("artifacts:"):
            continue
        try:
            meta = json.loads(value) if isinstance(value, str) else value
        except ValueError:
            continue
        if isinstance(meta, Mapping) and meta.get("filename") == LEARNING_CURVE_FILE:
            return str(meta.get("artifact_id") or key.split(":", 1)[1])
    return None


def upload_learning_curve(study, frozen, attrs: Mapping[str, Any], *, objective: str, artifact_store) -> str:
    """Upload ``learning_curve.svg`` for a RUNNING trial and return its artifact id.

    Raises:
        Exception: whatever the artifact store or the storage raised (a full disk, a finished
            trial); :func:`write_trial_views` turns it into a warning.
    """
    from optuna.artifacts import upload_artifact

    svg = learning_curve_svg(
        attrs.get("history") or [],
        objective=objective,
        boundary_step=attrs.get("phase_boundary_step"),
        title=f"trial {frozen.number}: {objective} per step",
        best_step=attrs.get("best_step"),
        pruned_at_step=attrs.get("pruned_at_step"),
    )
    with tempfile.TemporaryDirectory(prefix="autofinetune-curve-") as folder:
        path = Path(folder) / LEARNING_CURVE_FILE
        path.write_text(svg, encoding="utf-8")
        return upload_artifact(
            artifact_store=artifact_store,
            file_path=str(path),
            study_or_trial=frozen,
            storage=storage_of(study),
            mimetype="image/svg+xml",
        )
