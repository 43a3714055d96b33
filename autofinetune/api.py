"""The Python API: launch a study, or plug the two-phase schedule into your own ``study.optimize``.

``autofinetune launch`` is a thin shell over :func:`run_launch`, so the command line and
:func:`launch` run the same code. Errors raise instead of exiting: a
:class:`~autofinetune.errors.ConfigError` (bad input, nothing written), a
:class:`~autofinetune.errors.FatalError` (the search stopped; finished trials are kept) or
``KeyboardInterrupt`` (interrupted, as ``study.optimize`` re-raises it).
"""

from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence, Union

from autofinetune.errors import ConfigError, ExitCode, FatalError
from autofinetune.spec import StudySpec, TrackingSpec, load_spec, parse_spec
from autofinetune.trial.session import TrialSession

if TYPE_CHECKING:
    import optuna

    from autofinetune.data.sources import ImageData
    from autofinetune.engines.base import Engine, EngineOptions
    from autofinetune.engines.trial_path import TrialRecording

logger = logging.getLogger(__name__)

#: A study spec as the API takes it: a TOML file, the TOML's fields, or a loaded spec.
SpecLike = Union[str, "os.PathLike[str]", Mapping[str, Any], StudySpec]


def as_spec(spec: SpecLike) -> StudySpec:
    """A validated :class:`StudySpec` from a path, a mapping (relative paths against the
    working directory) or a spec.

    Raises:
        ConfigError: the file is missing, or a field is invalid.
    """
    if isinstance(spec, StudySpec):
        return spec
    if isinstance(spec, Mapping):
        return parse_spec(spec, base_dir=Path.cwd())
    if isinstance(spec, (str, os.PathLike)):
        return load_spec(os.fspath(spec))
    raise ConfigError(f"spec: got a {type(spec).__name__}; give a TOML file's path, a mapping or a StudySpec")


def with_tracking(
    spec: StudySpec, *, mlflow: str | None = None, wandb: str | None = None, tensorboard: str | os.PathLike | None = None,
    mlflow_register: str | None = None,
) -> StudySpec:
    """The spec with ``[tracking]`` fields replaced by the given ones (``None`` keeps a field).

    A TensorBoard folder given here is relative to the working directory, not the spec's.

    Raises:
        ConfigError: a value is invalid, naming its flag.
    """
    from pydantic import ValidationError

    given = {"mlflow": mlflow, "mlflow_register": mlflow_register, "wandb": wandb}
    overrides: dict[str, str] = {field: value for field, value in given.items() if value is not None}
    if tensorboard is not None:
        overrides["tensorboard"] = str(Path(tensorboard).expanduser().resolve())
    if not overrides:
        return spec
    try:
        tracking = TrackingSpec.model_validate({**spec.tracking.model_dump(), **overrides})
    except ValidationError as error:
        item = error.errors()[0]
        field = str(item["loc"][0]) if item["loc"] else "tracking"
        message = item["msg"].removeprefix("Value error, ")
        if not item["loc"]:  # a rule across fields names them itself
            raise ConfigError(message) from None
        raise ConfigError(f"--{field.replace('_', '-')}: got {overrides.get(field)!r}; {message}") from None
    return spec.model_copy(update={"tracking": tracking})


def with_study_name(spec: StudySpec, name: str | None) -> StudySpec:
    """``spec`` under another study name (``--study-name``); ``None`` keeps its own.

    Raises:
        ConfigError: the name breaks the spec's rule for names.
    """
    from pydantic import ValidationError

    if name is None or name == spec.name:
        return spec
    try:
        return StudySpec.model_validate({**spec.to_toml_dict(), "name": name, "base_dir": spec.base_dir})
    except ValidationError as error:
        raise ConfigError(f"--study-name: {error.errors()[0]['msg'].removeprefix('Value error, ')}") from None


