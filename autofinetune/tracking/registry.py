"""Which trackers a spec names: :func:`open_trackers` for the trial path, :func:`check_trackers` for ``launch``."""

from __future__ import annotations

from autofinetune.tracking.base import Tracker, TrackerSet


def open_trackers(spec, *, study_uid: str = "") -> TrackerSet:
    """The trackers named in the spec's ``[tracking]`` section (none are contacted yet).

    Args:
        spec: The study's spec.
        study_uid: The study's stable id; trackers find the study's runs by it.
    """
    trackers: list[Tracker] = []
    tracking = spec.tracking
    if tracking.mlflow:
        from autofinetune.tracking.mlflow import MlflowTracker

        trackers.append(MlflowTracker(
            tracking.mlflow, study=spec.name, study_uid=study_uid, register_as=tracking.mlflow_register
        ))
    if tracking.wandb:
        from autofinetune.tracking.wandb import WandbTracker

        trackers.append(WandbTracker(tracking.wandb, study=spec.name, study_uid=study_uid))
    if spec.tensorboard_dir is not None:
        from autofinetune.tracking.tensorboard import TensorBoardTracker

        trackers.append(TensorBoardTracker(
            spec.tensorboard_dir, study=spec.name, study_uid=study_uid, params=list(spec.search.params()),
            objective=spec.objective.metric,
        ))
    return TrackerSet(trackers)


def check_trackers(spec) -> None:
    """Reach every tracker of the spec; ``launch`` calls it before the study database is touched.

    Raises:
        ConfigError: a tracker's package is missing or it cannot be reached.
    """
    for tracker in open_trackers(spec).trackers:
        tracker.check()
