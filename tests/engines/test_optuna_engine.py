"""The main job: launch a study into a real database, resume it, survive dead workers."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from autofinetune.store.attributes import FAIL_REASON_ATTR

from autofinetune.store.database import open_storage

from conftest import tiny_spec_dict, wait_for, write_spec

FAST = {"schedule": {"phase1_epochs": 1, "phase2_epochs": 1}}


def run_cli(*args: str, cwd: Path, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "autofinetune.cli", *args],
        cwd=cwd, env=dict(os.environ, **(env or {})), capture_output=True, text=True, timeout=timeout,
    )


def start_cli(*args: str, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "autofinetune.cli", *args],
        cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


def load(url: str, name: str = "tiny"):
    return optuna.load_study(study_name=name, storage=url)



def trial_states(url: str, *, with_steps: bool = False) -> list[str]:
    """States of the study's trials; ``with_steps`` counts only trials that reported an epoch."""
    try:
        trials = load(url).get_trials(deepcopy=False)
    except Exception:  # the study may not exist yet
        return []
    return [t.state.name for t in trials if t.intermediate_values or not with_steps]


# --- a study in SQLite ---------------------------------------------------------------------


def test_sqlite_study_stores_every_trial_and_resume_adds_exactly_the_missing(tmp_path):
    spec = write_spec(tmp_path, tiny_spec_dict(search={"n_trials": 2, "pruner": "none"}, **FAST))
    url = f"sqlite:///{tmp_path / 'study.db'}"

    first = run_cli("launch", str(spec), "--storage", url, cwd=tmp_path)
    assert first.returncode == 0, first.stdout + first.stderr
    trials = load(url).get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2
    baseline = trials[0]
    assert baseline.user_attrs["baseline"] is True
    assert baseline.params["head_units"] == 16 and baseline.params["phase2_lr"] == pytest.approx(1e-4)
    for trial in trials:
        assert sorted(trial.intermediate_values) == [1, 2]
        assert trial.value == max(trial.intermediate_values.values())
        attrs = trial.user_attrs
        assert attrs["phase_boundary_step"] == 1
        for key in ("phase1_best", "phase2_best", "phase1_seconds", "phase2_seconds", "phase1_images_per_second",
                    "phase1_trainable_params", "phase2_trainable_params", "host", "device", "unfrozen_blocks"):
            assert key in attrs, key
        assert [h["phase"] for h in attrs["history"]] == [1, 2]
        assert len(attrs["unfrozen_blocks"]) == trial.params["unfreeze_depth"]
    study = load(url)
    assert study.user_attrs["autofinetune:spec"]["spec"]["name"] == "tiny"
    assert "best trial:" in first.stdout
    # The best trial's model is kept in the artifact store beside the database.
    kept = [t for t in trials if "checkpoint_artifact_id" in t.user_attrs]
    assert kept and (tmp_path / "study.db.artifacts" / kept[0].user_attrs["checkpoint_artifact_id"]).is_file()

    finished_before = {t.number: t.datetime_complete for t in trials}
    again = run_cli("launch", str(spec), "--storage", url, "--n-trials", "3", cwd=tmp_path)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "resuming study 'tiny'" in again.stdout and "2 of 3 trials so far" in again.stdout
    trials = load(url).get_trials()
    assert len(trials) == 3 and all(t.state == TrialState.COMPLETE for t in trials)
    assert {t.number: t.datetime_complete for t in trials[:2]} == finished_before
    assert sum(1 for t in trials if t.user_attrs.get("baseline")) == 1

    status = run_cli("status", "tiny", "--storage", url, cwd=tmp_path)
    assert status.returncode == 0
    assert "COMPLETE" in status.stdout and "baseline (seed recipe)" in status.stdout and "best trial:" in status.stdout
    listing = run_cli("studies", "--storage", url, cwd=tmp_path)
    assert "tiny" in listing.stdout and "complete 3" in listing.stdout


