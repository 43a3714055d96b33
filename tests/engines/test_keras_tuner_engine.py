"""keras-tuner: the search-space translation, the HyperModel, and searches mirrored into the study.

The translation tests need no training. The HyperModel and Hyperband tests train the tiny
backbone for real. The bookkeeping tests (failures, Ctrl-C, a killed search) replace the schedule
with a stand-in that returns at once, so they check the engine's records, not training.
"""

from __future__ import annotations

import math
import os
import signal
import statistics
import subprocess
import sys

import optuna
import pytest
from optuna.trial import TrialState

from autofinetune.spec import parse_spec
from autofinetune.errors import ConfigError
from autofinetune.trial.results import EpochRecord, PhaseSummary, TrialResult
from autofinetune.engines.keras_tuner.space import admits, keras_tuner_params, params_from_keras_tuner
from autofinetune.search.space import baseline_params, optuna_distributions
from autofinetune.store.attributes import FAIL_REASON_ATTR
from autofinetune.store.database import open_storage
from autofinetune.store.study import budget_used, create_or_resume_study

from conftest import REPO_ROOT, tiny_spec_dict

kt = pytest.importorskip("keras_tuner")


# --- the translation: every kind of parameter a spec allows ---------------------------------

#: search-space entry -> (keras-tuner class, the values it takes or None for a continuous range)
KINDS = {
    "choice of ints": ({"head_units": [8, 16, 32]}, "Choice", {8, 16, 32}),
    "choice of floats": ({"dropout": [0.0, 0.25, 0.5]}, "Choice", {0.0, 0.25, 0.5}),
    "fixed value": ({"label_smoothing": 0.1}, "Fixed", {0.1}),
    "int range": ({"unfreeze_depth": {"low": 0, "high": 16}}, "Int", set(range(17))),
    "int range with step": ({"unfreeze_depth": {"low": 1, "high": 16, "step": 3}}, "Int", {1, 4, 7, 10, 13, 16}),
    "int range, log": ({"head_units": {"low": 8, "high": 1024, "log": True}}, "Int", None),
    "float range": ({"phase1_momentum": {"low": 0.0, "high": 0.9}}, "Float", None),
    "float range, log": ({"phase1_lr": {"low": 1e-4, "high": 1e-1, "log": True}}, "Float", None),
    # keras-tuner's own Float(step=0.1) over [0, 0.9] loses 0.9 and yields 0.30000000000000004.
    "float range with step": (
        {"phase2_momentum": {"low": 0.0, "high": 0.9, "step": 0.1}},
        "Choice",
        {0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9},
    ),
    # Not a whole number of steps: the grid stops below high, as Optuna's distribution does.
    "float range, step not dividing": (
        {"label_smoothing": {"low": 0.0, "high": 0.25, "step": 0.1}}, "Choice", {0.0, 0.1, 0.2},
    ),
}


def _declared(spec):
    hp = kt.HyperParameters()
    keras_tuner_params(hp, spec)
    return hp, {p.name: p for p in hp.space}


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_translation_round_trips_every_kind_of_parameter(kind):
    search, expected_class, expected_values = KINDS[kind]
    (name,) = search
    spec = parse_spec(tiny_spec_dict(search={**search, "n_trials": 1}))
    param = spec.search.params()[name]
    distribution = optuna_distributions(spec)[name]
    hp, declared = _declared(spec)
    hyperparameter = declared[name]
    assert type(hyperparameter).__name__ == expected_class
    if isinstance(hyperparameter, (kt.engine.hyperparameters.Int, kt.engine.hyperparameters.Float)):
        assert hyperparameter.sampling == ("log" if param.log else "linear")

    samples = [hyperparameter.random_sample(seed) for seed in range(400)]
    if expected_values is not None:
        assert set(samples) == expected_values  # every value reachable, bounds included, nothing else
    else:
        assert param.low <= min(samples) and max(samples) <= param.high
    if isinstance(hyperparameter, kt.engine.hyperparameters.Int) and param.step is None:
        # Inclusive integer bounds: the lowest and highest probabilities give low and high.
        assert hyperparameter.prob_to_value(0.0) == param.low
        assert hyperparameter.prob_to_value(1 - 1e-12) == param.high
    if getattr(param, "log", False):
        # Log sampling: half the samples lie below the geometric middle of the range.
        middle = math.sqrt(param.low * param.high)
        assert 0.4 < statistics.mean(s < middle for s in samples) < 0.6

    others = baseline_params(spec)
    for value in samples:
        assert admits(param, value), value
        assert distribution._contains(distribution.to_internal_repr(value)), value
        params = params_from_keras_tuner({**others, name: value}, spec)
        assert params[name] == value and type(params[name]) is type(value)
        # The same record the study database takes from every engine.
        optuna.trial.create_trial(params=params, distributions=optuna_distributions(spec, params), value=0.0)