def with_skip_unreadable(spec: StudySpec, skip_unreadable: bool) -> StudySpec:
    """``spec`` with ``data.skip_unreadable`` turned on when ``skip_unreadable`` (the flag) asks."""
    if not skip_unreadable or spec.data.skip_unreadable:
        return spec
    return spec.model_copy(update={"data": spec.data.model_copy(update={"skip_unreadable": True})})


def run_launch(
    spec: SpecLike,
    *,
    n_trials: int | None = None,
    timeout: float | None = None,
    storage: str | None = None,
    engine: str = "optuna",
    skip_unreadable: bool = False,
    mlflow: str | None = None,
    wandb: str | None = None,
    tensorboard: str | os.PathLike | None = None,
    mlflow_register: str | None = None,
    study_name: str | None = None,
    warm_start: Sequence[str] | None = None,
    announce: Callable[[str], None] = logger.info,
    warn: Callable[[str], None] = logger.warning,
    **engine_options: Any,
) -> tuple["optuna.Study", ExitCode]:
    """Create or resume a study and run its missing trials with an engine: ``launch``'s one path.

    Everything that can be refused (the spec, the sampler and pruner, the engine's options, the
    storage URL, the artifact folder, every image file, the trackers) is checked before the
    study database is touched; a feature-cache folder that cannot be written is a warning.

    Args:
        spec: The study spec (see :func:`as_spec`).
        n_trials: The study's total trials, finished ones included (default: ``search.n_trials``).
        timeout: Start no new trial after this many seconds.
        storage: The study database's URL (default: ``$AUTOFINETUNE_STORAGE``,
            ``$OPTUNA_STORAGE``, the spec's, ``sqlite:///autofinetune.db``).
        engine: ``"optuna"``, ``"ray"`` or ``"keras-tuner"``.
        skip_unreadable: Leave out image files that cannot be decoded.
        mlflow, wandb, tensorboard, mlflow_register: Trackers, overriding ``[tracking]``.
        study_name: The study's name, overriding the spec's (``--study-name``).
        warm_start: Earlier studies to start from, overriding ``search.warm_start`` (``--warm-start``).
        announce: Receives the line that says whether the study was created or resumed.
        warn: Receives warnings for a person (unreadable images left out).
        **engine_options: The engine's options (``workers``, ``gpus``, ``address``, ...; see
            the ``*Options`` dataclasses in ``autofinetune.engines``); ``None`` keeps a default.

    Returns:
        ``(study, exit code)``: ``DONE``, ``BAD_INPUT`` (a fatal error stopped the search),
        ``DATABASE_UNREACHABLE`` (the database away past ``search.outage_grace``), ``CRASHED``
        (worker processes kept crashing) or ``INTERRUPTED``.
    """
    from autofinetune.engines.trial_path import TrialRecording
    from autofinetune.store.artifacts import artifacts_location, check_artifact_store
    from autofinetune.store.database import check_storage_url, redact_url, resolve_storage_url
    from autofinetune.store.study import study_budget
    from autofinetune.store.warm_start import check_warm_start, with_warm_start

    spec = with_skip_unreadable(with_warm_start(with_study_name(as_spec(spec), study_name), warm_start), skip_unreadable)
    spec = with_tracking(spec, mlflow=mlflow, wandb=wandb, tensorboard=tensorboard, mlflow_register=mlflow_register)
    chosen, options = _checked_engine(spec, engine, engine_options, timeout=timeout)
    url = resolve_storage_url(storage, spec)
    check_storage_url(url)
    done = _finished(spec, url, n_trials=n_trials)
    if done is not None:
        announce(f"study {spec.name!r} in {redact_url(url)}: all {study_budget(done)} trials are done; nothing to run "
                 "(--n-trials raises the budget)")
        return done, ExitCode.DONE
    check_warm_start(spec, url, flag=warm_start is not None)
    check_artifact_store(artifacts_location(url, options.artifacts))
    warn_if_cache_unwritable(spec, warn)
    # Worker processes import TensorFlow (seconds) while this one checks the inputs.
    early = chosen.start_early(spec, url, options)
    try:
        study = _open_checked_study(spec, url, n_trials=n_trials, announce=announce, warn=warn)
        recording = TrialRecording(study, spec)
        recording.trackers.start_study(engine=engine)
        code = ExitCode.CRASHED
        try:
            code = chosen.launch(spec, url, study, options, early=early)
        finally:
            _finish_launch(study, spec, recording, code, artifacts=artifacts_location(url, options.artifacts),
                           announce=announce, warn=warn)
    finally:
        if early is not None:
            early.cancel()  # stops only what launch never took over
    return study, code


