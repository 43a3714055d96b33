"""Failed trials queued again: a retry runs the same params and counts in the failed one's place.

Optuna's ``RetryFailedTrialCallback`` marks a retry with system attributes that its static
methods read; this module writes the same marks and reads them through those methods.
"""

from __future__ import annotations

import warnings

from autofinetune.store.attributes import BASELINE_ATTR, FAIL_REASON_ATTR, RETRY_HISTORY_ATTR, RETRY_OF_ATTR


def retried_trial_number(trial) -> int | None:
    """The number of the first failed trial of ``trial``'s retry series; ``None``: not a retry."""
    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RetryFailedTrialCallback.retried_trial_number(trial)


def retry_history(trial) -> list[int]:
    """The numbers of the trials ``trial`` retries, oldest first; empty when it is no retry."""
    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return list(optuna.storages.RetryFailedTrialCallback.retry_history(trial))


def retry_marks(failed: list[int]) -> dict[str, object]:
    """The system attributes of a trial that retries the trials ``failed`` (oldest first)."""
    return {RETRY_OF_ATTR: failed[0], RETRY_HISTORY_ATTR: list(failed)}


class RetryStaleTrial:
    """Queue a stale trial again, with the same params, at most ``max_retry`` times.

    The storage's stale-trial callback (see :func:`queue_retry`).
    """

    def __init__(self, max_retry: int) -> None:
        self.max_retry = max_retry

    def __call__(self, study, trial) -> None:
        queue_retry(study, trial, max_retry=self.max_retry)


def queue_retry(study, trial, *, max_retry: int | None) -> bool:
    """Queue a failed trial again, as a WAITING trial with the same params.

    Like Optuna's ``RetryFailedTrialCallback`` (same system attributes, so its
    :func:`retried_trial_number` and :func:`retry_history` read them), except that the failure
    reason stays on the failed trial, the retry says why it runs (``retry_reason``), and it
    carries nothing of the failed run (its outcome, curve, attributes): only the params and
    whether it is the baseline.

    Args:
        study: The study.
        trial: The failed trial (frozen).
        max_retry: Retries allowed along its retry history; ``None``: always (a trial our own
            search stopped is run again, whatever its history).

    Returns:
        Whether a retry was queued.
    """
    import optuna

    history = [*retry_history(trial), trial.number]
    if max_retry is not None and len(history) > max_retry:
        return False
    system_attrs = {
        key: value for key, value in trial.system_attrs.items() if not key.startswith(_RUN_SYSTEM_ATTR_PREFIXES)
    }
    system_attrs.update(retry_marks(history))
    user_attrs = {key: trial.user_attrs[key] for key in (BASELINE_ATTR,) if key in trial.user_attrs}
    user_attrs["retry_reason"] = trial.user_attrs.get(FAIL_REASON_ATTR, "stale heartbeat")
    study.add_trial(
        optuna.trial.create_trial(
            state=optuna.trial.TrialState.WAITING,
            params=trial.params,
            distributions=trial.distributions,
            user_attrs=user_attrs,
            system_attrs=system_attrs,
        )
    )
    return True


#: System attributes of a run, not of its params: autofinetune's (its outcome, the engine's tags,
#: a scheduler's stop signal) and its artifacts (the learning curve). A retry starts without them.
_RUN_SYSTEM_ATTR_PREFIXES = ("autofinetune:", "artifacts:")
