"""TensorBoard: one event folder per trial, ``<folder>/<study>/trial_<n>``, both phases one curve.

Events are written with ``tensorboard``'s own event-file writer, which needs no TensorFlow:
every epoch's metrics as scalars at the global step, and ``phase`` (1 or 2) beside them so the
boundary shows on the curves. A trial's parameters go in a text summary at step 0.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Mapping

from autofinetune.errors import ConfigError
from autofinetune.tracking.base import Tracker, TrialInfo


class TensorBoardTracker(Tracker):
    """Writes a study's trials as TensorBoard event files.

    Args:
        folder: The log folder (``tensorboard --logdir FOLDER`` shows every study in it).
        study: The study's name (its sub-folder).
    """

    name = "tensorboard"
    extra = "tensorboard"

    def __init__(self, folder: str | Path, *, study: str) -> None:
        self.folder = Path(folder)
        self.study = study
        #: Trial number -> its open event writer.
        self._writers: dict[int, Any] = {}

    def trial_folder(self, number: int) -> Path:
        """The event folder of trial ``number``."""
        return self.folder / self.study / f"trial_{number}"

    def check(self) -> None:
        self.import_package("tensorboard.summary.writer.event_file_writer")
        try:
            (self.folder / self.study).mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise ConfigError(
                f"{self.where}: cannot create the log folder {str(self.folder)!r}: {error.strerror or error}"
            ) from None

    def _event(self, step: int, values: list) -> Any:
        from tensorboard.compat.proto.event_pb2 import Event
        from tensorboard.compat.proto.summary_pb2 import Summary

        return Event(wall_time=time.time(), step=step, summary=Summary(value=values))

    def start_trial(self, trial: TrialInfo) -> None:
        if trial.number in self._writers:
            return
        from tensorboard.compat.proto.summary_pb2 import Summary, SummaryMetadata
        from tensorboard.compat.proto.tensor_pb2 import TensorProto
        from tensorboard.compat.proto.tensor_shape_pb2 import TensorShapeProto
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        writer = EventFileWriter(str(self.trial_folder(trial.number)))
        self._writers[trial.number] = writer
        text = json.dumps({**trial.params, "phase_boundary_step": trial.phase_boundary_step}, indent=2, default=str)
        tensor = TensorProto(
            dtype=7,  # DT_STRING
            string_val=[text.encode("utf-8")],
            tensor_shape=TensorShapeProto(dim=[TensorShapeProto.Dim(size=1)]),
        )
        metadata = SummaryMetadata(plugin_data=SummaryMetadata.PluginData(plugin_name="text"))
        writer.add_event(self._event(0, [Summary.Value(tag="params", tensor=tensor, metadata=metadata)]))
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
        writer = self._writers.pop(number, None)
        if writer is not None:
            writer.close()


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)
