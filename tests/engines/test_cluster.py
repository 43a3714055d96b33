"""A GPU cluster, simulated on one machine with real parts: a multi-node Ray cluster.

A head node (no CPUs, so no trial lands there) and two worker nodes of one CPU each run as
separate Ray nodes (their own raylets and worker processes), the study database is the real
PostgreSQL test server, checkpoints and Ray's experiment state go to one shared folder.
``autofinetune launch --engine ray --address <head>`` runs the study across the nodes; one
worker node is killed (raylet and workers, no graceful shutdown) in the middle of a trial,
and the trial must finish on the other node under the same Optuna trial.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from autofinetune.viewing.trial_views import find_learning_curve

from conftest import cli_env, tiny_spec_dict, wait_for, write_spec

pytest.importorskip("ray.tune")

FAST = {"schedule": {"phase1_epochs": 1, "phase2_epochs": 1}}
#: A driver is killed while its trial runs after its first epoch: a phase 2 of a few epochs keeps
#: that window open for seconds, not the one epoch a busy machine's polls can miss.
DRIVER_KILLED = {"schedule": {"phase1_epochs": 1, "phase2_epochs": 4}}

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ray_cluster():
    """A head node without CPUs and two worker nodes with one CPU each, as separate Ray nodes."""
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():  # pragma: no cover - another module left one connected
        ray.shutdown()
    # The nodes' worker processes must import this checkout's package, like the CLI's children.
    before = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = cli_env()["PYTHONPATH"]
    try:
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
        for _ in range(2):
            cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
    finally:
        if before is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = before
    yield cluster
    cluster.shutdown()


def load(url: str, name: str = "tiny"):
    return optuna.load_study(study_name=name, storage=url)



def running_on_a_node(url: str, *, with_epoch: bool = False) -> list:
    """RUNNING trials whose actor recorded its node (and, optionally, an epoch)."""
    try:
        trials = load(url).get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    except Exception:  # the study may not exist yet
        return []
    return [t for t in trials if "ray_node" in t.user_attrs and (t.intermediate_values or not with_epoch)]


def start_launch(spec_file: Path, url: str, address: str, shared: Path, *more: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "autofinetune.cli", "launch", str(spec_file), "--storage", url, "--engine", "ray",
         "--address", address, "--artifacts", str(shared / "checkpoints"), "--ray-storage", str(shared / "ray"),
         *more],
        cwd=spec_file.parent, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


# --- a study across two worker nodes, one of them lost mid-trial -----------------------------------


@pytest.fixture(scope="module")
def node_lost_study(ray_cluster, postgres_server, tmp_path_factory):
    folder = tmp_path_factory.mktemp("cluster")
    shared = tmp_path_factory.mktemp("cluster-shared")
    url = postgres_server.create_database("raycluster")
    spec_file = write_spec(folder, tiny_spec_dict(search={"n_trials": 3, "pruner": "none", "keep_checkpoints": 1}, **FAST))
    worker_nodes = {node.node_id: node for node in ray_cluster.worker_nodes}
    launch = start_launch(spec_file, url, ray_cluster.address, shared)
    try:
        victim = wait_for(lambda: next(iter(running_on_a_node(url)), None), what="a trial running on a node",
                          process=launch)
        # Mid-trial: its actor is building the model or training; its raylet and workers die at once.
        lost_node = victim.user_attrs["ray_node"]
        ray_cluster.remove_node(worker_nodes[lost_node], allow_graceful=False)
        output, _ = launch.communicate(timeout=600)
    finally:
        launch.kill()
    return {
        "url": url, "output": output, "code": launch.returncode, "victim": victim, "lost_node": lost_node,
        "worker_nodes": set(worker_nodes), "shared": shared,
    }


def test_a_study_runs_across_the_worker_nodes_and_records_the_node_of_each_trial(node_lost_study):
    assert node_lost_study["code"] == 0, node_lost_study["output"][-4000:]
    trials = load(node_lost_study["url"]).get_trials()
    assert len(trials) == 3, [(t.number, t.state) for t in trials]
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 3, "no trial lost or failed"
    nodes = {t.user_attrs["ray_node"] for t in trials}
    # The head has no CPUs: every trial ran on a worker node.
    assert nodes <= node_lost_study["worker_nodes"]
    assert all(t.user_attrs["host"] and t.user_attrs["pid"] for t in trials)
    # keep_checkpoints = 1: one model on the shared folder, of a trial that names it; beside it
    # only the trials' learning curves.
    saved = {path.name for path in (node_lost_study["shared"] / "checkpoints").iterdir()}
    curves = {find_learning_curve(t) for t in trials}
    assert None not in curves, "every trial has its learning curve on the shared folder"
    models = saved - curves
    assert len(models) == 1 and models <= {t.user_attrs.get("checkpoint_artifact_id") for t in trials}
    assert curves <= saved


def test_a_trial_on_a_lost_node_is_retried_on_the_other_node_under_the_same_optuna_trial(node_lost_study):
    trials = load(node_lost_study["url"]).get_trials()
    victim = node_lost_study["victim"]
    retried = trials[victim.number]
    assert retried.state == TrialState.COMPLETE
    assert retried.params == victim.params
    assert retried.user_attrs["ray_node"] != node_lost_study["lost_node"], "finished on the surviving node"
    assert retried.user_attrs["pid"] != victim.user_attrs["pid"]
    assert retried.user_attrs["ray_restarts"] >= 1
    assert "Ray restarted the trial" in retried.user_attrs["retry_reason"]
    # Same Optuna trial, not a new one: no retry trial and no duplicate params.
    assert not any(t.system_attrs.get("failed_trial") is not None for t in trials)
    assert len({tuple(sorted(t.params.items())) for t in trials}) == len(trials)
    assert sorted(retried.intermediate_values) == [1, 2]


# --- the driver dies: launch run again resumes on the cluster --------------------------------------


def test_launch_again_after_the_driver_died_resumes_on_the_cluster(ray_cluster, node_lost_study, postgres_server,
                                                                     tmp_path):
    from autofinetune.engines.ray.engine import RAY_TRIAL_ATTR

    url = postgres_server.create_database("raydriver")
    shared = node_lost_study["shared"]
    spec_file = write_spec(tmp_path, tiny_spec_dict(search={"n_trials": 1, "pruner": "none"}, **DRIVER_KILLED))
    driver = start_launch(spec_file, url, ray_cluster.address, shared, "--max-concurrent", "1")

    def running_trial_in_saved_experiment_state():
        for trial in running_on_a_node(url, with_epoch=True):
            tag = trial.system_attrs.get(RAY_TRIAL_ATTR)
            saved = (shared / "ray" / tag["experiment"]).glob("experiment_state-*.json") if tag else []
            if any(tag["tune_trial"] in path.read_text() for path in saved):
                return trial
        return None

    try:
        victim = wait_for(running_trial_in_saved_experiment_state, what="a running trial in Tune's saved state",
                          process=driver)
        driver.send_signal(signal.SIGKILL)
        driver.wait(timeout=60)
    finally:
        driver.kill()

    again = start_launch(spec_file, url, ray_cluster.address, shared, "--max-concurrent", "1")
    try:
        output, _ = again.communicate(timeout=600)
    finally:
        again.kill()
    assert again.returncode == 0, output[-4000:]
    assert "resuming Ray experiment" in output
    trials = load(url).get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE], "resumed, not duplicated"
    assert trials[0].system_attrs[RAY_TRIAL_ATTR] == victim.system_attrs[RAY_TRIAL_ATTR], "the same Tune trial"
    assert trials[0].user_attrs["ray_node"] in node_lost_study["worker_nodes"]