def _checked_engine(
    spec: StudySpec, engine: str, values: Mapping[str, Any], *, timeout: float | None
) -> tuple["Engine[Any]", "EngineOptions"]:
    """``(engine, its options)``, with the sampler, pruner and options checked: bad ones fail
    before the database is touched."""
    from autofinetune.engines.base import engine_options, get_engine
    from autofinetune.search.algorithms import make_pruner, make_sampler

    make_sampler(spec, seed=spec.seed)
    make_pruner(spec)
    chosen = get_engine(engine)
    deadline = None if timeout is None else time.time() + timeout
    # Refuses an option of another engine (naming it) or of none.
    options = engine_options(engine, {**values, "deadline": deadline})
    chosen.check(spec, options)
    return chosen, options


def _open_checked_study(
    spec: StudySpec, url: str, *, n_trials: int | None, announce: Callable[[str], None], warn: Callable[[str], None]
) -> "optuna.Study":
    """Check every image file and the trackers, then create or resume the study."""
    from autofinetune.data.sources import unreadable_images
    from autofinetune.store.attributes import STUDY_UNREADABLE_ATTR
    from autofinetune.store.database import open_storage, redact_url
    from autofinetune.store.outages import OutagePolicy
    from autofinetune.store.study import budget_used, create_or_resume_study, study_budget
    from autofinetune.tracking import check_trackers
    from autofinetune.viewing.trial_views import write_study_note

    # Every image file is checked in one pass, so a bad one stops here: no study half-created.
    unreadable = unreadable_images(spec)
    # An unreachable tracker fails here, before any trial runs.
    check_trackers(spec)
    # A mistyped address is refused at once; once open, calls wait out an outage (the
    # keras-tuner engine trains in this process, and the summary reads the study).
    outage = OutagePolicy(spec.search.outage_grace, where=redact_url(url))
    study, created = create_or_resume_study(spec, open_storage(url, outage=outage), n_trials=n_trials)
    # The dashboard's study note shows the spec; kept when it exists (a person may have edited it).
    write_study_note(study)
    if spec.image_folder is not None:
        study.set_user_attr(STUDY_UNREADABLE_ATTR, [str(item.path.relative_to(spec.image_folder)) for item in unreadable])
    if unreadable:
        warn(f"warning: data.skip_unreadable: leaving out {len(unreadable)} unreadable image file(s), "
             f"e.g. {unreadable[0].path} ({unreadable[0].reason}); the list is stored on the study "
             f"as {STUDY_UNREADABLE_ATTR!r}")
    counted, waiting = budget_used(study)
    verb = "created" if created else "resuming"
    announce(f"{verb} study {spec.name!r} in {redact_url(url)}: {counted - waiting} of {study_budget(study)} trials so far")
    return study


def _finished(spec: StudySpec, url: str, *, n_trials: int | None) -> "optuna.Study | None":
    """The study when it exists with nothing left to run (read without creating anything), else ``None``."""
    from autofinetune.store.database import open_storage, sqlite_path
    from autofinetune.store.study import finished_study

    path = sqlite_path(url)
    if path is not None and not path.is_file():
        return None  # opening it would create the file
    try:
        storage = open_storage(url, create=False)
    except ConfigError:
        return None  # no tables yet, or unreachable: the launch itself says which
    return finished_study(spec, storage, n_trials=n_trials)