def test_keras_tuner_defaults_are_the_seed_recipe():
    spec = parse_spec(tiny_spec_dict(search={"phase2_momentum": {"low": 0.0, "high": 0.95, "step": 0.05}}))
    hp, declared = _declared(spec)
    defaults = {name: declared[name].default for name in declared}
    baseline = baseline_params(spec)
    assert defaults == pytest.approx(baseline)
    assert keras_tuner_params(kt.HyperParameters(), spec) == defaults
    assert defaults["phase2_momentum"] == 0.9  # the grid's value, not 18 * 0.05 = 0.9000000000000001


def test_values_outside_the_space_are_refused_naming_field_value_and_allowed():
    spec = parse_spec(tiny_spec_dict())
    values = {**baseline_params(spec), "head_units": 12}
    with pytest.raises(ConfigError, match=r"parameter head_units: got 12; .* allows one of \[8, 16\]"):
        params_from_keras_tuner(values, spec)
    with pytest.raises(ConfigError, match="no value for parameter 'dropout'"):
        params_from_keras_tuner({k: v for k, v in baseline_params(spec).items() if k != "dropout"}, spec)


def test_a_step_grid_too_long_for_a_choice_is_a_config_error():
    spec = parse_spec(tiny_spec_dict(search={"phase1_momentum": {"low": 0.0, "high": 0.9, "step": 1e-5}}))
    with pytest.raises(ConfigError, match=r"search.phase1_momentum: a step of 1e-05 over \[0, 0.9\] gives 90001 values"):
        keras_tuner_params(kt.HyperParameters(), spec)


