"""One contract for every engine: the same spec lands the same record in the study database.

Each engine runs a study of the same tiny spec on an image folder; the assertions are about what
`status`, `dashboard` and `export` rely on, whatever engine ran the trials: attributes, notes,
learning curves, fail reasons, the study's class names (export works once the folder is gone).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from autofinetune.data.sources import synthetic_images, write_image_folder
from autofinetune.errors import ConfigError
from autofinetune.search.space import optuna_distributions
from autofinetune.spec import parse_spec
from autofinetune.store.attributes import (
    FAIL_REASON_ATTR,
    OUTCOME_ATTR,
    RECORD_WARNINGS_ATTR,
    SELECTION_SCORE_ATTR,
    STUDY_CLASSES_ATTR,
)
from autofinetune.store.study import best_feasible_trial
from autofinetune.viewing.trial_views import LEARNING_CURVE_FILE
from autofinetune.viewing.dashboard import read_trial_note

from conftest import tiny_spec_dict, write_spec

CLASS_NAMES = ["class_0", "class_1", "class_2"]

#: Each trial chooses its backbone among three families (MobileNetV3 and EfficientNetV2 need
#: 32-pixel images; each trial's depth goes up to its own backbone's blocks), under limits every
#: model keeps (measured and recorded all the same). Name -> the prefix of its blocks' names.
CONTRACT_BACKBONES = {"tiny_resnet": "conv", "mobilenetv3_small": "expanded_conv", "efficientnetv2-b0": "block"}
CONTRACT_CONSTRAINTS = ["params >= 1", "size_mb <= 1000", "latency_ms <= 1e6"]
CONTRACT_SPEC = tiny_spec_dict(
    name="contract",
    objective={"constraints": CONTRACT_CONSTRAINTS},
    # A quarter of the images held back for the final choice among the best trials.
    data={"source": "images", "image_size": 32, "selection_split": 0.25},
    search={"n_trials": 3, "pruner": "none", "keep_checkpoints": 3, "backbone": list(CONTRACT_BACKBONES),
            "unfreeze_depth": {"low": 0, "high": 16}, "batch_size": [8, 16], "phase1_weight_decay": [0.0, 1e-4],
            # A choice with its own parameters: momentum for RMSprop, beta_1 for Adam.
            "phase1_optimizer": ["rmsprop", "adam"], "phase1_beta_1": {"low": 0.8, "high": 0.95}},
    schedule={"phase1_epochs": 1, "phase2_epochs": 1},
)

#: A spec whose trials run long enough to be interrupted after their first epoch.
INTERRUPTED_SPEC = tiny_spec_dict(
    name="interrupted",
    data={"source": "images"},
    search={"n_trials": 2, "pruner": "none", "unfreeze_depth": 3},
    schedule={"phase1_epochs": 1, "phase2_epochs": 3},
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


def _launch(
    engine: str, spec_path: Path, url: str, cwd: Path, *extra: str, engines: dict[str, list[str]] = ENGINES
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "autofinetune.cli", "launch", str(spec_path), "--storage", url,
         "--engine", engine, *engines[engine], *extra],
        cwd=cwd, capture_output=True, text=True, timeout=900, env=dict(os.environ),
    )


def _assert_mlflow_has_every_epoch(uri: str, study, engine: str) -> None:
    """Every finished trial is an MLflow run under the study's run, with every epoch's metrics."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name(study.study_name)
    runs = client.search_runs([experiment.experiment_id])
    parent = [r.info.run_id for r in runs if r.data.tags.get("autofinetune.role") == "study"]
    children = {int(r.data.tags["autofinetune.trial_number"]): r for r in runs if r.data.tags.get("autofinetune.role") == "trial"}
    assert len(parent) == 1, engine
    for trial in study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED)):
        run = children[trial.number]
        assert run.data.tags["mlflow.parentRunId"] == parent[0], engine
        assert run.data.tags["autofinetune.state"] == trial.state.name, engine
        history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "val_accuracy")}
        assert history == pytest.approx(trial.intermediate_values), (engine, trial.number)


