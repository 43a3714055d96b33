"""The only module that touches Optuna's private API; every other module calls these functions.

Each function says why the public API does not do. When Optuna changes one of these names,
this module is the one place to fix (``pyproject.toml`` bounds the Optuna versions tested).
The exception is :class:`~autofinetune.store.outages.OutageTolerantStorage`: a subclass of
``RDBStorage``, it overrides the private methods through which a trial is created.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def storage_of(study) -> Any:
    """The storage a study reads and writes.

    Why private: ``optuna.Study`` has no public getter for its storage, and the engines write
    attributes on trials by storage id from processes that hold no ``optuna.Trial`` object (a
    Ray actor, the keras-tuner mirror, a worker failing another worker's stale trial).
    """
    return study._storage


def study_id(study) -> int:
    """The storage's id of a study (its storage methods take ids, not names).

    Why private: ``optuna.Study`` does not expose it, and ``get_study_system_attrs`` and
    optuna-dashboard's artifact URLs need it.
    """
    return study._study_id


def trial_id(trial) -> int:
    """The storage's id of a trial, given an ``optuna.Trial`` or an ``optuna.trial.FrozenTrial``.

    Why private: neither class exposes it, and every storage method addresses trials by it
    (``trial.number`` counts within the study only).
    """
    return trial._trial_id


def study_system_attrs(study) -> dict[str, Any]:
    """A study's system attributes (optuna-dashboard keeps its note versions there).

    Why private: ``Study.system_attrs`` left Optuna 5's public API; the storage still has them.
    """
    return study._storage.get_study_system_attrs(study._study_id)


def stale_trial_ids(study) -> list[int]:
    """Ids of the study's RUNNING trials whose heartbeat is older than the grace period.

    Why private: Optuna's public ``fail_stale_trials`` fails them at once, without a reason;
    the Optuna engine writes the reason first, while the trial is still RUNNING.
    """
    return list(study._storage._get_stale_trial_ids(study._study_id))


def _unwrapped(storage):
    """The storage behind Optuna's caching wrapper (which ``load_study`` puts around an
    ``RDBStorage``), or the storage itself."""
    return getattr(storage, "_backend", storage)


#: The trial system attribute Optuna's constrained samplers write (``constraints_func``'s
#: values) and ``Study.best_trial`` reads: a trial is feasible when each value is at most 0.
#: Why private: ``optuna.study._constrained_optimization._CONSTRAINTS_KEY``; written by the trial
#: path for every engine, so the best trial is the best feasible one whichever sampler ran.
OPTUNA_CONSTRAINTS_KEY = "constraints"


def set_trial_user_attrs(storage, trial_id: int, attrs: Mapping[str, Any]) -> None:
    """Write several user attributes of a RUNNING trial in one database transaction.

    Why private: the public ``set_trial_user_attr`` commits each attribute on its own, and a
    finished trial writes about twenty; on a database server shared by hundreds of workers
    one transaction instead of twenty is most of the per-trial cost. Storages other than
    ``RDBStorage`` (in memory, journal) get the public calls.
    """
    from optuna.storages import RDBStorage

    backend = _unwrapped(storage)
    if not isinstance(backend, RDBStorage) or len(attrs) < 2:
        for key, value in attrs.items():
            storage.set_trial_user_attr(trial_id, key, value)
        return
    from optuna.storages._rdb import models
    from optuna.storages._rdb.storage import _create_scoped_session

    from autofinetune.store.outages import call_through

    def write() -> None:
        with _create_scoped_session(backend.scoped_session, True) as session:
            for key, value in attrs.items():
                backend._set_trial_attr_without_commit(session, models.TrialUserAttributeModel, trial_id, key, value)

    call_through(backend, write, what="set_trial_user_attrs")


def storage_engine(storage):
    """The SQLAlchemy engine of an ``RDBStorage`` (behind Optuna's caching wrapper, if any).

    Why private: ``RDBStorage.engine`` is undocumented; the claim lock of a database server
    needs one connection of it held across several storage calls.
    """
    return _unwrapped(storage).engine


def reserve_trial(study, *, queued: bool = True) -> int:
    """Start the study's next trial in the database, a queued (WAITING) one first, without
    sampling its parameters: the first half of ``Study.ask``; returns its storage id.

    Why private: ``ask`` reserves the trial and then samples (TPE fits its model over every
    finished trial). Workers reserve under a claim lock shared by the whole cluster; sampling
    under it too made each worker's CPU time a cost every other worker waits for.

    Args:
        queued: Whether trials may be WAITING. Popping one reads every unfinished trial of the
            study (through Optuna's cache); ``False`` skips that when a count says none wait.
    """
    study._thread_local.cached_all_trials = None  # as ask does: read the storage afresh
    reserved = study._pop_waiting_trial_id() if queued else None
    if reserved is None:
        reserved = study._storage.create_new_trial(study._study_id)
    return reserved


def sample_reserved_trial(study, reserved_id: int):
    """The second half of ``Study.ask``: the ``optuna.Trial`` of a reserved trial, its
    relative parameters sampled (outside the claim lock).

    Why private: constructing ``optuna.Trial`` from an id is what ``ask`` does internally.
    """
    import optuna

    return optuna.Trial(study, reserved_id)


def count_trials(study, *, marked_by: str) -> tuple[int, int, int] | None:
    """``(all, waiting, marked)``: the study's trials, its WAITING ones, and those with the
    system attribute ``marked_by``, counted by the database; ``None`` for storages other than
    ``RDBStorage``.

    Why private: the public API counts by loading every unfinished trial with its parameters,
    attributes and reports, a load that grows with the workers running; a worker counts under
    the claim lock that the whole cluster shares, so that load would hold it for everyone.
    """
    from optuna.storages import RDBStorage

    backend = _unwrapped(study._storage)
    if not isinstance(backend, RDBStorage):
        return None
    from optuna.storages._rdb import models
    from optuna.storages._rdb.storage import _create_scoped_session
    from optuna.trial import TrialState
    from sqlalchemy import func, select

    from autofinetune.store.outages import call_through

    trials = models.TrialModel
    attrs = models.TrialSystemAttributeModel
    of_study = trials.study_id == study._study_id

    def count() -> tuple[int, int, int]:
        with _create_scoped_session(backend.scoped_session) as session:
            every = session.scalar(select(func.count(trials.trial_id)).where(of_study))
            waiting = session.scalar(select(func.count(trials.trial_id)).where(of_study, trials.state == TrialState.WAITING))
            marked = session.scalar(
                select(func.count(attrs.trial_system_attribute_id))
                .join(trials, attrs.trial_id == trials.trial_id)
                .where(of_study, attrs.key == marked_by)
            )
        return int(every or 0), int(waiting or 0), int(marked or 0)

    return call_through(backend, count, what="counting trials")
