"""What survives what: a study database restarted or down for 20 s under a 2-worker launch, a
full disk for the artifacts, an artifact folder that cannot be created.

Real faults on real components: a PostgreSQL server the test stops and starts, a tmpfs that is
full, a path under a regular file.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from autofinetune.store.attributes import FAIL_REASON_ATTR, RECORD_WARNINGS_ATTR

from conftest import tiny_spec_dict, wait_for, write_spec

#: Trials long enough (four phase-2 epochs of a few blocks) that a fault lands while they run.
FAULT_SPEC = tiny_spec_dict(
    name="faults",
    data={"synthetic_images_per_class": 32},
    search={
        "n_trials": 6, "pruner": "none", "unfreeze_depth": {"low": 8, "high": 16},
        # A heartbeat a second: even a restart of a second or two meets a database call.
        "heartbeat_interval": 1, "heartbeat_grace": 20, "outage_grace": 120,
    },
    schedule={"phase1_epochs": 1, "phase2_epochs": 4},
)


def _launch(spec_path: Path, url: str, cwd: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "autofinetune.cli", "launch", str(spec_path), "--storage", url, *extra],
        cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


def _collect(process: subprocess.Popen, lines: list[str]) -> threading.Thread:
    """Read the launch's output as it comes (a full pipe would block its workers)."""
    reader = threading.Thread(target=lambda: lines.extend(process.stdout), daemon=True)
    reader.start()
    return reader


def _running_with_an_epoch(url: str, name: str) -> bool:
    try:
        trials = optuna.load_study(study_name=name, storage=url).get_trials(states=(TrialState.RUNNING,))
    except Exception:  # the study does not exist yet, or the server is down
        return False
    return any(t.intermediate_values for t in trials)


def _assert_budget_whole(study, n_trials: int) -> None:
    """Every trial of the budget finished; every FAIL says why and was run again."""
    trials = study.get_trials()
    states = [t.state for t in trials]
    assert TrialState.RUNNING not in states and TrialState.WAITING not in states, states
    finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(finished) == n_trials, states
    retried = {number for t in trials for number in t.system_attrs.get("retry_history", [])}
    for trial in trials:
        if trial.state == TrialState.FAIL:
            assert trial.user_attrs.get(FAIL_REASON_ATTR), trial.number
            assert trial.number in retried, (trial.number, trial.user_attrs[FAIL_REASON_ATTR])


#: How each engine runs two trials at once (keras-tuner trains one trial in the launch itself).
ENGINE_ARGS = {
    "optuna": ["--workers", "2"],
    "keras-tuner": ["--engine", "keras-tuner", "--tuner", "random"],
    "ray": ["--engine", "ray", "--max-concurrent", "2", "--cpus-per-trial", "1"],
}


@pytest.mark.slow
@pytest.mark.parametrize("engine, fault", [
    ("optuna", "restart"), ("optuna", "down for 20 s"), ("keras-tuner", "down for 20 s"), ("ray", "down for 20 s"),
])
def test_a_search_rides_out_its_database_going_away(tmp_path, own_postgres, engine, fault):
    url = own_postgres.create_database("faults")
    spec_path = write_spec(tmp_path, FAULT_SPEC)
    launch = _launch(spec_path, url, tmp_path, *ENGINE_ARGS[engine])
    lines: list[str] = []
    reader = _collect(launch, lines)
    try:
        wait_for(lambda: _running_with_an_epoch(url, "faults"), timeout=300, what="a trial in its first epochs")
        if fault == "restart":
            own_postgres.restart()
        else:
            own_postgres.pause()
            time.sleep(20)
            own_postgres.resume()
        launch.wait(timeout=600)
    finally:
        launch.kill()
    reader.join(timeout=10)
    output = "".join(lines)
    assert launch.returncode == 0, output[-4000:]
    assert "Traceback" not in output, output[-4000:]
    if fault != "restart":  # a restart of a second may pass between two calls
        assert "is unreachable" in output and "is reachable again" in output, output[-4000:]
    assert output.count("is unreachable") == output.count("is reachable again"), "one line when it goes, one when back"
    assert "exited with code" not in output, "no worker crashed"
    _assert_budget_whole(optuna.load_study(study_name="faults", storage=url), FAULT_SPEC["search"]["n_trials"])


