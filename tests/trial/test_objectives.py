"""objective.metric names any metric a trial logs; objective.pareto_with makes the study
multi-objective: every value recorded by the one trial path, the Pareto front reported, nothing
pruned."""

from __future__ import annotations

import optuna
import pytest

from autofinetune.errors import ConfigError
from autofinetune.spec import parse_spec
from autofinetune.spec.objectives import EPOCH_METRICS, LOGGED_METRICS

from conftest import tiny_spec_dict

MULTI = {"metric": "val_f1", "pareto_with": ["params", "val_loss"]}


@pytest.mark.parametrize(
    ("objective", "search", "message"),
    [
        ({"metric": "val_auc"}, {}, "objective.metric: got 'val_auc', which a trial does not log; allowed: loss, accuracy"),
        ({"metric": "latency_ms"}, {}, "objective.metric: got 'latency_ms', a measure .*objective.pareto_with"),
        ({"pareto_with": ["speed"]}, {"pruner": "none"}, "objective.pareto_with: got 'speed'.*allowed: .*latency_ms"),
        ({"pareto_with": ["latency_ms"]}, {}, "search.pruner: got 'hyperband' with objective.pareto_with; .* set search.pruner"),
        ({"pareto_with": ["latency_ms"]}, {"pruner": "none", "sampler": "cmaes"}, "search.sampler: got 'cmaes'.*nsgaii"),
        ({"pareto_with": ["val_accuracy"]}, {"pruner": "none"}, "each objective once"),
        ({"pareto_with": ["params"], "pareto_directions": ["minimize"] * 2}, {"pruner": "none"}, "one direction for each"),
    ],
)
def test_an_objective_the_trial_does_not_log_or_cannot_search_is_refused(tmp_path, objective, search, message):
    with pytest.raises(ConfigError, match=message):
        parse_spec(tiny_spec_dict(objective=objective, search=search), base_dir=tmp_path)


def test_each_objective_has_its_direction_by_default_and_the_measures_are_logged_metrics(tmp_path):
    spec = parse_spec(tiny_spec_dict(objective=MULTI, search={"pruner": "none", "sampler": "nsgaii"}), base_dir=tmp_path)
    assert spec.objective.names == ["val_f1", "params", "val_loss"]
    assert spec.objective.directions == ["maximize", "minimize", "minimize"]
    assert spec.objective.measures == ["params"]
    assert {"val_f1", "val_top_5_accuracy", "f1", "top_5_accuracy"} <= set(EPOCH_METRICS)
    assert {"params", "size_mb", "latency_ms"} <= set(LOGGED_METRICS)
    overridden = {**MULTI, "pareto_directions": ["maximize", "minimize"]}
    spec = parse_spec(tiny_spec_dict(objective=overridden, search={"pruner": "none"}), base_dir=tmp_path)
    assert spec.objective.directions == ["maximize", "maximize", "minimize"]


def test_a_study_of_several_objectives_records_every_value_and_reports_its_pareto_front(tmp_path):
    pytest.importorskip("keras")
    import autofinetune
    from autofinetune.store.study import best_feasible_trial, create_or_resume_study, pareto_front
    from autofinetune.viewing.html_report import pareto_sections
    from autofinetune.viewing.report import format_study_status, study_status_document

    raw = tiny_spec_dict(name="multi", objective=MULTI, search={"pruner": "none", "n_trials": 2, "baseline_trial": False})
    spec = parse_spec(raw, base_dir=tmp_path)
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'study.db'}")
    study, _ = create_or_resume_study(spec, storage)
    study.optimize(autofinetune.objective(spec), n_trials=2)

    trials = study.get_trials()
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE"]
    for trial in trials:
        best_step = trial.user_attrs["best_step"]
        at_best = next(h for h in trial.user_attrs["history"] if h["step"] == best_step)
        # Main metric's best epoch first, then the measure, then the other metric at that epoch.
        assert trial.values == pytest.approx([at_best["val_f1"], trial.user_attrs["constraint_measures"]["params"],
                                              at_best["val_loss"]])
        assert trial.system_attrs["autofinetune:outcome"]["values"] == pytest.approx(trial.values)
        assert {"f1", "val_f1", "top_5_accuracy", "val_top_5_accuracy"} <= set(at_best)
        assert len(trial.intermediate_values) == 4, "the main metric's curve, as every engine records it"
    front = pareto_front(study)
    assert front and {t.number for t in front} <= {t.number for t in trials}
    best = best_feasible_trial(study)
    assert best.values[0] == max(t.values[0] for t in front)
    status = format_study_status(study)
    assert f"best trial: {best.number} with value" in status and "the Pareto front's best on val_f1" in status
    assert "Pareto front (" in status and "no trial was pruned" in status
    assert "params" in status.split("Pareto front (")[1]
    document = study_status_document(study)
    assert document["pareto_front"] == [t.number for t in front] and document["best_trial"]["number"] == best.number
    page = "".join(pareto_sections(study))
    assert "Pareto front" in page and "No trial was pruned" in page

    single = parse_spec({**raw, "objective": {"metric": "val_f1"}, "search": {**raw["search"], "pruner": "median"}},
                        base_dir=tmp_path)
    with pytest.raises(ConfigError, match=r"already exists with 3 objective\(s\)"):
        create_or_resume_study(single, storage)


def test_keras_tuner_refuses_its_hyperband_for_several_objectives(tmp_path):
    """Its Hyperband stops trials early (it prunes): refused before anything runs or is written."""
    pytest.importorskip("keras_tuner")
    from autofinetune.engines.keras_tuner.options import KerasTunerOptions
    from autofinetune.engines.keras_tuner.search import launch_with_keras_tuner

    spec = parse_spec(tiny_spec_dict(objective=MULTI, search={"pruner": "none"}), base_dir=tmp_path)
    with pytest.raises(ConfigError, match="--tuner: got 'hyperband'.*use --tuner random or --tuner bayesian"):
        launch_with_keras_tuner(spec, f"sqlite:///{tmp_path / 'study.db'}", None, KerasTunerOptions(tuner="hyperband"))
    assert not (tmp_path / "study.db").exists()
