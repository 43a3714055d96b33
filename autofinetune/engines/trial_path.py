"""The one trial path: run a trial's schedule and record it, the same way for every engine.

An engine gets a RUNNING study trial and its parameters its own way (Optuna's ``ask``, Ray's
searcher, a keras-tuner trial mirrored into the study), hands them with its reporter to
:func:`run_recorded_trial`, and turns the :class:`TrialOutcome` that comes back into its own
signal: ``study.tell`` (the Optuna worker, the keras-tuner mirror), the outcome the Ray driver
tells, a keras-tuner trial status, or what ``autofinetune.objective`` returns to Optuna. A trial
that ends without running its schedule to an outcome (its worker stopped sending heartbeats,
Ray gave it up, the search stopped around it) is recorded by :func:`record_ended_trial`.

What a trial writes, in this order:

1. **its outcome** (state, value, reason), in one write, before anything else: a worker that
   dies right after leaves a trial the next one finishes with that value
   (:func:`~autofinetune.store.trial_writer.finish_from_outcome`) instead of failing it;
2. its result's attributes, its kept checkpoint, the end of its tracker runs, its learning
   curve and its dashboard note. Any of these may fail (a full disk, a tracker gone): that is a
   warning, logged and stored on the trial (``record_warnings``, shown in its note), never a
   failed trial;
3. the engine's own signal, last.

Only an unreachable study database past its grace period
(:class:`~autofinetune.store.outages.StorageUnavailableError`) stops this path: nothing can be
recorded then, and the search stops.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Literal, Mapping, Sequence, Union

import optuna

from autofinetune.errors import ConfigError, FatalError
from autofinetune.store.attributes import CONSTRAINT_VIOLATIONS_ATTR, FAIL_REASON_ATTR, RECORD_WARNINGS_ATTR
from autofinetune.store.outages import StorageUnavailableError
from autofinetune.store.study import best_feasible_trial, main_value
from autofinetune.store.trial_writer import TrialWriter, result_attributes
from autofinetune.tracking import StudyEnd, TrialTrackers
from autofinetune.trial.devices import device_description
from autofinetune.viewing.notes import RESULT_STATES
from autofinetune.viewing.trial_views import write_trial_views

if TYPE_CHECKING:
    from autofinetune.data.sources import ImageData
    from autofinetune.trial.results import TrialResult
    from autofinetune.trial.session import TrialSession

logger = logging.getLogger(__name__)

#: After this many unexpected trial errors in a row the search stops: something is broken, not
#: a trial (the Optuna and Ray engines; keras-tuner counts failed trials its own way).
MAX_CONSECUTIVE_ERRORS = 3

#: A fail reason is cut to this many characters (a traceback's worth is noise on the dashboard).
MAX_REASON_CHARS = 2000

#: The fail reason of a trial stopped by Ctrl-C.
INTERRUPTED = "interrupted (Ctrl-C) while running"

#: How a trial's run ended, besides its state: ``finished`` (the schedule returned a result),
#: ``unexpected`` (an unexpected exception), ``fatal`` (bad input or a broken node: the search
#: stops), ``interrupted`` (our search stopped it: Ctrl-C, SIGTERM), ``lost`` (its process died:
#: killed, or its node lost; recorded by whoever ends the trial) or ``taken_over`` (another
#: worker failed the trial as stale meanwhile and queued its retry: this run records nothing more).
OutcomeKind = Literal["finished", "unexpected", "fatal", "interrupted", "lost", "taken_over"]

#: A trial's images, or what loads them (Ray loads them in the trial's actor, inside the path).
DataSource = Union["ImageData", Callable[[], "ImageData"]]


@dataclass(frozen=True)
class TrialOutcome:
    """How one trial ended, as it is recorded and as its engine signals it.

    Attributes:
        state: ``"complete"``, ``"pruned"`` or ``"failed"``.
        value: The best epoch's objective value of a complete trial.
        values: Every objective's value of a complete trial of a study with several
            (``objective.pareto_with``), ``value`` first; ``None`` with one objective.
        reason: Why the trial failed.
        kind: See :data:`OutcomeKind`.
        result: The schedule's result, when it returned one.
        error: The exception that ended the trial, when one did (never stored).
        warnings: What could not be recorded after the outcome (a checkpoint, a curve, ...).
        stop_search: Why the search must stop now (a fatal error, or one unexpected error too
            many in a row), else ``None``.
    """

    state: Literal["complete", "pruned", "failed"]
    value: float | None = None
    values: tuple[float, ...] | None = None
    reason: str | None = None
    kind: OutcomeKind = "finished"
    result: "TrialResult | None" = None
    error: BaseException | None = None
    warnings: tuple[str, ...] = ()
    stop_search: str | None = None

    @property
    def told(self) -> float | list[float] | None:
        """What an engine tells Optuna as the trial's value(s): every objective's, when several."""
        return list(self.values) if self.values is not None else self.value

    @property
    def optuna_state(self) -> "optuna.trial.TrialState":
        """The state an engine tells Optuna."""
        return optuna.trial.TrialState[RESULT_STATES[self.state]]

    def stored(self) -> dict[str, Any]:
        """What :data:`~autofinetune.store.attributes.OUTCOME_ATTR` holds (JSON data)."""
        data: dict[str, Any] = {"state": self.state, "value": self.value}
        if self.values is not None:
            data["values"] = list(self.values)
        if self.reason:
            data["reason"] = self.reason
        if self.kind != "finished":
            data["kind"] = self.kind
        return data


class ConsecutiveFailures:
    """Counts unexpected trial errors in a row; at :data:`MAX_CONSECUTIVE_ERRORS` the search stops.

    Args:
        limit: Errors in a row that stop the search.
    """

    def __init__(self, limit: int = MAX_CONSECUTIVE_ERRORS) -> None:
        self.limit = limit
        self.count = 0

    def succeeded(self) -> None:
        """A trial ended with a result (complete, pruned, or failed by its schedule)."""
        self.count = 0

    def failed(self, reason: str) -> str | None:
        """A trial raised an unexpected error.

        Returns:
            Why the search must stop when this was one error too many, else ``None``.
        """
        self.count += 1
        if self.count >= self.limit:
            return f"{self.limit} trials in a row failed; last: {reason}"
        return None


class TrialRecording:
    """What one process records its trials through: the study database's writer, the trackers,
    and the count of unexpected errors in a row.

    Args:
        study: The Optuna study.
        spec: Its :class:`~autofinetune.spec.StudySpec`.
        writer: Writes the trials' outcomes, attributes and kept models (default: one that keeps
            no models).
    """

    def __init__(self, study, spec, *, writer: TrialWriter | None = None) -> None:
        from autofinetune.store.study import study_uid

        self.study = study
        self.spec = spec
        self.writer = writer if writer is not None else TrialWriter(study, spec)
        self.trackers = TrialTrackers(spec, study_uid=study_uid(study) if spec.tracking.enabled else "")
        self.failures = ConsecutiveFailures()

    @classmethod
    def at(cls, study, spec, *, artifacts: str) -> "TrialRecording":
        """A recording whose curves and kept models go to the artifact store at ``artifacts``."""
        return cls(study, spec, writer=TrialWriter.at(study, spec, artifacts=artifacts))

    def end_study(self, *, status: str, test_score: Mapping[str, Any] | None = None, best_model: Any = None) -> None:
        """Close the trackers' record of the study with the launch's status and its best trial
        (``launch`` calls it when it returns).

        Args:
            status: ``"FINISHED"``, ``"FAILED"`` or ``"KILLED"``.
            test_score: The best trial's score on the held-back test split, if measured.
            best_model: The best trial's Keras model, for trackers that keep models.
        """
        if not self.trackers:
            return
        best = best_feasible_trial(self.study)
        self.trackers.end_study(StudyEnd(
            status=status, best_number=None if best is None else best.number,
            best_value=None if best is None else main_value(best), test_score=test_score, best_model=best_model,
        ))


class RecordingReporter:
    """An engine's reporter whose epochs reach the trackers first.

    The trackers hear an epoch before the engine's reporter may signal a prune, so a pruned
    trial's last epoch is logged everywhere too.
    """

    def __init__(self, trackers: TrialTrackers, number: int, params: Mapping[str, Any], inner) -> None:
        self.trackers = trackers
        self.number = number
        self.params = params
        self.inner = inner

    def report(self, step: int, metrics: Mapping[str, float]) -> None:
        self.trackers.epoch(self.number, self.params, step, metrics)
        if self.inner is not None:
            self.inner.report(step, metrics)

    def __getattr__(self, name: str) -> Any:
        # The engines' reporters have more (Ray's report_nothing_happened); they stay reachable.
        return getattr(self.inner, name)


def run_recorded_trial(
    recording: TrialRecording | None,
    spec,
    params: Mapping[str, Any],
    data: DataSource,
    *,
    trial_id: int | None = None,
    number: int | None = None,
    reporter=None,
    checkpoint_path: str | Path | None = None,
    stop_event: threading.Event | None = None,
    stop_reason: Union[str, Callable[[], str]] = INTERRUPTED,
    callbacks: Sequence[Any] = (),
    session: "TrialSession | None" = None,
) -> TrialOutcome:
    """Run one trial's two-phase schedule and record it: the one path of every engine.

    Args:
        recording: Where the trial is recorded; ``None`` records nothing (a keras-tuner
            HyperModel in a user's own tuner), the outcome is still classified.
        spec: The study's spec.
        params: The trial's complete parameters.
        data: The images, or a function that loads them (a failure then fails the trial).
        trial_id: The storage's id of the RUNNING study trial (with ``recording``).
        number: Its number in the study (with ``recording``).
        reporter: The engine's reporter (``report(step, metrics)``, may raise a prune signal).
        checkpoint_path: Where to save the best epoch's model, always; default: a temporary
            file, saved only when the study would keep it.
        stop_event: Once set, the trial stops after its current batch (Ctrl-C, SIGTERM).
        stop_reason: The fail reason of a stopped trial (or what returns it, read when it stops).
        callbacks: The user's Keras callbacks, added to both phases' ``fit``.
        session: The worker's :class:`~autofinetune.trial.session.TrialSession`, kept from
            trial to trial; ``None``: the trial keeps nothing for the next.

    Returns:
        The :class:`TrialOutcome`, recorded; the engine signals it.

    Raises:
        StorageUnavailableError: the study database stayed unreachable past its grace period.
    """
    from autofinetune.trial.schedule import run_trial

    if recording is not None:
        if trial_id is None or number is None:
            raise ValueError("run_recorded_trial: a recorded trial needs its trial_id and number")
        try:
            recording.writer.start(trial_id, device=device_description())
        except optuna.exceptions.UpdateFinishedTrialError as error:
            return _taken_over(number, error)
        reporter = RecordingReporter(recording.trackers, number, params, reporter)
    with tempfile.TemporaryDirectory(prefix="autofinetune-") as scratch:
        keep_checkpoint = None
        if checkpoint_path is None and recording is not None and recording.writer.keeps_checkpoints:
            checkpoint_path = Path(scratch) / "model.keras"
            keep_checkpoint = recording.writer.checkpoint_wanted(trial_id)  # type: ignore[arg-type]
        started = time.perf_counter()
        try:
            images = data() if callable(data) else data
            result = run_trial(
                spec, params, images, reporter=reporter, checkpoint_path=checkpoint_path,
                keep_checkpoint=keep_checkpoint, stop_event=stop_event, callbacks=callbacks, session=session,
            )
        except optuna.exceptions.UpdateFinishedTrialError as error:
            return _taken_over(number, error)
        except StorageUnavailableError:
            raise
        except (KeyboardInterrupt, Exception) as error:
            stop_requested = stop_event is not None and stop_event.is_set()
            outcome = _stopped_by(error, recording, stop_reason, stop_requested=stop_requested)
        else:
            if recording is not None:
                recording.failures.succeeded()
            outcome = _finished(result)
        if recording is None:
            return outcome
        timing = {"schedule_seconds": round(time.perf_counter() - started, 3)}
        return _record(recording, trial_id, number, params, outcome, timing=timing)  # type: ignore[arg-type]


def _stopped_by(
    error: BaseException,
    recording: TrialRecording | None,
    stop_reason: Union[str, Callable[[], str]],
    *,
    stop_requested: bool = False,
) -> TrialOutcome:
    """The outcome of a schedule that raised: interrupted, fatal to the search, or unexpected
    (which stops the search after too many in a row).

    Args:
        stop_requested: The trial's stop event was set when it raised: whatever error its
            process met while going down (a closed queue, a session torn down) is the stop's,
            not the trial's, and the trial runs again.
    """
    if isinstance(error, KeyboardInterrupt) or stop_requested:
        reason = stop_reason() if callable(stop_reason) else stop_reason
        return TrialOutcome("failed", reason=reason, kind="interrupted", error=error)
    if isinstance(error, (ConfigError, FatalError)):
        # Bad input or a broken node: every trial would fail the same way.
        return TrialOutcome("failed", reason=_cut(str(error)), kind="fatal", error=error, stop_search=str(error))
    reason = _cut(f"{type(error).__name__}: {error}")
    stop = recording.failures.failed(reason) if recording is not None else None
    return TrialOutcome("failed", reason=reason, kind="unexpected", error=error, stop_search=stop)


def _finished(result: "TrialResult") -> TrialOutcome:
    """The outcome of a schedule that returned: its state, and a complete trial's value(s)."""
    if result.state == "complete" and result.best_value is None:
        # Optuna takes no COMPLETE trial without a value: there is nothing to score.
        return TrialOutcome("failed", reason=f"no epoch gave a finite {result.objective}", result=result)
    value = result.best_value if result.state == "complete" else None
    values = None
    if result.objective_values and result.state == "complete":
        missing = [i for i, v in enumerate(result.objective_values) if v is None or not math.isfinite(v)]
        if missing:
            # Optuna takes no COMPLETE trial of several objectives without every value.
            reason = f"objective {missing[0] + 1} of {len(result.objective_values)} (in [metric, *pareto_with]) has no finite value"
            return TrialOutcome("failed", reason=reason, result=result)
        values = tuple(float(v) for v in result.objective_values)  # type: ignore[arg-type]
    return TrialOutcome(result.state, value=value, values=values, reason=result.error, result=result)


def record_ended_trial(recording: TrialRecording, frozen, reason: str, *, kind: OutcomeKind = "unexpected") -> TrialOutcome:
    """Record a RUNNING trial that ends without its schedule's outcome, as the path records one.

    For a trial whose worker stopped sending heartbeats, that Ray gave up, or that a stopped
    search leaves behind: its fail reason, its trackers' end, its learning curve (from the
    epochs it reported) and its note. The engine then sets it FAIL (and queues it again).

    Args:
        recording: This process's recording.
        frozen: The trial, as read from the storage.
        reason: Why it failed, for a person.
        kind: How it ended (see :data:`OutcomeKind`).
    """
    from autofinetune.store.optuna_internals import trial_id as storage_id_of

    outcome = TrialOutcome("failed", reason=_cut(reason), kind=kind)
    return _record(recording, storage_id_of(frozen), frozen.number, frozen.params, outcome)


def _record(
    recording: TrialRecording, trial_id: int, number: int, params: Mapping[str, Any], outcome: TrialOutcome,
    *, timing: Mapping[str, float] | None = None,
) -> TrialOutcome:
    """Write a trial that ended: its outcome first, then what else it produced (warnings).

    Args:
        timing: Seconds the trial's parts took (``schedule_seconds``), stored with ``trial_seconds``.
    """
    writer = recording.writer
    try:
        writer.write_outcome(trial_id, outcome.stored())
    except optuna.exceptions.UpdateFinishedTrialError as error:
        return _taken_over(number, error)
    warnings: list[str] = []
    violations = outcome.result.extra.get(CONSTRAINT_VIOLATIONS_ATTR) if outcome.result is not None else None
    if violations is not None and outcome.state != "failed":
        # Next to the outcome: which trial is best depends on it.
        _attempt(warnings, number, "constraints not recorded", lambda: writer.write_constraints(trial_id, violations))
    attrs: dict[str, Any] = {}
    if outcome.result is not None:
        attrs.update(result_attributes(outcome.result, phase1_epochs=recording.spec.schedule.phase1_epochs))
    if outcome.reason and outcome.state == "failed":
        attrs[FAIL_REASON_ATTR] = outcome.reason
    if attrs:
        _attempt(warnings, number, "attributes not recorded", lambda: writer.write_attributes(trial_id, attrs))
    kept = None
    checkpoint = outcome.result.checkpoint_path if outcome.result is not None else None
    value = outcome.value
    if outcome.state == "complete" and value is not None and checkpoint is not None and Path(checkpoint).is_file():
        kept = _attempt(warnings, number, "checkpoint not kept", lambda: writer.offer_checkpoint(trial_id, value, str(checkpoint)))
    state = RESULT_STATES[outcome.state]
    warnings += recording.trackers.end(
        number, params, state=state, value=outcome.value, reason=outcome.reason if outcome.state == "failed" else None,
        checkpoint=str(checkpoint) if kept is not None else None,
    )
    warnings += write_trial_views(
        recording.study, trial_id, state=state, value=outcome.value, attrs={**attrs, RECORD_WARNINGS_ATTR: warnings},
        artifact_store=writer.artifact_store,
    )
    # Last, so that the checkpoint upload and the views count in what the trial cost.
    final: dict[str, Any] = {**(timing or {}), **writer.seconds_since_start(trial_id)}
    if warnings:
        final[RECORD_WARNINGS_ATTR] = list(warnings)
    if final:
        _attempt(warnings, number, "attributes not recorded", lambda: writer.write_attributes(trial_id, final))
    return dataclasses.replace(outcome, warnings=tuple(warnings))


def _attempt(warnings: list[str], number: int, what: str, write: Callable[[], Any]) -> Any:
    """``write()``; a failure becomes a warning (an outage past its grace still stops the path)."""
    try:
        return write()
    except StorageUnavailableError:
        raise
    except Exception as error:
        text = str(error).strip().splitlines()
        warning = f"{what}: {type(error).__name__}" + (f": {text[0][:300]}" if text else "")
        logger.warning("trial %d: %s", number, warning)
        warnings.append(warning)
        return None


def _taken_over(number: int | None, error: BaseException) -> TrialOutcome:
    # Another worker failed it as stale (this process missed its heartbeats, e.g. while
    # swapping) and queued its retry: this run's result is dropped.
    logger.warning("trial %s was failed as stale by another worker; dropping this run", number)
    return TrialOutcome("failed", reason="failed as stale by another worker", kind="taken_over", error=error)


def _cut(reason: str) -> str:
    return reason[:MAX_REASON_CHARS]