#: How the trackers' record of a study ends, by the launch's exit code (MLflow's run statuses).
TRACKED_STATUS = {ExitCode.DONE: "FINISHED", ExitCode.RECYCLE: "FINISHED", ExitCode.INTERRUPTED: "KILLED"}


def _finish_launch(
    study: "optuna.Study", spec: StudySpec, recording: "TrialRecording", code: ExitCode, *, artifacts: str, announce: Callable[[str], None],
    warn: Callable[[str], None],
) -> None:
    """What a launch does once its trials are done: score the best trial's model on the
    held-back test split, and close the trackers' record of the study (with that model, for
    MLflow). An unreachable database leaves both to the next launch."""
    from autofinetune.store.outages import StorageUnavailableError

    if code == ExitCode.DATABASE_UNREACHABLE:
        return
    try:
        score, model = None, None
        if code in (ExitCode.DONE, ExitCode.RECYCLE):
            score, model = _score_best_trial(study, spec, artifacts=artifacts, announce=announce, warn=warn)
        recording.end_study(status=TRACKED_STATUS.get(code, "FAILED"), test_score=score, best_model=model)
    except StorageUnavailableError as error:
        warn(f"warning: the study's end was not recorded: {error}")


def _score_best_trial(
    study: "optuna.Study", spec: StudySpec, *, artifacts: str, announce: Callable[[str], None], warn: Callable[[str], None]
) -> tuple[Any, Any]:
    """``(test score, model)`` of the study's best trial: its kept model is loaded (Keras) only
    when the spec holds a test split back or MLflow keeps models; ``(None, None)`` otherwise."""
    from autofinetune.store.study import best_feasible_trial
    from autofinetune.export.exporter import load_kept_model
    from autofinetune.export.held_out import score_on_test_split
    from autofinetune.store.artifacts import open_artifact_store
    from autofinetune.store.attributes import STUDY_TEST_SCORE_ATTR
    from autofinetune.store.study import load_study_data
    from autofinetune.viewing.report import describe_test_score

    best = best_feasible_trial(study)
    if best is None or not (spec.data.test_split > 0 or spec.tracking.mlflow):
        return None, None
    try:
        model = load_kept_model(best, open_artifact_store(artifacts))
    except ConfigError as error:
        warn(f"warning: the best trial's model is neither scored on the test split nor logged: {error}")
        return None, None
    score = None
    if spec.data.test_split > 0:
        score = score_on_test_split(model, load_study_data(study, spec), trial=best.number)
        study.set_user_attr(STUDY_TEST_SCORE_ATTR, score)
        announce(describe_test_score(score))
    return score, model


def warn_if_cache_unwritable(spec: StudySpec, warn: Callable[[str], None]) -> bool:
    """Warn once, before any trial, when the feature-cache folder cannot be written.

    Trials then run without the cache (slower, the same results), each noting it on itself.

    Returns:
        Whether the folder can be written (``True`` also when the cache is off).
    """
    import tempfile

    from autofinetune.trial.features import FeatureCache

    if not spec.cache.enabled:
        return True
    folder = FeatureCache.from_spec(spec).directory
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".autofinetune-probe-"):
            pass
    except OSError as error:
        warn(f"warning: cache.dir: cannot write to {str(folder)!r} ({error.strerror or error}); the trials run without "
             "the feature cache (slower, the same results): give cache.dir or $AUTOFINETUNE_CACHE_DIR a writable folder")
        return False
    return True


