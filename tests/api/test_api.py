"""The Python API: launch and resume a study from Python, and the schedule in a user's own optimize loop."""

from __future__ import annotations

import keras
import optuna
import pytest
from optuna.trial import TrialState

import autofinetune
from autofinetune.errors import ConfigError

from conftest import tiny_spec_dict


def test_launch_runs_a_study_from_python_and_a_second_call_resumes_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec = tiny_spec_dict(name="api", search={"n_trials": 2, "pruner": "none"},
                          schedule={"phase1_epochs": 1, "phase2_epochs": 1})
    url = f"sqlite:///{tmp_path / 'study.db'}"

    study = autofinetune.launch(spec, storage=url)
    assert isinstance(study, optuna.Study) and study.study_name == "api"
    first = study.get_trials()
    assert [t.state for t in first] == [TrialState.COMPLETE] * 2
    assert all("history" in t.user_attrs for t in first)

    resumed = autofinetune.launch(spec, storage=url, n_trials=3)
    trials = resumed.get_trials()
    assert len(trials) == 3, "only the missing trial ran"
    assert [t.datetime_start for t in trials[:2]] == [t.datetime_start for t in first]
    assert trials[2].state == TrialState.COMPLETE


def test_an_unwritable_cache_folder_is_one_warning_and_the_trials_run_uncached(tmp_path, monkeypatch, caplog):
    from autofinetune.trial.features import CACHE_DIR_ENV

    monkeypatch.chdir(tmp_path)
    (tmp_path / "a-file").write_text("not a folder")
    monkeypatch.setenv(CACHE_DIR_ENV, str(tmp_path / "a-file" / "cache"))
    spec = tiny_spec_dict(name="nocache", search={"n_trials": 2, "pruner": "none"},
                          schedule={"phase1_epochs": 1, "phase2_epochs": 1})
    with caplog.at_level("WARNING"):
        study = autofinetune.launch(spec, storage=f"sqlite:///{tmp_path / 'study.db'}")
    warned = [r.getMessage() for r in caplog.records if "cache.dir" in r.getMessage()]
    assert warned == [
        f"warning: cache.dir: cannot write to {str(tmp_path / 'a-file' / 'cache')!r} (Not a directory); the trials "
        "run without the feature cache (slower, the same results): give cache.dir or $AUTOFINETUNE_CACHE_DIR a "
        "writable folder"
    ]
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2
    assert all(t.user_attrs["phase1_cache_note"].startswith("off: cache folder") for t in trials)


def test_launch_raises_a_config_error_instead_of_exiting(tmp_path):
    spec = tiny_spec_dict(name="bad")
    with pytest.raises(ConfigError, match="--engine: got 'hyperopt'"):
        autofinetune.launch(spec, storage=f"sqlite:///{tmp_path / 'study.db'}", engine="hyperopt")
    assert not (tmp_path / "study.db").exists()


class _EpochsSeen(keras.callbacks.Callback):
    def __init__(self) -> None:
        super().__init__()
        self.epochs: list[int] = []

    def on_epoch_end(self, epoch, logs=None) -> None:
        self.epochs.append(epoch)


class _PruneAfterStep(optuna.pruners.BasePruner):
    """Prunes a trial once it has reported ``step``: a pruner decision on the global step."""

    def __init__(self, step: int) -> None:
        self.step = step
        self.asked: list[int] = []

    def prune(self, study, trial) -> bool:
        last = trial.last_step
        self.asked.append(last)
        return last is not None and last >= self.step


def test_objective_in_a_users_optimize_reports_both_phases_on_the_global_step(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec = tiny_spec_dict(name="own-loop", schedule={"phase1_epochs": 2, "phase2_epochs": 2})
    seen = _EpochsSeen()
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))
    study.optimize(autofinetune.objective(spec, callbacks=[seen]), n_trials=1)
    trial = study.trials[0]
    assert trial.state == TrialState.COMPLETE
    assert sorted(trial.intermediate_values) == [1, 2, 3, 4], "both phases, one step count"
    assert seen.epochs == [0, 1, 2, 3], "a user's callback sees the global epoch index"
    assert trial.user_attrs["phase_boundary_step"] == 2
    assert [h["phase"] for h in trial.user_attrs["history"]] == [1, 1, 2, 2]
    assert "host" in trial.user_attrs and "trial_seconds" in trial.user_attrs

    # A pruner that stops trials at step 3, the first epoch of phase 2.
    pruner = _PruneAfterStep(3)
    pruned_study = optuna.create_study(direction="maximize", pruner=pruner)
    pruned_study.optimize(autofinetune.objective(spec), n_trials=1)
    pruned = pruned_study.trials[0]
    assert pruned.state == TrialState.PRUNED
    assert sorted(pruned.intermediate_values) == [1, 2, 3]
    assert pruned.user_attrs["pruned_at_step"] == 3
    assert 3 in pruner.asked


def test_objective_refuses_a_study_whose_direction_is_not_the_objectives(tmp_path):
    study = optuna.create_study(direction="minimize")
    with pytest.raises(ConfigError, match="create_study\\(direction='maximize'\\)"):
        study.optimize(autofinetune.objective(tiny_spec_dict(name="dir")), n_trials=1)