def test_missing_keras_tuner_names_the_extra_and_the_package_imports_without_it():
    code = (
        "import sys; sys.modules['keras_tuner'] = None\n"
        "import autofinetune\n"
        "assert 'TwoPhaseHyperModel' in autofinetune.__all__\n"
        "try:\n"
        "    autofinetune.TwoPhaseHyperModel\n"
        "except ImportError as error:\n"
        "    assert isinstance(error, autofinetune.ConfigError)\n"
        "    print(error)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)))
    assert out.returncode == 0, out.stderr
    assert "pip install 'autofinetune[keras-tuner]'" in out.stdout


# --- the HyperModel's own checks ------------------------------------------------------------


def test_hypermodel_fit_refuses_data_arguments_and_bad_budgets(tiny_spec):
    from autofinetune import TwoPhaseHyperModel

    hypermodel = TwoPhaseHyperModel(tiny_spec(schedule={"phase1_epochs": 1, "phase2_epochs": 2}))
    assert hypermodel.max_epochs == 3
    assert hypermodel.objective.name == "val_accuracy" and hypermodel.objective.direction == "max"
    with pytest.raises(kt.errors.FatalValueError, match=r"got 1 positional argument\(s\), validation_data; .* search\(\) takes only callbacks, epochs and verbose"):
        hypermodel.fit(kt.HyperParameters(), None, [0], validation_data=None)
    with pytest.raises(kt.errors.FatalValueError, match="epochs: got 0; must be a positive integer"):
        hypermodel.fit(kt.HyperParameters(), None, epochs=0)


def test_a_callback_that_stops_training_stops_the_schedule_after_that_epoch(tiny_spec):
    import keras

    from autofinetune import TwoPhaseHyperModel
    from autofinetune.engines.keras_tuner.hypermodel import _CallbackReporter
    from autofinetune.errors import PruneTrial

    hypermodel = TwoPhaseHyperModel(tiny_spec(schedule={"phase1_epochs": 2, "phase2_epochs": 2}))
    model = hypermodel.build(kt.HyperParameters())
    stopper = keras.callbacks.EarlyStopping(monitor="val_accuracy", mode="max", patience=0)
    callbacks = keras.callbacks.CallbackList([stopper], model=model)
    callbacks.on_train_begin()
    reporter = _CallbackReporter(callbacks, model, budget=4, total=4)
    reporter.report(1, {"loss": 1.0, "val_accuracy": 0.5})
    with pytest.raises(PruneTrial) as stopped:
        reporter.report(2, {"loss": 1.0, "val_accuracy": 0.4})
    assert stopped.value.step == 2
    # The budget stops the schedule after its last epoch, and only when it is short of the total.
    with pytest.raises(PruneTrial, match="epoch budget 1 of 4"):
        _CallbackReporter(keras.callbacks.CallbackList([], model=model), model, budget=1, total=4).report(1, {})
    model.stop_training = False
    _CallbackReporter(keras.callbacks.CallbackList([], model=model), model, budget=4, total=4).report(4, {})


# --- searches mirrored into the study database ------------------------------------------------


def _launch(spec, url, *, n_trials=None, tuner="hyperband", **options):
    """What `autofinetune launch --engine keras-tuner` does, in this process."""
    from autofinetune.engines.keras_tuner.options import KerasTunerOptions
    from autofinetune.engines.keras_tuner.search import launch_with_keras_tuner

    study, _ = create_or_resume_study(spec, open_storage(url), n_trials=n_trials)
    return launch_with_keras_tuner(spec, url, study, KerasTunerOptions(tuner=tuner, **options)), study


@pytest.mark.slow
def test_hyperband_truncated_trials_are_pruned_promotions_complete_and_resume_does_not_duplicate(tmp_path):
    # Three global epochs: Hyperband's first bracket runs three trials for 1 epoch (phase 1
    # only), then promotes the best to all 3 epochs.
    spec = parse_spec(tiny_spec_dict(
        search={"n_trials": 2, "baseline_trial": False},
        schedule={"phase1_epochs": 1, "phase2_epochs": 2},
    ), base_dir=tmp_path)
    url = f"sqlite:///{tmp_path / 'study.db'}"
    code, study = _launch(spec, url)
    assert code == 0
    first = study.get_trials()
    assert [t.state for t in first] == [TrialState.PRUNED] * 2
    for trial in first:
        assert trial.intermediate_values.keys() == {1}
        assert trial.user_attrs["pruned_at_step"] == 1 and trial.user_attrs["keras_tuner_epochs"] == 1
        assert [h["phase"] for h in trial.user_attrs["history"]] == [1]
        assert trial.distributions == optuna_distributions(spec, trial.params)

    code, study = _launch(spec, url, n_trials=4)
    assert code == 0
    trials = study.get_trials()
    assert len(trials) == 4
    assert [(t.number, t.datetime_complete) for t in trials[:2]] == [(t.number, t.datetime_complete) for t in first]
    ids = [t.user_attrs["keras_tuner_trial_id"] for t in trials]
    assert len(set(ids)) == 4, ids
    assert budget_used(study) == (4, 0)

    promoted = trials[3]
    assert promoted.state == TrialState.COMPLETE
    source = next(t for t in trials if t.user_attrs["keras_tuner_trial_id"] == promoted.user_attrs["keras_tuner_promoted_from"])
    assert source.state == TrialState.PRUNED and promoted.params == source.params
    assert sorted(promoted.intermediate_values) == [1, 2, 3]
    assert [h["phase"] for h in promoted.user_attrs["history"]] == [1, 2, 2]
    assert promoted.value == max(promoted.intermediate_values.values())
    assert "checkpoint_artifact_id" in promoted.user_attrs

    # The project is an ordinary keras-tuner project: stock keras-tuner reloads it, and its
    # best model holds the trained best epoch, not the model build() returned.
    import keras

    from autofinetune import TwoPhaseHyperModel

    hypermodel = TwoPhaseHyperModel(spec)
    tuner = kt.Hyperband(hypermodel, objective=hypermodel.objective, max_epochs=hypermodel.max_epochs,
                         directory=str(tmp_path / "study.db.keras_tuner"), project_name=spec.name)
    best_trial = tuner.oracle.get_best_trials(1)[0]
    best_record = next(t for t in trials if t.user_attrs["keras_tuner_trial_id"] == best_trial.trial_id)
    assert best_trial.score == max(best_record.intermediate_values.values())
    data = hypermodel.data
    scores = tuner.get_best_models(1)[0].evaluate(
        data.x_val, keras.utils.to_categorical(data.y_val, data.num_classes), verbose=0, return_dict=True
    )
    assert scores["accuracy"] == pytest.approx(best_trial.score, abs=1e-6)


def _stand_in_result(spec, params, *, state="complete", error=None, steps=2):
    """A TrialResult as the schedule returns it, without training (for bookkeeping tests)."""
    history = tuple(
        EpochRecord(step=s, phase=1 if s <= spec.schedule.phase1_epochs else 2,
                    metrics={"loss": 1.0 / s, "accuracy": 0.5, "val_loss": 1.0, "val_accuracy": 0.3 + 0.1 * s})
        for s in range(1, steps + 1)
    )
    phases = tuple(
        PhaseSummary(phase=p, epochs_run=sum(r.phase == p for r in history), best_value=0.5, trainable_params=10,
                     seconds=0.1, images_per_second=100.0)
        for p in sorted({r.phase for r in history})
    )
    values = [r.metrics["val_accuracy"] for r in history]
    return TrialResult(
        params=dict(params), objective="val_accuracy", direction="maximize", history=history,
        best_value=max(values) if state != "failed" else values[0], best_step=values.index(max(values)) + 1,
        unfrozen_blocks=(), phases=phases, state=state, error=error,
    )


class StandInSchedule:
    """Replaces `autofinetune.trial.schedule.run_trial`: each call takes the next planned outcome."""

    def __init__(self, *outcomes):
        self.outcomes = list(outcomes)
        self.calls = 0

    def __call__(self, spec, params, data, *, reporter=None, checkpoint_path=None, stop_event=None, **_):
        self.calls += 1
        outcome = self.outcomes.pop(0) if self.outcomes else "complete"
        if isinstance(outcome, BaseException):
            raise outcome
        if outcome == "swallowed ctrl-c":
            # A real Ctrl-C in the middle of a trial that does not stop at its next batch (the
            # real schedule would): the engine's handler raises nothing, it sets the trial's
            # stop event, and the next epoch end must still stop the search.
            signal.raise_signal(signal.SIGINT)
            assert stop_event is not None and stop_event.is_set()
        if outcome == "nan":
            result = _stand_in_result(spec, params, state="failed", steps=1,
                                      error="training loss became nan at step 1 (phase 1)")
        else:
            result = _stand_in_result(spec, params)
        for record in result.history:
            reporter.report(record.step, record.metrics)
        return result


def _bookkeeping_spec(tmp_path, **search):
    return parse_spec(tiny_spec_dict(
        search={"n_trials": 2, "keep_checkpoints": 0, **search},
        schedule={"phase1_epochs": 1, "phase2_epochs": 1},
    ), base_dir=tmp_path)


def test_failed_trials_are_recorded_with_their_reason_and_the_search_goes_on(tmp_path, monkeypatch):
    from autofinetune.trial import schedule

    stand_in = StandInSchedule(RuntimeError("the data loader broke"), "nan")
    monkeypatch.setattr(schedule, "run_trial", stand_in)
    spec = _bookkeeping_spec(tmp_path, baseline_trial=False)
    code, study = _launch(spec, f"sqlite:///{tmp_path / 'study.db'}", tuner="random")
    assert code == 0 and stand_in.calls == 2
    broken, nan = study.get_trials()
    assert broken.state == nan.state == TrialState.FAIL
    assert broken.user_attrs[FAIL_REASON_ATTR] == "RuntimeError: the data loader broke"
    assert nan.user_attrs[FAIL_REASON_ATTR] == "training loss became nan at step 1 (phase 1)"
    assert nan.user_attrs["history"][0]["loss"] == 1.0  # the failed run's record is kept
    assert broken.distributions == nan.distributions == optuna_distributions(spec, broken.params)


def test_too_many_failures_in_a_row_stop_the_search_with_exit_code_2(tmp_path, monkeypatch, capsys):
    from autofinetune.trial import schedule
    from autofinetune.engines.keras_tuner import oracles

    assert oracles.MAX_CONSECUTIVE_FAILED_TRIALS == 5
    monkeypatch.setattr(oracles, "MAX_CONSECUTIVE_FAILED_TRIALS", 2)  # fewer trials to wait for
    monkeypatch.setattr(schedule, "run_trial", StandInSchedule(*[ValueError("broken")] * 20))
    spec = _bookkeeping_spec(tmp_path, baseline_trial=False, n_trials=20)
    code, study = _launch(spec, f"sqlite:///{tmp_path / 'study.db'}", tuner="random")
    assert code == 2
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL] * 2
    assert all(t.user_attrs[FAIL_REASON_ATTR] == "ValueError: broken" for t in trials)
    assert "Number of consecutive failures exceeded the limit of 2" in capsys.readouterr().err


