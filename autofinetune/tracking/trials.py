"""The trackers as a process's trials reach them: the study's record, one run per trial, every epoch.

The one trial path (:mod:`autofinetune.engines.trial_path`) tells :class:`TrialTrackers` each
epoch and each end, whichever engine runs the trial; a trial's tracker runs open with its first
epoch (or its end, for a trial that never ran one). ``launch`` opens the study's own record
(:meth:`TrialTrackers.start_study`) before any trial runs and closes it when it returns.
"""

from __future__ import annotations

from typing import Any, Mapping

from autofinetune.tracking.base import StudyEnd, StudyInfo, TrialInfo, flatten_spec
from autofinetune.tracking.registry import open_trackers


def spec_for_trackers(spec) -> dict[str, Any]:
    """The spec as trackers log it: flattened, without ``storage`` and ``[tracking]`` (a
    database password or a tracker's token must not travel to a tracking server)."""
    data = {key: value for key, value in spec.to_toml_dict().items() if key not in ("storage", "tracking")}
    return flatten_spec(data)


class TrialTrackers:
    """The spec's trackers in one process.

    Args:
        spec: The study's spec (its ``[tracking]`` section, name and phase boundary).
        study_uid: The study's stable id, by which trackers find the study's runs.
    """

    def __init__(self, spec, *, study_uid: str = "") -> None:
        self.spec = spec
        self.study_uid = study_uid
        self.trackers = open_trackers(spec, study_uid=study_uid)
        #: Numbers of the trials whose runs are open in this process.
        self._open: set[int] = set()
        self._spec_data: dict[str, Any] | None = None

    def __bool__(self) -> bool:
        return bool(self.trackers)

    @property
    def spec_data(self) -> dict[str, Any]:
        """The spec as the trackers log it (see :func:`spec_for_trackers`)."""
        if self._spec_data is None:
            self._spec_data = spec_for_trackers(self.spec)
        return self._spec_data

    def start_study(self, *, engine: str) -> list[str]:
        """Open (or reopen) the study's record; a warning per tracker that could not."""
        if not self.trackers:
            return []
        info = StudyInfo(name=self.spec.name, uid=self.study_uid, spec=self.spec_data, engine=engine)
        return self.trackers.call("start_study", info)

    def epoch(self, number: int, params: Mapping[str, Any], step: int, metrics: Mapping[str, float]) -> None:
        """One epoch of a running trial, at its global 1-based step; never raises."""
        if not self.trackers:
            return
        self._start(number, params)
        phase = 1 if step <= self.spec.schedule.phase1_epochs else 2
        self.trackers.call("log_epoch", number, step, dict(metrics), phase=phase)

    def end(
        self, number: int, params: Mapping[str, Any], *, state: str, value: float | None, reason: str | None,
        checkpoint: str | None,
    ) -> list[str]:
        """Close the trial's runs; never raises.

        Args:
            number: The trial's number.
            params: Its parameters (a run opens now for a trial that ran no epoch here).
            state: ``"COMPLETE"``, ``"PRUNED"`` or ``"FAIL"``.
            value: The objective value of a complete trial.
            reason: Why it failed, else ``None``.
            checkpoint: The trial's kept model file, else ``None``.

        Returns:
            A warning per tracker that did not record the trial.
        """
        if not self.trackers:
            return []
        self._start(number, params)  # a tracker that fails here is off: end_trial says so
        self._open.discard(number)
        return self.trackers.call("end_trial", number, state=state, value=value, reason=reason, checkpoint=checkpoint)

    def end_study(self, end: StudyEnd) -> list[str]:
        """Close the study's record (``launch`` calls it when it returns); never raises."""
        return self.trackers.call("end_study", end) if self.trackers else []

    def _start(self, number: int, params: Mapping[str, Any]) -> None:
        if number in self._open:
            return
        self._open.add(number)
        info = TrialInfo(
            study=self.spec.name, number=number, params=dict(params), phase_boundary_step=self.spec.schedule.phase1_epochs,
            study_uid=self.study_uid, spec=self.spec_data,
        )
        self.trackers.call("start_trial", info)
