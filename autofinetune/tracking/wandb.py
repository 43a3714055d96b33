"""Weights & Biases: one run per trial, grouped by the study (``group = study name``).

Each trial's run (``name = trial_<n>``, ``job_type = trial``) has the params,
``phase_boundary_step``, the study's id (``study_uid``) and its spec (``spec``, flattened) in its
config, every epoch's metrics at the global step (also logged as ``global_step``), ``state`` and
``fail_reason`` in its summary, its state as a tag, and the kept checkpoint as a ``model``
artifact. At the study's end a run ``job_type = study`` in the same group records the spec, how
the launch ended, ``best_trial`` and ``best_value``. ``WANDB_MODE=offline`` writes the runs to
files only (``wandb sync`` uploads them later).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Mapping

from autofinetune.tracking.base import StudyEnd, StudyInfo, Tracker, TrialInfo, check_reachable

#: Where the W&B client talks to unless ``WANDB_BASE_URL`` says otherwise.
DEFAULT_BASE_URL = "https://api.wandb.ai"


class WandbTracker(Tracker):
    """Logs a study's trials to a Weights & Biases project.

    Args:
        project: The W&B project.
        study: The study's name (the runs' group).
        study_uid: The study's stable id (in every run's config).
    """

    name = "wandb"
    extra = "wandb"

    def __init__(self, project: str, *, study: str, study_uid: str = "") -> None:
        self.project = project
        self.study = study
        self.study_uid = study_uid
        self._spec: dict[str, Any] = {}
        #: Trial number -> its open run.
        self._runs: dict[int, Any] = {}

    @staticmethod
    def offline() -> bool:
        """Whether W&B writes to local files only (``WANDB_MODE=offline``/``disabled``)."""
        return os.environ.get("WANDB_MODE", "").lower() in ("offline", "dryrun", "disabled")

    def check(self) -> None:
        self.import_package("wandb")
        if not self.offline():
            check_reachable(os.environ.get("WANDB_BASE_URL", DEFAULT_BASE_URL), where=self.where)

    def _init(self, **kwargs: Any):
        wandb = self.import_package("wandb")
        return wandb.init(
            project=self.project, group=self.study, reinit="create_new",
            settings=wandb.Settings(console="off", silent=True), **kwargs,
        )

    def start_trial(self, trial: TrialInfo) -> None:
        if trial.number in self._runs:
            return
        self._spec = dict(trial.spec)
        config = {**trial.params, "phase_boundary_step": trial.phase_boundary_step, "study": trial.study,
                  "study_uid": self.study_uid, "trial_number": trial.number, "spec": self._spec}
        self._runs[trial.number] = self._init(name=f"trial_{trial.number}", job_type="trial", config=config)

    def log_epoch(self, number: int, step: int, metrics: Mapping[str, float], *, phase: int) -> None:
        run = self._runs.get(number)
        if run is None:
            return
        values = {key: float(value) for key, value in metrics.items() if _finite(value)}
        run.log({**values, "phase": phase, "global_step": step}, step=step)

    def end_trial(
        self, number: int, *, state: str, value: float | None, reason: str | None, checkpoint: str | None
    ) -> None:
        run = self._runs.pop(number, None)
        if run is None:
            return
        wandb = self.import_package("wandb")
        run.summary["state"] = state
        if reason:
            run.summary["fail_reason"] = reason
        if value is not None and _finite(value):
            run.summary["objective_value"] = float(value)
        run.tags = tuple(run.tags or ()) + (state.lower(),)
        if checkpoint is not None and Path(checkpoint).is_file():
            artifact = wandb.Artifact(f"{self.study}-trial-{number}", type="model")
            artifact.add_file(str(checkpoint))
            run.log_artifact(artifact)
        run.finish(exit_code=1 if state == "FAIL" else 0)

    def start_study(self, study: StudyInfo) -> None:
        self._spec = {**study.spec, "engine": study.engine}

    def end_study(self, end: StudyEnd) -> None:
        config = {"study": self.study, "study_uid": self.study_uid, "spec": self._spec}
        run = self._init(name=f"{self.study}", job_type="study", config=config)
        run.summary["status"] = end.status
        if end.best_number is not None:
            run.summary["best_trial"] = end.best_number
            run.summary["best_run_name"] = f"trial_{end.best_number}"
        if end.best_value is not None and _finite(end.best_value):
            run.summary["best_value"] = float(end.best_value)
        for metric, value in (end.test_score or {}).items():
            if metric in ("accuracy", "loss") and _finite(value):
                run.summary[f"test_{metric}"] = float(value)
        run.finish(exit_code=0 if end.status == "FINISHED" else 1)


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)
