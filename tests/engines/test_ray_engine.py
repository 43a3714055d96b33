"""The Ray Tune engine on a real local Ray instance, writing into a real SQLite study database.

One Ray instance (2 CPUs, no dashboard) serves the module. The main study runs three tiny
trials, two at a time, and has one trial's actor killed mid-run; the other tests read it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from autofinetune.spec import parse_spec
from autofinetune.errors import ConfigError
from autofinetune.search.space import optuna_distributions
from autofinetune.store.attributes import FAIL_REASON_ATTR, OUTCOME_ATTR
from autofinetune.store.database import open_storage
from autofinetune.store.study import create_or_resume_study

from conftest import REPO_ROOT, tiny_spec_dict, wait_for, write_spec

pytest.importorskip("ray.tune")

from autofinetune.engines.ray.engine import (  # noqa: E402
    EARLY_STOP_ATTR,
    RAY_EXPERIMENT_ATTR,
    RAY_TRIAL_ATTR,
    RayLaunchOptions,
    launch_with_ray,
    scheduler_plan,
)

FAST = {"schedule": {"phase1_epochs": 1, "phase2_epochs": 1}}
#: A driver is killed while its trial runs after its first epoch: a phase 2 of a few epochs keeps
#: that window open for seconds, not the one epoch a busy machine's polls can miss.
DRIVER_KILLED = {"schedule": {"phase1_epochs": 1, "phase2_epochs": 4}}


@pytest.fixture(scope="module")
def ray_instance():
    import ray

    if ray.is_initialized():  # pragma: no cover - another module left one running
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def new_study(folder: Path, **overrides):
    spec = parse_spec(tiny_spec_dict(**overrides), base_dir=folder, origin="tiny.toml")
    url = f"sqlite:///{folder / 'study.db'}"
    study, _ = create_or_resume_study(spec, open_storage(url))
    return spec, url, study


def load(url: str, name: str = "tiny"):
    return optuna.load_study(study_name=name, storage=url)


def running_with_an_epoch(url: str) -> list:
    """RUNNING trials that reported an epoch; none while the study does not exist yet."""
    try:
        trials = load(url).get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    except Exception:
        return []
    return [t for t in trials if t.intermediate_values]


def how_they_ended(trials) -> list[tuple]:
    """Each trial's state, fail reason and recorded outcome: what a failed assertion shows."""
    return [(t.number, t.state.name, t.user_attrs.get(FAIL_REASON_ATTR), t.system_attrs.get(OUTCOME_ATTR)) for t in trials]



# --- the main study: three trials, two at a time, one actor killed --------------------------------


@pytest.fixture(scope="module")
def main_study(ray_instance, tmp_path_factory):
    folder = tmp_path_factory.mktemp("ray-main")
    spec, url, study = new_study(folder, search={"n_trials": 3, "pruner": "none", "keep_checkpoints": 1}, **FAST)
    outcome: dict = {}

    def run() -> None:
        outcome["code"] = launch_with_ray(spec, url, study, RayLaunchOptions(max_concurrent=2, cpus_per_trial=1))

    runner = threading.Thread(target=run, name="launch-with-ray")
    runner.start()

    def first_epoch_reported():
        for trial in load(url).get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if trial.intermediate_values and "pid" in trial.user_attrs:
                return trial
        return None

    victim = wait_for(first_epoch_reported, what="a trial that reported its first epoch")
    # Its phase 2 (recompile, tracing) is still ahead: kill the actor process mid-run.
    os.kill(victim.user_attrs["pid"], signal.SIGKILL)
    runner.join(timeout=600)
    assert not runner.is_alive(), "launch_with_ray did not return"
    return {"spec": spec, "url": url, "folder": folder, "victim": victim, "code": outcome.get("code")}


