"""Experiment trackers (MLflow, Weights & Biases, TensorBoard) that every trial is also logged to.

The one trial path (:mod:`autofinetune.engines.trial_path`) calls them through
:class:`TrialTrackers`, so every engine logs alike. Each tracker's package is optional and imported only when the spec names the tracker.
This package never imports Keras: Ray trial actors and Optuna workers load it as they are.
"""

from autofinetune.tracking.base import StudyEnd, StudyInfo, Tracker, TrackerSet, TrialInfo, flatten_spec
from autofinetune.tracking.registry import check_trackers, open_trackers
from autofinetune.tracking.trials import TrialTrackers

__all__ = [
    "StudyEnd", "StudyInfo", "Tracker", "TrackerSet", "TrialInfo", "TrialTrackers", "check_trackers",
    "flatten_spec", "open_trackers",
]
