"""One contract for every engine: the same spec lands the same record in the study database.

Each engine runs a study of the same tiny spec; the assertions are about what `status`,
`dashboard` and `export` rely on, whatever engine ran the trials.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import optuna
import pytest
from optuna.trial import TrialState

from autofinetune.spec.schema import parse_spec
from autofinetune.search.space import optuna_distributions

from conftest import tiny_spec_dict, write_spec

CONTRACT_SPEC = tiny_spec_dict(
    name="contract",
    search={"n_trials": 3, "pruner": "none", "keep_checkpoints": 1},
    schedule={"phase1_epochs": 1, "phase2_epochs": 1},
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


@pytest.mark.slow
@pytest.mark.parametrize("engine", sorted(ENGINES))
def test_engine_lands_the_same_record_in_the_study_database(engine, tmp_path):
    spec_path = write_spec(tmp_path, CONTRACT_SPEC)
    url = f"sqlite:///{tmp_path / 'study.db'}"
    out = subprocess.run(
        [sys.executable, "-m", "autofinetune.cli", "launch", str(spec_path), "--storage", url,
         "--engine", engine, *ENGINES[engine]],
        cwd=tmp_path, capture_output=True, text=True, timeout=900, env=dict(os.environ),
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]

    study = optuna.load_study(study_name="contract", storage=url)
    spec = parse_spec(CONTRACT_SPEC)
    trials = study.get_trials()
    finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(finished) == 3, [(t.number, t.state) for t in trials]
    assert any(t.user_attrs.get("baseline") for t in trials), "the seed recipe ran first"
    expected = optuna_distributions(spec)
    for trial in finished:
        assert trial.distributions == expected
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
    # What the dashboard shows: every finished trial has a note (written by record_result).
    from autofinetune.viewing.dashboard import read_trial_note

    for trial in finished:
        assert read_trial_note(study, trial._trial_id).startswith(f"### Trial {trial.number}: "), (engine, trial.number)
    best = study.best_trial
    assert "checkpoint_artifact_id" in best.user_attrs
    assert (tmp_path / "study.db.artifacts" / best.user_attrs["checkpoint_artifact_id"]).is_file()

    status = subprocess.run(
        [sys.executable, "-m", "autofinetune.cli", "status", "contract", "--storage", url],
        capture_output=True, text=True, timeout=120,
    )
    assert status.returncode == 0 and f"best trial: {best.number}" in status.stdout
