"""Keep the best trials' models in the artifact store, and only the best K of them."""

from __future__ import annotations

import logging
from typing import Any

from autofinetune.store.attributes import CHECKPOINT_ATTR
from autofinetune.store.optuna_internals import storage_of

logger = logging.getLogger(__name__)


class CheckpointKeeper:
    """Uploads a finished trial's best-epoch model when it ranks among the best ``keep``.

    When a new trial enters the best ``keep``, the model of the trial it pushes out is removed
    from the artifact store, so a long study does not fill the disk. (The dropped trial's record
    still names the artifact; ``export --retrain`` rebuilds such a model from its params.)

    Args:
        artifact_store: An Optuna artifact store.
        keep: How many of the best trials keep their model; 0 keeps none.
        objective: The spec's :class:`~autofinetune.spec.ObjectiveSpec` (its direction ranks).
    """

    def __init__(self, artifact_store, *, keep: int, objective) -> None:
        self.artifact_store = artifact_store
        self.keep = keep
        self.objective = objective

    def offer(self, study, trial_id: int, value: float, model_path: str) -> str | None:
        """Upload ``model_path`` for a RUNNING trial if it ranks in the best ``keep``.

        Args:
            study: The study holding the trial.
            trial_id: The storage's id of the trial.
            value: Its objective value.
            model_path: The saved model file.

        Returns:
            The artifact id, or ``None`` when the model was not kept.
        """
        from optuna.artifacts import upload_artifact

        if self.keep <= 0:
            return None
        storage = storage_of(study)
        trial = storage.get_trial(trial_id)
        ranked = self._ranked_kept(study)
        if not self._enters(ranked, value, trial.number):
            return None
        artifact_id = upload_artifact(
            artifact_store=self.artifact_store,
            file_path=model_path,
            study_or_trial=trial,
            storage=storage,
            mimetype="application/octet-stream",
        )
        storage.set_trial_user_attr(trial_id, CHECKPOINT_ATTR, artifact_id)
        for dropped in ranked[self.keep - 1 :]:
            self._remove(dropped.user_attrs[CHECKPOINT_ATTR], dropped.number)
        return artifact_id

    def would_keep(self, study, trial_id: int, value: float) -> bool:
        """Whether a trial with ``value`` would rank in the best ``keep`` now (a trial asks
        before it spends time saving its model; :meth:`offer` decides again when it ends)."""
        if self.keep <= 0:
            return False
        number = storage_of(study).get_trial(trial_id).number
        return self._enters(self._ranked_kept(study), value, number)

    def _ranked_kept(self, study) -> list:
        from optuna.trial import TrialState

        kept = [
            t
            for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if CHECKPOINT_ATTR in t.user_attrs and t.values
        ]
        # A trial's first value is its main metric's (its only one, or the first of several).
        return sorted(kept, key=lambda t: self._rank(t.values[0], t.number))

    def _enters(self, ranked: list, value: float, number: int) -> bool:
        if len(ranked) < self.keep:
            return True
        last = ranked[self.keep - 1]
        return self._rank(value, number) < self._rank(last.values[0], last.number)

    def _rank(self, value: float, number: int) -> tuple[float, int]:
        # Sort key, best first. Among equal values the earlier trial wins, whichever finished
        # first: that is the one Optuna's `best_trial` names (its query breaks ties by row
        # order), so the best trial keeps its model when concurrent trials tie.
        return (-value if self.objective.maximize else value, number)

    def _remove(self, artifact_id: Any, trial_number: int) -> None:
        try:
            self.artifact_store.remove(artifact_id)
            logger.info("removed the checkpoint of trial %d (no longer among the best %d)", trial_number, self.keep)
        except Exception:  # already removed by another worker
            pass