def launch(
    spec: SpecLike,
    *,
    n_trials: int | None = None,
    timeout: float | None = None,
    storage: str | None = None,
    engine: str = "optuna",
    mlflow: str | None = None,
    wandb: str | None = None,
    tensorboard: str | os.PathLike | None = None,
    mlflow_register: str | None = None,
    skip_unreadable: bool = False,
    progress: bool | None = None,
    study_name: str | None = None,
    warm_start: Sequence[str] | None = None,
    **engine_options: Any,
) -> "optuna.Study":
    """Create or resume a study and run its missing trials, as ``autofinetune launch`` does.

    A second call with the same spec and storage resumes the study: only the trials missing
    from ``n_trials`` run.

    Args:
        spec: A TOML file's path, the spec's fields as a mapping, or a :class:`StudySpec`.
        n_trials: The study's total trials, finished ones included (default: ``search.n_trials``).
        timeout: Start no new trial after this many seconds.
        storage: The study database's SQLAlchemy URL (default: ``$AUTOFINETUNE_STORAGE``,
            ``$OPTUNA_STORAGE``, the spec's ``storage``, ``sqlite:///autofinetune.db``).
        engine: ``"optuna"`` (worker processes), ``"ray"`` or ``"keras-tuner"``.
        mlflow: An MLflow tracking URI (overrides ``tracking.mlflow``).
        wandb: A Weights & Biases project (overrides ``tracking.wandb``).
        tensorboard: A TensorBoard log folder (overrides ``tracking.tensorboard``).
        mlflow_register: Register the best trial's model in MLflow under this name (overrides
            ``tracking.mlflow_register``).
        skip_unreadable: Leave out image files that cannot be decoded.
        progress: Draw a bar of the study's trials (done/total, best so far, ETA); ``None``: in
            a notebook (a ``tqdm.auto`` widget) or on a terminal.
        study_name: The study's name, overriding the spec's: one spec, several studies.
        warm_start: Earlier studies to start from (``NAME`` or ``NAME@URL``), overriding ``search.warm_start``.
        **engine_options: The chosen engine's options, as its options dataclass names them:
            ``workers`` (default: one per GPU, else 1), ``gpus``, ``trials_per_gpu`` (Optuna);
            ``address``, ``gpus_per_trial``, ``cpus_per_trial``, ``max_concurrent``,
            ``storage_path`` (Ray); ``tuner`` (keras-tuner); ``artifacts`` (every engine).

    Returns:
        The ``optuna.Study`` (``study.best_trial``, ``study.trials_dataframe()``, ...).

    Raises:
        ConfigError: bad input, an option of another engine among them (nothing was written to
            the study database).
        TypeError: an engine option no engine has.
        FatalError: a fatal error stopped the search (finished trials are kept).
        KeyboardInterrupt: the search was interrupted; the running trials are failed with that
            reason, as ``study.optimize`` does.
    """
    study, code = run_launch(
        spec, n_trials=n_trials, timeout=timeout, storage=storage, engine=engine,
        mlflow=mlflow, wandb=wandb, tensorboard=tensorboard, mlflow_register=mlflow_register,
        skip_unreadable=skip_unreadable, progress=progress, study_name=study_name, warm_start=warm_start,
        **engine_options,
    )
    if code == ExitCode.INTERRUPTED:
        raise KeyboardInterrupt(f"study {study.study_name!r}: the search was interrupted")
    if code == ExitCode.DATABASE_UNREACHABLE:
        raise FatalError(
            f"study {study.study_name!r}: the study database stayed unreachable past search.outage_grace; finished "
            "trials are kept, and launch() again resumes the study once the database is back"
        )
    if code == ExitCode.CRASHED:
        raise FatalError(f"study {study.study_name!r}: worker processes kept crashing; their logged lines say why")
    if code not in (ExitCode.DONE, ExitCode.RECYCLE):
        raise FatalError(
            f"study {study.study_name!r}: the search stopped early (exit code {int(code)}); the reason is logged "
            "and stored on the failed trial as 'fail_reason'"
        )
    return study


