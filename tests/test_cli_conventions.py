"""The command line's conventions: -q/-v/--log-file, JSON output, $OPTUNA_STORAGE, quiet workers.

One real study is launched once (two worker processes, a log file) and read by the tests below;
two more launches of it check -q and -v.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import cli_env, tiny_spec_dict, write_spec

SPEC = tiny_spec_dict(
    name="conventions",
    data={"synthetic_images_per_class": 8},
    schedule={"phase1_epochs": 1, "phase2_epochs": 1},
    search={"n_trials": 2, "pruner": "none"},
)

#: What TensorFlow's C++ code prints while it loads (see autofinetune/logs.py).
NATIVE_STARTUP_MARKERS = (
    "absl::InitializeLog",
    "port.cc",
    "cudart_stub.cc",
    "cpu_feature_guard.cc",
    "cuda_platform",
    "To enable the following instructions",
)


def autofinetune(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "autofinetune.cli", *args], cwd=cwd, env=env or cli_env(),
        capture_output=True, text=True, timeout=600,
    )


@dataclass
class Launched:
    folder: Path
    spec_path: Path
    url: str
    log_file: Path
    run: subprocess.CompletedProcess

    def load(self):
        import optuna

        return optuna.load_study(study_name=SPEC["name"], storage=self.url)


@pytest.fixture(scope="module")
def launched(tmp_path_factory) -> Launched:
    """`autofinetune --log-file F launch SPEC --workers 2` at the default level."""
    folder = tmp_path_factory.mktemp("conventions")
    spec_path = write_spec(folder, SPEC)
    url = f"sqlite:///{folder / 'study.db'}"
    log_file = folder / "autofinetune.log"
    run = autofinetune("--log-file", str(log_file), "launch", str(spec_path), "--storage", url, "--workers", "2",
                       cwd=folder)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return Launched(folder, spec_path, url, log_file, run)


def test_launch_output_has_no_native_startup_lines(launched):
    output = launched.run.stdout + launched.run.stderr
    assert "[worker 0]" in output or "[worker 1]" in output  # the workers' lines do come through
    assert "trial 0 " in output
    for marker in NATIVE_STARTUP_MARKERS:
        assert marker not in output, f"{marker!r} in the output of launch:\n{output}"


def test_log_file_gets_the_lines_of_every_worker_process(launched):
    lines = launched.log_file.read_text(encoding="utf-8").splitlines()
    started = {}
    for line in lines:
        match = re.search(r"pid (\d+) autofinetune\.cli\] worker (\d) of study 'conventions' started", line)
        if match:
            started[int(match.group(2))] = int(match.group(1))
    assert set(started) == {0, 1}
    assert len(set(started.values())) == 2  # two processes wrote into the one file
    trial_lines = [line for line in lines if "autofinetune.engines.optuna.worker] trial" in line]
    assert any("trial 0 started: backbone='tiny_resnet'" in line and "head_units=" in line for line in trial_lines)
    assert any("trial 1 finished: COMPLETE" in line for line in trial_lines)
    # Info lines go to the file although the terminal shows warnings only.
    assert not any("autofinetune.cli] worker" in line for line in (launched.run.stdout + launched.run.stderr).splitlines())


def test_status_json_lists_every_trial(launched):
    run = autofinetune("status", "--json", "--storage", launched.url, cwd=launched.folder)
    assert run.returncode == 0, run.stderr
    document = json.loads(run.stdout)
    trials = launched.load().get_trials(deepcopy=False)
    assert document["study"] == "conventions" and document["direction"] == "maximize"
    assert [t["number"] for t in document["trials"]] == [t.number for t in trials]
    assert [t["state"] for t in document["trials"]] == [t.state.name for t in trials]
    assert document["n_trials"] == len(trials) >= 2
    first = document["trials"][0]
    assert first["params"] == trials[0].params
    assert first["value"] == pytest.approx(trials[0].value)
    assert first["n_intermediate_values"] == 2  # one per epoch of both phases
    assert first["host"] and first["device"].startswith(("tensorflow", "jax", "torch"))
    assert first["duration_seconds"] > 0 and first["fail_reason"] is None
    assert document["best_trial"]["value"] == pytest.approx(launched.load().best_value)


def test_studies_json(launched):
    run = autofinetune("studies", "--json", "--storage", launched.url, cwd=launched.folder)
    assert run.returncode == 0, run.stderr
    (entry,) = json.loads(run.stdout)["studies"]
    assert entry["name"] == "conventions" and entry["direction"] == "maximize"
    assert entry["n_trials"] == sum(entry["n_trials_by_state"].values()) >= 2
    assert entry["best_value"] == pytest.approx(launched.load().best_value)


def test_quiet_launch_prints_nothing_but_runs(launched):
    before = len(launched.load().trials)
    run = autofinetune("-q", "launch", str(launched.spec_path), "--storage", launched.url,
                       "--n-trials", str(before + 1), cwd=launched.folder)
    assert run.returncode == 0, run.stderr
    assert run.stdout == "" and run.stderr == ""
    assert len(launched.load().trials) == before + 1


def test_verbose_after_the_command_shows_our_info_lines_and_a_study_name_names_another_study(launched):
    # -v after the command's name, as the group's options may be; a study of its own name, in a
    # database of its own (the other tests read the shared one's only study).
    url = f"sqlite:///{launched.folder / 'renamed.db'}"
    run = autofinetune("launch", str(launched.spec_path), "--storage", url, "--study-name", "conventions-v",
                       "--n-trials", "1", "-v", cwd=launched.folder)
    assert run.returncode == 0, run.stderr
    assert re.search(r"\[I [\d-]+ [\d:,]+ autofinetune\.cli\] worker 0 of study 'conventions-v' started", run.stdout)
    listed = json.loads(autofinetune("studies", "--storage", url, "--json", cwd=launched.folder).stdout)
    assert [entry["name"] for entry in listed["studies"]] == ["conventions-v"]


def test_a_resume_with_nothing_to_do_answers_without_starting_a_worker(launched):
    done = len(launched.load().trials)
    run = autofinetune("launch", str(launched.spec_path), "--storage", launched.url, "--n-trials", str(done),
                       cwd=launched.folder)
    assert run.returncode == 0, run.stderr
    assert f"all {done} trials are done; nothing to run" in run.stdout
    assert "worker(s)" not in run.stdout and "best trial:" in run.stdout
    quiet = autofinetune("launch", str(launched.spec_path), "--storage", launched.url, "--n-trials", str(done), "-q",
                         cwd=launched.folder)
    assert quiet.returncode == 0 and quiet.stdout == "" and quiet.stderr == "", "-q after the command's name"


def test_optuna_storage_is_used_without_flag_or_autofinetune_storage(launched, tmp_path):
    env = cli_env()
    env.pop("AUTOFINETUNE_STORAGE", None)
    env["OPTUNA_STORAGE"] = launched.url
    run = autofinetune("status", "--json", cwd=tmp_path, env=env)  # no autofinetune.db in tmp_path
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["study"] == "conventions"
    assert not (tmp_path / "autofinetune.db").exists()


def test_storage_precedence(monkeypatch, tmp_path):
    from autofinetune.store.database import resolve_storage_url

    monkeypatch.setenv("OPTUNA_STORAGE", "sqlite:////optuna.db")
    monkeypatch.setenv("AUTOFINETUNE_STORAGE", "sqlite:////autofinetune-env.db")
    assert resolve_storage_url("sqlite:////flag.db") == "sqlite:////flag.db"
    assert resolve_storage_url(None) == "sqlite:////autofinetune-env.db"
    monkeypatch.delenv("AUTOFINETUNE_STORAGE")
    assert resolve_storage_url(None) == "sqlite:////optuna.db"
    monkeypatch.delenv("OPTUNA_STORAGE")
    assert resolve_storage_url(None).endswith("/autofinetune.db")


def test_quiet_and_verbose_together_is_bad_input(tmp_path):
    run = autofinetune("-q", "-v", "studies", cwd=tmp_path)
    assert run.returncode == 2
    assert "-q/--quiet and -v/--verbose contradict each other" in run.stderr


def test_native_startup_filter_drops_only_startup_noise(tmp_path):
    """Native writes to file descriptor 2 inside the filter: noise is dropped, the rest kept in order."""
    program = r"""