@pytest.mark.slow
def test_local_ray_study_records_every_trial_like_the_optuna_engine(main_study):
    assert main_study["code"] == 0
    spec, url = main_study["spec"], main_study["url"]
    trials = load(url).get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 3, [(t.number, t.state) for t in trials]
    first = min(trials, key=lambda t: t.datetime_start)
    assert first.number == 0 and first.user_attrs["baseline"] is True, "the queued baseline runs first"
    assert first.params["head_units"] == 16 and first.params["phase2_lr"] == pytest.approx(1e-4)
    for trial in trials:
        assert trial.distributions == optuna_distributions(spec, trial.params)
        assert sorted(trial.intermediate_values) == [1, 2]
        assert trial.value == max(trial.intermediate_values.values())
        attrs = trial.user_attrs
        for key in ("phase_boundary_step", "phase1_best", "phase2_best", "phase1_seconds", "phase2_seconds",
                    "phase1_images_per_second", "phase1_trainable_params", "phase2_trainable_params", "host",
                    "device", "unfrozen_blocks", "trial_seconds", "ray_trial_id"):
            assert key in attrs, (trial.number, key)
        assert [(h["step"], h["phase"]) for h in attrs["history"]] == [(1, 1), (2, 2)]
        assert all(h["val_accuracy"] == pytest.approx(trial.intermediate_values[h["step"]]) for h in attrs["history"])
        assert len(attrs["unfrozen_blocks"]) == trial.params["unfreeze_depth"]
    best = load(url).best_trial
    assert (main_study["folder"] / "study.db.artifacts" / best.user_attrs["checkpoint_artifact_id"]).is_file()
    record = load(url)._storage.get_study_system_attrs(load(url)._study_id)[RAY_EXPERIMENT_ATTR]
    assert record["finished"] is True and record["path"].startswith(str(main_study["folder"] / "study.db.ray"))

    status = subprocess.run(
        [sys.executable, "-m", "autofinetune.cli", "status", "tiny", "--storage", url],
        capture_output=True, text=True, timeout=120, cwd=REPO_ROOT,
    )
    assert status.returncode == 0, status.stderr
    assert "COMPLETE" in status.stdout and "baseline (seed recipe)" in status.stdout
    assert f"best trial: {best.number}" in status.stdout


@pytest.mark.slow
def test_a_killed_trial_actor_is_retried_and_the_study_completes(main_study):
    victim = main_study["victim"]
    trials = load(main_study["url"]).get_trials()
    assert len(trials) == 3, "a retry reuses the trial, it adds none"
    retried = trials[victim.number]
    assert retried.state == TrialState.COMPLETE
    assert retried.params == victim.params
    assert retried.user_attrs["ray_restarts"] == 1
    assert "Ray restarted the trial" in retried.user_attrs["retry_reason"]
    assert retried.user_attrs["pid"] != victim.user_attrs["pid"]
    assert FAIL_REASON_ATTR not in retried.user_attrs


def test_resume_adds_only_the_missing_trials(main_study):
    spec, url = main_study["spec"], main_study["url"]
    study, _ = create_or_resume_study(spec, open_storage(url))
    assert launch_with_ray(spec, url, study, RayLaunchOptions(max_concurrent=2)) == 0
    assert len(load(url).get_trials()) == 3, "the budget was used: nothing new"

    study, _ = create_or_resume_study(spec, open_storage(url), n_trials=4)
    before = {t.number: t.datetime_complete for t in load(url).get_trials()}
    assert launch_with_ray(spec, url, study, RayLaunchOptions(max_concurrent=2)) == 0
    trials = load(url).get_trials()
    assert len(trials) == 4 and all(t.state == TrialState.COMPLETE for t in trials)
    assert {t.number: t.datetime_complete for t in trials[:3]} == before
    assert sum(1 for t in trials if t.user_attrs.get("baseline")) == 1


# --- the driver dies: launch again resumes its Ray experiment ---------------------------------------


@pytest.mark.slow
def test_launch_again_after_the_driver_died_resumes_its_ray_experiment(ray_instance, tmp_path):
    from autofinetune.spec import load_spec
    from autofinetune.store.database import load_study

    spec_file = write_spec(tmp_path, tiny_spec_dict(search={"n_trials": 1, "pruner": "none"}, **DRIVER_KILLED))
    url = f"sqlite:///{tmp_path / 'study.db'}"
    # The driver joins this module's Ray instance, so its death takes only its own job down.
    driver = subprocess.Popen(
        [sys.executable, "-m", "autofinetune.cli", "launch", str(spec_file), "--storage", url, "--engine", "ray",
         "--address", ray_instance.get_runtime_context().gcs_address, "--max-concurrent", "1"],
        cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )

    def running_trial_in_saved_experiment_state():
        for trial in running_with_an_epoch(url):
            tag = trial.system_attrs.get(RAY_TRIAL_ATTR)
            if not tag:
                continue
            saved = (tmp_path / "study.db.ray" / tag["experiment"]).glob("experiment_state-*.json")
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

    study = load_study("tiny", open_storage(url))
    assert launch_with_ray(load_spec(spec_file), url, study, RayLaunchOptions(max_concurrent=1)) == 0
    trials = load(url).get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE], f"resumed, not duplicated: {how_they_ended(trials)}"
    resumed = trials[victim.number]
    assert resumed.system_attrs[RAY_TRIAL_ATTR] == victim.system_attrs[RAY_TRIAL_ATTR], "the same Tune trial"
    assert resumed.user_attrs["pid"] != victim.user_attrs["pid"]
    record = study._storage.get_study_system_attrs(study._study_id)[RAY_EXPERIMENT_ATTR]
    assert record["name"] == victim.system_attrs[RAY_TRIAL_ATTR]["experiment"] and record["finished"] is True


