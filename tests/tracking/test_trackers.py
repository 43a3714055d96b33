"""Trackers receive every trial: a real MLflow file store and tracking server, W&B offline files,
TensorBoard event files; an unreachable tracker stops the launch before anything is written."""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from optuna.trial import TrialState

import autofinetune

from conftest import cli_env, tiny_spec_dict, write_spec

#: Two trials of 1 + 2 epochs: the phase boundary is after step 1, and both phases have epochs.
TRACKED_SPEC = tiny_spec_dict(
    name="tracked",
    search={"n_trials": 2, "pruner": "none", "keep_checkpoints": 1},
    schedule={"phase1_epochs": 1, "phase2_epochs": 2},
)
STEPS = [1, 2, 3]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _assert_mlflow_runs(uri: str, study) -> None:
    """Every finished trial of ``study`` is a child run of the study's run, with every epoch."""
    import mlflow
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=[study.study_name], output_format="list")
    parents = [r for r in runs if r.data.tags.get("autofinetune.role") == "study"]
    children = {int(r.data.tags["autofinetune.trial_number"]): r for r in runs if r.data.tags.get("autofinetune.role") == "trial"}
    assert len(parents) == 1, "one parent run, shared by the workers and resumed launches"
    finished = [t for t in study.get_trials() if t.state.is_finished()]
    assert sorted(children) == [t.number for t in finished]
    for trial in finished:
        run = children[trial.number]
        assert run.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        assert run.data.tags["autofinetune.state"] == trial.state.name
        assert run.data.params["phase_boundary_step"] == "1"
        assert run.data.params["head_units"] == str(trial.params["head_units"])
        history = client.get_metric_history(run.info.run_id, "val_accuracy")
        assert sorted(m.step for m in history) == sorted(trial.intermediate_values) == STEPS
        by_step = {m.step: m.value for m in history}
        assert all(by_step[s] == pytest.approx(v) for s, v in trial.intermediate_values.items())
        phases = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "phase")}
        assert phases == {1: 1.0, 2: 2.0, 3: 2.0}
        assert run.info.status == "FINISHED"
    best = children[study.best_trial.number]
    assert best.data.tags.get("autofinetune.best") == "true"
    assert [a.path for a in client.list_artifacts(best.info.run_id, "checkpoint")] == ["checkpoint/model.keras"]
    parent = client.get_run(parents[0].info.run_id)
    assert parent.data.tags["autofinetune.best_trial"] == str(study.best_trial.number)
    assert parent.data.tags["autofinetune.study_uid"] == study.user_attrs["autofinetune:study_uid"]
    # The parent run ends with the launch, and holds the spec, the engine, sampler and pruner.
    assert parent.info.status == "FINISHED"
    assert parent.data.params["engine"] == "optuna" and parent.data.params["sampler"] == "tpe"
    assert parent.data.params["pruner"] == "none" and parent.data.params["data.image_size"] == "16"
    assert parent.data.params["search.unfreeze_depth"] == "{'low': 0, 'high': 16, 'log': False}"
    assert not any(key.startswith(("storage", "tracking")) for key in parent.data.params)


def _wandb_records(path: Path):
    """The protobuf records of an offline W&B run file (LevelDB's log format after a 7-byte header)."""
    from wandb.proto import wandb_internal_pb2

    data, pos, block, pending = path.read_bytes(), 7, 32768, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 0:
            break
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def _wandb_runs(folder: Path) -> dict[str, dict]:
    """Offline runs by name: group, job type, history rows by step, summary."""
    runs = {}
    for run_file in folder.glob("wandb/offline-run-*/*.wandb"):
        run: dict = {"history": {}, "summary": {}}
        for record in _wandb_records(run_file):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                run.update(name=record.run.display_name, group=record.run.run_group, job_type=record.run.job_type)
                run["config"] = {item.key: json.loads(item.value_json) for item in record.run.config.update
                                 if not item.key.startswith("_")}
            elif kind == "history":
                row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
                run["history"][row["_step"]] = row
            elif kind == "summary":
                run["summary"].update({item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.summary.update})
        runs[run["name"]] = run
    return runs


def _tensorboard_session_groups(logdir: Path, metric: str) -> dict[str, dict]:
    """The HParams tab's rows, from a real TensorBoard server: trial name -> its hparams and metrics."""
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir), "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    request = {
        "experimentName": "", "allowedStatuses": ["STATUS_UNKNOWN", "STATUS_SUCCESS", "STATUS_FAILURE", "STATUS_RUNNING"],
        "colParams": [{"metric": {"tag": metric, "group": ""}}], "startIndex": 0, "sliceSize": 100,
    }
    try:
        deadline = time.time() + 120
        while True:
            try:
                answer = urllib.request.urlopen(urllib.request.Request(
                    f"http://127.0.0.1:{port}/data/plugin/hparams/session_groups", data=json.dumps(request).encode(),
                    headers={"Content-Type": "application/json"},
                ), timeout=5)
                groups = json.loads(answer.read())["sessionGroups"]
                if groups:
                    break
            except (OSError, KeyError, ValueError):
                pass
            assert server.poll() is None and time.time() < deadline, "TensorBoard served no HParams sessions"
            time.sleep(0.5)
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)
    return {
        group["name"]: {"hparams": group["hparams"], "metrics": {m["name"]["tag"]: m["value"] for m in group["metricValues"]}}
        for group in groups
    }


