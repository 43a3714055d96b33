"""Export the best trial's model, reload it, predict, and refuse bad requests with exit code 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from autofinetune.cli import main
from autofinetune.data.sources import load_data, write_image_folder
from autofinetune.export.predict import load_exported_model
from autofinetune.store.study import spec_from_study

from conftest import cli_env, tiny_spec_dict


def run_cli(*args: str, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    """The CLI in its own process: for exit codes of commands that stop before Keras loads."""
    return subprocess.run(
        [sys.executable, "-m", "autofinetune.cli", *args],
        cwd=cwd, env=cli_env(), capture_output=True, text=True, timeout=timeout,
    )


def invoke(*args: str):
    """The CLI in this process, which has Keras loaded already (saves a TensorFlow start per call)."""
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    return result


@pytest.fixture(scope="module")
def validation(launched_study):
    """The shared study's validation images and labels, exactly as its trials saw them."""
    return load_data(spec_from_study(launched_study.load()))


@pytest.fixture(scope="module")
def keras_export(launched_study, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("exports") / "best"
    result = invoke("export", launched_study.name, "--storage", launched_study.url, "--out", str(out))
    assert result.exit_code == 0, result.output
    assert f"exported trial {launched_study.load().best_trial.number}" in result.output
    return out


def _accuracy(probabilities: np.ndarray, labels: np.ndarray) -> tuple[int, float]:
    correct = int((probabilities.argmax(axis=1) == labels).sum())
    return correct, correct / len(labels)


def test_exported_best_model_reproduces_the_trials_validation_accuracy(keras_export, validation, launched_study):
    study = launched_study.load()
    best = study.best_trial
    assert best.value > 0.4, "the best model is at chance (1/3): reproducing its accuracy would prove nothing"
    model = load_exported_model(keras_export)  # keras.saving.load_model(..., safe_mode=True)
    probabilities = model.predict(validation.x_val.astype("float32"))
    correct, accuracy = _accuracy(probabilities, validation.y_val)
    # The stored value is Keras's float32 accuracy of the best epoch: the same count of images.
    assert correct == round(best.value * len(validation.y_val))
    assert accuracy == pytest.approx(best.value, abs=1e-6)

    card = json.loads((keras_export / "model_card.json").read_text())
    assert card["format"] == "keras" and (keras_export / card["model_file"]).is_file()
    assert card["trial"]["number"] == best.number and card["trial"]["id"] == best._trial_id
    assert card["study"] == {"name": "shared", "id": study._study_id, "storage": launched_study.url,
                             "direction": "maximize", "objectives": ["val_accuracy"]}
    assert card["params"] == best.params and card["metrics"]["value"] == best.value
    assert [p["phase"] for p in card["metrics"]["phases"]] == [1, 2]
    assert card["metrics"]["phases"][0]["best"] == best.user_attrs["phase1_best"]
    assert card["classes"] == list(validation.class_names) == ["class_0", "class_1", "class_2"]
    assert card["input"]["height"] == card["input"]["width"] == 16
    assert card["backbone"] == {"name": "tiny_resnet", "weights": "none"}
    assert card["data"]["fingerprint"] == study.user_attrs["autofinetune:data_fingerprint"] == validation.fingerprint
    assert card["weights_source"]["kind"] == "checkpoint"
    assert {"keras", "tensorflow", "optuna", "numpy", "python", "autofinetune"} <= set(card["versions"])
    markdown = (keras_export / "MODEL_CARD.md").read_text()
    assert "# shared, trial" in markdown and "class_0" in markdown and "0..255" in markdown


def test_savedmodel_and_tflite_exports_agree_with_keras_on_top1(keras_export, validation, launched_study, tmp_path):
    reference = load_exported_model(keras_export).predict(validation.x_val.astype("float32")).argmax(axis=1)
    for fmt, written in (("savedmodel", "saved_model"), ("tflite", "model.tflite")):
        out = tmp_path / fmt
        result = invoke("export", launched_study.name, "--storage", launched_study.url, "--out", str(out),
                        "--format", fmt)
        assert result.exit_code == 0, result.output
        assert (out / written).exists() and json.loads((out / "model_card.json").read_text())["format"] == fmt
        top1 = load_exported_model(out).predict(validation.x_val.astype("float32")).argmax(axis=1)
        assert top1.tolist() == reference.tolist(), fmt


def test_onnx_export_agrees_with_keras_on_top1_and_says_nothing_else(keras_export, validation, launched_study, tmp_path):
    pytest.importorskip("tf2onnx")
    pytest.importorskip("onnxruntime")
    reference = load_exported_model(keras_export).predict(validation.x_val.astype("float32")).argmax(axis=1)
    # In its own process: the test run itself ignores library warnings, a user's does not.
    result = run_cli("export", launched_study.name, "--storage", launched_study.url, "--out", str(tmp_path / "onnx"),
                     "--format", "onnx", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Warning" not in result.stdout + result.stderr, result.stderr
    top1 = load_exported_model(tmp_path / "onnx").predict(validation.x_val.astype("float32")).argmax(axis=1)
    assert top1.tolist() == reference.tolist()


def test_an_export_is_readable_by_others_as_the_umask_allows(keras_export):
    import stat

    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(keras_export.stat().st_mode) == 0o777 & ~mask, "the export's folder, not a private temp one"
    for path in keras_export.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask, path.name


def test_predict_names_a_corrupt_image_and_classifies_the_rest(keras_export, validation, launched_study, tmp_path):
    folder = write_image_folder(tmp_path / "images", validation.x_val, validation.y_val, validation.class_names)
    broken = folder / "class_0" / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    missing = tmp_path / "nowhere.jpg"

    result = CliRunner().invoke(main, ["predict", str(keras_export), str(folder), str(missing), "--json",
                                       "--top-k", "2"])
    assert result.exit_code == 1, result.output
    assert f"error: {broken}: not a readable image" in result.stderr
    assert f"error: {missing}: no such file or folder" in result.stderr
    report = json.loads(result.stdout)
    assert {e["file"] for e in report["errors"]} == {str(broken), str(missing)}
    predictions = report["predictions"]
    assert len(predictions) == len(validation.y_val)
    assert all(len(p["predictions"]) == 2 for p in predictions)
    # Read back from PNG files, the images give the trial's validation accuracy again.
    correct = sum(Path(p["file"]).parent.name == p["predictions"][0]["label"] for p in predictions)
    assert correct == round(launched_study.load().best_trial.value * len(validation.y_val))

    plain = CliRunner().invoke(main, ["predict", str(keras_export), str(folder / "class_1")])
    assert plain.exit_code == 0 and plain.stdout.count(" (") == 3 * len(list((folder / "class_1").iterdir()))


BARE_KERAS_PREDICT = """
import json, sys
sys.modules["autofinetune"] = None  # any import of autofinetune now raises ImportError
import keras
import numpy as np
from PIL import Image

model_path, files = sys.argv[1], sys.argv[2:]
model = keras.saving.load_model(model_path, safe_mode=True)
pixels = np.stack([np.asarray(Image.open(f).convert("RGB"), dtype="float32") for f in files])
print(json.dumps(model.predict(pixels, verbose=0).tolist()))
"""


def test_keras_export_loads_where_autofinetune_cannot_be_imported(keras_export, validation, tmp_path):
    """A serving Python without autofinetune loads the .keras file (safe mode, no custom objects)
    and predicts what `autofinetune predict` predicts on the same images."""
    folder = write_image_folder(tmp_path / "images", validation.x_val[:6], validation.y_val[:6], validation.class_names)
    files = sorted(str(p) for p in folder.rglob("*.png"))
    env = {key: value for key, value in cli_env().items() if key != "PYTHONPATH"}
    bare = subprocess.run(
        [sys.executable, "-c", BARE_KERAS_PREDICT, str(keras_export / "model.keras"), *files],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert bare.returncode == 0, bare.stderr[-3000:]
    probabilities = np.asarray(json.loads(bare.stdout.strip().splitlines()[-1]))

    result = CliRunner().invoke(main, ["predict", str(keras_export), *files, "--json", "--top-k", "3"])
    assert result.exit_code == 0, result.output
    predicted = {p["file"]: p["predictions"] for p in json.loads(result.stdout)["predictions"]}
    classes = list(validation.class_names)
    for row, name in zip(probabilities, files):
        for entry in predicted[name]:
            assert row[classes.index(entry["label"])] == pytest.approx(entry["probability"], abs=1e-5)


def test_export_overwrites_only_when_asked_and_only_an_earlier_export(keras_export, launched_study, tmp_path):
    url = launched_study.url
    refused = run_cli("export", "shared", "--storage", url, "--out", str(keras_export), cwd=tmp_path)
    assert refused.returncode == 2 and "is not empty; pass --overwrite" in refused.stderr
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("mine")
    refused = run_cli("export", "shared", "--storage", url, "--out", str(stranger), "--overwrite", cwd=tmp_path)
    assert refused.returncode == 2 and "is not an earlier export" in refused.stderr
    assert (stranger / "notes.txt").read_text() == "mine"

    before = (keras_export / "model_card.json").read_text()
    again = invoke("export", "shared", "--storage", url, "--out", str(keras_export), "--overwrite")
    assert again.exit_code == 0, again.output
    assert json.loads((keras_export / "model_card.json").read_text())["exported_at"] >= json.loads(before)["exported_at"]
    assert not [p for p in keras_export.parent.iterdir() if ".partial-" in p.name]


def test_export_without_a_kept_checkpoint_needs_retrain(launched_study, validation, tmp_path):
    study = launched_study.load()
    other = next(t for t in study.trials if "checkpoint_artifact_id" not in t.user_attrs)
    out = tmp_path / "retrained"
    refused = run_cli("export", "shared", "--storage", launched_study.url, "--trial", str(other.number),
                      "--out", str(out), cwd=tmp_path)
    assert refused.returncode == 2
    assert f"trial {other.number} kept no checkpoint" in refused.stderr and "--retrain" in refused.stderr
    assert not out.exists()

    result = invoke("export", "shared", "--storage", launched_study.url, "--trial", str(other.number),
                    "--out", str(out), "--retrain")
    assert result.exit_code == 0, result.output
    card = json.loads((out / "model_card.json").read_text())
    assert card["trial"]["number"] == other.number and card["weights_source"]["kind"] == "retrained"
    # Same seed, same data, same params: the retrained model scores what its record says it scored.
    probabilities = load_exported_model(out).predict(validation.x_val.astype("float32"))
    assert _accuracy(probabilities, validation.y_val)[1] == pytest.approx(card["weights_source"]["value"], abs=1e-6)


# --- bad requests: exit code 2, a message naming what is wrong, nothing written ----------------


@pytest.fixture(scope="module")
def empty_study(tmp_path_factory) -> str:
    """A study created but never run: no completed trial."""
    from autofinetune.spec import parse_spec
    from autofinetune.store.database import open_storage
    from autofinetune.store.study import create_or_resume_study

    folder = tmp_path_factory.mktemp("empty")
    url = f"sqlite:///{folder / 'empty.db'}"
    create_or_resume_study(parse_spec(tiny_spec_dict(name="empty"), base_dir=folder), open_storage(url))
    return url


def test_export_of_a_study_without_completed_trials_exits_2(empty_study, tmp_path):
    out = run_cli("export", "empty", "--storage", empty_study, "--out", str(tmp_path / "m"), cwd=tmp_path)
    assert out.returncode == 2
    assert "study 'empty' has no completed trial to export (trials: 0: WAITING)" in out.stderr
    assert not (tmp_path / "m").exists()


def test_export_of_an_unknown_trial_exits_2(launched_study, tmp_path):
    out = run_cli("export", "shared", "--storage", launched_study.url, "--trial", "42", "--out", str(tmp_path / "m"),
                  cwd=tmp_path)
    assert out.returncode == 2
    assert "--trial: got 42; study 'shared' has trials 0..2" in out.stderr


def test_export_into_an_unwritable_folder_exits_2(launched_study, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    out = run_cli("export", "shared", "--storage", launched_study.url, "--out", str(blocker / "model"), cwd=tmp_path)
    assert out.returncode == 2
    assert f"--out: cannot write to {str(blocker / 'model')!r}" in out.stderr
    if os.geteuid() != 0:  # root writes through permission bits, so this half needs another user
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o555)
        out = run_cli("export", "shared", "--storage", launched_study.url, "--out", str(locked / "m"), cwd=tmp_path)
        assert out.returncode == 2 and "Permission denied" in out.stderr


def test_export_of_an_unknown_study_or_format_exits_2(launched_study, tmp_path):
    out = run_cli("export", "nope", "--storage", launched_study.url, "--out", str(tmp_path / "m"), cwd=tmp_path)
    assert out.returncode == 2 and "study 'nope' does not exist in this database; existing studies: shared" in out.stderr
    out = run_cli("export", "shared", "--storage", launched_study.url, "--out", str(tmp_path / "m"),
                  "--train-on-all", cwd=tmp_path)
    assert out.returncode == 2 and "--train-on-all: only together with --retrain" in out.stderr


def test_predict_on_a_folder_that_is_no_export_exits_2(tmp_path):
    (tmp_path / "image.png").write_bytes(b"")
    out = run_cli("predict", str(tmp_path), str(tmp_path / "image.png"), cwd=tmp_path)
    assert out.returncode == 2 and "holds no model_card.json" in out.stderr