@pytest.mark.slow
def test_past_its_grace_the_launch_stops_with_one_line_and_launching_again_resumes(tmp_path, own_postgres):
    url = own_postgres.create_database("faults")
    spec = {**FAULT_SPEC, "search": {**FAULT_SPEC["search"], "outage_grace": 5}}
    spec_path = write_spec(tmp_path, spec)
    launch = _launch(spec_path, url, tmp_path, "--workers", "2")
    lines: list[str] = []
    reader = _collect(launch, lines)
    try:
        wait_for(lambda: _running_with_an_epoch(url, "faults"), timeout=300, what="a trial in its first epochs")
        own_postgres.pause()
        launch.wait(timeout=300)
    finally:
        launch.kill()
        own_postgres.resume()
    reader.join(timeout=10)
    output = "".join(lines)
    assert launch.returncode == 75, output[-4000:]
    assert "Traceback" not in output, output[-4000:]
    assert "longer than search.outage_grace (5 s)" in output
    assert "fatal: the study database stayed unreachable past search.outage_grace" in output
    assert "exited with code" not in output, "a worker out of grace is not a crash to replace"

    again = _launch(spec_path, url, tmp_path, "--workers", "2")
    output, _ = again.communicate(timeout=600)
    assert again.returncode == 0, output[-4000:]
    _assert_budget_whole(optuna.load_study(study_name="faults", storage=url), FAULT_SPEC["search"]["n_trials"])


@pytest.fixture
def full_disk(tmp_path):
    """A tmpfs that is full (mounted as root; skipped where that is not allowed)."""
    mount = tmp_path / "full"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({done.stderr.strip() or 'mount failed'}); it needs root")
    try:
        descriptor = os.open(mount / "filler", os.O_WRONLY | os.O_CREAT)
        try:
            while True:
                os.write(descriptor, b"\0" * 4096)
        except OSError:
            pass  # no space left: the disk is full
        finally:
            os.close(descriptor)
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


ENGINES = {
    "optuna": [],
    "keras-tuner": ["--tuner", "random"],
    "ray": ["--max-concurrent", "1", "--cpus-per-trial", "1"],
}


@pytest.mark.slow
@pytest.mark.parametrize("engine", sorted(ENGINES))
def test_a_full_artifact_disk_keeps_every_finished_value_with_a_warning(tmp_path, full_disk, engine):
    spec_path = write_spec(tmp_path, tiny_spec_dict(
        name="fulldisk", search={"n_trials": 2, "pruner": "none", "keep_checkpoints": 2},
        schedule={"phase1_epochs": 1, "phase2_epochs": 1},
    ))
    url = f"sqlite:///{tmp_path / 'study.db'}"
    launch = _launch(spec_path, url, tmp_path, "--engine", engine, "--artifacts", str(full_disk), *ENGINES[engine])
    output, _ = launch.communicate(timeout=900)
    assert launch.returncode == 0, output[-4000:]
    assert "Traceback" not in output, output[-4000:]
    study = optuna.load_study(study_name="fulldisk", storage=url)
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2, [(t.number, t.state, t.user_attrs) for t in trials]
    for trial in trials:
        assert trial.value is not None and trial.value == max(trial.intermediate_values.values())
        warnings = trial.user_attrs[RECORD_WARNINGS_ATTR]
        assert any(w.startswith("checkpoint not kept: OSError: [Errno 28] No space left on device") for w in warnings), warnings
        assert "checkpoint_artifact_id" not in trial.user_attrs
    assert f"best trial: {study.best_trial.number}" in output


def test_an_artifact_folder_that_cannot_be_created_is_refused_before_the_study_exists(tmp_path):
    spec_path = write_spec(tmp_path, tiny_spec_dict(name="nofolder"))
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    url = f"sqlite:///{tmp_path / 'study.db'}"
    out = subprocess.run(
        [sys.executable, "-m", "autofinetune.cli", "launch", str(spec_path), "--storage", url,
         "--artifacts", str(blocker / "artifacts")],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 2, out.stdout + out.stderr
    assert f"artifacts: cannot write to {str(blocker / 'artifacts')!r}" in out.stderr
    assert "Not a directory" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "study.db").exists(), "refused before the study database was touched"