class Objective:
    """The two-phase schedule as an objective for ``study.optimize`` (see :func:`objective`)."""

    def __init__(self, spec: StudySpec, *, data: "ImageData | None" = None, callbacks: Sequence[Any] = ()) -> None:
        self.spec = spec
        self.data = data
        self.callbacks = tuple(callbacks)
        self._recordings: dict[int, Any] = {}
        # What its trials reuse from one to the next: the backbone, compiled parts, feature cache.
        self.session = TrialSession()
        self._devices_prepared = False

    def _recording(self, study: "optuna.Study") -> "TrialRecording":
        from autofinetune.engines.trial_path import TrialRecording
        from autofinetune.store.study import check_directions

        recording = self._recordings.get(id(study))
        if recording is None:
            check_directions(study, self.spec.objective)
            recording = self._recordings[id(study)] = TrialRecording(study, self.spec)
        return recording

    def _images(self, study: "optuna.Study") -> "ImageData":
        from autofinetune.store.study import load_study_data

        if self.data is None:
            self.data = load_study_data(study, self.spec)
        return self.data

    def __call__(self, trial: "optuna.Trial") -> float | list[float]:
        import optuna

        from autofinetune.engines.optuna.worker import OptunaReporter
        from autofinetune.engines.trial_path import run_recorded_trial
        from autofinetune.search.space import suggest_params
        from autofinetune.store.optuna_internals import trial_id
        from autofinetune.trial.devices import prepare_devices

        if not self._devices_prepared:  # before this process's first trial touches a device
            prepare_devices()
            self._devices_prepared = True
        recording = self._recording(trial.study)
        params = suggest_params(trial, self.spec)
        outcome = run_recorded_trial(
            recording, self.spec, params, lambda: self._images(trial.study), trial_id=trial_id(trial),
            number=trial.number, reporter=OptunaReporter(trial, self.spec.objective.metric), callbacks=self.callbacks,
            session=self.session,
        )
        # Optuna's optimize tells the state: turn the recorded outcome into what it expects.
        if outcome.kind == "interrupted":
            raise KeyboardInterrupt(outcome.reason)
        if outcome.kind in ("fatal", "unexpected") and outcome.error is not None:
            raise outcome.error
        if outcome.state == "pruned":
            raise optuna.TrialPruned(f"pruned after step {outcome.result.pruned_at_step if outcome.result else '?'}")
        if outcome.state == "failed":
            # Optuna fails a trial that returns NaN and goes on with the study (a trial error).
            logger.warning("trial %d failed: %s", trial.number, outcome.reason)
            return [math.nan] * len(self.spec.objective.names) if self.spec.objective.is_multi else math.nan
        return outcome.told  # type: ignore[return-value]  # a complete trial has its value(s)


def objective(spec: SpecLike, *, data: "ImageData | None" = None, callbacks: Sequence[Any] = ()) -> Objective:
    """A callable for your own ``study.optimize(...)`` that runs the two-phase schedule.

    Each call suggests the spec's parameters on the trial, runs both phases, reports the
    objective of every epoch at the global step (``1 .. phase1_epochs + phase2_epochs``) so
    the study's pruner works across both phases, and records the trial's attributes, note and
    trackers as ``launch`` does. A pruned trial raises ``optuna.TrialPruned``; a trial whose
    loss went NaN (or ran out of memory) returns NaN, which Optuna records as FAIL.

    Args:
        spec: A TOML file's path, the spec's fields as a mapping, or a :class:`StudySpec`.
        data: The images (:func:`autofinetune.data.sources.load_data`); default: the spec's,
            loaded on the first trial.
        callbacks: Keras callbacks added to both phases' ``fit``; ``on_epoch_end(epoch, logs)``
            sees one 0-based epoch index across both phases.

    Raises:
        ConfigError: the spec is invalid, or (on the first trial) the study's direction is not
            the objective's.
    """
    from autofinetune.logs import quiet_library_output

    # As quiet as the command line: a notebook's cell shows the trials, not TensorFlow's start-up.
    quiet_library_output()
    return Objective(as_spec(spec), data=data, callbacks=callbacks)
