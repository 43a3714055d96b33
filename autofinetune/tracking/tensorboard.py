"""TensorBoard: one event folder per trial, both phases one curve, and the HParams tab.

Layout: ``<folder>/<study>-<id>/trial_<n>``, where ``<id>`` is the start of the study's stable
id, so two studies of one name never write into each other's runs. Events are written with
``tensorboard``'s own event-file writer, which needs no TensorFlow: every epoch's metrics as
scalars at the global step, and ``phase`` (1 or 2) beside them so the boundary shows on the
curves. For the HParams tab, the study's folder holds the experiment (the searched parameters
and the metrics), and each trial's folder a session: its parameters when it starts, its status
when it ends (the HParams plugin's summaries, built from its protos).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

from autofinetune.errors import ConfigError
from autofinetune.tracking.base import StudyInfo, Tracker, TrialInfo

#: The epoch metrics the HParams tab shows for each trial (their last value), after its value.
EPOCH_METRICS = ("val_accuracy", "val_loss", "accuracy", "loss")
#: The hparams plugin's session status of each trial state (``api_pb2.Status``): a pruned
#: trial ran well but stopped early, which the plugin has no word for.
SESSION_STATUS = {"COMPLETE": "STATUS_SUCCESS", "PRUNED": "STATUS_UNKNOWN", "FAIL": "STATUS_FAILURE"}


class TensorBoardTracker(Tracker):
    """Writes a study's trials as TensorBoard event files.

    Args:
        folder: The log folder (``tensorboard --logdir FOLDER`` shows every study in it).
        study: The study's name.
        study_uid: The study's stable id (its first characters name the study's folder).
        params: The searched parameters' names (the HParams tab's columns).
        objective: The metric a trial is scored by: its best value is the trial's value, which
            each trial's session ends with as ``best_<objective>``.
    """

    name = "tensorboard"
    extra = "tensorboard"

    def __init__(
        self, folder: str | Path, *, study: str, study_uid: str = "", params: Sequence[str] = (),
        objective: str = "val_accuracy",
    ) -> None:
        self.folder = Path(folder)
        self.study = study
        self.study_uid = study_uid
        self.params = tuple(params)
        self.objective = objective
        #: Trial number -> its open event writer.
        self._writers: dict[int, Any] = {}

    @property
    def study_folder(self) -> Path:
        """The study's folder: its name and the start of its id."""
        return self.folder / (f"{self.study}-{self.study_uid[:8]}" if self.study_uid else self.study)

    def trial_folder(self, number: int) -> Path:
        """The event folder of trial ``number``."""
        return self.study_folder / f"trial_{number}"

    def check(self) -> None:
        self.import_package("tensorboard.summary.writer.event_file_writer")
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise ConfigError(
                f"{self.where}: cannot create the log folder {str(self.folder)!r}: {error.strerror or error}"
            ) from None

    def _event(self, step: int, values: list) -> Any:
        from tensorboard.compat.proto.event_pb2 import Event
        from tensorboard.compat.proto.summary_pb2 import Summary

        return Event(wall_time=time.time(), step=step, summary=Summary(value=values))

    def _hparams_value(self, tag: str, plugin_data) -> Any:
        """A summary value of the HParams plugin (what its ``summary`` module builds with TF)."""
        from tensorboard.compat.proto.summary_pb2 import Summary
        from tensorboard.plugins.hparams import metadata

        return Summary.Value(tag=tag, metadata=metadata.create_summary_metadata(plugin_data), tensor=metadata.NULL_TENSOR)

    def start_study(self, study: StudyInfo) -> None:
        """The HParams experiment: the searched parameters and the metrics, in the study's folder."""
        from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        metrics = (f"best_{self.objective}", *EPOCH_METRICS)
        experiment = api_pb2.Experiment(
            description=f"autofinetune study {study.name} (engine {study.engine})",
            time_created_secs=time.time(),
            # Every searched parameter is a number (choices of numbers too).
            hparam_infos=[api_pb2.HParamInfo(name=name, type=api_pb2.DATA_TYPE_FLOAT64) for name in self.params],
            metric_infos=[api_pb2.MetricInfo(name=api_pb2.MetricName(tag=tag)) for tag in metrics],
        )
        writer = EventFileWriter(str(self.study_folder))
        plugin_data = plugin_data_pb2.HParamsPluginData(experiment=experiment)
        writer.add_event(self._event(0, [self._hparams_value(metadata.EXPERIMENT_TAG, plugin_data)]))
        writer.close()

    def start_trial(self, trial: TrialInfo) -> None:
        if trial.number in self._writers:
            return
        from tensorboard.plugins.hparams import metadata, plugin_data_pb2
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        writer = EventFileWriter(str(self.trial_folder(trial.number)))
        self._writers[trial.number] = writer
        session = plugin_data_pb2.SessionStartInfo(group_name=f"trial_{trial.number}", start_time_secs=time.time())
        for name, value in trial.params.items():
            if isinstance(value, bool):
                session.hparams[name].bool_value = value
            elif isinstance(value, (int, float)):
                session.hparams[name].number_value = value
            else:
                session.hparams[name].string_value = str(value)
        plugin_data = plugin_data_pb2.HParamsPluginData(session_start_info=session)
        writer.add_event(self._event(0, [self._hparams_value(metadata.SESSION_START_INFO_TAG, plugin_data)]))
        writer.flush()

    def log_epoch(self, number: int, step: int, metrics: Mapping[str, float], *, phase: int) -> None:
        from tensorboard.compat.proto.summary_pb2 import Summary

        writer = self._writers.get(number)
        if writer is None:
            return
        values = {**metrics, "phase": float(phase)}
        scalars = [
            Summary.Value(tag=key, simple_value=float(value)) for key, value in values.items() if _finite(value)
        ]
        writer.add_event(self._event(step, scalars))
        writer.flush()

    def end_trial(
        self, number: int, *, state: str, value: float | None, reason: str | None, checkpoint: str | None
    ) -> None:
        from tensorboard.compat.proto.summary_pb2 import Summary
        from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2

        writer = self._writers.pop(number, None)
        if writer is None:
            return
        if value is not None and _finite(value):
            writer.add_event(self._event(0, [Summary.Value(tag=f"best_{self.objective}", simple_value=float(value))]))
        status = api_pb2.Status.Value(SESSION_STATUS.get(state, "STATUS_UNKNOWN"))
        end = plugin_data_pb2.SessionEndInfo(status=status, end_time_secs=time.time())
        plugin_data = plugin_data_pb2.HParamsPluginData(session_end_info=end)
        writer.add_event(self._event(0, [self._hparams_value(metadata.SESSION_END_INFO_TAG, plugin_data)]))
        writer.close()


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)
