"""The one trial path: what a trial records, in which order, and what survives a failure."""

from __future__ import annotations

import shutil
import threading
import time

import optuna
import pytest
from optuna.trial import TrialState

from autofinetune.engines.optuna.worker import fail_stale_trials
from autofinetune.engines.trial_path import (
    MAX_CONSECUTIVE_ERRORS,
    ConsecutiveFailures,
    TrialRecording,
    run_recorded_trial,
)
from autofinetune.errors import FatalError
from autofinetune.search.space import suggest_params
from autofinetune.spec import parse_spec
from autofinetune.store.attributes import (
    FAIL_REASON_ATTR,
    OUTCOME_ATTR,
    RECORD_WARNINGS_ATTR,
    STUDY_CLASSES_ATTR,
    STUDY_FINGERPRINT_ATTR,
)
from autofinetune.store.database import open_storage
from autofinetune.store.study import create_or_resume_study, load_study_data
from autofinetune.store.trial_writer import TrialWriter, finish_from_outcome
from autofinetune.viewing.dashboard import read_trial_note

from conftest import tiny_spec_dict

#: One epoch a phase, no baseline: each test asks for its own trials.
PATH_SPEC = tiny_spec_dict(
    name="path",
    search={"baseline_trial": False, "keep_checkpoints": 1, "pruner": "none", "unfreeze_depth": 2},
    schedule={"phase1_epochs": 1, "phase2_epochs": 1},
)


def _study(tmp_path, **overrides):
    spec = parse_spec({**PATH_SPEC, **overrides}, base_dir=tmp_path)
    study, _ = create_or_resume_study(spec, open_storage(f"sqlite:///{tmp_path / 'study.db'}"))
    return spec, study


def _run(recording, spec, study, **options):
    trial = study.ask()
    params = suggest_params(trial, spec)
    outcome = run_recorded_trial(
        recording, spec, params, load_study_data(study, spec), trial_id=trial._trial_id, number=trial.number,
        **options,
    )
    return trial, outcome


def test_load_data_stores_fingerprint_and_class_names_and_refuses_other_images(tmp_path):
    spec = parse_spec(tiny_spec_dict(name="data"), base_dir=tmp_path)
    study, _ = create_or_resume_study(spec, open_storage(f"sqlite:///{tmp_path / 'study.db'}"))
    data = load_study_data(study, spec)
    assert study.user_attrs[STUDY_FINGERPRINT_ATTR] == data.fingerprint
    assert study.user_attrs[STUDY_CLASSES_ATTR] == ["class_0", "class_1", "class_2"]

    study.set_user_attr(STUDY_FINGERPRINT_ATTR, "0" * 64)  # as if the study began on other images
    with pytest.raises(FatalError, match="differs from the data the study started with"):
        load_study_data(study, spec)


def test_consecutive_failures_stop_the_search_at_the_limit_and_a_result_resets_them():
    failures = ConsecutiveFailures()
    for _ in range(MAX_CONSECUTIVE_ERRORS - 1):
        assert failures.failed("ValueError: broken") is None
    failures.succeeded()
    for _ in range(MAX_CONSECUTIVE_ERRORS - 1):
        assert failures.failed("ValueError: broken") is None
    assert failures.failed("ValueError: broken") == "3 trials in a row failed; last: ValueError: broken"


def test_a_complete_trial_whose_checkpoint_and_curve_cannot_be_stored_keeps_its_value_with_warnings(tmp_path):
    spec, study = _study(tmp_path)
    artifacts = tmp_path / "artifacts"
    recording = TrialRecording.at(study, spec, artifacts=str(artifacts))
    # The artifact folder goes away and a file takes its place: every upload fails, as on a
    # full disk, after the trial trained to its end.
    shutil.rmtree(artifacts)
    artifacts.write_text("not a folder")

    trial, outcome = _run(recording, spec, study)
    assert outcome.state == "complete" and outcome.kind == "finished" and outcome.value is not None
    assert [w.split(":")[0] for w in outcome.warnings] == ["checkpoint not kept", "learning curve not uploaded"]
    assert "NotADirectoryError" in outcome.warnings[0]
    study.tell(trial, outcome.value, state=outcome.optuna_state)

    frozen = study.trials[trial.number]
    assert frozen.state == TrialState.COMPLETE and frozen.value == outcome.value
    assert frozen.system_attrs[OUTCOME_ATTR] == {"state": "complete", "value": outcome.value}
    assert frozen.user_attrs[RECORD_WARNINGS_ATTR] == list(outcome.warnings)
    assert frozen.user_attrs["history"] and "trial_seconds" in frozen.user_attrs
    assert "checkpoint_artifact_id" not in frozen.user_attrs
    note = read_trial_note(study, trial._trial_id)
    assert note.startswith(f"### Trial {trial.number}: COMPLETE") and "**Not recorded** (the outcome above is)" in note
    assert "checkpoint not kept: NotADirectoryError" in note


