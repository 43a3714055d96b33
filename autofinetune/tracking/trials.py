"""The trackers as a process's trials reach them: one run per trial, every epoch, its end.

The one trial path (:mod:`autofinetune.engines.trial_path`) tells :class:`TrialTrackers` each
epoch and each end, whichever engine runs the trial; a trial's tracker runs open with its first
epoch (or its end, for a trial that never ran one).
"""

from __future__ import annotations

from typing import Any, Mapping

from autofinetune.tracking.base import TrialInfo
from autofinetune.tracking.registry import open_trackers


class TrialTrackers:
    """The spec's trackers in one process.

    Args:
        spec: The study's spec (its ``[tracking]`` section, name and phase boundary).
    """

    def __init__(self, spec) -> None:
        self.spec = spec
        self.trackers = open_trackers(spec)
        #: Numbers of the trials whose runs are open in this process.
        self._open: set[int] = set()

    def __bool__(self) -> bool:
        return bool(self.trackers)

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

    def end_study(self, *, best_number: int | None, best_value: float | None) -> None:
        """Tell the trackers the study's best trial so far (``launch`` calls it when it returns)."""
        if self.trackers:
            self.trackers.call("end_study", best_number=best_number, best_value=best_value)

    def _start(self, number: int, params: Mapping[str, Any]) -> None:
        if number in self._open:
            return
        self._open.add(number)
        info = TrialInfo(
            study=self.spec.name, number=number, params=dict(params), phase_boundary_step=self.spec.schedule.phase1_epochs
        )
        self.trackers.call("start_trial", info)