import os
from autofinetune.logs import native_startup_filtered

with native_startup_filtered():
    os.write(2, b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n")
    os.write(2, b"I0000 00:00:1796160575.379020   11371 port.cc:153] oneDNN custom operations are on.\n")
    os.write(2, b"E0000 00:00:1796160579.817792   11371 cuda_platform.cc:52] failed call to cuInit\n")
    os.write(2, b"E0000 00:00:1796160579.817792   11371 some_kernel.cc:9] a real error\n")
    os.write(2, b"plain text\n")
os.write(2, b"after\n")
"""
    run = subprocess.run([sys.executable, "-c", program], env=cli_env(), capture_output=True, text=True, timeout=60,
                         cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert run.stderr.splitlines() == [
        "E0000 00:00:1796160579.817792   11371 some_kernel.cc:9] a real error",
        "plain text",
        "after",
    ]


def test_an_inherited_log_file_that_cannot_be_opened_only_warns(launched, tmp_path):
    # A worker on another machine inherits a log file path that does not exist there.
    env = dict(cli_env(), AUTOFINETUNE_LOG_FILE=str(tmp_path / "missing-folder" / "search.log"))
    run = autofinetune("studies", "--storage", launched.url, cwd=tmp_path, env=env)
    assert run.returncode == 0 and "conventions" in run.stdout
    assert "cannot append to the log file of $AUTOFINETUNE_LOG_FILE here" in run.stderr
    # Given on the command line, the same file is bad input.
    run = autofinetune("--log-file", str(tmp_path / "missing-folder" / "search.log"), "studies",
                       "--storage", launched.url, cwd=tmp_path)
    assert run.returncode == 2 and "--log-file: cannot append to" in run.stderr