def test_a_worker_keeps_its_models_between_trials_until_it_is_replaced(tmp_path):
    """Trials of one shape in one worker: the second trains on the models the first kept; after
    ``trials_per_process`` trials a fresh worker starts, and keeps nothing yet."""
    search = {"n_trials": 3, "pruner": "none", "baseline_trial": False, "trials_per_process": 2,
              "head_units": [16], "unfreeze_depth": [2]}
    spec = write_spec(tmp_path, tiny_spec_dict(search=search, **FAST))
    url = f"sqlite:///{tmp_path / 'study.db'}"

    launched = run_cli("launch", str(spec), "--storage", url, cwd=tmp_path)
    assert launched.returncode == 0, launched.stdout + launched.stderr
    trials = load(url).get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 3
    kept = [t.user_attrs["performance"]["phases_on_kept_models"] for t in trials]
    assert kept == [0, 2, 0], "trial 1 reuses trial 0's models; trial 2 runs in a fresh worker"


def test_aggressive_pruner_prunes_at_the_global_step_with_two_sqlite_workers(tmp_path):
    # Nothing reaches an accuracy of 1.01: every trial is pruned at the first step the pruner
    # may act on (steps are 1-based epochs, so warm-up 2 means step 2: phase 2's first epoch).
    spec = write_spec(tmp_path, tiny_spec_dict(
        search={"n_trials": 2, "pruner": "threshold", "pruner_options": {"lower": 1.01, "n_warmup_steps": 2}},
        schedule={"phase1_epochs": 1, "phase2_epochs": 2},
    ))
    url = f"sqlite:///{tmp_path / 'study.db'}"
    # Two workers write to one SQLite file at once: WAL and a lock timeout keep them apart.
    out = run_cli("launch", str(spec), "--storage", url, "--workers", "2", cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "database is locked" not in out.stdout + out.stderr
    assert "exited with code" not in out.stdout, "a worker crashed"
    trials = load(url).get_trials()
    assert [t.state for t in trials] == [TrialState.PRUNED] * 2
    assert len({t.user_attrs["pid"] for t in trials}) == 2
    for trial in trials:
        assert sorted(trial.intermediate_values) == [1, 2]
        assert trial.user_attrs["pruned_at_step"] == 2
        assert [h["phase"] for h in trial.user_attrs["history"]] == [1, 2]


# --- PostgreSQL, two workers, and a password that must not leak -----------------------------


@pytest.mark.slow
def test_postgres_two_workers_no_trial_lost_or_duplicated_and_password_hidden(tmp_path, postgres_server):
    postgres_server.create_database("twoworkers")
    secret = "Pa55-w0rd-XYZZY"
    url = postgres_server.url("twoworkers", password=secret)
    spec = write_spec(tmp_path, tiny_spec_dict(search={"n_trials": 4, "pruner": "none"}, **FAST))

    out = run_cli("launch", str(spec), "--storage", url, "--workers", "2", cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    status = run_cli("status", "tiny", "--storage", url, cwd=tmp_path)

    trials = load(postgres_server.url("twoworkers")).get_trials()
    numbers = [t.number for t in trials]
    assert len(set(numbers)) == len(numbers) == len(trials)
    # Two workers may each start a trial when one is left: at most one extra.
    assert 4 <= len(trials) <= 5
    assert all(t.state == TrialState.COMPLETE for t in trials)
    assert len({tuple(sorted(t.params.items())) for t in trials}) == len(trials), "workers repeated params"
    assert len({t.user_attrs["pid"] for t in trials}) >= 2, "both workers ran trials"

    captured = out.stdout + out.stderr + status.stdout + status.stderr
    assert "postgres:***@" in out.stdout
    assert secret not in captured
    assert secret not in postgres_server.dump("twoworkers")


# --- a worker killed mid-trial -------------------------------------------------------------


@pytest.mark.slow
def test_sigkilled_worker_trial_is_failed_with_reason_and_retried(tmp_path):
    import psutil

    spec = write_spec(tmp_path, tiny_spec_dict(
        search={"n_trials": 2, "pruner": "none", "heartbeat_interval": 1, "heartbeat_grace": 3},
        schedule={"phase1_epochs": 2, "phase2_epochs": 2},
    ))
    url = f"sqlite:///{tmp_path / 'study.db'}"
    launch = start_cli("launch", str(spec), "--storage", url, cwd=tmp_path)
    try:
        wait_for(lambda: trial_states(url, with_steps=True) == ["RUNNING"], timeout=240, what="a trial in its first epochs", process=launch)
        victim = psutil.Process(launch.pid).children()[0]
        victim.send_signal(signal.SIGKILL)
        output, _ = launch.communicate(timeout=400)
    finally:
        launch.kill()
    assert launch.returncode == 0, output
    assert "exited with code -9; starting a replacement" in output
    assert "learning curve not uploaded" not in output, "the views of a taken-over trial are written once, while RUNNING"

    trials = load(url).get_trials()
    failed = [t for t in trials if t.state == TrialState.FAIL]
    assert len(failed) == 1
    assert "stopped sending heartbeats" in failed[0].user_attrs[FAIL_REASON_ATTR]
    retries = [t for t in trials if t.system_attrs.get("failed_trial") == failed[0].number]
    assert len(retries) == 1 and retries[0].state == TrialState.COMPLETE
    assert retries[0].params == failed[0].params
    assert "stopped sending heartbeats" in retries[0].user_attrs["retry_reason"]
    assert FAIL_REASON_ATTR not in retries[0].user_attrs
    assert sum(t.state == TrialState.COMPLETE for t in trials) == 2


def test_ctrl_c_fails_the_running_trial_and_keeps_finished_ones(tmp_path):
    spec = write_spec(tmp_path, tiny_spec_dict(search={"n_trials": 3, "pruner": "none"}, **FAST))
    url = f"sqlite:///{tmp_path / 'study.db'}"
    launch = start_cli("launch", str(spec), "--storage", url, cwd=tmp_path)
    try:
        wait_for(lambda: trial_states(url)[:2] == ["COMPLETE", "RUNNING"], timeout=240, what="a finished and a running trial", process=launch)
        launch.send_signal(signal.SIGINT)
        output, _ = launch.communicate(timeout=120)
    finally:
        launch.kill()
    assert launch.returncode == 130, output
    trials = load(url).get_trials()
    assert trials[0].state == TrialState.COMPLETE
    assert trials[1].state == TrialState.FAIL, output
    assert trials[1].user_attrs[FAIL_REASON_ATTR] == "interrupted (Ctrl-C) while running; queued again"
    # Our own stop is not the trial's fault: it runs again, in place of the failed record.
    (retry,) = [t for t in trials if t.state == TrialState.WAITING]
    assert retry.params == trials[1].params and retry.system_attrs["failed_trial"] == 1

    resumed = run_cli("launch", str(spec), "--storage", url, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    states = [t.state for t in load(url).get_trials()]
    assert states.count(TrialState.COMPLETE) == 3 and TrialState.WAITING not in states, states


# --- bad input: exit code 2, database untouched ---------------------------------------------


def _dump_sqlite(path: Path) -> list[str]:
    connection = sqlite3.connect(path)
    try:
        return list(connection.iterdump())
    finally:
        connection.close()


@pytest.mark.parametrize("search, expected", [
    ({"sampler": "annealing"}, "unknown sampler 'annealing'"),
    ({"pruner": "patience"}, "unknown pruner 'patience'"),
    ({"pruner": "median", "pruner_options": {"patience": 3}}, "MedianPruner takes no option 'patience'"),
])
def test_bad_sampler_or_pruner_exits_2_without_a_database(tmp_path, search, expected):
    spec = write_spec(tmp_path, tiny_spec_dict(search=search))
    out = run_cli("launch", str(spec), "--storage", f"sqlite:///{tmp_path / 'study.db'}", cwd=tmp_path)
    assert out.returncode == 2
    assert expected in out.stderr
    assert not (tmp_path / "study.db").exists()


def test_unreachable_database_exits_2(tmp_path):
    spec = write_spec(tmp_path, tiny_spec_dict())
    out = run_cli("launch", str(spec), "--storage", "postgresql+psycopg://someone:hunter2@127.0.0.1:9/none",
                  cwd=tmp_path, timeout=120)
    assert out.returncode == 2
    assert "storage: cannot open 'postgresql+psycopg://someone:***@127.0.0.1:9/none'" in out.stderr
    assert "hunter2" not in out.stdout + out.stderr


def test_a_storage_url_naming_no_installed_driver_exits_2_before_anything_starts(tmp_path):
    spec = write_spec(tmp_path, tiny_spec_dict())
    out = run_cli("launch", str(spec), "--storage", "notadb://x", cwd=tmp_path, timeout=120)
    assert out.returncode == 2, out.stdout + out.stderr
    assert "storage: 'notadb://x' names the database dialect 'notadb'" in out.stderr
    assert "installed drivers: sqlite, postgresql+psycopg" in out.stderr and "Traceback" not in out.stderr


def test_existing_study_with_another_search_space_exits_2_and_changes_nothing(tmp_path):
    from autofinetune.spec import parse_spec
    from autofinetune.store.study import create_or_resume_study

    url = f"sqlite:///{tmp_path / 'study.db'}"
    create_or_resume_study(parse_spec(tiny_spec_dict(), base_dir=tmp_path), open_storage(url))
    before = _dump_sqlite(tmp_path / "study.db")

    changed = write_spec(tmp_path, tiny_spec_dict(search={"head_units": [32, 64]}))
    out = run_cli("launch", str(changed), "--storage", url, cwd=tmp_path)
    assert out.returncode == 2
    assert "study 'tiny' already exists with a different spec" in out.stderr
    assert "search space.head_units" in out.stderr
    assert _dump_sqlite(tmp_path / "study.db") == before


# --- workers started before the study exists ---------------------------------------------------


def _worker_processes_of(study_name: str) -> list:
    import psutil

    found = []
    for process in psutil.process_iter(["cmdline"]):
        cmdline = process.info["cmdline"] or []
        if "worker-process" in cmdline and study_name in cmdline:
            found.append(process)
    return found


def test_a_prestarted_worker_waits_for_go_then_runs_and_cancel_stops_one_never_told(tmp_path):
    from autofinetune.engines.optuna.supervisor import WorkerSupervisor
    from autofinetune.spec import parse_spec
    from autofinetune.store.study import create_or_resume_study

    spec = parse_spec(tiny_spec_dict(name=f"prestart-{os.getpid()}", search={"n_trials": 1}, **FAST), base_dir=tmp_path)
    url = f"sqlite:///{tmp_path / 'study.db'}"

    refused = WorkerSupervisor(spec.name, url, slots=[{}])
    refused.prestart()
    waiting = refused.slots[0].process
    assert _worker_processes_of(spec.name), "the worker runs before the study exists"
    refused.cancel()
    assert waiting.returncode == -signal.SIGKILL and not _worker_processes_of(spec.name)
    assert not (tmp_path / "study.db").exists(), "a worker never told to go touches nothing"

    supervisor = WorkerSupervisor(spec.name, url, slots=[{}])
    supervisor.prestart()
    create_or_resume_study(spec, open_storage(url))  # what launch does while the worker imports
    assert supervisor.run() == 0
    assert [t.state.name for t in load(url, spec.name).trials] == ["COMPLETE"]


def test_a_launch_refused_after_its_workers_started_leaves_none_running(tmp_path):
    from autofinetune.spec import parse_spec
    from autofinetune.store.study import create_or_resume_study

    name = f"refused-{os.getpid()}"
    url = f"sqlite:///{tmp_path / 'study.db'}"
    create_or_resume_study(parse_spec(tiny_spec_dict(name=name), base_dir=tmp_path), open_storage(url))
    # The study exists with another search space: refused after the workers were started.
    changed = write_spec(tmp_path, tiny_spec_dict(name=name, search={"head_units": [32, 64]}))
    out = run_cli("launch", str(changed), "--storage", url, cwd=tmp_path)
    assert out.returncode == 2 and "already exists with a different spec" in out.stderr
    assert not _worker_processes_of(name)
    assert [t.state.name for t in load(url, name).trials] == ["WAITING"]  # the queued baseline, untouched