def test_ctrl_c_and_a_killed_search_fail_the_running_trial_and_resume_retries_it(tmp_path, monkeypatch):
    from autofinetune.trial import schedule
    from autofinetune.engines.keras_tuner.mirror import StudyMirror

    spec = _bookkeeping_spec(tmp_path)
    url = f"sqlite:///{tmp_path / 'study.db'}"

    # Ctrl-C in the baseline trial: it is failed with the reason; the study has no WAITING trial.
    monkeypatch.setattr(schedule, "run_trial", StandInSchedule("swallowed ctrl-c"))
    code, study = _launch(spec, url, tuner="random")
    assert code == 130
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored
    (interrupted,) = study.get_trials()
    assert interrupted.state == TrialState.FAIL and interrupted.user_attrs["baseline"] is True
    assert interrupted.user_attrs[FAIL_REASON_ATTR] == "interrupted (Ctrl-C) while running"
    assert interrupted.params == baseline_params(spec)

    # Resume: keras-tuner runs the baseline again (a retry of the failed record), then a new
    # trial, which is "killed": its record stays RUNNING.
    monkeypatch.setattr(schedule, "run_trial", StandInSchedule("complete", KeyboardInterrupt()))
    monkeypatch.setattr(StudyMirror, "fail_open", lambda self, reason: None)
    code, study = _launch(spec, url, tuner="random")
    assert code == 130
    states = [t.state for t in study.get_trials()]
    assert states == [TrialState.FAIL, TrialState.COMPLETE, TrialState.RUNNING]
    monkeypatch.undo()

    # Resume after the kill: the stale record is failed with a reason and the trial runs again.
    monkeypatch.setattr(schedule, "run_trial", StandInSchedule("complete"))
    code, study = _launch(spec, url, tuner="random")
    assert code == 0
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE, TrialState.FAIL, TrialState.COMPLETE]
    baseline_retry, killed, retry = trials[1], trials[2], trials[3]
    assert baseline_retry.user_attrs["baseline"] is True and baseline_retry.system_attrs["failed_trial"] == 0
    assert baseline_retry.params == baseline_params(spec)
    assert "stopped (killed) while this trial ran" in killed.user_attrs[FAIL_REASON_ATTR]
    assert retry.system_attrs["retry_history"] == [2] and retry.params == killed.params
    kt_ids = [t.user_attrs["keras_tuner_trial_id"] for t in trials]
    assert kt_ids[0] == kt_ids[1] and kt_ids[2] == kt_ids[3] and kt_ids[0] != kt_ids[2]
    # Failed records that were retried do not count: the budget of 2 is used exactly.
    assert budget_used(study) == (2, 0)


def test_a_project_is_searched_by_one_process_with_one_tuner(tmp_path):
    from autofinetune.engines.keras_tuner.project import Project

    project = Project(tmp_path, "study", "hyperband")
    with pytest.raises(ConfigError, match="another `autofinetune launch --engine keras-tuner` is searching it"):
        Project(tmp_path, "study", "hyperband")
    project.close()
    with pytest.raises(ConfigError, match="--tuner: got 'random', .* resume with --tuner hyperband"):
        Project(tmp_path, "study", "random")
    again = Project(tmp_path, "study", "hyperband")
    assert again.id == project.id
    again.close()