def _artifact_names(study, trial) -> set[str]:
    return {meta.filename for meta in optuna.artifacts.get_all_artifact_meta(trial, storage=study._storage)}


@pytest.mark.slow
@pytest.mark.parametrize("engine", sorted(ENGINES))
def test_engine_lands_the_same_record_in_the_study_database(engine, tmp_path, monkeypatch):
    # MLflow 3 keeps its file store behind this switch; the launch, its workers and Ray actors inherit it.
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    images = _image_folder(tmp_path)
    spec_path = write_spec(tmp_path, CONTRACT_SPEC)
    url = f"sqlite:///{tmp_path / 'study.db'}"
    mlflow_uri = (tmp_path / "mlruns").as_uri()
    out = _launch(engine, spec_path, url, tmp_path, "--mlflow", mlflow_uri)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]

    study = optuna.load_study(study_name="contract", storage=url)
    spec = parse_spec(CONTRACT_SPEC, base_dir=tmp_path)
    trials = study.get_trials()
    finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(finished) == 3, [(t.number, t.state) for t in trials]
    assert any(t.user_attrs.get("baseline") for t in trials), "the seed recipe ran first"
    for trial in finished:
        # Every parameter the trial has, and only those: a conditional one where its condition holds.
        assert trial.distributions == optuna_distributions(spec, trial.params), engine
        adam = trial.params["phase1_optimizer"] == "adam"
        assert ("phase1_beta_1" in trial.params, "phase1_momentum" in trial.params) == (adam, not adam), engine
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
        # The outcome was written first, by the one trial path, whatever engine told Optuna.
        outcome = trial.system_attrs[OUTCOME_ATTR]
        assert outcome["state"] == trial.state.name.lower(), (engine, outcome)
        if trial.state == TrialState.COMPLETE:
            assert outcome["value"] == trial.value, (engine, outcome)
        assert RECORD_WARNINGS_ATTR not in trial.user_attrs, (engine, trial.user_attrs.get(RECORD_WARNINGS_ATTR))
        assert "trial_seconds" in trial.user_attrs, engine
        # How the trial used the worker's kept models: one count, whatever engine ran it.
        kept = trial.user_attrs["performance"]["phases_on_kept_models"]
        assert isinstance(kept, int) and 0 <= kept <= 2, (engine, kept)
        # Its model's measures, and where Optuna reads its constraints, whatever engine ran it.
        assert set(trial.user_attrs["constraint_measures"]) == {"params", "size_mb", "latency_ms"}, engine
        assert len(trial.constraints) == len(CONTRACT_CONSTRAINTS) and max(trial.constraints.values()) <= 0, engine
        # The trial built the backbone it records: its unfrozen blocks are named like that family's.
        prefix = CONTRACT_BACKBONES[trial.params["backbone"]]
        assert all(block.startswith(prefix) for block in trial.user_attrs["unfrozen_blocks"]), (engine, trial.params)
        # Its best epoch's model scored on the selection images (3 classes x 4 of 16), whatever engine ran it.
        if trial.state == TrialState.COMPLETE:
            selection = trial.user_attrs[SELECTION_SCORE_ATTR]
            assert (selection["metric"], selection["images"], selection["among"]) == ("val_accuracy", 12, 3), engine
            assert 0.0 <= selection["value"] <= 1.0, (engine, selection)
    # What the trackers get, whatever engine ran the trials (the one recorder feeds them).
    _assert_mlflow_has_every_epoch(mlflow_uri, study, engine)
    # What the dashboard shows: every finished trial has a note and its learning curve.
    for trial in finished:
        note = read_trial_note(study, trial._trial_id)
        assert note.startswith(f"### Trial {trial.number}: "), (engine, trial.number)
        assert LEARNING_CURVE_FILE in _artifact_names(study, trial), (engine, trial.number)
        assert f"/artifacts/{study._study_id}/{trial._trial_id}/" in note, (engine, trial.number)
    # What export needs where the images are not: the class names, on the study.
    assert study.user_attrs[STUDY_CLASSES_ATTR] == CLASS_NAMES, engine
    # The best trial is the final choice: of the best 3 by validation, the best on the selection images.
    complete = [t for t in finished if t.state == TrialState.COMPLETE]
    best = best_feasible_trial(study)
    top = sorted(complete, key=lambda t: (-t.value, t.number))[:3]
    assert best.user_attrs[SELECTION_SCORE_ATTR]["value"] == max(t.user_attrs[SELECTION_SCORE_ATTR]["value"] for t in top)
    assert "checkpoint_artifact_id" in best.user_attrs
    assert (tmp_path / "study.db.artifacts" / best.user_attrs["checkpoint_artifact_id"]).is_file()

    status = subprocess.run(
        [sys.executable, "-m", "autofinetune.cli", "status", "contract", "--storage", url],
        capture_output=True, text=True, timeout=120,
    )
    assert status.returncode == 0 and f"best trial: {best.number}" in status.stdout
    assert "chosen among the best 3 by val_accuracy on 12 selection images" in status.stdout, status.stdout

    shutil.move(str(images), str(tmp_path / "images-elsewhere"))
    exported = subprocess.run(
        [sys.executable, "-m", "autofinetune.cli", "export", "contract", "--storage", url,
         "--out", str(tmp_path / "export")],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert exported.returncode == 0, exported.stdout[-3000:] + exported.stderr[-3000:]
    assert f"exported trial {best.number} of study 'contract'" in exported.stdout
    assert "class_2" in (tmp_path / "export" / "MODEL_CARD.md").read_text()
    card = json.loads((tmp_path / "export" / "model_card.json").read_text())
    assert card["backbone"]["name"] == best.params["backbone"]
    assert card["metrics"]["selection"] == best.user_attrs[SELECTION_SCORE_ATTR]
    assert "- **final choice**: val_accuracy" in (tmp_path / "export" / "MODEL_CARD.md").read_text()
    # The exported best model serves from plain Keras, whatever engine and backbone made it.
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    served = subprocess.run(
        [sys.executable, "-c", PLAIN_KERAS_PREDICT, str(tmp_path / "export" / "model.keras")],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env,
    )
    assert served.returncode == 0, served.stderr[-3000:]
    assert json.loads(served.stdout.strip().splitlines()[-1]) == [2, 3], engine


#: Loads a .keras file where autofinetune cannot be imported and prints its output's shape for
#: two 32x32 images.
PLAIN_KERAS_PREDICT = """
import json, sys
sys.modules["autofinetune"] = None  # any import of autofinetune now raises ImportError
import keras
import numpy as np

model = keras.saving.load_model(sys.argv[1], safe_mode=True)
print(json.dumps(list(model.predict(np.zeros((2, 32, 32, 3), "float32"), verbose=0).shape)))
"""


#: Several objectives: a logged metric other than accuracy first, a measure of the model beside
#: it, nothing pruned. keras-tuner searches on the main metric, with a tuner that prunes nothing.
MULTI_SPEC = tiny_spec_dict(
    name="multi",
    objective={"metric": "val_f1", "pareto_with": ["params"]},
    data={"source": "images"},
    search={"n_trials": 2, "pruner": "none", "sampler": "nsgaii", "unfreeze_depth": 1},
    schedule={"phase1_epochs": 1, "phase2_epochs": 1},
)
MULTI_ENGINES = {"optuna": [], "keras-tuner": ["--tuner", "random"], "ray": ENGINES["ray"]}


@pytest.mark.slow
@pytest.mark.parametrize("engine", sorted(MULTI_ENGINES))
def test_engine_records_every_objective_and_the_pareto_front(engine, tmp_path):
    _image_folder(tmp_path)
    spec_path = write_spec(tmp_path, MULTI_SPEC)
    url = f"sqlite:///{tmp_path / 'study.db'}"
    out = _launch(engine, spec_path, url, tmp_path, engines=MULTI_ENGINES)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]

    study = optuna.load_study(study_name="multi", storage=url)
    assert [d.name for d in study.directions] == ["MAXIMIZE", "MINIMIZE"]
    complete = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(complete) == 2, [(t.number, t.state) for t in study.get_trials()]
    for trial in complete:
        # The main metric's best epoch, then the measure: recorded the same way by every engine.
        assert trial.values[0] == pytest.approx(max(trial.intermediate_values.values())), engine
        assert trial.values[1] == trial.user_attrs["constraint_measures"]["params"], engine
        assert trial.system_attrs[OUTCOME_ATTR]["values"] == pytest.approx(trial.values), engine
    status = subprocess.run(
        [sys.executable, "-m", "autofinetune.cli", "status", "multi", "--storage", url],
        capture_output=True, text=True, timeout=120,
    )
    assert status.returncode == 0, status.stderr[-2000:]
    assert "Pareto front (" in status.stdout and "no trial was pruned" in status.stdout, status.stdout


