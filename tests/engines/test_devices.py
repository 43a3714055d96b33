"""Every GPU of a machine: found without flags, one worker per device, memory growth on.

This machine has no GPU; a fake ``nvidia-smi`` on ``PATH`` and ``CUDA_VISIBLE_DEVICES`` stand in
for a GPU box. What the tests check is the environment each worker process gets.
"""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import optuna
import pytest

from autofinetune.engines.devices import GpuDiscovery, discover_gpus, parse_gpus, worker_environments
from autofinetune.engines.optuna.supervisor import gpu_slots
from autofinetune.errors import ConfigError

from conftest import cli_env, tiny_spec_dict, write_spec

GROWTH = {"TF_FORCE_GPU_ALLOW_GROWTH": "true", "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}


def fake_nvidia_smi(folder: Path, count: int) -> Path:
    """A folder holding an ``nvidia-smi`` that lists ``count`` GPUs the way the real one does."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = "\n".join(f"GPU {i}: NVIDIA H100 80GB HBM3 (UUID: GPU-{i:08d}-0000-0000-0000-000000000000)" for i in range(count))
    script = folder / "nvidia-smi"
    script.write_text(f'#!/bin/sh\n[ "$1" = "-L" ] || exit 9\ncat <<EOF\n{lines}\nEOF\n')
    script.chmod(script.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return folder


@pytest.fixture
def four_gpu_box(tmp_path, monkeypatch):
    """This process looks like a machine with 4 GPUs (nvidia-smi) and no CUDA_VISIBLE_DEVICES."""
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setenv("PATH", f"{fake_nvidia_smi(tmp_path / 'bin', 4)}{os.pathsep}{os.environ['PATH']}")


def test_gpus_are_found_by_nvidia_smi_and_each_worker_sees_one(four_gpu_box):
    assert discover_gpus() == GpuDiscovery(("0", "1", "2", "3"), "nvidia-smi -L")
    slots = gpu_slots(None)
    assert slots == [{"CUDA_VISIBLE_DEVICES": str(i), **GROWTH} for i in range(4)]
    assert gpu_slots("all") == slots
    assert gpu_slots("1,3") == [{"CUDA_VISIBLE_DEVICES": "1", **GROWTH}, {"CUDA_VISIBLE_DEVICES": "3", **GROWTH}]
    assert gpu_slots("none", 2) == [{}, {}]


def test_trials_per_gpu_shares_each_card_and_workers_spread_over_them(four_gpu_box):
    shared = gpu_slots("0,1", trials_per_gpu=3)
    assert [slot["CUDA_VISIBLE_DEVICES"] for slot in shared] == ["0", "0", "0", "1", "1", "1"]
    assert all(slot["TF_FORCE_GPU_ALLOW_GROWTH"] == "true" for slot in shared)
    spread = gpu_slots(None, 6)
    assert [slot["CUDA_VISIBLE_DEVICES"] for slot in spread] == ["0", "1", "2", "3", "0", "1"]
    with pytest.raises(ConfigError, match="--workers 2 and --trials-per-gpu 2: give one of them"):
        gpu_slots(None, 2, trials_per_gpu=2)


def test_cuda_visible_devices_wins_over_nvidia_smi(four_gpu_box, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    assert discover_gpus() == GpuDiscovery(("2", "3"), "CUDA_VISIBLE_DEVICES")
    assert [slot["CUDA_VISIBLE_DEVICES"] for slot in gpu_slots(None)] == ["2", "3"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert gpu_slots(None, 2) == [{}, {}], "an empty CUDA_VISIBLE_DEVICES hides every GPU: the CPU path"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "-1")
    assert discover_gpus().ids == ()


def test_a_cpu_machine_keeps_the_cpu_path(tmp_path, monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))  # no nvidia-smi
    cpu = GpuDiscovery((), "none found")
    assert gpu_slots(None, discovery=cpu) == [{}]
    assert gpu_slots(None, 3, discovery=cpu) == [{}, {}, {}]
    assert worker_environments((), trials_per_gpu=4) == [{}]
    with pytest.raises(ConfigError, match="--gpus all: no GPU found"):
        gpu_slots("all", discovery=cpu)
    with pytest.raises(ConfigError, match=r"--gpus: got '7'; device\(s\) 7 not found; no GPU is visible here \(none found\)"):
        gpu_slots("7", discovery=cpu)


def test_a_device_outside_the_visible_ones_is_refused_with_the_list(four_gpu_box, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with pytest.raises(ConfigError, match=r"device\(s\) 7 not found; no GPU is visible here \(CUDA_VISIBLE_DEVICES\)"):
        parse_gpus("7")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")
    with pytest.raises(ConfigError, match=r"device\(s\) 7 not found; this machine has 0, 1, 2, 3 \(CUDA_VISIBLE_DEVICES\)"):
        parse_gpus("7")


@pytest.mark.parametrize(("value", "message"), [
    ("a,b", "--gpus: got 'a,b'; allowed: all, none, or device ids separated by commas"),
    ("0,,1", "--gpus: got '0,,1'; allowed"),
    ("1,1", "a device is listed twice"),
    ("0,7", r"device\(s\) 7 not found; this machine has 0, 1, 2, 3 \(nvidia-smi -L\)"),
])
def test_bad_gpu_lists_name_the_value_and_the_rule(four_gpu_box, value, message):
    with pytest.raises(ConfigError, match=message):
        parse_gpus(value)


def test_bad_gpus_on_launch_exit_2_before_the_study_is_created(tmp_path, four_gpu_box):
    spec = write_spec(tmp_path, tiny_spec_dict())
    url = f"sqlite:///{tmp_path / 'study.db'}"
    env = dict(cli_env(), PATH=os.environ["PATH"])
    out = subprocess.run([sys.executable, "-m", "autofinetune.cli", "launch", str(spec), "--storage", url,
                          "--gpus", "0,9"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stdout + out.stderr
    assert "--gpus: got '0,9'; device(s) 9 not found" in out.stderr
    assert not (tmp_path / "study.db").exists()


def test_launch_without_flags_runs_one_real_worker_per_gpu(tmp_path, monkeypatch):
    """Two (fake) GPUs, no flags: two worker processes, each seeing only its device."""
    spec = write_spec(tmp_path, tiny_spec_dict(
        search={"n_trials": 2, "pruner": "none", "baseline_trial": False},
        schedule={"phase1_epochs": 1, "phase2_epochs": 0},
    ))
    url = f"sqlite:///{tmp_path / 'study.db'}"
    env = cli_env()
    env.pop("CUDA_VISIBLE_DEVICES", None)
    env["PATH"] = f"{fake_nvidia_smi(tmp_path / 'bin', 2)}{os.pathsep}{env['PATH']}"
    out = subprocess.run([sys.executable, "-m", "autofinetune.cli", "launch", str(spec), "--storage", url],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "2 worker(s), GPU 0, 1" in out.stdout
    # Each worker process reports the device list it was started with.
    assert re.search(r"^\[worker 0\] worker 0: CUDA_VISIBLE_DEVICES=0$", out.stdout, re.M), out.stdout
    assert re.search(r"^\[worker 1\] worker 1: CUDA_VISIBLE_DEVICES=1$", out.stdout, re.M), out.stdout

    trials = optuna.load_study(study_name="tiny", storage=url).get_trials()
    assert len(trials) == 2
    device_of_pid = {}
    for trial in trials:
        device = trial.user_attrs["device"]
        assert re.search(r", CUDA_VISIBLE_DEVICES=[01]$", device), device
        device_of_pid.setdefault(trial.user_attrs["pid"], device)
        assert device_of_pid[trial.user_attrs["pid"]] == device, "one worker process, one device"

    status = subprocess.run([sys.executable, "-m", "autofinetune.cli", "status", "tiny", "--storage", url],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert status.returncode == 0 and "device" in status.stdout.splitlines()[1]
    for trial in trials:
        assert trial.user_attrs["device"] in status.stdout


def test_gpu_options_are_refused_for_engines_that_place_trials_themselves(tmp_path):
    from click.testing import CliRunner

    from autofinetune.cli import main

    spec = write_spec(tmp_path, tiny_spec_dict())
    url = f"sqlite:///{tmp_path / 'study.db'}"
    result = CliRunner().invoke(main, ["launch", str(spec), "--storage", url, "--engine", "keras-tuner", "--gpus", "0"])
    assert result.exit_code == 2
    assert "--gpus belongs to the optuna engine; --engine keras-tuner takes --tuner" in result.output
    assert not (tmp_path / "study.db").exists()
