"""One contract for every engine: the same spec lands the same record in the study database.

Each engine runs a study of the same tiny spec on an image folder; the assertions are about what
`status`, `dashboard` and `export` rely on, whatever engine ran the trials: attributes, notes,
learning curves, fail reasons, the study's class names (export works once the folder is gone).
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from autofinetune.data.sources import synthetic_images, write_image_folder
from autofinetune.search.space import optuna_distributions
from autofinetune.spec.schema import parse_spec
from autofinetune.store.database import FAIL_REASON_ATTR, STUDY_CLASSES_ATTR
from autofinetune.store.views import LEARNING_CURVE_FILE
from autofinetune.viewing.dashboard import read_trial_note

from conftest import tiny_spec_dict, write_spec

CLASS_NAMES = ["class_0", "class_1", "class_2"]

CONTRACT_SPEC = tiny_spec_dict(
    name="contract",
    data={"source": "images"},
    search={"n_trials": 3, "pruner": "none", "keep_checkpoints": 1},
    schedule={"phase1_epochs": 1, "phase2_epochs": 1},
)

#: A spec whose first trial fails: its backbone weights file cannot be loaded (a config error
#: that every engine meets inside the trial, records on it, and stops the search for).
FAILING_SPEC = tiny_spec_dict(
    name="failing",
    data={"source": "images"},
    backbone={"weights": "broken.weights.h5"},
    search={"n_trials": 1, "pruner": "none"},
    schedule={"phase1_epochs": 1, "phase2_epochs": 1},
)

#: Engine name -> extra `launch` arguments.
ENGINES = {
    "optuna": [],
    # Hyperband's budget is both phases' epochs (2 here): one bracket of full-length trials.
    "keras-tuner": ["--tuner", "hyperband"],
    "ray": ["--max-concurrent", "2", "--cpus-per-trial", "1"],
}

REQUIRED_ATTRS = (
    "phase_boundary_step", "unfrozen_blocks", "history", "phase1_best", "phase1_seconds",
    "phase1_trainable_params", "phase1_images_per_second", "host", "device",
)


def _image_folder(tmp_path: Path) -> Path:
    x, y, names = synthetic_images(16, num_classes=3, per_class=16, seed=0)
    return write_image_folder(tmp_path / "images", x, y, names)


def _launch(engine: str, spec_path: Path, url: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "autofinetune.cli", "launch", str(spec_path), "--storage", url,
         "--engine", engine, *ENGINES[engine]],
        cwd=cwd, capture_output=True, text=True, timeout=900, env=dict(os.environ),
    )


def _artifact_names(study, trial) -> set[str]:
    return {meta.filename for meta in optuna.artifacts.get_all_artifact_meta(trial, storage=study._storage)}


@pytest.mark.slow
@pytest.mark.parametrize("engine", sorted(ENGINES))
def test_engine_lands_the_same_record_in_the_study_database(engine, tmp_path):
    images = _image_folder(tmp_path)
    spec_path = write_spec(tmp_path, CONTRACT_SPEC)
    url = f"sqlite:///{tmp_path / 'study.db'}"
    out = _launch(engine, spec_path, url, tmp_path)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]

    study = optuna.load_study(study_name="contract", storage=url)
    spec = parse_spec(CONTRACT_SPEC, base_dir=tmp_path)
    trials = study.get_trials()
    finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(finished) == 3, [(t.number, t.state) for t in trials]
    assert any(t.user_attrs.get("baseline") for t in trials), "the seed recipe ran first"
    expected = optuna_distributions(spec)
    for trial in finished:
        assert trial.distributions == expected
        steps = sorted(trial.intermediate_values)
        assert steps == list(range(1, len(steps) + 1)) and steps
        for key in REQUIRED_ATTRS:
            assert key in trial.user_attrs, (engine, key)
        history = trial.user_attrs["history"]
        assert [h["step"] for h in history] == steps
        assert all(h["val_accuracy"] == pytest.approx(trial.intermediate_values[h["step"]]) for h in history)
        if trial.state == TrialState.COMPLETE:
            assert trial.value == pytest.approx(max(trial.intermediate_values.values()))
            assert math.isfinite(trial.value)
        assert "trial_seconds" in trial.user_attrs, engine
    # What the dashboard shows: every finished trial has a note and its learning curve.
    for trial in finished:
        note = read_trial_note(study, trial._trial_id)
        assert note.startswith(f"### Trial {trial.number}: "), (engine, trial.number)
        assert LEARNING_CURVE_FILE in _artifact_names(study, trial), (engine, trial.number)
        assert f"/artifacts/{study._study_id}/{trial._trial_id}/" in note, (engine, trial.number)
    # What export needs where the images are not: the class names, on the study.
    assert study.user_attrs[STUDY_CLASSES_ATTR] == CLASS_NAMES, engine
    best = study.best_trial
    assert "checkpoint_artifact_id" in best.user_attrs
    assert (tmp_path / "study.db.artifacts" / best.user_attrs["checkpoint_artifact_id"]).is_file()

    status = subprocess.run(
        [sys.executable, "-m", "autofinetune.cli", "status", "contract", "--storage", url],
        capture_output=True, text=True, timeout=120,
    )
    assert status.returncode == 0 and f"best trial: {best.number}" in status.stdout

    shutil.move(str(images), str(tmp_path / "images-elsewhere"))
    exported = subprocess.run(
        [sys.executable, "-m", "autofinetune.cli", "export", "contract", "--storage", url,
         "--out", str(tmp_path / "export")],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert exported.returncode == 0, exported.stdout[-3000:] + exported.stderr[-3000:]
    assert f"exported trial {best.number} of study 'contract'" in exported.stdout
    assert "class_2" in (tmp_path / "export" / "MODEL_CARD.md").read_text()


@pytest.mark.slow
@pytest.mark.parametrize("engine", sorted(ENGINES))
def test_engine_records_a_failed_trial_with_its_reason_and_note(engine, tmp_path):
    _image_folder(tmp_path)
    (tmp_path / "broken.weights.h5").write_bytes(b"not an HDF5 file")
    spec_path = write_spec(tmp_path, FAILING_SPEC)
    url = f"sqlite:///{tmp_path / 'study.db'}"
    out = _launch(engine, spec_path, url, tmp_path)
    # A config error met inside a trial stops the search: exit code 2, the failed trial kept.
    assert out.returncode == 2, out.stdout[-3000:] + out.stderr[-3000:]

    study = optuna.load_study(study_name="failing", storage=url)
    failed = [t for t in study.get_trials() if t.state == TrialState.FAIL]
    assert failed, (engine, [(t.number, t.state) for t in study.get_trials()])
    for trial in failed:
        reason = trial.user_attrs[FAIL_REASON_ATTR]
        assert "broken.weights.h5" in reason, (engine, reason)
        assert "host" in trial.user_attrs and "trial_seconds" in trial.user_attrs, engine
        note = read_trial_note(study, trial._trial_id)
        assert note.startswith(f"### Trial {trial.number}: FAIL"), (engine, note[:200])
        assert "broken.weights.h5" in note, engine
    assert study.user_attrs[STUDY_CLASSES_ATTR] == CLASS_NAMES, engine
