"""The one trial recorder: what every engine writes into the study database, through one class.

Engines differ only in how they ask for params and schedule trials; each records its trials with
a :class:`TrialRecorder`, so one dashboard and one ``export`` serve them all. The contract, for
each trial an engine runs (Optuna, Ray Tune, keras-tuner):

* params: every search-space parameter with the spec's Optuna distribution;
* one intermediate value per epoch, at the global 1-based step (phase 2 continues phase 1);
* state: COMPLETE with the best epoch's objective value, PRUNED when stopped early (never
  COMPLETE with a truncated value), FAIL with the reason in the ``fail_reason`` user attribute;
* the host attributes (:meth:`TrialRecorder.start`), the user attributes of
  :func:`result_attributes` and ``trial_seconds``;
* for kept trials, the best epoch's model as an artifact, its id in ``checkpoint_artifact_id``;
* for every finished trial a dashboard note and the artifact ``learning_curve.svg``
  (:meth:`TrialRecorder.finish`, or :meth:`TrialRecorder.fail` for a trial that ends by an
  exception instead of a result);
* on the study: the data's fingerprint and class names (:meth:`TrialRecorder.load_data`);
* to the spec's trackers (``[tracking]``: MLflow, W&B, TensorBoard): the trial's start with its
  params, every epoch on the global step (:meth:`TrialRecorder.epoch`, or the reporter that
  :meth:`TrialRecorder.reporter` wraps), its end with state, reason and kept checkpoint, and
  the study's best trial (:meth:`TrialRecorder.end_study`).
"""

from __future__ import annotations

import logging
import math
import os
import socket
import time
from typing import Any, Callable, Mapping

from autofinetune.errors import FatalError
from autofinetune.store.database import FAIL_REASON_ATTR, STUDY_CLASSES_ATTR, STUDY_FINGERPRINT_ATTR
from autofinetune.viewing.notes import RESULT_STATES
from autofinetune.store.optuna_internals import set_trial_user_attrs, storage_of
from autofinetune.tracking import TrialInfo, open_trackers
from autofinetune.trial.results import TrialResult

logger = logging.getLogger(__name__)

#: After this many unexpected trial errors in a row the search stops: something is broken, not
#: a trial (the Optuna and Ray engines; keras-tuner counts failed trials its own way).
MAX_CONSECUTIVE_ERRORS = 3

#: A fail reason is cut to this many characters (a traceback's worth is noise on the dashboard).
MAX_REASON_CHARS = 2000


def result_attributes(result: TrialResult, *, phase1_epochs: int) -> dict[str, Any]:
    """The user attributes that describe a finished trial (JSON-serializable)."""
    attrs: dict[str, Any] = {
        "phase_boundary_step": phase1_epochs,
        "unfrozen_blocks": list(result.unfrozen_blocks),
        "best_step": result.best_step,
        "history": [{"step": r.step, "phase": r.phase, **{k: _finite(v) for k, v in r.metrics.items()}} for r in result.history],
        "fit_seconds": round(result.total_seconds, 3),
    }
    for phase in result.phases:
        prefix = f"phase{phase.phase}_"
        attrs[prefix + "best"] = _finite(phase.best_value)
        attrs[prefix + "trainable_params"] = phase.trainable_params
        attrs[prefix + "seconds"] = round(phase.seconds, 3)
        attrs[prefix + "images_per_second"] = round(phase.images_per_second, 2)
        attrs[prefix + "epochs"] = phase.epochs_run
        if phase.cache_note or phase.cached:
            attrs[prefix + "cached"] = phase.cached
        if phase.cache_note:
            attrs[prefix + "cache_note"] = phase.cache_note
    if result.pruned_at_step is not None:
        attrs["pruned_at_step"] = result.pruned_at_step
    if result.error:
        attrs[FAIL_REASON_ATTR] = result.error
    for key, value in result.extra.items():
        attrs[key] = value
    return attrs


def _finite(value: Any) -> Any:
    # JSON has no NaN; the dashboard's parser rejects it.
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


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


