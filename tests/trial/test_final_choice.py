"""The final choice: ``data.selection_split`` holds images back from training and validation, each
finished trial's best-epoch model is scored on them, and the study's best trial is the one of its
best few by validation that scores best there."""

from __future__ import annotations

import math

import numpy as np
import optuna
import pytest

from autofinetune.data.sources import load_data
from autofinetune.errors import ConfigError
from autofinetune.spec import parse_spec
from autofinetune.store.attributes import SELECTION_SCORE_ATTR
from autofinetune.store.study import best_feasible_trial
from autofinetune.trial.selection import metric_on

from conftest import tiny_spec_dict


def test_the_selection_split_is_held_back_stratified_seeded_and_apart_from_every_other_split():
    raw = tiny_spec_dict(name="select", data={"synthetic_images_per_class": 20, "test_split": 0.25, "selection_split": 0.2})
    data = load_data(parse_spec(raw))
    assert data.has_selection_split and np.bincount(data.y_select).tolist() == [3, 3, 3]
    assert len(data.y_train) + len(data.y_val) + len(data.y_test) + len(data.y_select) == 60
    elsewhere = {image.tobytes() for image in np.concatenate([data.x_train, data.x_val, data.x_test])}
    assert not any(image.tobytes() in elsewhere for image in data.x_select), "no trial trains or validates on them"
    again = load_data(parse_spec(raw))
    assert np.array_equal(again.x_select, data.x_select) and again.fingerprint == data.fingerprint
    without = load_data(parse_spec(tiny_spec_dict(name="select", data={"synthetic_images_per_class": 20, "test_split": 0.25})))
    assert not without.has_selection_split and without.fingerprint != data.fingerprint
    assert np.array_equal(without.x_test, data.x_test), "the test split does not move"


def test_retraining_on_all_images_gives_the_selection_images_back_and_keeps_the_test_split_out():
    raw = tiny_spec_dict(name="select", data={"synthetic_images_per_class": 20, "test_split": 0.25, "selection_split": 0.2})
    data = load_data(parse_spec(raw))
    everything = data.training_on_all_but_test()
    trained = {image.tobytes() for image in everything.x_train}
    for split in (data.x_train, data.x_val, data.x_select):
        assert all(image.tobytes() in trained for image in split)
    assert not any(image.tobytes() in trained for image in data.x_test), "the test split stays out"
    assert len(everything.y_train) == len(data.y_train) + len(data.y_val) + len(data.y_select)
    assert np.bincount(everything.y_train).tolist() == [15, 15, 15]
    assert not everything.has_selection_split and np.array_equal(everything.x_val, data.x_val)
    # Cached features are keyed by the fingerprint: other training rows, another key.
    assert everything.fingerprint != data.fingerprint


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"data": {"selection_split": 0.2}, "search": {"keep_checkpoints": 1}},
         "search.keep_checkpoints: got 1 with data.selection_split.*keep at least 3"),
        ({"data": {"selection_split": 0.2}, "objective": {"pareto_with": ["params"]},
          "search": {"pruner": "none", "sampler": "nsgaii"}},
         "data.selection_split: got 0.2 with objective.pareto_with"),
        ({"data": {"selection_split": 1.5}}, "selection_split"),
        ({"objective": {"final_choice_among": 0}}, "final_choice_among"),
    ],
)
def test_a_final_choice_the_study_cannot_make_is_refused_naming_the_field(fields, message):
    with pytest.raises(ConfigError, match=message):
        parse_spec(tiny_spec_dict(**fields))


def test_a_class_too_small_for_the_selection_split_is_named():
    raw = tiny_spec_dict(data={"synthetic_images_per_class": 3, "selection_split": 0.1})
    with pytest.raises(ConfigError, match="data.selection_split: got 0.1.*selection image"):
        load_data(parse_spec(raw))


