"""The only module that touches Optuna's private API; every other module calls these functions.

Each function says why the public API does not do. When Optuna changes one of these names,
this module is the one place to fix (``pyproject.toml`` bounds the Optuna versions tested).
"""

from __future__ import annotations

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
