"""``launch --warm-start``: a real short search on the Optuna engine (the command line) and on
keras-tuner (the Python API) runs the baseline, then the earlier study's best configurations."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import optuna
from optuna.trial import TrialState

import autofinetune
from autofinetune.search.space import baseline_params, optuna_distributions
from autofinetune.spec import parse_spec
from autofinetune.store.attributes import BASELINE_ATTR, WARM_START_ATTR
from autofinetune.store.database import open_storage
from autofinetune.store.study import create_or_resume_study

from conftest import tiny_spec_dict, write_spec

FAST = {"schedule": {"phase1_epochs": 1, "phase2_epochs": 1}}
#: The earlier study's best, and its second best.
BEST = {"head_units": 8, "unfreeze_depth": 2, "phase1_lr": 5e-3}
SECOND = {"head_units": 8, "unfreeze_depth": 1, "phase1_lr": 2e-3}


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "autofinetune.cli", *args], cwd=cwd, env=dict(os.environ),
                          capture_output=True, text=True, timeout=600)


def _earlier_study(url: str) -> list:
    """Study ``earlier`` with three finished trials (recorded, not trained: only their params and values count)."""
    spec = parse_spec(tiny_spec_dict(name="earlier"))
    study, _ = create_or_resume_study(spec, open_storage(url))
    for params, value in ((SECOND, 0.8), (BEST, 0.9), ({"head_units": 16, "unfreeze_depth": 0}, 0.4)):
        full = {**baseline_params(spec), **params}
        study.add_trial(optuna.trial.create_trial(params=full, distributions=optuna_distributions(spec, full), value=value))
    return [(t.number, t.params, t.value, t.user_attrs) for t in study.get_trials()]


def _ran_in_order(study, spec) -> None:
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 3
    assert trials[0].user_attrs.get(BASELINE_ATTR) is True
    assert [t.user_attrs.get(WARM_START_ATTR, "").rsplit("#", 1)[-1] for t in trials[1:]] == ["2", "1"]
    baseline = baseline_params(spec)
    assert trials[1].params == {**baseline, **BEST} and trials[2].params == {**baseline, **SECOND}


def test_optuna_engine_runs_the_baseline_then_the_earlier_studys_best(tmp_path):
    url = f"sqlite:///{tmp_path / 'study.db'}"
    before = _earlier_study(url)
    data = tiny_spec_dict(search={"n_trials": 3, "pruner": "none"}, **FAST)
    result = run_cli("launch", str(write_spec(tmp_path, data)), "--storage", url, "--warm-start", "earlier",
                     "--n-trials", "3", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    _ran_in_order(optuna.load_study(study_name="tiny", storage=url), parse_spec(data))
    earlier = optuna.load_study(study_name="earlier", storage=url).get_trials()
    assert [(t.number, t.params, t.value, t.user_attrs) for t in earlier] == before, "the earlier study is only read"

    refused = run_cli("launch", str(write_spec(tmp_path, data)), "--storage", url, "--study-name", "other",
                      "--warm-start", "ghost", cwd=tmp_path)
    assert refused.returncode == 2 and "--warm-start: 'ghost': study 'ghost' does not exist" in refused.stderr
    assert "other" not in optuna.get_all_study_names(url)


def test_keras_tuner_runs_the_baseline_then_the_earlier_studys_best(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    source = f"sqlite:///{tmp_path / 'earlier.db'}"
    _earlier_study(source)
    data = tiny_spec_dict(name="kt", search={"n_trials": 3, "pruner": "none"}, **FAST)
    study = autofinetune.launch(data, storage=f"sqlite:///{tmp_path / 'study.db'}", engine="keras-tuner",
                                tuner="random", warm_start=[f"earlier@{source}"], progress=False)
    _ran_in_order(study, parse_spec(data))
