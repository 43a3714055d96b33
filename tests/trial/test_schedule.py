"""One trial of the two-phase schedule, end to end."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from autofinetune.data.sources import load_data
from autofinetune.errors import PruneTrial
from autofinetune.trial.schedule import run_trial
from autofinetune.search.space import complete_params

from conftest import REPO_ROOT, tiny_spec_dict, write_spec


class RecordingReporter:
    def __init__(self, prune_at: int | None = None):
        self.steps: list[int] = []
        self.prune_at = prune_at

    def report(self, step, metrics):
        self.steps.append(step)
        if step == self.prune_at:
            raise PruneTrial(step)


def test_phase_two_continues_the_step_count(tiny_spec):
    spec = tiny_spec(schedule={"phase1_epochs": 2, "phase2_epochs": 3})
    data = load_data(spec)
    reporter = RecordingReporter()
    result = run_trial(spec, complete_params(spec, {"unfreeze_depth": 2, "head_units": 8}), data, reporter=reporter)

    assert result.state == "complete"
    assert reporter.steps == [1, 2, 3, 4, 5]
    assert [(r.step, r.phase) for r in result.history] == [(1, 1), (2, 1), (3, 2), (4, 2), (5, 2)]
    assert result.unfrozen_blocks == ("conv5_block3", "conv5_block2")
    phase1, phase2 = result.phases
    assert phase2.trainable_params > phase1.trainable_params
    assert phase1.epochs_run == 2 and phase2.epochs_run == 3
    assert phase1.images_per_second > 0 and phase2.seconds > 0
    best = max(r.metrics["val_accuracy"] for r in result.history)
    assert result.best_value == best
    assert result.history[result.best_step - 1].metrics["val_accuracy"] == best


def test_a_users_keras_callbacks_see_every_epoch_on_the_global_index(tiny_spec):
    import keras

    class Seen(keras.callbacks.Callback):
        def __init__(self) -> None:
            super().__init__()
            self.epochs: list[tuple[int, float]] = []

        def on_epoch_end(self, epoch, logs=None) -> None:
            self.epochs.append((epoch, logs["val_accuracy"]))

    spec = tiny_spec(schedule={"phase1_epochs": 1, "phase2_epochs": 2})
    seen = Seen()
    result = run_trial(spec, complete_params(spec, {"unfreeze_depth": 1, "head_units": 8}), load_data(spec), callbacks=[seen])
    assert [epoch for epoch, _ in seen.epochs] == [0, 1, 2], "phase 2 continues the epoch index"
    assert [value for _, value in seen.epochs] == pytest.approx([r.metrics["val_accuracy"] for r in result.history])


def test_depth_zero_trains_only_the_head_in_phase_two(tiny_spec):
    spec = tiny_spec(schedule={"phase1_epochs": 1, "phase2_epochs": 1})
    result = run_trial(spec, complete_params(spec, {"unfreeze_depth": 0, "head_units": 8}), load_data(spec))
    assert result.unfrozen_blocks == ()
    assert result.phases[0].trainable_params == result.phases[1].trainable_params


def test_pruning_stops_after_the_reported_step(tiny_spec):
    spec = tiny_spec(schedule={"phase1_epochs": 2, "phase2_epochs": 2})
    reporter = RecordingReporter(prune_at=1)
    result = run_trial(spec, complete_params(spec, {"head_units": 8}), load_data(spec), reporter=reporter)
    assert result.state == "pruned" and result.pruned_at_step == 1
    assert reporter.steps == [1]
    assert len(result.phases) == 1, "a trial pruned in phase 1 never pays for fine-tuning"


def test_training_learns_the_synthetic_task(tiny_spec):
    spec = tiny_spec(schedule={"phase1_epochs": 4, "phase2_epochs": 2})
    params = complete_params(spec, {"head_units": 16, "phase1_lr": 0.01, "unfreeze_depth": 4, "phase2_lr": 0.01})
    result = run_trial(spec, params, load_data(spec))
    assert result.best_value > 1 / 3 + 0.2, result.values()


def test_non_finite_loss_fails_the_trial_with_the_reason():
    """The epoch callback turns a NaN loss into a failed trial that names step and phase."""
    import keras

    from autofinetune.trial.progress import NullReporter, TrialProgress, epoch_callback

    progress = TrialProgress("val_accuracy", "maximize", keep_best_weights=False)
    callback = epoch_callback(progress, NullReporter(), phase=2)
    callback.set_model(keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)]))
    callback.on_epoch_end(4, {"loss": math.nan, "val_accuracy": 0.5})
    assert callback.model.stop_training
    assert progress.error == "training loss became nan at step 5 (phase 2)"


def test_best_epoch_snapshot_restores_weights_a_later_phase_unfroze():
    """The snapshot holds only trainable weights; a phase that unfreezes more carries their
    pre-phase values in, so restoring gives back every weight of the best epoch."""
    import keras

    from autofinetune.trial.progress import TrialProgress

    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4, name="lower"), keras.layers.Dense(2, name="head")])
    lower, head = model.get_layer("lower"), model.get_layer("head")
    lower.trainable = False
    at_best = [np.array(w) for w in model.get_weights()]
    progress = TrialProgress("val_accuracy", "maximize", keep_best_weights=True)
    progress.snapshot(model)  # the best epoch, in "phase 1"
    assert set(progress.best_weights) == {variable.path for variable in head.weights}

    head.kernel.assign(head.kernel + 1.0)  # later phase-1 epochs
    lower.trainable = True  # "phase 2" unfreezes the lower layer
    progress.carry_snapshot_into(model)
    lower.kernel.assign(lower.kernel - 2.0)
    head.bias.assign(head.bias + 3.0)
    progress.restore_best(model)

    for restored, expected in zip(model.get_weights(), at_best):
        np.testing.assert_array_equal(restored, expected)


def test_checkpoint_is_saved_only_when_keep_checkpoint_says_so(tiny_spec, tmp_path):
    spec = tiny_spec(schedule={"phase1_epochs": 1, "phase2_epochs": 1})
    data = load_data(spec)
    params = complete_params(spec, {"head_units": 8})
    asked: list[tuple[str, float]] = []

    def refuse(state: str, value: float) -> bool:
        asked.append((state, value))
        return False

    path = tmp_path / "best.keras"
    result = run_trial(spec, params, data, checkpoint_path=path, keep_checkpoint=refuse)
    assert asked == [("complete", result.best_value)]
    assert result.checkpoint_path is None and not path.exists()

    pruned = run_trial(
        spec, params, data, reporter=RecordingReporter(prune_at=1), checkpoint_path=path,
        keep_checkpoint=lambda state, value: state == "complete",
    )
    assert pruned.state == "pruned" and pruned.checkpoint_path is None and not path.exists()


def test_checkpoint_holds_the_best_epoch(tiny_spec, tmp_path):
    import keras

    spec = tiny_spec(schedule={"phase1_epochs": 2, "phase2_epochs": 2})
    data = load_data(spec)
    path = tmp_path / "best.keras"
    result = run_trial(spec, complete_params(spec, {"head_units": 8}), data, checkpoint_path=path)
    model = keras.models.load_model(path)
    predicted = model.predict(data.x_val, verbose=0).argmax(axis=1)
    assert np.mean(predicted == data.y_val) == pytest.approx(result.best_value, abs=1e-6)


@pytest.mark.slow
def test_real_resnet50_trial_at_32x32(tmp_path):
    spec_path = write_spec(
        tmp_path,
        tiny_spec_dict(
            data={"source": "digits", "image_size": 32, "max_images_per_class": 4, "validation_split": 0.5},
            backbone={"name": "resnet50", "weights": "none"},
            schedule={"phase1_epochs": 1, "phase2_epochs": 1},
            search={"unfreeze_depth": {"low": 0, "high": 6}},
        ),
    )
    out = subprocess.run(
        [sys.executable, "-m", "autofinetune.cli", "run-trial", str(spec_path), "--json", "--param", "head_units=16"],
        capture_output=True, text=True, timeout=600, cwd=REPO_ROOT,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout)
    assert result["state"] == "complete"
    assert [r["step"] for r in result["history"]] == [1, 2]
    assert result["unfrozen_blocks"] == ["conv5_block3", "conv5_block2", "conv5_block1"]
    assert result["phases"][1]["trainable_params"] > result["phases"][0]["trainable_params"]


def test_tiny_trial_on_the_jax_backend(tmp_path):
    pytest.importorskip("jax")
    spec_path = write_spec(tmp_path, tiny_spec_dict(schedule={"phase1_epochs": 1, "phase2_epochs": 1}))
    env = dict(os.environ, KERAS_BACKEND="jax")
    code = (
        "import json, keras, sys\n"
        "from autofinetune.spec import load_spec\n"
        "from autofinetune.data.sources import load_data\n"
        "from autofinetune.trial.schedule import run_trial\n"
        "from autofinetune.search.space import complete_params\n"
        "spec = load_spec(sys.argv[1])\n"
        "r = run_trial(spec, complete_params(spec, {'head_units': 8, 'unfreeze_depth': 3}), load_data(spec))\n"
        "print(json.dumps({'backend': keras.backend.backend(), 'state': r.state, 'steps': [h.step for h in r.history],\n"
        "                  'blocks': list(r.unfrozen_blocks)}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(spec_path)], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    reported = json.loads(out.stdout.strip().splitlines()[-1])
    assert reported == {"backend": "jax", "state": "complete", "steps": [1, 2],
                        "blocks": ["conv5_block3", "conv5_block2", "conv5_block1"]}
