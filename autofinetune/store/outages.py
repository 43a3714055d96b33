"""Riding out a study database that goes away for a while (a restart, a failover).

Every storage call a worker makes -- claiming a trial, its heartbeat, an epoch's report, its
attributes, the final ``tell`` -- goes through :class:`OutageTolerantStorage`, an ``RDBStorage``
whose calls wait out transient database errors (connection refused or reset, the server
shutting down or starting, too many clients) with backoff, for the grace period of an
:class:`OutagePolicy`. One line says when the database went away, one when it is back; past the
grace a call raises :class:`StorageUnavailableError`, a fatal error that stops the search
cleanly. The policy also remembers when the database came back: heartbeats missed during an
outage are nobody's fault, so no trial is failed as stale until the workers had a grace period
to beat again (:meth:`OutagePolicy.recently_recovered`).
"""

from __future__ import annotations

import copy
import functools
import logging
import os
import random
import threading
import time
import uuid
from datetime import datetime
from typing import Any, Callable, TypeVar

import optuna
from optuna.storages import RDBStorage
from optuna.trial import FrozenTrial, TrialState

from autofinetune.errors import FatalError
from autofinetune.spec import SearchSpec
from autofinetune.store.attributes import CREATION_TOKEN_ATTR

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: The grace of a process that has not read its study's spec yet (a worker joining a study).
DEFAULT_OUTAGE_GRACE = float(SearchSpec.model_fields["outage_grace"].default)
#: How a launch tells its worker processes the study's grace before they can read the spec.
OUTAGE_GRACE_ENV = "AUTOFINETUNE_OUTAGE_GRACE"


def outage_grace_from_env() -> float:
    """:data:`OUTAGE_GRACE_ENV` (seconds), else :data:`DEFAULT_OUTAGE_GRACE`."""
    text = os.environ.get(OUTAGE_GRACE_ENV, "").strip()
    try:
        return max(0.0, float(text)) if text else DEFAULT_OUTAGE_GRACE
    except ValueError:
        return DEFAULT_OUTAGE_GRACE


#: Lower-case fragments of database errors that mean "not now" rather than "never".
TRANSIENT_MARKERS = (
    "connection refused",
    "server closed the connection",
    "terminating connection",
    "connection reset",
    "connection timed out",
    "connection timeout expired",
    "broken pipe",
    "the connection is closed",
    "connection already closed",
    "no connection to the server",
    "ssl connection has been closed",
    "could not receive data from server",
    "could not send data to server",
    "server conn crashed",
    "the database system is shutting down",
    "the database system is starting up",
    "the database system is in recovery mode",
    "the database system is not yet accepting connections",
    "too many clients",
    "remaining connection slots are reserved",
    "too many connections",
    "lost connection to",  # MySQL 2013
    "server has gone away",  # MySQL 2006
    "database is locked",  # SQLite, past its busy timeout
)


def is_transient(error: BaseException) -> bool:
    """Whether ``error`` (or an error it wraps) says the database is unreachable for now.

    Optuna wraps SQLAlchemy's errors in ``StorageInternalError`` and SQLAlchemy wraps the
    driver's: the whole chain is read. A lost connection that SQLAlchemy recognised
    (``connection_invalidated``) counts whatever its text.
    """
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if getattr(current, "connection_invalidated", False):
            return True
        text = str(current).lower()
        if any(marker in text for marker in TRANSIENT_MARKERS):
            return True
        current = current.__cause__ or current.__context__
    return False


class StorageUnavailableError(FatalError):
    """The study database stayed unreachable for longer than its grace period."""