def test_ctrl_c_fails_the_running_trial_with_a_reason_and_queues_it_again(ray_instance, tmp_path):
    spec_file = write_spec(tmp_path, tiny_spec_dict(search={"n_trials": 2, "pruner": "none"}, **FAST))
    url = f"sqlite:///{tmp_path / 'study.db'}"
    driver = subprocess.Popen(
        [sys.executable, "-m", "autofinetune.cli", "launch", str(spec_file), "--storage", url, "--engine", "ray",
         "--address", ray_instance.get_runtime_context().gcs_address, "--max-concurrent", "1"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        wait_for(lambda: running_with_an_epoch(url), what="a running trial", process=driver)
        driver.send_signal(signal.SIGINT)
        output, _ = driver.communicate(timeout=180)
    finally:
        driver.kill()
    assert driver.returncode == 130, output[-3000:]
    interrupted, retry = load(url).get_trials()
    assert interrupted.state == TrialState.FAIL
    assert interrupted.user_attrs[FAIL_REASON_ATTR] == "interrupted (Ctrl-C) while running; queued again"
    assert retry.state == TrialState.WAITING and retry.params == interrupted.params
    assert retry.system_attrs["failed_trial"] == interrupted.number
    record = load(url)._storage.get_study_system_attrs(load(url)._study_id)[RAY_EXPERIMENT_ATTR]
    assert record["finished"] is True, "the next launch starts afresh and runs the queued retry first"


# --- early stopping ------------------------------------------------------------------------------


def test_a_trial_stopped_by_asha_is_pruned_with_its_full_record(ray_instance, tmp_path):
    # Two queued trials, one at a time, scored by val_loss. The first learns nothing at a tiny
    # rate (val_loss stays near ln 3); the second's huge rate blows its val_loss up, so ASHA's
    # first rung (step 1, cutoff = the first trial's value) stops it. Steps are epochs.
    spec, url, study = new_study(
        tmp_path,
        objective={"metric": "val_loss"},
        search={"n_trials": 2, "baseline_trial": False, "pruner": "successive_halving",
                "pruner_options": {"min_resource": 1, "reduction_factor": 2},
                "phase1_lr": {"low": 1e-6, "high": 5.0, "log": True}},
        schedule={"phase1_epochs": 2, "phase2_epochs": 0},  # one phase: one model to trace, not two
    )
    study.enqueue_trial({"phase1_lr": 1e-6})
    study.enqueue_trial({"phase1_lr": 5.0})
    assert launch_with_ray(spec, url, study, RayLaunchOptions(max_concurrent=1)) == 0

    calm, wild = load(url).get_trials()
    assert calm.state == TrialState.COMPLETE and sorted(calm.intermediate_values) == [1, 2]
    assert wild.state == TrialState.PRUNED, (wild.state, wild.intermediate_values, calm.intermediate_values)
    assert wild.intermediate_values[1] > calm.intermediate_values[1]
    assert sorted(wild.intermediate_values) == [1]
    assert wild.value == wild.intermediate_values[1]  # Optuna's rule for a pruned trial
    assert wild.user_attrs["pruned_at_step"] == 1
    assert [h["step"] for h in wild.user_attrs["history"]] == [1]
    assert wild.system_attrs[EARLY_STOP_ATTR] == {"step": 1, "scheduler": "ASHA"}
    for key in ("phase1_best", "phase1_seconds", "host", "device", "unfrozen_blocks", "trial_seconds"):
        assert key in wild.user_attrs, key


# --- failures that stop the search -----------------------------------------------------------------


def test_a_fatal_trial_error_is_recorded_as_fail_with_its_reason_and_stops_the_search(ray_instance, tmp_path):
    from autofinetune.store.attributes import STUDY_FINGERPRINT_ATTR

    spec, url, study = new_study(tmp_path, search={"n_trials": 3, "pruner": "none"}, **FAST)
    # As if the study had started on other images: the actor's data does not match.
    study.set_user_attr(STUDY_FINGERPRINT_ATTR, "0" * 64)
    assert launch_with_ray(spec, url, study, RayLaunchOptions(max_concurrent=1)) == 2
    trials = load(url).get_trials()
    assert trials[0].state == TrialState.FAIL
    assert "differs from the data the study started with" in trials[0].user_attrs[FAIL_REASON_ATTR]
    assert [t.state for t in trials[1:]] == [], "no trial starts after a fatal error"


def test_a_passed_deadline_starts_no_trial(ray_instance, tmp_path):
    spec, url, study = new_study(tmp_path, **FAST)
    assert launch_with_ray(spec, url, study, RayLaunchOptions(deadline=time.time() - 1)) == 0
    assert [t.state for t in load(url).get_trials()] == [TrialState.WAITING], "the queued baseline waits"


# --- bad input: found before Ray starts ----------------------------------------------------------


@pytest.mark.parametrize("options, expected", [
    ({"gpus_per_trial": 1.5}, "--gpus-per-trial: got 1.5; above 1 it must be a whole number"),
    ({"cpus_per_trial": 0.0, "gpus_per_trial": 0.0}, "a trial needs some resource"),
    ({"max_concurrent": 0}, "--max-concurrent: got 0; must be an integer >= 1"),
])
def test_bad_ray_options_are_refused(options, expected):
    with pytest.raises(ConfigError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        RayLaunchOptions(**options).check()


def test_pruners_map_to_ray_schedulers_or_are_refused(tiny_spec):
    asha = scheduler_plan(tiny_spec(search={"pruner": "hyperband"}, schedule={"phase1_epochs": 3, "phase2_epochs": 6}))
    # The first rung is the end of phase 1, as under the Optuna engine (tests/search).
    assert asha.kind == "asha" and asha.options["max_t"] == 9 and asha.options["grace_period"] == 3
    assert asha.options["brackets"] == 2  # Optuna's Hyperband: floor(log_3(9 / 3)) + 1 brackets
    halving = scheduler_plan(tiny_spec(search={"pruner": "successive_halving",
                                               "pruner_options": {"min_resource": 2, "reduction_factor": 2}}))
    assert halving.options == {"grace_period": 2, "max_t": 4, "reduction_factor": 2.0, "brackets": 1}
    assert scheduler_plan(tiny_spec(search={"pruner": "none"})).kind == "fifo"
    with pytest.raises(ConfigError, match="search.pruner: 'threshold' has no Ray Tune scheduler"):
        scheduler_plan(tiny_spec(search={"pruner": "threshold", "pruner_options": {"lower": 0.5}}))
    with pytest.raises(ConfigError, match="'bootstrap_count'|bootstrap_count"):
        scheduler_plan(tiny_spec(search={"pruner": "hyperband", "pruner_options": {"bootstrap_count": 2}}))


def test_engine_ray_without_the_ray_extra_names_the_extra_and_writes_nothing(tmp_path):
    spec = write_spec(tmp_path, tiny_spec_dict())
    # `sys.modules['ray'] = None` makes `import ray` fail as if Ray were not installed.
    program = "import sys; sys.modules['ray'] = None; from autofinetune.cli import main; main()"
    out = subprocess.run(
        [sys.executable, "-c", program, "launch", str(spec), "--storage", f"sqlite:///{tmp_path / 'study.db'}",
         "--engine", "ray"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 2, out.stdout + out.stderr
    assert "pip install 'autofinetune[ray]'" in out.stderr
    assert not (tmp_path / "study.db").exists()


def test_bad_ray_option_on_the_command_line_exits_2_before_the_database(tmp_path):
    spec = write_spec(tmp_path, tiny_spec_dict(search={"pruner": "percentile", "pruner_options": {"percentile": 25.0}}))
    out = subprocess.run(
        [sys.executable, "-m", "autofinetune.cli", "launch", str(spec), "--storage",
         f"sqlite:///{tmp_path / 'study.db'}", "--engine", "ray"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 2
    assert "search.pruner: 'percentile' has no Ray Tune scheduler" in out.stderr
    assert not (tmp_path / "study.db").exists()
