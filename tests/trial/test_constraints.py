"""objective.constraints: limits on the trial's model, measured where it trained, recorded by the
one trial path so that the best trial is the best one that keeps them."""

from __future__ import annotations

import pytest

from autofinetune.errors import ConfigError
from autofinetune.spec import parse_spec
from autofinetune.spec.constraints import Constraint, parse_constraint

from conftest import tiny_spec_dict


def test_a_constraint_is_a_measure_a_bound_and_how_far_a_value_is_past_it():
    assert parse_constraint("latency_ms <= 15") == Constraint("latency_ms", "<=", 15.0)
    assert parse_constraint(" params>=1e3 ") == Constraint("params", ">=", 1000.0)
    assert parse_constraint("latency_ms <= 15").violation(12.0) == pytest.approx(-3.0)
    assert parse_constraint("latency_ms <= 15").violation(20.0) == pytest.approx(5.0)
    assert parse_constraint("params >= 1000").violation(400.0) == pytest.approx(600.0)


@pytest.mark.parametrize(
    ("constraints", "search", "message"),
    [
        (["latency < 3"], {}, "'latency < 3' is not a constraint; write 'MEASURE <= NUMBER'"),
        (["speed_ms <= 3"], {}, "unknown measure 'speed_ms'; allowed: params, size_mb, latency_ms"),
        (["size_mb <= 1e999"], {}, "the bound must be a finite number"),
        (["params <= 1e6"], {"sampler": "cmaes"}, "search.sampler: cmaes cannot sample under objective.constraints"),
    ],
)
def test_a_constraint_the_search_cannot_keep_is_refused_before_anything_runs(tmp_path, constraints, search, message):
    with pytest.raises(ConfigError, match=message):
        parse_spec(tiny_spec_dict(objective={"constraints": constraints}, search=search), base_dir=tmp_path)


def test_the_measures_are_taken_on_the_model(tmp_path):
    pytest.importorskip("keras")
    from autofinetune.trial.backbones import build_backbone
    from autofinetune.trial.constraints import measure_model
    from autofinetune.trial.model import build_classifier

    model = build_classifier(build_backbone("tiny_resnet", image_size=16), num_classes=3, head_units=8)
    measures = measure_model(model, ["params", "size_mb", "latency_ms"])
    assert measures["params"] == model.count_params()
    assert measures["size_mb"] > model.count_params() * 4 / 1e6  # float32 weights and the file's own data
    assert 0 < measures["latency_ms"] < 10_000
    assert measure_model(model, ["params"]) == {"params": measures["params"]}


def test_the_best_trial_is_the_best_one_that_keeps_the_constraints(tmp_path):
    """Two trials that differ only in their head: the wider one is past a parameter limit, so
    however its value compares, the narrower one is the best, for Optuna and for us alike."""
    keras = pytest.importorskip("keras")
    import optuna

    import autofinetune
    from autofinetune.store.study import best_feasible_trial
    from autofinetune.trial.backbones import build_backbone
    from autofinetune.trial.model import build_classifier
    from autofinetune.viewing.report import format_best_trial

    def params_with_head(units: int) -> int:
        return build_classifier(build_backbone("tiny_resnet", image_size=16), num_classes=3, head_units=units).count_params()

    limit = params_with_head(8) + 100
    assert params_with_head(16) > limit
    spec = tiny_spec_dict(objective={"constraints": [f"params <= {limit}"]})
    study = optuna.create_study(direction="maximize", storage=f"sqlite:///{tmp_path / 'study.db'}", study_name="c")
    study.enqueue_trial({"head_units": 16})
    study.enqueue_trial({"head_units": 8})
    study.optimize(autofinetune.objective(parse_spec(spec, base_dir=tmp_path)), n_trials=2)
    del keras

    wide, narrow = study.trials
    assert (wide.params["head_units"], narrow.params["head_units"]) == (16, 8)
    for trial in (wide, narrow):
        assert trial.user_attrs["constraint_measures"]["params"] == params_with_head(trial.params["head_units"])
    assert wide.user_attrs["constraint_violations"][0] > 0 >= narrow.user_attrs["constraint_violations"][0]
    assert max(wide.constraints.values()) > 0 >= max(narrow.constraints.values()), "recorded where Optuna reads it"
    assert study.best_trial.number == narrow.number == best_feasible_trial(study).number
    assert f"best trial: {narrow.number}" in format_best_trial(study)
    assert "within its constraints: params" in format_best_trial(study)
