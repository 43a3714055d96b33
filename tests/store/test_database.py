"""Study database helpers: URLs, passwords, budgets, retries and the best-K checkpoints."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time

import optuna
import pytest
from optuna.trial import TrialState

from autofinetune.store.checkpoints import CheckpointKeeper
from autofinetune.store.optuna_internals import trial_id
from autofinetune.spec import ObjectiveSpec, parse_spec
from autofinetune.errors import ConfigError
from autofinetune.store.artifacts import artifacts_location, open_artifact_store
from autofinetune.store.database import claim_lock, open_storage, redact_url, resolve_storage_url, STORAGE_ENV
from autofinetune.store.retries import RetryStaleTrial
from autofinetune.store.study import budget_used, create_or_resume_study, spec_from_study

from conftest import tiny_spec_dict


def test_redact_url_hides_only_the_password():
    assert redact_url("postgresql+psycopg://bob:s3cret@db:5432/studies") == "postgresql+psycopg://bob:***@db:5432/studies"
    assert redact_url("sqlite:////tmp/x.db") == "sqlite:////tmp/x.db"
    assert redact_url("postgresql://bob@db/studies") == "postgresql://bob@db/studies"


def test_storage_precedence_flag_env_spec_default(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec = parse_spec(tiny_spec_dict(storage="sqlite:///from-spec.db"))
    monkeypatch.delenv(STORAGE_ENV, raising=False)
    monkeypatch.delenv("OPTUNA_STORAGE", raising=False)
    assert resolve_storage_url(None) == f"sqlite:///{tmp_path / 'autofinetune.db'}"
    assert resolve_storage_url(None, spec) == f"sqlite:///{tmp_path / 'from-spec.db'}"
    monkeypatch.setenv(STORAGE_ENV, "sqlite:///from-env.db")
    assert resolve_storage_url(None, spec) == f"sqlite:///{tmp_path / 'from-env.db'}"
    assert resolve_storage_url("postgresql://x@h/db", spec) == "postgresql://x@h/db"


def test_artifacts_beside_sqlite_database(tmp_path):
    url = f"sqlite:///{tmp_path / 'study.db'}"
    assert artifacts_location(url) == str(tmp_path / "study.db.artifacts")
    assert artifacts_location(url, "/elsewhere") == "/elsewhere"


def test_bad_storage_urls(tmp_path):
    with pytest.raises(ConfigError, match="is not a SQLAlchemy URL"):
        open_storage("not a url")
    with pytest.raises(ConfigError, match="the folder of 'sqlite:///.*/missing/x.db' does not exist"):
        open_storage(f"sqlite:///{tmp_path / 'missing' / 'x.db'}")
    with pytest.raises(ConfigError) as unknown:
        open_storage("notadb://x")
    assert str(unknown.value).startswith(
        "storage: 'notadb://x' names the database dialect 'notadb', which SQLAlchemy does not know here; "
        "installed drivers: sqlite, postgresql+psycopg"
    )
    with pytest.raises(ConfigError, match=r"the driver for 'mysql\+pymysql://u:\*\*\*@h/d' is not installed"):
        open_storage("mysql+pymysql://u:secret@h/d")


def test_spec_round_trips_through_the_study_without_the_password(tmp_path):
    spec = parse_spec(tiny_spec_dict(storage="postgresql://bob:s3cret@db/x"), base_dir=tmp_path)
    storage = open_storage(f"sqlite:///{tmp_path / 'study.db'}")
    study, created = create_or_resume_study(spec, storage, n_trials=7)
    assert created
    restored = spec_from_study(study)
    assert restored.search == spec.search and restored.data == spec.data
    assert restored.storage == "postgresql://bob:***@db/x"
    assert study.user_attrs["autofinetune:n_trials"] == 7
    again, created = create_or_resume_study(spec, storage)
    assert not created and again.user_attrs["autofinetune:n_trials"] == spec.search.n_trials
    assert len(again.get_trials()) == 1, "the baseline is enqueued once"


@pytest.mark.parametrize("database", ["sqlite", "in-memory"])  # counted in SQL, or from the trials
def test_budget_counts_a_retry_in_place_of_its_failed_trial(tmp_path, database):
    storage = open_storage(f"sqlite:///{tmp_path / 'study.db'}") if database == "sqlite" else None
    study = optuna.create_study(storage=storage, study_name="s")
    done = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
    study.tell(done, 0.5)
    failed = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
    study._storage.set_trial_user_attr(failed._trial_id, "fail_reason", "worker died")
    study.tell(failed, state=TrialState.FAIL)
    RetryStaleTrial(max_retry=1)(study, study.trials[1])
    assert budget_used(study) == (2, 1)
    retry = study.trials[2]
    assert retry.state == TrialState.WAITING and retry.params == study.trials[1].params
    assert retry.system_attrs["failed_trial"] == 1 and retry.user_attrs["retry_reason"] == "worker died"
    assert "fail_reason" not in retry.user_attrs
    # A retry of the retry exceeds max_retry=1: nothing more is queued.
    RetryStaleTrial(max_retry=1)(study, retry)
    assert len(study.trials) == 3
    # The retry runs, fails and is retried in turn: one trial still counts in place of three.
    running = study.ask()
    assert running.number == 2
    study.tell(running, state=TrialState.FAIL)
    RetryStaleTrial(max_retry=2)(study, study.trials[2])
    assert [t.state for t in study.trials[1:]] == [TrialState.FAIL, TrialState.FAIL, TrialState.WAITING]
    assert budget_used(study) == (2, 1)


def test_checkpoint_keeper_keeps_only_the_best_k(tmp_path):
    storage = open_storage(f"sqlite:///{tmp_path / 'study.db'}")
    study = optuna.create_study(storage=storage, study_name="s", direction="maximize")
    store = open_artifact_store(str(tmp_path / "artifacts"))
    keeper = CheckpointKeeper(store, keep=2, objective=ObjectiveSpec())
    model = tmp_path / "model.keras"
    kept = {}
    for value in (0.5, 0.7, 0.6, 0.9, 0.1):
        model.write_bytes(f"model {value}".encode())
        trial = study.ask()
        kept[value] = keeper.offer(study, trial_id(trial), value, str(model))
        study.tell(trial, value)
    assert kept[0.1] is None, "worse than the best two: not uploaded"
    files = {p.name for p in (tmp_path / "artifacts").iterdir()}
    assert files == {kept[0.9], kept[0.7]}


def test_checkpoint_keeper_says_before_the_save_whether_a_value_would_be_kept(tmp_path):
    storage = open_storage(f"sqlite:///{tmp_path / 'study.db'}")
    study = optuna.create_study(storage=storage, study_name="s", direction="maximize")
    keeper = CheckpointKeeper(open_artifact_store(str(tmp_path / "artifacts")), keep=1, objective=ObjectiveSpec())
    model = tmp_path / "model.keras"
    model.write_bytes(b"model")
    first = study.ask()
    assert keeper.would_keep(study, trial_id(first), 0.1), "nothing kept yet: any value enters"
    keeper.offer(study, trial_id(first), 0.7, str(model))
    study.tell(first, 0.7)
    second = study.ask()
    assert not keeper.would_keep(study, trial_id(second), 0.6)
    assert not keeper.would_keep(study, trial_id(second), 0.7), "a tie goes to the earlier trial"
    assert keeper.would_keep(study, trial_id(second), 0.8)
    assert not CheckpointKeeper(keeper.artifact_store, keep=0, objective=ObjectiveSpec()).would_keep(
        study, trial_id(second), 0.9
    )


def test_checkpoint_keeper_gives_a_tie_to_the_trial_optuna_calls_best(tmp_path):
    # Concurrent trials finish out of order; with equal values, the earlier trial is the one
    # `study.best_trial` names, so it must hold the checkpoint even when it finishes last.
    storage = open_storage(f"sqlite:///{tmp_path / 'study.db'}")
    study = optuna.create_study(storage=storage, study_name="s", direction="maximize")
    keeper = CheckpointKeeper(open_artifact_store(str(tmp_path / "artifacts")), keep=1, objective=ObjectiveSpec())
    model = tmp_path / "model.keras"
    model.write_bytes(b"model")
    early, late = study.ask(), study.ask()
    assert keeper.offer(study, trial_id(late), 0.5, str(model)) is not None
    study.tell(late, 0.5)
    kept = keeper.offer(study, trial_id(early), 0.5, str(model))
    study.tell(early, 0.5)
    assert study.best_trial.number == early.number
    assert study.best_trial.user_attrs["checkpoint_artifact_id"] == kept
    assert {p.name for p in (tmp_path / "artifacts").iterdir()} == {kept}


CLAIMING_WORKER = textwrap.dedent("""
    import json, sys, time
    from pathlib import Path
    import optuna
    from autofinetune.store.database import claim_lock

    url, go = sys.argv[1], Path(sys.argv[2])
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    study = optuna.load_study(study_name="claims", storage=url)
    while not go.exists():
        time.sleep(0.01)
    claimed = []
    for _ in range(4):
        with claim_lock(url):
            claimed.append(study.ask().number)
    print(json.dumps(claimed))
""")


def test_workers_on_one_sqlite_file_never_claim_the_same_queued_trial(tmp_path):
    # SQLite ignores SELECT ... FOR UPDATE: without the claim lock two workers can both pop
    # one WAITING trial. With it, the 12 queued trials go to 12 distinct claims.
    url = f"sqlite:///{tmp_path / 'claims.db'}"
    study = optuna.create_study(study_name="claims", storage=url)
    for value in range(12):
        study.enqueue_trial({"x": value})
    go = tmp_path / "go"
    workers = [
        subprocess.Popen([sys.executable, "-c", CLAIMING_WORKER, url, str(go)], stdout=subprocess.PIPE, text=True)
        for _ in range(3)
    ]
    time.sleep(3)  # let all three import Optuna and wait at the start line
    go.touch()
    claimed = [json.loads(worker.communicate(timeout=120)[0]) for worker in workers]
    numbers = [number for worker in claimed for number in worker]
    assert sorted(numbers) == list(range(12)), claimed


def test_claim_lock_is_a_no_op_for_server_databases(tmp_path):
    with claim_lock("postgresql+psycopg://bob@127.0.0.1:1/studies"):
        pass
    assert list(tmp_path.iterdir()) == []