def test_each_metric_is_scored_on_the_probabilities_as_the_epoch_metric_is():
    probabilities = np.array([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3], [0.5, 0.1, 0.4], [0.2, 0.3, 0.5]])
    labels = np.array([0, 1, 2, 2])
    assert metric_on(probabilities, labels, "val_accuracy") == pytest.approx(0.75)
    loss = -np.mean(np.log([0.7, 0.6, 0.4, 0.5]))
    assert metric_on(probabilities, labels, "val_loss") == pytest.approx(loss)
    assert metric_on(probabilities, labels, "val_top_5_accuracy") == 1.0  # three classes: always in the top 5
    # Class 0: precision 1/2, recall 1; class 1: 1, 1; class 2: 1, 1/2. Macro F1 = mean of 2/3, 1, 2/3.
    assert metric_on(probabilities, labels, "val_f1") == pytest.approx((2 / 3 + 1 + 2 / 3) / 3)
    assert metric_on(probabilities, labels, "accuracy") == metric_on(probabilities, labels, "val_accuracy")


def _study_of(trials: list[tuple[float, float | None]], *, direction: str = "maximize", among: int = 3):
    """A study whose trial i has value ``trials[i][0]`` and selection score ``trials[i][1]``."""
    study = optuna.create_study(direction=direction)
    distribution = optuna.distributions.FloatDistribution(0.0, 1.0)
    for value, selection in trials:
        attrs = {} if selection is None else {
            SELECTION_SCORE_ATTR: {"metric": "val_accuracy", "value": selection, "images": 30, "among": among}
        }
        study.add_trial(optuna.trial.create_trial(
            params={"x": 0.5}, distributions={"x": distribution}, value=value, user_attrs=attrs,
        ))
    return study


def test_the_best_trial_is_the_best_on_the_selection_images_among_the_best_few_by_validation():
    # Ranked by validation: 1 (0.95), 3 (0.93), 0 (0.90), 2 (0.80); the best 3 compete.
    study = _study_of([(0.90, 0.88), (0.95, 0.80), (0.80, 0.99), (0.93, 0.85)])
    assert best_feasible_trial(study).number == 0, "trial 2 scores best there, but is fourth by validation"
    assert best_feasible_trial(_study_of([(0.90, 0.88), (0.95, 0.80), (0.80, 0.99)], among=3)).number == 2
    assert best_feasible_trial(_study_of([(0.90, 0.88), (0.95, 0.80), (0.80, 0.99)], among=2)).number == 0
    # A tie on the selection images goes to the better by validation.
    assert best_feasible_trial(_study_of([(0.90, 0.85), (0.95, 0.85)])).number == 1
    # Without any score (no selection split), the best by validation, as Optuna's best_trial.
    plain = _study_of([(0.90, None), (0.95, None), (0.80, None)])
    assert best_feasible_trial(plain).number == plain.best_trial.number == 1
    # Minimized: the lowest loss on the selection images among the 3 lowest by validation.
    losses = _study_of([(0.30, 0.50), (0.20, 0.60), (0.40, 0.45), (0.90, 0.10)], direction="minimize")
    assert best_feasible_trial(losses).number == 2


@pytest.mark.slow
def test_a_finished_trial_records_its_kept_models_score_on_the_selection_images(tmp_path):
    pytest.importorskip("keras")
    import keras

    from autofinetune.search.space import complete_params
    from autofinetune.trial.schedule import run_trial

    spec = parse_spec(tiny_spec_dict(
        name="select", data={"synthetic_images_per_class": 24, "selection_split": 0.25},
        schedule={"phase1_epochs": 2, "phase2_epochs": 1},
    ))
    data = load_data(spec)
    checkpoint = tmp_path / "best.keras"
    result = run_trial(spec, complete_params(spec, {"unfreeze_depth": 1, "head_units": 8}), data,
                       checkpoint_path=checkpoint)
    assert result.state == "complete"
    score = result.extra[SELECTION_SCORE_ATTR]
    assert (score["metric"], score["images"], score["among"]) == ("val_accuracy", 18, 3)
    # The score is the best epoch's model's: the checkpoint the trial kept, read back.
    kept = keras.saving.load_model(checkpoint)
    probabilities = np.asarray(kept.predict(data.x_select.astype("float32"), verbose=0))
    assert score["value"] == pytest.approx(metric_on(probabilities, data.y_select, "val_accuracy"))
    assert math.isfinite(score["value"])
    # A trial without the split records none.
    plain_spec = parse_spec(tiny_spec_dict(name="select", data={"synthetic_images_per_class": 24},
                                           schedule={"phase1_epochs": 1, "phase2_epochs": 0}))
    plain = run_trial(plain_spec, complete_params(plain_spec, {"head_units": 8}), load_data(plain_spec))
    assert SELECTION_SCORE_ATTR not in plain.extra