def _tensorboard_scalars(folder: Path) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(folder))
    accumulator.Reload()
    return {tag: {e.step: e.value for e in accumulator.Scalars(tag)} for tag in accumulator.Tags()["scalars"]}


@pytest.mark.slow
def test_mlflow_file_store_wandb_offline_and_tensorboard_receive_every_trial(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    # MLflow 3 keeps its file store behind this switch (maintenance mode); workers inherit it.
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    mlflow_uri = (tmp_path / "mlruns").as_uri()
    study = autofinetune.launch(
        TRACKED_SPEC, storage=f"sqlite:///{tmp_path / 'study.db'}",
        mlflow=mlflow_uri, wandb="autofinetune-tests", tensorboard=tmp_path / "tb",
    )
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2
    _assert_mlflow_runs(mlflow_uri, study)

    runs = _wandb_runs(tmp_path)
    for trial in trials:
        run = runs[f"trial_{trial.number}"]
        assert run["group"] == "tracked" and run["job_type"] == "trial"
        assert sorted(run["history"]) == STEPS
        for step, value in trial.intermediate_values.items():
            assert run["history"][step]["val_accuracy"] == pytest.approx(value)
            assert run["history"][step]["phase"] == (1 if step == 1 else 2)
        assert run["summary"]["state"] == "COMPLETE"
    assert runs["tracked"]["summary"]["best_trial"] == study.best_trial.number

    uid = study.user_attrs["autofinetune:study_uid"]
    for trial in trials:
        config = runs[f"trial_{trial.number}"]["config"]
        assert config["study_uid"] == uid and config["spec"]["schedule.phase2_epochs"] == 2, "the spec in the config"
        scalars = _tensorboard_scalars(tmp_path / "tb" / f"tracked-{uid[:8]}" / f"trial_{trial.number}")
        assert sorted(scalars["val_accuracy"]) == STEPS, "both phases, one curve"
        assert scalars["val_accuracy"] == pytest.approx(trial.intermediate_values)
        assert scalars["phase"] == {1: 1.0, 2: 2.0, 3: 2.0}
    assert runs["tracked"]["config"]["spec"]["engine"] == "optuna" and runs["tracked"]["summary"]["status"] == "FINISHED"
    # TensorBoard's HParams tab compares the trials: their params and their value.
    groups = _tensorboard_session_groups(tmp_path / "tb", "best_val_accuracy")
    assert sorted(groups) == [f"trial_{t.number}" for t in trials]
    for trial in trials:
        row = groups[f"trial_{trial.number}"]
        assert row["hparams"]["head_units"] == trial.params["head_units"]
        assert row["hparams"]["phase2_lr"] == pytest.approx(trial.params["phase2_lr"])
        assert row["metrics"]["best_val_accuracy"] == pytest.approx(trial.value)


@pytest.fixture
def mlflow_server(tmp_path):
    """A real MLflow tracking server on loopback, with a SQLite backend; yields its URI."""
    port = _free_port()
    uri = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
         "--artifacts-destination", str(tmp_path / "mlflow-artifacts"), "--workers", "1"],
        cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )
    try:
        deadline = time.time() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            assert server.poll() is None, server.stderr.read()[-3000:]
            assert time.time() < deadline, "the MLflow server did not start within 2 minutes"
            time.sleep(0.5)
        yield uri
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)


