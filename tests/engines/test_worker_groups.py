"""Optuna workers on "several machines": two worker groups on one PostgreSQL study.

Each group is an ``autofinetune worker`` supervisor with its own working folder and its own
feature-cache folder, as two hosts would have; they share only the study database and the
checkpoint folder. One group is SIGKILLed (supervisor and worker at once, as when its machine
is lost) in the middle of a trial; the other fails that trial once its heartbeat is older than
the grace period and runs the retry, even when its own trials are done by then.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import optuna
import psutil
import pytest
from optuna.trial import TrialState

from autofinetune.spec import parse_spec
from autofinetune.store.attributes import FAIL_REASON_ATTR
from autofinetune.store.database import open_storage
from autofinetune.store.study import create_or_resume_study
from autofinetune.trial.features import CACHE_DIR_ENV

from conftest import cli_env, tiny_spec_dict, wait_for

#: Much longer than the rest of a tiny trial, even on a busy machine: the surviving group
#: finishes its own trial before the lost group's trial turns stale, so it must wait for it
#: rather than exit with the trial left RUNNING.
GRACE = 40


def start_group(name: str, url: str, root: Path, shared: Path) -> tuple[subprocess.Popen, Path]:
    """One "machine": its own folder and feature cache; a process group of its own to lose."""
    folder = root / name
    (folder / "feature-cache").mkdir(parents=True)
    env = dict(cli_env(), **{CACHE_DIR_ENV: str(folder / "feature-cache")})
    process = subprocess.Popen(
        [sys.executable, "-m", "autofinetune.cli", "worker", "tiny", "--storage", url, "--artifacts", str(shared)],
        cwd=folder, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )
    return process, folder


def pids_of(process: subprocess.Popen) -> set[int]:
    try:
        parent = psutil.Process(process.pid)
        return {process.pid, *(child.pid for child in parent.children(recursive=True))}
    except psutil.NoSuchProcess:
        return set()



@pytest.mark.slow
def test_a_lost_worker_group_trial_is_retried_by_the_other_group_with_exact_counts(tmp_path, postgres_server):
    url = postgres_server.create_database("workergroups")
    spec = parse_spec(tiny_spec_dict(
        search={"n_trials": 2, "pruner": "none", "heartbeat_interval": 1, "heartbeat_grace": GRACE},
        # Long enough that a trial seen early in its run is still running when its group is killed.
        schedule={"phase1_epochs": 1, "phase2_epochs": 12},
    ), base_dir=tmp_path, origin="tiny.toml")
    create_or_resume_study(spec, open_storage(url))
    shared = tmp_path / "shared-checkpoints"
    first, first_folder = start_group("host-a", url, tmp_path, shared)
    second, second_folder = start_group("host-b", url, tmp_path, shared)
    groups = [first, second]
    try:
        def both_groups_in_their_first_epochs():
            pids = {p: pids_of(p) for p in groups}
            running = {}
            for trial in optuna.load_study(study_name="tiny", storage=url).get_trials(
                    deepcopy=False, states=(TrialState.RUNNING,)):
                for group, members in pids.items():
                    if 1 <= len(trial.intermediate_values) <= 3 and trial.user_attrs.get("pid") in members:
                        running[group] = trial
            return (running[first], first) if len(running) == 2 else None

        victim, lost = wait_for(both_groups_in_their_first_epochs, what="a trial of each group early in its run")
        os.killpg(lost.pid, signal.SIGKILL)  # the whole machine: supervisor and worker
        survivor = second if lost is first else first
        survivor_pids = pids_of(survivor)
        output, _ = survivor.communicate(timeout=600)
        lost.wait(timeout=60)
    finally:
        for group in groups:
            if group.poll() is None:
                os.killpg(group.pid, signal.SIGKILL)
    assert survivor.returncode == 0, output[-4000:]

    trials = optuna.load_study(study_name="tiny", storage=url).get_trials()
    states = sorted(t.state.name for t in trials)
    # Exactly: the two budgeted trials complete, the lost one failed once and retried once.
    assert states == ["COMPLETE", "COMPLETE", "FAIL"], [(t.number, t.state.name) for t in trials]
    failed = trials[victim.number]
    assert failed.state == TrialState.FAIL
    assert f"more than {GRACE} s" in failed.user_attrs[FAIL_REASON_ATTR]
    retry = next(t for t in trials if t.system_attrs.get("failed_trial") == victim.number)
    assert retry.state == TrialState.COMPLETE and retry.params == victim.params
    assert "stopped sending heartbeats" in retry.user_attrs["retry_reason"]
    assert retry.user_attrs["pid"] in survivor_pids, "the surviving group ran the retry"
    own = next(t for t in trials if t.state == TrialState.COMPLETE and t.number < retry.number)
    assert own.user_attrs["pid"] in survivor_pids
    assert own.datetime_complete < failed.datetime_complete, "the survivor had finished its own trial and waited"
    assert sum(1 for t in trials if t.user_attrs.get("baseline") and t.state == TrialState.COMPLETE) == 1
    # Each host cached features in its own folder only.
    survivor_folder = second_folder if lost is first else first_folder
    assert any((survivor_folder / "feature-cache").iterdir())