def storage_unavailable(error: BaseException) -> StorageUnavailableError | None:
    """The :class:`StorageUnavailableError` behind ``error`` (a library that called our storage
    may wrap it: Ray Tune, keras-tuner), else ``None``."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        if isinstance(current, StorageUnavailableError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def _first_line(error: BaseException) -> str:
    """The error that says why the database is unreachable (the driver's, e.g. "Connection
    refused"), in one line, without the wrappers' boilerplate; else the root cause's."""
    chain: list[BaseException] = []
    current: BaseException | None = error
    while current is not None and current not in chain:
        chain.append(current)
        current = current.__cause__ or current.__context__
    telling = [e for e in chain if any(marker in str(e).lower() for marker in TRANSIENT_MARKERS)]
    chosen = telling[-1] if telling else chain[-1]
    text = str(chosen).strip().splitlines()
    return f"{type(chosen).__name__}: {text[0][:300]}" if text else type(chosen).__name__


class OutagePolicy:
    """How long a process waits for its study database, and what it says meanwhile.

    One policy per process is shared by every thread that uses the storage (the trial and its
    heartbeat), so an outage is announced once and measured from when it began.

    Args:
        grace: Seconds the database may stay unreachable before calls give up (``0``: never
            wait).
        where: The database as it may be printed (password redacted).
        first_wait: The first pause between attempts; it doubles up to ``max_wait``.
        max_wait: The longest pause between attempts.
    """

    def __init__(self, grace: float, *, where: str, first_wait: float = 0.25, max_wait: float = 5.0) -> None:
        if grace < 0:
            raise ValueError(f"grace must be >= 0, but got {grace}")
        self.grace = float(grace)
        self.where = where
        self.first_wait = first_wait
        self.max_wait = max_wait
        self._lock = threading.Lock()
        self._down_since: float | None = None
        self._back_at: float | None = None
        self._calling = threading.local()

    def __getstate__(self) -> dict[str, Any]:
        # A storage is pickled with its policy (Optuna's RDBStorage pickles); locks are not.
        return {key: value for key, value in self.__dict__.items() if key not in ("_lock", "_calling")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()
        self._calling = threading.local()

    # -- what the workers ask ---------------------------------------------------------------

    def recently_recovered(self, within: float) -> bool:
        """Whether the database came back less than ``within`` seconds ago (or is down now)."""
        with self._lock:
            if self._down_since is not None:
                return True
            return self._back_at is not None and time.monotonic() - self._back_at < within

    # -- calling through it -----------------------------------------------------------------

    def call(self, function: Callable[[], T], *, what: str = "a storage call") -> T:
        """``function()``, retried while it fails with a transient database error.

        A call made while another is retrying on this thread runs once: the outer call retries
        the whole of it.

        Raises:
            StorageUnavailableError: still unreachable after the grace period.
        """
        if getattr(self._calling, "active", False):
            return function()
        self._calling.active = True
        try:
            return self._retrying(function, what)
        finally:
            self._calling.active = False

    def _retrying(self, function: Callable[[], T], what: str) -> T:
        wait = self.first_wait
        while True:
            try:
                value = function()
            except Exception as error:
                if not is_transient(error):
                    raise
                waited = self._went_away(error)
                if waited >= self.grace:
                    raise StorageUnavailableError(
                        f"the study database {self.where} has been unreachable for {waited:.0f} s, longer than "
                        f"search.outage_grace ({self.grace:g} s), during {what}; last error: {_first_line(error)}. "
                        "Finished trials are kept: launch the study again once the database is back"
                    ) from None
                time.sleep(min(wait * (0.5 + random.random()), max(0.0, self.grace - waited)) or 0.01)
                wait = min(self.max_wait, wait * 2)
                continue
            self._came_back()
            return value

    def _went_away(self, error: BaseException) -> float:
        """Note a failed attempt; the seconds the database has been unreachable."""
        with self._lock:
            now = time.monotonic()
            if self._down_since is None:
                self._down_since = now
                logger.warning(
                    "the study database %s is unreachable (%s); waiting up to %g s for it (search.outage_grace)",
                    self.where, _first_line(error), self.grace,
                )
            return now - self._down_since

    def _came_back(self) -> None:
        if self._down_since is None:
            return
        with self._lock:
            if self._down_since is None:
                return
            now = time.monotonic()
            logger.warning("the study database %s is reachable again after %.0f s", self.where, now - self._down_since)
            self._down_since, self._back_at = None, now


#: ``RDBStorage`` methods that touch the database: every ``BaseStorage`` method, the heartbeat's,
#: and the private ones Optuna's caching wrapper calls on its backend.
_DATABASE_METHODS = (
    "create_new_study", "delete_study", "set_study_user_attr", "set_study_system_attr",
    "get_study_id_from_name", "get_study_name_from_id", "get_study_directions", "get_study_user_attrs",
    "get_study_system_attrs", "get_all_studies", "create_new_trial", "_create_new_trial", "set_trial_param",
    "_set_trial_param", "get_trial_id_from_study_id_trial_number", "get_trial_number_from_id",
    "get_trial_param", "set_trial_state_values", "set_trial_intermediate_value", "set_trial_user_attr",
    "set_trial_system_attr", "get_trial", "get_all_trials", "_get_trials", "get_n_trials", "get_best_trial",
    "_get_best_trial_id", "get_trial_params", "get_trial_user_attrs", "get_trial_system_attrs",
    "record_heartbeat", "_get_stale_trial_ids",
)


class OutageTolerantStorage(RDBStorage):
    """An ``RDBStorage`` whose every database call waits out an outage (see :class:`OutagePolicy`).

    Optuna's caching wrapper still goes around it (``optuna.load_study`` adds it for any
    ``RDBStorage``), so studies read and write through the cache as usual.

    Args:
        url: The SQLAlchemy URL.
        outage: The process's policy.
        wait_to_connect: Wait out an outage while connecting too (a worker joining a study);
            ``False`` fails at once, so that a mistyped address is reported, not waited for.
        **kwargs: ``RDBStorage``'s other arguments.
    """

    def __init__(self, url: str, *, outage: OutagePolicy, wait_to_connect: bool = False, **kwargs: Any) -> None:
        self.outage = outage
        self._creations_tried: set[str] = set()  # creation tokens of attempts begun in this process
        connect = functools.partial(RDBStorage.__init__, self, url, **kwargs)
        if wait_to_connect:
            outage.call(connect, what="connecting")
        else:
            connect()

    def set_trial_state_values(self, trial_id: int, state, values=None) -> bool:
        # A write that reached the database before its connection dropped is retried, and the
        # retry finds the trial finished already: that is success, not another worker's doing.
        attempts = 0

        def set_state() -> bool:
            nonlocal attempts
            attempts += 1
            try:
                return RDBStorage.set_trial_state_values(self, trial_id, state, values)
            except optuna.exceptions.UpdateFinishedTrialError:
                if attempts > 1 and _already(self, trial_id, state, values):
                    return True
                raise

        return self.outage.call(set_state, what="set_trial_state_values")

    def create_new_trial(self, study_id: int, template_trial: FrozenTrial | None = None) -> int:
        # Defined here so that it is not wrapped in a retry too: _create_new_trial retries itself.
        return self._create_new_trial(study_id, template_trial)._trial_id

    def _create_new_trial(self, study_id: int, template_trial: FrozenTrial | None = None) -> FrozenTrial:
        # Optuna retries a failed creation itself, and the outage policy retries it again: a
        # creation that committed before its connection dropped would make a second trial and
        # leave the first RUNNING with no worker. A token written in the creating transaction
        # lets each retry find the trial an earlier attempt made (_get_prepared_new_trial).
        template = _with_creation_token(template_trial, uuid.uuid4().hex)
        try:
            return self.outage.call(lambda: RDBStorage._create_new_trial(self, study_id, template), what="_create_new_trial")
        finally:
            self._creations_tried.discard(template.system_attrs[CREATION_TOKEN_ATTR])

    def _get_prepared_new_trial(self, study_id: int, template_trial: FrozenTrial | None, session):
        token = template_trial.system_attrs.get(CREATION_TOKEN_ATTR) if template_trial is not None else None
        if token in self._creations_tried:  # a retry: did an earlier attempt commit?
            made = _trial_created_with(session, study_id, CREATION_TOKEN_ATTR, token)
            if made is not None:
                return made
        elif token is not None:
            self._creations_tried.add(token)
        return RDBStorage._get_prepared_new_trial(self, study_id, template_trial, session)


def _with_creation_token(template: FrozenTrial | None, token: str) -> FrozenTrial:
    """``template`` (or a new RUNNING trial's, as ``RDBStorage`` makes without one) with ``token``."""
    if template is None:
        template = FrozenTrial(
            number=-1, state=TrialState.RUNNING, value=None, values=None, datetime_start=datetime.now(),
            datetime_complete=None, params={}, distributions={}, user_attrs={}, system_attrs={},
            intermediate_values={}, trial_id=-1,
        )
    tokened = copy.copy(template)
    tokened.system_attrs = {**template.system_attrs, CREATION_TOKEN_ATTR: token}
    return tokened


def _trial_created_with(session, study_id: int, key: str, token: str):
    """The study's trial (Optuna's ``TrialModel``) whose system attribute ``key`` is ``token``,
    read in ``session``, the open transaction of a trial's creation; ``None`` if there is none.

    Why private: ``RDBStorage._create_new_trial`` retries a failed transaction itself, so a
    creation that committed before its answer was lost is found only inside that transaction,
    through Optuna's models (the public API cannot look a trial up by an attribute).
    """
    import json

    from optuna.storages._rdb import models
    from sqlalchemy import select

    trials = models.TrialModel
    attrs = models.TrialSystemAttributeModel
    return session.scalars(
        select(trials)
        .join(attrs, attrs.trial_id == trials.trial_id)
        .where(trials.study_id == study_id, attrs.key == key, attrs.value_json == json.dumps(token))
    ).first()


def _already(storage: RDBStorage, trial_id: int, state, values) -> bool:
    frozen = RDBStorage.get_trial(storage, trial_id)
    return frozen.state == state and (values is None or frozen.values == list(values))


def _retried(name: str):
    method = getattr(RDBStorage, name)

    @functools.wraps(method)
    def call(self: OutageTolerantStorage, *args: Any, **kwargs: Any) -> Any:
        return self.outage.call(lambda: method(self, *args, **kwargs), what=name)

    return call


for _name in _DATABASE_METHODS:
    if _name not in OutageTolerantStorage.__dict__:
        setattr(OutageTolerantStorage, _name, _retried(_name))


def outage_policy_of(storage) -> OutagePolicy | None:
    """The policy of a storage (behind Optuna's caching wrapper, if any), else ``None``."""
    backend = getattr(storage, "_backend", storage)
    return getattr(backend, "outage", None)


def call_through(storage, function: Callable[[], T], *, what: str) -> T:
    """``function()`` under the storage's outage policy (once, when it has none).

    For database work that does not go through a storage method: the claim lock's connection,
    counts and multi-attribute writes in :mod:`~autofinetune.store.optuna_internals`.
    """
    policy = outage_policy_of(storage)
    return function() if policy is None else policy.call(function, what=what)