@pytest.mark.slow
def test_a_local_mlflow_tracking_server_receives_every_trial_from_the_command_line(tmp_path, mlflow_server):
    spec_path = write_spec(tmp_path, TRACKED_SPEC)
    url = f"sqlite:///{tmp_path / 'study.db'}"
    out = subprocess.run(
        [sys.executable, "-m", "autofinetune.cli", "launch", str(spec_path), "--storage", url, "--mlflow", mlflow_server],
        cwd=tmp_path, capture_output=True, text=True, timeout=600, env=cli_env(),
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    import optuna

    _assert_mlflow_runs(mlflow_server, optuna.load_study(study_name="tracked", storage=url))


def test_an_unreachable_tracker_fails_the_launch_before_any_trial_runs(tmp_path):
    spec_path = write_spec(tmp_path, TRACKED_SPEC)
    closed = f"http://127.0.0.1:{_free_port()}"
    out = subprocess.run(
        [sys.executable, "-m", "autofinetune.cli", "launch", str(spec_path),
         "--storage", f"sqlite:///{tmp_path / 'study.db'}", "--mlflow", closed],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, env=cli_env(),
    )
    assert out.returncode == 2, out.stdout[-3000:] + out.stderr[-3000:]
    assert f"--mlflow / tracking.mlflow: cannot reach {closed}" in out.stderr
    assert not (tmp_path / "study.db").exists(), "the study database is untouched"


@pytest.mark.slow
def test_two_studies_of_one_name_keep_their_own_mlflow_runs_and_a_resume_reopens_its_own(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"  # MLflow's database store: no switch needed
    first, second = f"sqlite:///{tmp_path / 'first.db'}", f"sqlite:///{tmp_path / 'second.db'}"
    studies = [autofinetune.launch(TRACKED_SPEC, storage=url, mlflow=uri) for url in (first, second)]
    resumed = autofinetune.launch(TRACKED_SPEC, storage=first, mlflow=uri, n_trials=3)
    uids = [study.user_attrs["autofinetune:study_uid"] for study in studies]
    assert uids[0] != uids[1] and resumed.user_attrs["autofinetune:study_uid"] == uids[0]

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("tracked")
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    parents = {r.data.tags["autofinetune.study_uid"]: r for r in runs if r.data.tags["autofinetune.role"] == "study"}
    assert sorted(parents) == sorted(uids), "one parent run per study, the resumed one reopened, not doubled"
    assert all(parent.info.status == "FINISHED" for parent in parents.values())
    for uid, expected in ((uids[0], 3), (uids[1], 2)):
        children = [r for r in runs if r.data.tags["autofinetune.role"] == "trial" and r.data.tags["autofinetune.study_uid"] == uid]
        assert sorted(int(r.data.tags["autofinetune.trial_number"]) for r in children) == list(range(expected))
        for run in children:
            assert run.data.tags["mlflow.parentRunId"] == parents[uid].info.run_id
            steps = [m.step for m in client.get_metric_history(run.info.run_id, "val_accuracy")]
            assert sorted(steps) == STEPS, "each trial's own epochs, once"


def test_an_mlflow_file_store_behind_its_switch_is_refused_with_mlflows_whole_hint(tmp_path, monkeypatch):
    from autofinetune.errors import ConfigError

    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    with pytest.raises(ConfigError) as refused:
        autofinetune.launch(TRACKED_SPEC, storage=f"sqlite:///{tmp_path / 'study.db'}", mlflow=(tmp_path / "mlruns").as_uri())
    message = str(refused.value)
    assert message.startswith("--mlflow / tracking.mlflow: cannot use MLflow at file://")
    assert "sqlite:///mlflow.db" in message and message.rstrip(".").endswith("set `MLFLOW_ALLOW_FILE_STORE=true` to opt out of this exception")
    assert not (tmp_path / "study.db").exists()


def test_tracking_fields_are_validated_naming_the_field(tmp_path):
    from autofinetune.errors import ConfigError
    from autofinetune.spec import parse_spec

    with pytest.raises(ConfigError, match="tracking.wandb: got 'my project'"):
        parse_spec(tiny_spec_dict(tracking={"wandb": "my project"}), base_dir=tmp_path)
    with pytest.raises(ConfigError, match="tracking.mlflow: got 'ftp://host'"):
        parse_spec(tiny_spec_dict(tracking={"mlflow": "ftp://host"}), base_dir=tmp_path)
    with pytest.raises(ConfigError, match="--wandb: got 'a b'"):
        autofinetune.launch(tiny_spec_dict(), storage=f"sqlite:///{tmp_path / 'x.db'}", wandb="a b")
    assert not (tmp_path / "x.db").exists()


def test_a_tracker_that_fails_mid_study_is_warned_about_once_and_never_fails_a_trial(tmp_path, caplog):
    import optuna

    # Trial 0's TensorBoard folder is taken by a file: its event writer cannot be created.
    spec = tiny_spec_dict(name="broken-tb", tracking={"tensorboard": str(tmp_path / "tb")},
                          schedule={"phase1_epochs": 1, "phase2_epochs": 1})
    (tmp_path / "tb" / "broken-tb-0123abcd").mkdir(parents=True)
    (tmp_path / "tb" / "broken-tb-0123abcd" / "trial_0").write_text("not a folder")
    study = optuna.create_study(direction="maximize")
    study.set_user_attr("autofinetune:study_uid", "0123abcd" * 4)  # its folder: broken-tb-0123abcd
    with caplog.at_level("WARNING"):
        study.optimize(autofinetune.objective(spec), n_trials=2)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 2
    warnings = [r.getMessage() for r in caplog.records if "tracker --tensorboard / tracking.tensorboard failed" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert not (tmp_path / "tb" / "broken-tb-0123abcd" / "trial_1").exists(), "a failed tracker stays off in this process"
    assert study.trials[1].user_attrs["record_warnings"] == [
        "tracker --tensorboard / tracking.tensorboard is off in this process since it failed"
    ], "what a trial's tracker runs miss is said on the trial"