def test_a_stopped_trial_is_recorded_as_interrupted_with_its_reason_and_would_run_again(tmp_path):
    spec, study = _study(tmp_path)
    stop = threading.Event()
    stop.set()  # as a signal handler sets it: the trial stops after its first batch
    reason = "stopped (SIGTERM) while running; queued again"
    trial, outcome = _run(TrialRecording(study, spec), spec, study, stop_event=stop, stop_reason=lambda: reason)
    assert (outcome.state, outcome.kind, outcome.reason) == ("failed", "interrupted", reason)
    frozen = study._storage.get_trial(trial._trial_id)
    assert frozen.state == TrialState.RUNNING  # the engine tells; the path has recorded
    assert frozen.user_attrs[FAIL_REASON_ATTR] == reason
    assert frozen.system_attrs[OUTCOME_ATTR]["kind"] == "interrupted"
    # An interrupted trial is never finished from its outcome: it did not run to its end.
    assert finish_from_outcome(study._storage, frozen) is None


def test_an_error_met_after_a_stop_request_is_the_stop_and_the_trial_runs_again(tmp_path):
    spec, study = _study(tmp_path)
    stop = threading.Event()
    reason = "its Ray actor stopped while it ran"

    def data_that_cannot_be_read():
        raise RuntimeError("bad file")

    def data_of_an_exiting_process():
        stop.set()  # the process began to exit (as an actor's atexit hook sets it) ...
        raise RuntimeError("cannot schedule new futures after interpreter shutdown")  # ... and this followed

    for stop_requested in (False, True):
        trial = study.ask()
        data = data_of_an_exiting_process if stop_requested else data_that_cannot_be_read
        outcome = run_recorded_trial(
            TrialRecording(study, spec), spec, suggest_params(trial, spec), data,
            trial_id=trial._trial_id, number=trial.number, stop_event=stop, stop_reason=reason,
        )
        frozen = study._storage.get_trial(trial._trial_id)
        if stop_requested:
            assert (outcome.kind, outcome.reason) == ("interrupted", reason)
            assert finish_from_outcome(study._storage, frozen) is None, "runs again, not failed for good"
        else:
            assert outcome.kind == "unexpected" and outcome.reason == "RuntimeError: bad file"
            assert finish_from_outcome(study._storage, frozen) == "FAIL"


def test_a_stale_trial_that_recorded_its_outcome_is_finished_with_its_value_and_not_run_again(tmp_path):
    url = f"sqlite:///{tmp_path / 'study.db'}"
    spec = parse_spec(
        {**PATH_SPEC, "search": {**PATH_SPEC["search"], "heartbeat_interval": 1, "heartbeat_grace": 2}},
        base_dir=tmp_path,
    )
    create_or_resume_study(spec, open_storage(url))
    storage = open_storage(url, heartbeat_interval=1, grace_period=2, max_retry=2, create=False)
    study = optuna.load_study(study_name=spec.name, storage=storage)
    # Two workers died mid-trial: one after writing its outcome, one before.
    finished = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
    study._storage.set_trial_intermediate_value(finished._trial_id, 1, 0.5)
    TrialWriter(study, spec).write_outcome(finished._trial_id, {"state": "complete", "value": 0.75})
    lost = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
    for trial in (finished, lost):
        storage.record_heartbeat(trial._trial_id)
    time.sleep(3.5)

    assert fail_stale_trials(TrialRecording(study, spec), grace=2) == [finished.number, lost.number]
    trials = study.get_trials()
    assert (trials[0].state, trials[0].value) == (TrialState.COMPLETE, 0.75)
    assert trials[1].state == TrialState.FAIL
    assert "stopped sending heartbeats" in trials[1].user_attrs[FAIL_REASON_ATTR]
    # Only the trial without an outcome runs again; its retry carries nothing of the lost run.
    (retry,) = [t for t in trials if t.state == TrialState.WAITING]
    assert retry.system_attrs["failed_trial"] == lost.number and OUTCOME_ATTR not in retry.system_attrs
    assert fail_stale_trials(TrialRecording(study, spec), grace=2) == []
