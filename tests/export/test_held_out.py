"""The held-back test split end to end: scored when the launch ends, shown by status, carried by
the export's model card and the MLflow study run, whose best model MLflow itself serves."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import optuna
import pytest

from autofinetune.data.sources import load_data
from autofinetune.spec import parse_spec

from conftest import tiny_spec_dict, write_spec

HELD_OUT_SPEC = tiny_spec_dict(
    name="heldout",
    data={"synthetic_images_per_class": 24, "test_split": 0.25},
    search={"n_trials": 2, "pruner": "none", "keep_checkpoints": 1},
    schedule={"phase1_epochs": 1, "phase2_epochs": 1},
)


@pytest.mark.slow
def test_the_best_trial_is_scored_on_images_no_trial_saw_and_mlflow_serves_its_model(tmp_path, monkeypatch):
    import mlflow
    from mlflow.tracking import MlflowClient

    monkeypatch.chdir(tmp_path)
    url, uri = f"sqlite:///{tmp_path / 'study.db'}", f"sqlite:///{tmp_path / 'mlflow.db'}"
    spec_path = write_spec(tmp_path, HELD_OUT_SPEC)
    launched = subprocess.run(
        [sys.executable, "-m", "autofinetune.cli", "launch", str(spec_path), "--storage", url, "--mlflow", uri,
         "--mlflow-register", "heldout-best"],
        cwd=tmp_path, capture_output=True, text=True, timeout=900,
    )
    assert launched.returncode == 0, launched.stdout[-3000:] + launched.stderr[-3000:]
    study = optuna.load_study(study_name="heldout", storage=url)
    best = study.best_trial
    score = study.user_attrs["autofinetune:test_score"]
    assert score["trial"] == best.number and score["images"] == 18  # 3 classes x 24 images x 0.25
    assert 0 <= score["accuracy"] <= 1 and score["loss"] > 0
    line = f"test split (18 held-back images), trial {best.number}: accuracy"
    assert line in launched.stdout

    status = subprocess.run([sys.executable, "-m", "autofinetune.cli", "status", "heldout", "--storage", url],
                            capture_output=True, text=True, timeout=120)
    assert line in status.stdout

    # MLflow: the study run has the test score and the best model, which MLflow serves.
    client = MlflowClient(tracking_uri=uri)
    (parent,) = [r for r in client.search_runs([client.get_experiment_by_name("heldout").experiment_id])
                 if r.data.tags["autofinetune.role"] == "study"]
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["test_accuracy"] == pytest.approx(score["accuracy"])
    data = load_data(parse_spec(HELD_OUT_SPEC, base_dir=tmp_path))
    mlflow.set_tracking_uri(uri)
    served = mlflow.pyfunc.load_model(parent.data.tags["autofinetune.best_model_uri"])
    probabilities = np.asarray(served.predict(data.x_test.astype("float32")))
    assert probabilities.shape == (18, 3) and np.allclose(probabilities.sum(axis=1), 1, atol=1e-4)
    assert np.mean(probabilities.argmax(axis=1) == data.y_test) == pytest.approx(score["accuracy"])
    registered = mlflow.pyfunc.load_model("models:/heldout-best/1")
    assert np.allclose(np.asarray(registered.predict(data.x_test[:2].astype("float32"))), probabilities[:2], atol=1e-5)

    # The export's model card carries the same score, measured again on the exported model.
    exported = subprocess.run(
        [sys.executable, "-m", "autofinetune.cli", "export", "heldout", "--storage", url, "--out", str(tmp_path / "out")],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert exported.returncode == 0, exported.stdout[-3000:] + exported.stderr[-3000:]
    card = json.loads((tmp_path / "out" / "model_card.json").read_text())
    assert card["metrics"]["test"]["accuracy"] == pytest.approx(score["accuracy"])
    assert card["metrics"]["test"]["measured"] == "at export"
    assert "images no trial saw" in (tmp_path / "out" / "MODEL_CARD.md").read_text()