def _running_with_an_epoch(url: str, name: str) -> list:
    try:
        trials = optuna.load_study(study_name=name, storage=url).get_trials(states=(TrialState.RUNNING,))
    except Exception:  # the study does not exist yet
        return []
    return [t for t in trials if t.intermediate_values]


@pytest.mark.slow
@pytest.mark.parametrize("engine", sorted(ENGINES))
def test_engine_records_an_interrupted_trial_with_its_reason_note_and_curve(engine, tmp_path):
    # Ctrl-C fails the running trial in every engine: the one failure all three meet inside a
    # trial, whatever the params.
    _image_folder(tmp_path)
    spec_path = write_spec(tmp_path, INTERRUPTED_SPEC)
    url = f"sqlite:///{tmp_path / 'study.db'}"
    launch = subprocess.Popen(
        [sys.executable, "-m", "autofinetune.cli", "launch", str(spec_path), "--storage", url,
         "--engine", engine, *ENGINES[engine]],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        deadline = time.time() + 600
        while not _running_with_an_epoch(url, "interrupted"):
            assert launch.poll() is None and time.time() < deadline, "no trial reported an epoch"
            time.sleep(0.2)
        launch.send_signal(signal.SIGINT)
        output, _ = launch.communicate(timeout=300)
    finally:
        launch.kill()
    assert launch.returncode == 130, output[-3000:]

    study = optuna.load_study(study_name="interrupted", storage=url)
    failed = [t for t in study.get_trials() if t.state == TrialState.FAIL]
    assert failed, (engine, [(t.number, t.state) for t in study.get_trials()])
    for trial in failed:
        assert "interrupted (Ctrl-C) while running" in trial.user_attrs[FAIL_REASON_ATTR], engine
        assert "host" in trial.user_attrs, engine
        note = read_trial_note(study, trial._trial_id)
        assert note.startswith(f"### Trial {trial.number}: FAIL") and "interrupted" in note, (engine, note[:300])
        if trial.intermediate_values:  # the curve of the epochs it ran
            assert LEARNING_CURVE_FILE in _artifact_names(study, trial), (engine, trial.number)
    assert any(t.intermediate_values for t in failed), engine
    assert study.user_attrs[STUDY_CLASSES_ATTR] == CLASS_NAMES, engine


# --- the engine registry ---------------------------------------------------------------------


def test_an_unknown_engine_name_is_refused_listing_the_engines():
    from autofinetune.engines.base import get_engine
    from autofinetune.errors import ConfigError

    with pytest.raises(ConfigError) as raised:
        get_engine("hyperopt")
    assert str(raised.value) == "--engine: got 'hyperopt'; allowed: optuna, ray, keras-tuner"


@pytest.mark.parametrize("name", sorted(ENGINES))
def test_every_registered_engine_has_its_name_and_frozen_options(name):
    import dataclasses

    from autofinetune.engines.base import get_engine

    engine = get_engine(name)
    assert engine.name == name
    options = engine.make_options(deadline=1.0, artifacts="here", progress=None)
    assert options.deadline == 1.0 and options.artifacts == "here"
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.deadline = 2.0


def test_launch_refuses_an_option_of_another_engine_or_of_none_naming_it():
    from autofinetune.engines.base import engine_options
    from autofinetune.errors import ConfigError

    assert engine_options("ray", {"gpus_per_trial": 0.5, "workers": None}).gpus_per_trial == 0.5
    with pytest.raises(ConfigError) as other:
        engine_options("optuna", {"gpus_per_trial": 0.5})
    assert str(other.value) == (
        "--gpus-per-trial belongs to the ray engine; --engine optuna takes --workers, --gpus, --trials-per-gpu"
    )
    with pytest.raises(TypeError, match="launch\\(\\) got an unexpected engine option 'gpu'; the optuna engine takes:"):
        engine_options("optuna", {"gpu": "0"})


MINIMAL_ENGINE = '''
"""A minimal engine: its trials in this process, one after another, through the one trial path."""

from dataclasses import dataclass

import optuna

from autofinetune.engines.base import Engine, EngineOptions, option
from autofinetune.engines.trial_path import TrialRecording, run_recorded_trial
from autofinetune.errors import ExitCode
from autofinetune.search.space import suggest_params
from autofinetune.store.artifacts import artifacts_location
from autofinetune.store.optuna_internals import trial_id
from autofinetune.store.study import load_study_data, study_budget


@dataclass(frozen=True)
class InlineOptions(EngineOptions):
    trials_at_most: int = option(100, kind=int, minimum=1, help="Trials this launch runs at most.")


class InlineEngine(Engine):
    name = "inline"
    options_type = InlineOptions

    def check(self, spec, options):
        pass

    def launch(self, spec, url, study, options, early=None):
        recording = TrialRecording.at(study, spec, artifacts=artifacts_location(url, options.artifacts))
        data = load_study_data(study, spec)
        while len(study.trials) < min(study_budget(study), options.trials_at_most):
            trial = study.ask()
            outcome = run_recorded_trial(
                recording, spec, suggest_params(trial, spec), data, trial_id=trial_id(trial), number=trial.number
            )
            study.tell(trial, outcome.value, state=outcome.optuna_state)
        return ExitCode.DONE
'''


def test_a_new_engine_is_a_module_and_one_registry_line(tmp_path, monkeypatch, request):
    import autofinetune
    from autofinetune.engines.base import register_engine, unregister_engine

    (tmp_path / "inline_engine.py").write_text(MINIMAL_ENGINE)
    monkeypatch.syspath_prepend(str(tmp_path))
    register_engine("inline", "inline_engine:InlineEngine")
    request.addfinalizer(lambda: unregister_engine("inline"))
    register_engine("inline", "inline_engine:InlineEngine")  # the same line again: allowed
    spec = tiny_spec_dict(name="inline", search={"n_trials": 3, "pruner": "none"}, schedule={"phase1_epochs": 1, "phase2_epochs": 1})
    study = autofinetune.launch(spec, storage=f"sqlite:///{tmp_path / 'study.db'}", engine="inline", trials_at_most=2)
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2, "its own option took effect"
    for trial in trials:  # recorded as every engine records a trial
        assert trial.system_attrs[OUTCOME_ATTR]["value"] == trial.value and trial.user_attrs["history"]
    assert trials[0].user_attrs.get("baseline"), "the baseline, queued by launch, ran first"
    with pytest.raises(ConfigError, match="engine 'optuna' is built in"):
        unregister_engine("optuna")
