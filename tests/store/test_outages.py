"""Waiting out a study database that goes away: which errors are worth waiting for, and how long."""

from __future__ import annotations

import logging
import pickle
import time

import optuna
import pytest
from sqlalchemy.exc import OperationalError, ProgrammingError

from autofinetune.store.outages import OutagePolicy, StorageUnavailableError, is_transient, storage_unavailable


def _wrapped(driver_message: str) -> optuna.exceptions.StorageInternalError:
    """What Optuna raises when a query fails: its error, from SQLAlchemy's, from the driver's."""
    import psycopg

    driver = psycopg.OperationalError(driver_message)
    try:
        try:
            raise OperationalError("SELECT 1", {}, driver) from driver
        except OperationalError as error:
            raise optuna.exceptions.StorageInternalError("An exception is raised during the commit.") from error
    except optuna.exceptions.StorageInternalError as error:
        return error


@pytest.mark.parametrize("message", [
    'connection failed: connection to server at "127.0.0.1", port 5432 failed: Connection refused',
    "server closed the connection unexpectedly",
    "terminating connection due to administrator command",
    "FATAL:  the database system is starting up",
    "FATAL:  sorry, too many clients already",
])
def test_a_lost_or_busy_server_is_transient_whatever_wraps_it(message):
    assert is_transient(_wrapped(message))


def test_a_wrong_query_or_password_is_not_transient():
    assert not is_transient(ProgrammingError("SELECT x", {}, Exception('relation "trials" does not exist')))
    assert not is_transient(_wrapped('FATAL:  password authentication failed for user "bob"'))


class Flaky:
    """Fails with a lost connection ``failures`` times, then answers."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls = 0

    def __call__(self) -> str:
        self.calls += 1
        if self.calls <= self.failures:
            raise _wrapped("server closed the connection unexpectedly")
        return "answer"


def test_an_outage_is_waited_out_with_one_line_when_it_goes_and_one_when_it_is_back(caplog):
    policy = OutagePolicy(30, where="postgresql://db/x", first_wait=0.01)
    flaky = Flaky(failures=3)
    with caplog.at_level(logging.WARNING, logger="autofinetune.store.outages"):
        assert policy.call(flaky, what="a report") == "answer"
    assert flaky.calls == 4
    lines = [record.getMessage() for record in caplog.records]
    assert len(lines) == 2
    assert lines[0].startswith(
        "the study database postgresql://db/x is unreachable (OperationalError: server closed the connection unexpectedly)"
    )
    assert "waiting up to 30 s for it (search.outage_grace)" in lines[0]
    assert lines[1].startswith("the study database postgresql://db/x is reachable again after")
    # Heartbeats missed meanwhile are nobody's fault: stale trials wait one grace period.
    assert policy.recently_recovered(within=60) and not policy.recently_recovered(within=0)


def test_past_its_grace_a_call_gives_up_naming_the_grace_and_the_last_error():
    policy = OutagePolicy(0.3, where="postgresql://db/x", first_wait=0.05)
    started = time.monotonic()
    with pytest.raises(StorageUnavailableError) as raised:
        policy.call(Flaky(failures=1000), what="set_trial_state_values")
    assert 0.3 <= time.monotonic() - started < 5
    message = str(raised.value)
    assert "has been unreachable for" in message and "search.outage_grace (0.3 s)" in message
    assert "during set_trial_state_values" in message and "server closed the connection" in message
    # Still down: the next call gives up at once instead of waiting another grace period.
    started = time.monotonic()
    with pytest.raises(StorageUnavailableError):
        policy.call(Flaky(failures=1000))
    assert time.monotonic() - started < 0.3


def test_other_errors_are_raised_at_once_and_a_wrapped_outage_is_found():
    policy = OutagePolicy(30, where="x")
    calls = []

    def wrong() -> None:
        calls.append(1)
        raise ValueError("not a database problem")

    with pytest.raises(ValueError):
        policy.call(wrong)
    assert calls == [1]
    try:
        try:
            raise StorageUnavailableError("gone")
        except StorageUnavailableError as error:
            raise RuntimeError("a library wrapped it") from error
    except RuntimeError as wrapped:
        assert str(storage_unavailable(wrapped)) == "gone"
    assert storage_unavailable(ValueError("other")) is None
    assert pickle.loads(pickle.dumps(policy)).grace == 30  # storages that hold it pickle


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_a_trial_created_before_its_answer_was_lost_is_found_not_created_twice(database, request, tmp_path, monkeypatch):
    from sqlalchemy.orm import Session

    from autofinetune.store.outages import OutageTolerantStorage

    if database == "sqlite":
        url = f"sqlite:///{tmp_path / 'study.db'}"
    else:
        url = request.getfixturevalue("postgres_server").create_database("lost_answer")
    storage = OutageTolerantStorage(url, outage=OutagePolicy(30, where="x", first_wait=0.01))
    study_id = storage.create_new_study([optuna.study.StudyDirection.MAXIMIZE], "lost-answer")
    commit = Session.commit
    answers_to_lose = ["the first creation's"]

    def committed_then_connection_lost(self):
        commit(self)
        if answers_to_lose:
            answers_to_lose.pop()
            raise OperationalError("COMMIT", {}, Exception("server closed the connection unexpectedly"))

    monkeypatch.setattr(Session, "commit", committed_then_connection_lost)
    trial_id = storage.create_new_trial(study_id)
    assert not answers_to_lose, "the first creation's answer was lost"
    trials = storage.get_all_trials(study_id)
    assert [(t._trial_id, t.state) for t in trials] == [(trial_id, optuna.trial.TrialState.RUNNING)], \
        "the retry found the committed trial instead of creating another, left RUNNING with no worker"
    # A queued configuration keeps its params and state through the same path.
    queued = optuna.trial.create_trial(state=optuna.trial.TrialState.WAITING, params={"x": 1.0},
                                       distributions={"x": optuna.distributions.FloatDistribution(0, 2)})
    waiting = storage.get_trial(storage.create_new_trial(study_id, template_trial=queued))
    assert waiting.state == optuna.trial.TrialState.WAITING and waiting.params == {"x": 1.0} and waiting.number == 1
