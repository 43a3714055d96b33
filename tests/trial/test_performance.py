"""The performance switches: mixed precision, XLA, input pipelines, the decoded-image cache,
and the GPU throughput benchmark's CPU dry run."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import numpy as np
import pytest

from autofinetune.spec import PerformanceSpec, parse_spec
from autofinetune.data.sources import load_data, synthetic_images, write_image_folder
from autofinetune.errors import ConfigError
from autofinetune.trial.schedule import run_trial
from autofinetune.search.space import complete_params

from conftest import REPO_ROOT, tiny_spec_dict

# 48 synthetic images, a quarter for validation: 36 + 12, whole batches of 12, so a jitted
# step compiles for one batch shape only.
WHOLE_BATCHES = {"batch_size": 12}


# --- spec --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "performance, message",
    [
        ({"mixed_precision": "fp16"}, r"performance\.mixed_precision: got 'fp16'; .*'off', 'mixed_float16' or 'mixed_bfloat16'"),
        ({"jit_compile": "yes"}, r'performance\.jit_compile: got \'yes\'; allowed: true, false or "auto"'),
        ({"input_pipeline": "dali"}, r"performance\.input_pipeline: got 'dali'; .*'numpy', 'auto', 'tf_data' or 'py_dataset'"),
        ({"input_workers": 0}, r"performance\.input_workers: got 0; .*greater than or equal to 1"),
        ({"xla": True}, r"performance\.xla: unknown field; allowed: mixed_precision, jit_compile"),
    ],
)
def test_bad_switches_name_field_value_and_what_is_allowed(performance, message):
    with pytest.raises(ConfigError, match=message):
        parse_spec(tiny_spec_dict(performance=performance), origin="s.toml")


def test_switches_are_off_by_default():
    perf = parse_spec(tiny_spec_dict()).performance
    assert (perf.mixed_precision, perf.jit_compile, perf.input_pipeline, perf.image_cache) == ("off", "auto", "numpy", False)


# --- mixed precision ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "mixed_precision, compute, scaled",
    [("off", "float32", False), ("mixed_float16", "float16", True), ("mixed_bfloat16", "bfloat16", False)],
)
def test_policy_scope_builds_mixed_layers_and_scales_only_float16_losses(mixed_precision, compute, scaled):
    import keras

    from autofinetune.trial.backbones import build_backbone
    from autofinetune.trial.model import build_classifier, compile_for_training, make_optimizer
    from autofinetune.trial.performance import compile_options, keras_session

    with keras_session(PerformanceSpec(mixed_precision=mixed_precision)):
        model = build_classifier(build_backbone("tiny_resnet", image_size=8), num_classes=3, head_units=4)
        view = compile_for_training(
            model, make_optimizer("sgd", learning_rate=0.01, momentum=0.9), **compile_options(PerformanceSpec())
        )
    assert model.get_layer("head_dense").compute_dtype == compute
    assert model.get_layer("logits").compute_dtype == "float32"
    assert model.get_layer("predictions").compute_dtype == "float32"
    assert model.output.dtype == "float32" and view.output.dtype == "float32"
    assert isinstance(view.optimizer, keras.optimizers.LossScaleOptimizer) is scaled
    assert keras.config.dtype_policy().name == "float32"


def test_keras_session_restores_the_callers_policy_when_the_trial_raises():
    import keras

    from autofinetune.trial.performance import keras_session

    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        with pytest.raises(RuntimeError, match="boom"):
            with keras_session(PerformanceSpec(mixed_precision="mixed_float16")):
                assert keras.config.dtype_policy().name == "mixed_float16"
                raise RuntimeError("boom")
        assert keras.config.dtype_policy().name == "mixed_bfloat16"
    finally:
        keras.config.set_dtype_policy("float32")


def test_mixed_float16_trial_has_a_float32_softmax_and_finite_loss(tiny_spec, tmp_path):
    import keras

    spec = tiny_spec(
        data=WHOLE_BATCHES,
        schedule={"phase1_epochs": 2, "phase2_epochs": 0},
        performance={"mixed_precision": "mixed_float16"},
    )
    path = tmp_path / "best.keras"
    result = run_trial(spec, complete_params(spec, {"head_units": 8}), load_data(spec), checkpoint_path=path)

    assert result.state == "complete", result.error
    assert all(math.isfinite(r.metrics["loss"]) for r in result.history)
    performance = dict(result.extra["performance"])
    assert performance.pop("phases_on_kept_models") in (0, 1)  # 1 after an earlier trial of that head
    assert performance == {
        "dtype_policy": "mixed_float16", "jit_compile": False, "loss_scaling": True, "input_pipeline": "numpy",
    }
    assert keras.config.dtype_policy().name == "float32", "the trial's policy must not outlive it"
    model = keras.models.load_model(path)
    assert model.get_layer("predictions").compute_dtype == "float32"
    assert model.get_layer("head_dense").compute_dtype == "float16"
    assert model.predict(np.zeros((1, 16, 16, 3), np.uint8), verbose=0).dtype == np.float32


# --- XLA ---------------------------------------------------------------------------------


def test_xla_switch_compiles_and_trains_one_epoch(tiny_spec):
    import keras

    if keras.backend.backend() != "tensorflow":
        pytest.skip("checks XLA on the TensorFlow backend, where it is off unless asked for on a CPU")
    spec = tiny_spec(data=WHOLE_BATCHES, schedule={"phase1_epochs": 1, "phase2_epochs": 0}, performance={"jit_compile": True})
    result = run_trial(spec, complete_params(spec, {"head_units": 8}), load_data(spec))
    assert result.state == "complete", result.error
    assert [r.step for r in result.history] == [1] and math.isfinite(result.history[0].metrics["loss"])
    assert result.extra["performance"]["jit_compile"] is True


# --- input pipelines ---------------------------------------------------------------------


def _epoch_rows(batches) -> list[int]:
    return sorted(int(v) for xb, _ in batches for v in xb[:, 0])


def test_numpy_pipeline_is_the_schedules_seeded_order_continued_across_phases():
    # The trials' default path, and the one benchmarks/gpu_throughput.py measures as "numpy".
    from autofinetune.trial.inputs import epoch_order, make_fit_inputs

    x = np.arange(23, dtype=np.int32).reshape(23, 1)
    y = x * 10
    phase2 = make_fit_inputs(x, y, x, y, batch_size=5, pipeline="numpy", seed=7, first_epoch=2).fit_kwargs
    train, val = phase2["x"], phase2["validation_data"]
    assert phase2["steps_per_epoch"] == 5 and phase2["shuffle"] is False
    # Batch i of the endless training set belongs to global epoch 2 + i // 5.
    epoch = lambda k: [int(v) for i in range(5 * k, 5 * k + 5) for v in train[i][0][:, 0]]  # noqa: E731
    assert epoch(0) == list(epoch_order(7, 2, 23))
    assert epoch(1) == list(epoch_order(7, 3, 23)) != epoch(0)
    assert all(np.array_equal(train[i][0] * 10, train[i][1]) for i in range(5)), "images and labels stay paired"
    assert [int(v) for i in range(len(val)) for v in val[i][0][:, 0]] == list(range(23)), "validation in order"


@pytest.mark.parametrize("pipeline", ["py_dataset", "tf_data"])
def test_pipelines_give_every_sample_once_per_epoch_in_a_new_seeded_order(pipeline):
    from autofinetune.trial.inputs import ArrayBatches

    x = np.arange(23, dtype=np.int32).reshape(23, 1)
    y = x * 10
    if pipeline == "py_dataset":
        dataset = ArrayBatches(x, y, batch_size=5, shuffle=True, seed=3, workers=2)
        again = ArrayBatches(x, y, batch_size=5, shuffle=True, seed=3, workers=2)
        first = [dataset[i] for i in range(len(dataset))]
        same = [again[i] for i in range(len(again))]
        dataset.on_epoch_end()
        second = [dataset[i] for i in range(len(dataset))]
    else:
        pytest.importorskip("tensorflow")
        from autofinetune.trial.inputs_tf import array_dataset

        dataset = array_dataset(x, y, batch_size=5, shuffle=True, seed=3)
        first, second = (list(dataset.as_numpy_iterator()) for _ in range(2))
        same = list(array_dataset(x, y, batch_size=5, shuffle=True, seed=3).as_numpy_iterator())
    assert [len(b[0]) for b in first] == [5, 5, 5, 5, 3]
    assert _epoch_rows(first) == _epoch_rows(second) == list(range(23))
    assert all(np.array_equal(xb * 10, yb) for xb, yb in first), "images and labels stay paired"
    order = lambda batches: [int(v) for xb, _ in batches for v in xb[:, 0]]  # noqa: E731
    assert order(first) != order(second), "each epoch draws a new order"
    assert order(first) == order(same), "the same seed gives the same order"


@pytest.mark.parametrize("pipeline, concrete", [("py_dataset", "py_dataset"), ("auto", None)])
def test_a_trial_trains_through_an_input_pipeline(tiny_spec, pipeline, concrete):
    import keras

    concrete = concrete or ("tf_data" if keras.backend.backend() == "tensorflow" else "py_dataset")
    # Two epochs: the pipeline is iterated again after its end-of-epoch reshuffle.
    spec = tiny_spec(data=WHOLE_BATCHES, schedule={"phase1_epochs": 2, "phase2_epochs": 0}, performance={"input_pipeline": pipeline})
    result = run_trial(spec, complete_params(spec, {"head_units": 8}), load_data(spec))
    assert result.state == "complete", result.error
    assert [r.step for r in result.history] == [1, 2]
    assert all(math.isfinite(r.metrics["val_loss"]) for r in result.history)
    assert result.extra["performance"]["input_pipeline"] == concrete


# --- decoded-image cache -----------------------------------------------------------------


def _folder_spec(folder, cache_dir, **performance):
    return parse_spec(
        tiny_spec_dict(
            data={"source": str(folder), "image_size": 8},
            performance={"image_cache": True, "image_cache_dir": str(cache_dir), **performance},
        )
    )


def test_decoded_image_cache_is_reused_and_rebuilt_when_a_file_changes(tmp_path, monkeypatch):
    import autofinetune.data.sources as data_module
    from PIL import Image

    x, y, names = synthetic_images(8, 3, 6, seed=0)
    folder = write_image_folder(tmp_path / "imgs", x, y, names)
    cache_dir = tmp_path / "cache"
    decoded: list[str] = []
    real_load_image = data_module.load_image

    def counting_load_image(path, image_size):
        decoded.append(str(path))
        return real_load_image(path, image_size)

    monkeypatch.setattr(data_module, "load_image", counting_load_image)
    spec = _folder_spec(folder, cache_dir)

    first = load_data(spec)
    assert len(decoded) == 18
    cached = sorted(cache_dir.glob("*.npy"))
    assert len(cached) == 1

    again = load_data(spec)
    assert len(decoded) == 18, "the second load reads the cache instead of decoding"
    assert again.fingerprint == first.fingerprint
    np.testing.assert_array_equal(again.x_val, first.x_val)

    # Another process reads the same cache without decoding a single image.
    code = (
        "import sys, autofinetune.data.sources as d\n"
        "from autofinetune.spec import parse_spec\n"
        "def fail(path, size): raise AssertionError(f'decoded {path}')\n"
        "d.load_image = fail\n"
        "spec = parse_spec({'name': 't', 'data': {'source': sys.argv[1], 'image_size': 8, 'validation_split': 0.25},\n"
        "                   'backbone': {'name': 'tiny_resnet'},\n"
        "                   'performance': {'image_cache': True, 'image_cache_dir': sys.argv[2]}})\n"
        "print(d.load_data(spec).fingerprint)\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
    out = subprocess.run([sys.executable, "-c", code, str(folder), str(cache_dir)], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == first.fingerprint

    # A changed file (new pixels, new modification time) rebuilds the cache and drops the old file.
    victim = sorted(folder.rglob("*.png"))[0]
    Image.fromarray(255 - np.asarray(Image.open(victim))).save(victim)
    stat = victim.stat()
    os.utime(victim, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    changed = load_data(spec)
    assert len(decoded) == 36
    assert changed.fingerprint != first.fingerprint
    assert sorted(cache_dir.glob("*.npy")) != cached and len(list(cache_dir.glob("*.npy"))) == 1
    monkeypatch.setattr(data_module, "load_image", real_load_image)
    uncached = load_data(parse_spec(tiny_spec_dict(data={"source": str(folder), "image_size": 8})))
    assert uncached.fingerprint == changed.fingerprint, "cached and decoded images are the same pixels"


def test_unwritable_cache_folder_is_a_config_error(tmp_path):
    x, y, names = synthetic_images(8, 3, 4, seed=0)
    folder = write_image_folder(tmp_path / "imgs", x, y, names)
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder should be")
    with pytest.raises(ConfigError, match=r"performance\.image_cache_dir: cannot use the image cache in"):
        load_data(_folder_spec(folder, blocker / "cache"))


# --- the GPU benchmark, dry run on CPU ---------------------------------------------------


@pytest.mark.slow
def test_benchmark_dry_run_prints_its_table(tmp_path):
    out_file = tmp_path / "table.txt"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
    out = subprocess.run(
        [
            sys.executable, str(REPO_ROOT / "benchmarks" / "gpu_throughput.py"), "--dry-run",
            "--phases", "1,2:1", "--precisions", "mixed_bfloat16", "--pipelines", "auto",
            "--out", str(out_file),
        ],
        capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "DRY RUN on CPU" in out.stdout and "device: " in out.stdout
    assert "reference ceiling: NVIDIA DeepLearningExamples" in out.stdout
    rows = [line for line in out.stdout.splitlines() if line.startswith(("1 ", "2 (depth 1)"))]
    assert len(rows) == 4, out.stdout  # 2 phases x 2 sources
    for row in rows:
        assert "mixed_bfloat16" in row, "the model must really be built under the policy"
        assert "error" not in row and "skipped" not in row
        assert row.split()[-1].endswith("x"), row  # the ratio to the reference
    assert "second load_data (memory-mapped image cache" in out.stdout
    assert out_file.read_text() in out.stdout, "--out holds the printed table"