class TrialRecorder:
    """Writes every trial of one study the same way, whichever engine runs it.

    An engine makes one recorder per process that runs trials (an Optuna worker, a Ray trial
    actor, the keras-tuner launcher, the Ray driver for trials Ray gave up on), then for each
    trial calls :meth:`start` once it has a RUNNING trial, and :meth:`finish` with the schedule's
    result or :meth:`fail` with a reason, before telling Optuna the trial's state.

    Args:
        study: The Optuna study.
        spec: Its :class:`~autofinetune.spec.StudySpec`.
        artifact_store: Where learning curves go; ``None`` uploads none (default: the
            keeper's store).
        keeper: The :class:`~autofinetune.store.checkpoints.CheckpointKeeper` offered each
            complete trial's best model; ``None`` keeps no models.
    """

    def __init__(self, study, spec, *, artifact_store=None, keeper=None) -> None:
        self.study = study
        self.spec = spec
        self.keeper = keeper
        self.artifact_store = artifact_store if artifact_store is not None else getattr(keeper, "artifact_store", None)
        self.storage = storage_of(study)
        self.failures = ConsecutiveFailures()
        #: Storage trial id -> ``time.perf_counter()`` at :meth:`start`.
        self._started: dict[int, float] = {}
        #: The spec's trackers (contacted on a trial's first epoch or end).
        self.trackers = open_trackers(spec)
        #: Storage trial id -> trial number, for trials whose tracker runs are open.
        self._tracked: dict[int, int] = {}

    @classmethod
    def at(cls, study, spec, *, artifacts: str) -> "TrialRecorder":
        """A recorder whose curves and kept models go to the artifact store at ``artifacts``.

        Args:
            study: The Optuna study.
            spec: Its spec (``search.keep_checkpoints`` and the objective rank the models).
            artifacts: A folder or bucket URI (see :func:`~autofinetune.store.database.artifacts_location`).
        """
        from autofinetune.store.checkpoints import CheckpointKeeper
        from autofinetune.store.database import open_artifact_store

        keeper = CheckpointKeeper(
            open_artifact_store(artifacts), keep=spec.search.keep_checkpoints, objective=spec.objective
        )
        return cls(study, spec, keeper=keeper)

    @property
    def keeps_checkpoints(self) -> bool:
        """Whether a trial should save its best model for :meth:`finish` to offer."""
        return self.keeper is not None and self.keeper.keep > 0

    def checkpoint_wanted(self, trial_id: int) -> Callable[[str, float], bool]:
        """The schedule's ``keep_checkpoint`` for a trial: save the model only when the trial
        completed and its best value would rank among the checkpoints the study keeps
        (:meth:`finish` offers nothing else)."""

        def wanted(state: str, value: float) -> bool:
            return state == "complete" and self.keeper is not None and self.keeper.would_keep(self.study, trial_id, value)

        return wanted

    # -- the study's data -------------------------------------------------------------------

    def load_data(self):
        """The spec's images, checked against (or recorded as) the data the study started with.

        The first process to load them stores their fingerprint and class names on the study:
        ``export`` reads the class names there, so a model can be exported where the images are
        not. Later processes (other workers, Ray nodes, engines) must see the same images.

        Returns:
            The :class:`~autofinetune.data.sources.ImageData`.

        Raises:
            FatalError: this process sees other images than the study started with.
        """
        from autofinetune.data.sources import load_data

        data = load_data(self.spec)
        attrs = self.study.user_attrs
        known = attrs.get(STUDY_FINGERPRINT_ATTR)
        if known is None:
            self.study.set_user_attr(STUDY_FINGERPRINT_ATTR, data.fingerprint)
        elif known != data.fingerprint:
            raise FatalError(
                f"the data this process on {socket.gethostname()} sees ({data.source}) differs from the data the "
                f"study started with (fingerprint {data.fingerprint[:12]} != {known[:12]}); every worker, Ray "
                "node and engine must see the same images"
            )
        if STUDY_CLASSES_ATTR not in attrs:
            self.study.set_user_attr(STUDY_CLASSES_ATTR, list(data.class_names))
        return data

    # -- one trial --------------------------------------------------------------------------

    def start(self, trial_id: int, *, device: str | None = None) -> None:
        """A RUNNING trial starts here: record where it runs, and start its clock.

        Args:
            trial_id: The storage's id of the trial.
            device: The accelerator the trial trains on
                (:func:`autofinetune.trial.devices.device_description`, called by the engine in
                the trial's process: the study database's side never loads Keras).
        """
        self._started[trial_id] = time.perf_counter()
        set_trial_user_attrs(self.storage, trial_id, host_attributes(device=device))

    def finish(self, trial_id: int, result: TrialResult, *, checkpoint_path: str | os.PathLike | None = None) -> None:
        """Record a schedule's result on its (still RUNNING) trial.

        Writes the attributes of :func:`result_attributes`, offers the best model of a complete
        trial to the checkpoint keeper, writes ``trial_seconds``, the dashboard note and the
        learning curve. The engine then tells Optuna the state (``result.state``).

        Args:
            trial_id: The storage's id of the trial, which must be RUNNING.
            result: What the schedule returned (complete, pruned, or failed by the schedule).
            checkpoint_path: The saved best-epoch model; offered only for a complete trial.
        """
        attrs = result_attributes(result, phase1_epochs=self.spec.schedule.phase1_epochs)
        # One transaction for all of them: on a shared database server it is most of a trial's cost.
        set_trial_user_attrs(self.storage, trial_id, attrs)
        if (
            result.state == "complete"
            and result.best_value is not None
            and checkpoint_path is not None
            and self.keeper is not None
        ):
            kept = self.keeper.offer(self.study, trial_id, result.best_value, str(checkpoint_path))
        else:
            kept = None
        # After the checkpoint upload, which is part of what the trial cost.
        set_trial_user_attrs(self.storage, trial_id, self._seconds_attr(trial_id))
        value = result.best_value if result.state == "complete" else None
        state = RESULT_STATES[result.state]
        self.write_views(trial_id, state=state, value=value, attrs=attrs)
        self._track_end(
            trial_id, state=state, value=value, reason=result.error,
            checkpoint=str(checkpoint_path) if kept is not None else None,
        )

    def fail(self, trial_id: int, reason: str) -> str:
        """Record why a trial failed when it ended by an exception rather than a result.

        Sets ``fail_reason`` and ``trial_seconds`` (when :meth:`start` ran here), writes the
        dashboard note and, when the trial recorded epochs before failing, its learning curve.
        The trial must still be RUNNING; the engine then tells Optuna the trial FAILED.

        Args:
            trial_id: The storage's id of the trial.
            reason: Why it failed, for a person (cut to :data:`MAX_REASON_CHARS` characters).

        Returns:
            The reason as recorded.
        """
        reason = reason[:MAX_REASON_CHARS]
        set_trial_user_attrs(self.storage, trial_id, {FAIL_REASON_ATTR: reason, **self._seconds_attr(trial_id)})
        self.write_views(trial_id, state="FAIL", attrs={FAIL_REASON_ATTR: reason})
        self._track_end(trial_id, state="FAIL", value=None, reason=reason, checkpoint=None)
        return reason

    # -- trackers ---------------------------------------------------------------------------

    def epoch(self, trial_id: int, step: int, metrics: Mapping[str, float]) -> None:
        """One epoch of a running trial, at its global 1-based step: logged to the trackers.

        Engines call it through :meth:`reporter`; never raises.
        """
        if not self.trackers:
            return
        number = self._track_start(trial_id)
        if number is not None:
            phase = 1 if step <= self.spec.schedule.phase1_epochs else 2
            self.trackers.call("log_epoch", number, step, dict(metrics), phase=phase)

    def reporter(self, trial_id: int, inner):
        """``inner`` (the engine's reporter) with every epoch also passed to :meth:`epoch` first.

        Args:
            trial_id: The storage's id of the running trial.
            inner: The engine's reporter (``report(step, metrics)``, may raise a prune signal).
        """
        return RecordingReporter(self, trial_id, inner)

    def end_study(self) -> None:
        """Tell the trackers the study's best trial so far (``launch`` calls it when it returns)."""
        if not self.trackers:
            return
        from optuna.trial import TrialState

        complete = [t for t in self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if t.value is not None]
        best = None
        if complete:
            best = (max if self.spec.objective.maximize else min)(complete, key=lambda t: t.value)
        self.trackers.call(
            "end_study", best_number=None if best is None else best.number, best_value=None if best is None else best.value
        )

    def _track_start(self, trial_id: int) -> int | None:
        """Open the trial's tracker runs once its params are known; returns its number."""
        if trial_id not in self._tracked:
            try:
                frozen = self.storage.get_trial(trial_id)
            except Exception as error:  # tracking must never fail a trial
                logger.warning("trackers: cannot read trial id %d: %s", trial_id, error)
                return None
            self._tracked[trial_id] = frozen.number
            info = TrialInfo(
                study=self.study.study_name, number=frozen.number, params=dict(frozen.params),
                phase_boundary_step=self.spec.schedule.phase1_epochs,
            )
            self.trackers.call("start_trial", info)
        return self._tracked[trial_id]

    def _track_end(self, trial_id: int, *, state: str, value: float | None, reason: str | None, checkpoint: str | None) -> None:
        if not self.trackers:
            return
        number = self._track_start(trial_id)
        self._tracked.pop(trial_id, None)
        if number is not None:
            self.trackers.call("end_trial", number, state=state, value=value, reason=reason, checkpoint=checkpoint)

    def write_views(
        self, trial_id: int, *, state: str, value: float | None = None, attrs: Mapping[str, Any] | None = None
    ) -> None:
        """Write a trial's dashboard note (and, while it is RUNNING, its learning curve).

        Cheap (a few small writes) and never raises: a dashboard note must not fail a trial.

        Args:
            trial_id: The storage's id of the trial.
            state: ``"COMPLETE"``, ``"PRUNED"`` or ``"FAIL"``.
            value: The objective value of a complete trial.
            attrs: Attributes just written (the rest are read from the storage).
        """
        try:
            from autofinetune.viewing.trial_views import write_trial_views

            write_trial_views(
                self.study, trial_id, state=state, value=value, attrs=attrs, artifact_store=self.artifact_store
            )
        except Exception as error:  # write_trial_views logs its own failures; this is a last guard
            logger.warning("could not write the dashboard views of trial id %d: %s", trial_id, error)

    def _seconds_attr(self, trial_id: int) -> dict[str, float]:
        """``{"trial_seconds": ...}`` since :meth:`start` ran here for this trial, else empty."""
        started = self._started.pop(trial_id, None)
        return {} if started is None else {"trial_seconds": round(time.perf_counter() - started, 3)}


class RecordingReporter:
    """An engine's reporter whose epochs also reach the recorder (and so the trackers).

    The recorder hears the epoch first: a prune the engine's reporter then signals still leaves
    the epoch logged everywhere.
    """

    def __init__(self, recorder: TrialRecorder, trial_id: int, inner) -> None:
        self.recorder = recorder
        self.trial_id = trial_id
        self.inner = inner

    def report(self, step: int, metrics: Mapping[str, float]) -> None:
        self.recorder.epoch(self.trial_id, step, metrics)
        self.inner.report(step, metrics)

    def __getattr__(self, name: str) -> Any:
        # The engines' reporters have more (Ray's report_nothing_happened); they stay reachable.
        return getattr(self.inner, name)


def host_attributes(*, device: str | None = None) -> dict[str, Any]:
    """Where a trial ran: host name, process id and, when known, the accelerator it used."""
    attrs: dict[str, Any] = {"host": socket.gethostname(), "pid": os.getpid()}
    if device is not None:
        attrs["device"] = device
    return attrs
