"""keras-tuner: the two-phase schedule as a keras-tuner ``HyperModel``, and a keras-tuner search
mirrored into the study database.

Two ways in:

* :class:`TwoPhaseHyperModel` is an ordinary ``keras_tuner.HyperModel``: pass it to any tuner
  (``Hyperband``, ``BayesianOptimization``, ``RandomSearch``, ``GridSearch`` or your own). Its
  space is the spec's, translated by :func:`autofinetune.search.space.keras_tuner_params`; its
  ``fit`` runs :func:`autofinetune.trial.schedule.run_trial`.
* ``autofinetune launch STUDY.toml --engine keras-tuner --tuner hyperband|bayesian|random``
  (:func:`launch_with_keras_tuner`) runs such a tuner on a study and mirrors every keras-tuner
  trial into the study database, so ``status``, the dashboard and ``export`` serve it unchanged.

Hyperband's budget is the global epoch count of the schedule (``max_epochs`` = the epochs of both
phases). What we decided, and why:

* **Truncation.** A trial given ``tuner/epochs`` = e < total runs the first e global epochs of
  the full schedule: phase 1 for ``min(e, phase1_epochs)`` epochs, then phase 2 for the rest, and
  stops after step e. Its history is exactly the prefix a full trial would report, so Hyperband
  compares trials at the same global step, as Optuna's Hyperband pruner does. (Shrinking both
  phases in proportion would move the phase boundary, so a promoted trial would not continue
  the run it was chosen for.)
* **Promotion.** A promoted trial (``tuner/trial_id``) runs the schedule again from epoch 0 to
  its larger budget: :func:`~autofinetune.trial.schedule.run_trial` has no entry point to resume from
  another run's weights. That costs ``tuner/initial_epoch`` extra epochs per promotion; the
  feature cache makes phase-1 epochs cheap.
* **State in the study database.** A trial stopped by its budget is COMPLETED in keras-tuner
  (Hyperband ranks and promotes only completed trials) and PRUNED in the study database, with
  ``pruned_at_step`` = e: Hyperband stopped it early, and its value is not a full trial's.
  Each keras-tuner trial (a promotion too) is one study trial, with the keras-tuner trial id in
  ``keras_tuner_trial_id``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import logging
import math
import signal
import sys
import tempfile
import threading
import time
import uuid
import warnings
from pathlib import Path
from typing import Any, Iterator, Mapping

from autofinetune.engines.base import Engine, EngineOptions
from autofinetune.errors import ConfigError, ExitCode, FatalError, PruneTrial
from autofinetune.store.optuna_internals import storage_of, study_id
from autofinetune.store.optuna_internals import trial_id as storage_id_of

EXTRA_HINT = "pip install 'autofinetune[keras-tuner]'"


class MissingKerasTunerError(ConfigError, ImportError):
    """keras-tuner (or TensorBoard, which it needs) is not installed.

    A :class:`~autofinetune.errors.ConfigError` (the CLI exits with code 2 and this message) and
    an ``ImportError`` (what Python code importing the HyperModel expects).
    """


try:
    import keras_tuner
except ImportError as _error:  # keras_tuner is optional: only this module imports it
    raise MissingKerasTunerError(
        f"the keras-tuner engine needs keras-tuner, which is not installed ({_error}); "
        f"install the extra: {EXTRA_HINT}"
    ) from _error

logger = logging.getLogger(__name__)

#: ``--tuner`` names.
TUNERS = ("hyperband", "bayesian", "random")

#: Hyperband's reduction factor (keras-tuner's default): a third of each round is promoted.
HYPERBAND_FACTOR = 3

#: keras-tuner stops the search after this many failed trials in a row. A NaN loss fails a
#: trial too (an aggressive learning-rate range can produce a few in a row), so this is more
#: than the Optuna engine's three unexpected errors; five in a row means something is broken.
MAX_CONSECUTIVE_FAILED_TRIALS = 5

# User attributes of a mirrored trial (besides those every engine writes).
KT_TRIAL_ID_ATTR = "keras_tuner_trial_id"
KT_PROJECT_ATTR = "keras_tuner_project"
KT_DIR_ATTR = "keras_tuner_dir"


def _require_tensorboard() -> None:
    """keras-tuner 1.4 imports TensorBoard's hparams plugin in every trial on TensorFlow."""
    import importlib.util

    import keras

    if keras.backend.backend() == "tensorflow" and importlib.util.find_spec("tensorboard") is None:
        raise MissingKerasTunerError(
            "keras-tuner needs TensorBoard to run trials on the TensorFlow backend, and it is not "
            f"installed; install the extra: {EXTRA_HINT}"
        )


# --- the HyperModel ------------------------------------------------------------------------


def _is_best_epoch_saver(callback: Any) -> bool:
    # keras-tuner adds a SaveBestEpoch callback (not exported) that saves `self.model`'s weights
    # whenever the objective improves. The schedule trains its own model, so this callback is
    # given the trained best-epoch weights once at the end instead of untrained ones per epoch.
    return type(callback).__name__ == "SaveBestEpoch"


class _CallbackReporter:
    """Forwards each epoch to keras callbacks and stops the schedule at the epoch budget.

    Args:
        callbacks: A ``keras.callbacks.CallbackList`` set to the HyperModel's model.
        model: That model; a callback that sets ``model.stop_training`` stops the schedule.
        budget: The global step after which the schedule stops.
        total: The schedule's full length in epochs.
    """

    def __init__(self, callbacks, model, *, budget: int, total: int) -> None:
        self.callbacks = callbacks
        self.model = model
        self.budget = budget
        self.total = total

    def report(self, step: int, metrics: Mapping[str, float]) -> None:
        logs = {name: float(value) for name, value in metrics.items()}
        # The schedule reports an epoch when it has ended, so begin and end arrive together;
        # the order (and the 0-based epoch Keras callbacks expect) is kept.
        self.callbacks.on_epoch_begin(step - 1)
        self.callbacks.on_epoch_end(step - 1, logs)
        if step >= self.budget and self.budget < self.total:
            raise PruneTrial(step, f"epoch budget {self.budget} of {self.total} reached")
        if getattr(self.model, "stop_training", False):
            raise PruneTrial(step, f"a callback stopped training after step {step}")


class TwoPhaseHyperModel(keras_tuner.HyperModel):
    """The two-phase fine-tuning schedule of a study spec, as a keras-tuner HyperModel.

    ``build(hp)`` declares the spec's search space on ``hp`` and returns the phase-1 classifier
    (backbone frozen, new head, compiled). ``fit(hp, model, ...)`` runs the whole schedule
    (:func:`autofinetune.trial.schedule.run_trial`: head training, then the top residual blocks
    fine-tuned) on the spec's data, leaves the best epoch's weights in ``model`` and returns a
    ``keras.callbacks.History`` of every epoch (keras-tuner scores its best epoch).

    Example:

    ```python
    import keras_tuner
    from autofinetune import TwoPhaseHyperModel, load_spec

    hypermodel = TwoPhaseHyperModel(load_spec("studies/digits-demo.toml"))
    tuner = keras_tuner.Hyperband(
        hypermodel, objective=hypermodel.objective, max_epochs=hypermodel.max_epochs,
        directory="kt", project_name="digits")
    tuner.search()
    best_model = tuner.get_best_models(1)[0]
    ```

    ``search()`` takes no data: images, split and batch size come from the spec. ``epochs``
    (Hyperband's ``tuner/epochs``) is the global epoch budget: the schedule stops after that
    many epochs of both phases together (phase 1 first). Callbacks passed to ``search()`` get
    every epoch's logs when the epoch has ended; a callback that sets ``model.stop_training``
    (e.g. ``EarlyStopping``) stops the schedule. ``EarlyStopping`` on an accuracy needs
    ``mode="max"``: Keras infers the direction from metrics that only ``model.fit`` builds.
    Callbacks that act on the model while it trains (weights, learning-rate schedules) do not
    apply: the schedule trains its own copy.

    Errors follow keras-tuner's semantics: a NaN loss or out-of-memory fails the trial with
    ``keras_tuner.errors.FailedTrialError`` (not retried), a bad spec or unreadable weights stop
    the search with ``keras_tuner.errors.FatalError``, any other exception is an invalid trial
    that keras-tuner retries ``max_retries_per_trial`` times.

    Args:
        spec: The study spec (a :class:`~autofinetune.spec.schema.StudySpec` or the path of its TOML
            file).
        data: The :class:`~autofinetune.data.sources.ImageData` to train on; default: loaded from the
            spec on first use.
        name: keras-tuner's name of this HyperModel.
        tunable: keras-tuner's flag; ``False`` keeps the parameters out of the search space.

    Attributes:
        last_result: The :class:`~autofinetune.trial.results.TrialResult` of the latest ``fit`` (also
            when that trial failed), or ``None``.
        checkpoint_path: Where ``fit`` saves the best epoch's full model (``.keras``); ``None``
            (default) uses a temporary file. Set by an engine that keeps checkpoints.

    Raises:
        ConfigError: the spec's space cannot be expressed in keras-tuner (see
            :func:`autofinetune.search.space.keras_tuner_hyperparameter`).
    """

    def __init__(self, spec, data=None, *, name: str | None = None, tunable: bool = True) -> None:
        from autofinetune.spec.schema import StudySpec, load_spec
        from autofinetune.search.space import keras_tuner_params

        super().__init__(name=name, tunable=tunable)
        self.spec: StudySpec = spec if isinstance(spec, StudySpec) else load_spec(spec)
        # Fail here, before a tuner exists, when the space does not translate.
        keras_tuner_params(keras_tuner.HyperParameters(), self.spec)
        _require_tensorboard()
        self._data = data
        self.last_result = None
        self.checkpoint_path: str | Path | None = None

    # -- what a tuner needs to know ---------------------------------------------------------

    @property
    def data(self):
        """The images the schedule trains on (loaded from the spec on first use)."""
        if self._data is None:
            from autofinetune.data.sources import load_data

            self._data = load_data(self.spec)
        return self._data

    @property
    def max_epochs(self) -> int:
        """The schedule's epochs, both phases: Hyperband's ``max_epochs``."""
        return self.spec.schedule.total_epochs

    @property
    def objective(self):
        """The spec's objective as a ``keras_tuner.Objective`` (metric and direction)."""
        return keras_tuner.Objective(self.spec.objective.metric, direction=self.spec.objective.mode)

    # -- keras-tuner's interface ------------------------------------------------------------

    def declare_hyperparameters(self, hp) -> None:
        """Declare the spec's search space on ``hp`` (defaults: the seed recipe)."""
        from autofinetune.search.space import keras_tuner_params

        keras_tuner_params(hp, self.spec)

    def build(self, hp):
        """The phase-1 classifier for ``hp``'s parameters: backbone frozen, head new, compiled.

        Args:
            hp: A ``keras_tuner.HyperParameters``; the spec's parameters are declared on it.

        Returns:
            A compiled ``keras.Model`` taking raw 0..255 RGB images.
        """
        from autofinetune.trial.backbones import build_backbone
        from autofinetune.trial.model import build_classifier, compile_classifier, freeze_backbone, make_optimizer
        from autofinetune.search.space import keras_tuner_params

        params = keras_tuner_params(hp, self.spec)
        spec = self.spec
        backbone = build_backbone(
            spec.backbone.name, image_size=spec.data.image_size, weights=spec.weights_path or spec.backbone.weights
        )
        model = build_classifier(
            backbone,
            num_classes=self.data.num_classes,
            head_units=int(params["head_units"]),
            dropout=float(params["dropout"]),
            augmentation=spec.data.augmentation,
        )
        freeze_backbone(backbone)
        optimizer = make_optimizer(
            spec.schedule.phase1_optimizer,
            learning_rate=float(params["phase1_lr"]),
            momentum=float(params["phase1_momentum"]),
        )
        compile_classifier(model, optimizer, label_smoothing=float(params["label_smoothing"]))
        return model

    def fit(self, hp, model, *args: Any, callbacks=None, epochs: int | None = None, initial_epoch: int = 0,
            verbose: Any = None, **kwargs: Any):
        """Run the two-phase schedule for ``hp``'s parameters; ``model`` gets the best epoch's weights.

        Args:
            hp: The trial's ``keras_tuner.HyperParameters``.
            model: The model :meth:`build` returned (Hyperband may have loaded a predecessor's
                weights into it; the schedule starts from the backbone's weights regardless).
            callbacks: keras-tuner's and the user's callbacks; each gets every epoch's logs.
            epochs: The global epoch budget (Hyperband's ``tuner/epochs``); ``None`` or more
                than both phases: the full schedule.
            initial_epoch: Hyperband's ``tuner/initial_epoch``; the schedule runs from epoch 0
                anyway (it cannot resume another run's weights).
            verbose: Accepted from ``search()`` and ignored: the schedule trains quietly.

        Returns:
            A ``keras.callbacks.History`` with every epoch's metrics (index = global step - 1).

        Raises:
            keras_tuner.errors.FailedTrialError: the loss became NaN, memory ran out, or no
                epoch gave a finite objective value.
            keras_tuner.errors.FatalError: bad arguments, or the spec cannot train (e.g. its
                weights file cannot be loaded); keras-tuner stops the search.
        """
        import keras

        from autofinetune.trial import schedule
        from autofinetune.search.space import keras_tuner_params

        del initial_epoch, verbose  # see the docstring: accepted, not used
        if args or kwargs:
            received = [f"{len(args)} positional argument(s)"] if args else []
            received += sorted(kwargs)
            raise keras_tuner.errors.FatalValueError(
                f"TwoPhaseHyperModel.fit: got {', '.join(received)}; the images, split and batch size come "
                "from the study spec, so search() takes only callbacks, epochs and verbose"
            )
        total = self.max_epochs
        if epochs is None:
            budget = total
        elif isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
            raise keras_tuner.errors.FatalValueError(
                f"TwoPhaseHyperModel.fit: epochs: got {epochs!r}; must be a positive integer (the global epoch budget)"
            )
        else:
            budget = min(epochs, total)
        params = keras_tuner_params(hp, self.spec)
        callbacks = list(callbacks or [])
        savers = [callback for callback in callbacks if _is_best_epoch_saver(callback)]
        listeners = keras.callbacks.CallbackList(
            [callback for callback in callbacks if not _is_best_epoch_saver(callback)], model=model
        )
        model.stop_training = False
        reporter = _CallbackReporter(listeners, model, budget=budget, total=total)
        self.last_result = None
        with tempfile.TemporaryDirectory(prefix="autofinetune-kt-") as scratch:
            checkpoint = Path(self.checkpoint_path) if self.checkpoint_path else Path(scratch) / "model.keras"
            # A file left by an interrupted run of the same trial must not pass for this run's.
            checkpoint.unlink(missing_ok=True)
            listeners.on_train_begin()
            try:
                result = schedule.run_trial(self.spec, params, self.data, reporter=reporter, checkpoint_path=checkpoint)
            except (ConfigError, FatalError) as error:
                # Every trial would fail the same way: stop the search (keras-tuner's FatalError).
                raise keras_tuner.errors.FatalError(str(error)) from error
            if self.checkpoint_path is None:
                # The temporary file is gone when fit returns.
                result = dataclasses.replace(result, checkpoint_path=None)
            self.last_result = result
            listeners.on_train_end()
            if result.state == "failed":
                raise keras_tuner.errors.FailedTrialError(result.error)
            if result.best_value is None:
                raise keras_tuner.errors.FailedTrialError(
                    f"no epoch gave a finite {result.objective}; nothing to score"
                )
            if checkpoint.is_file():
                # After on_train_end, so a callback restoring "best weights" of the untrained
                # model cannot overwrite the schedule's.
                with warnings.catch_warnings():
                    # The file holds the last phase's optimizer state and `model` is compiled for
                    # phase 1; only the weights are wanted.
                    warnings.filterwarnings("ignore", message="Skipping variable loading for optimizer")
                    model.load_weights(checkpoint)
        best = next(record for record in result.history if record.step == result.best_step)
        for saver in savers:
            saver.set_model(model)
            saver.on_epoch_end(best.step - 1, dict(best.metrics))
        return _history(result, model)


def _history(result, model):
    """A ``keras.callbacks.History`` of the schedule's epochs, as ``model.fit`` would return."""
    import keras

    history = keras.callbacks.History()
    history.set_model(model)
    names = sorted({name for record in result.history for name in record.metrics})
    history.epoch = [record.step - 1 for record in result.history]
    history.history = {name: [float(record.metrics.get(name, math.nan)) for record in result.history] for name in names}
    return history


# --- the keras-tuner project beside the study database ----------------------------------------


def keras_tuner_directory(storage_url: str) -> Path:
    """Where the keras-tuner projects of a study database live.

    ``x.db.keras_tuner/`` beside a SQLite database ``x.db``; for a server database,
    ``autofinetune-keras-tuner/`` in the working directory. Each study is a project folder in it.
    """
    from autofinetune.store.database import sqlite_path

    path = sqlite_path(storage_url)
    if path is not None:
        return path.with_name(path.name + ".keras_tuner")
    return Path("autofinetune-keras-tuner").resolve()


class _Project:
    """The keras-tuner project of one study: locked while searched, and remembering its tuner.

    keras-tuner keeps its search state in files of the project folder, so one process searches a
    project at a time; a second ``launch`` is refused instead of corrupting it. The project's id
    (a UUID in ``autofinetune.json``) tags the trials mirrored from it, so a new project for the
    same study, whose trial ids start again at 0, never matches the old project's trials.
    """

    def __init__(self, directory: Path, name: str, tuner: str) -> None:
        self.directory = directory
        self.name = name
        self.path = directory / name
        self.path.mkdir(parents=True, exist_ok=True)
        self._lock = open(self.path / "autofinetune.lock", "w")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            raise ConfigError(
                f"keras-tuner project {str(self.path)!r}: another `autofinetune launch --engine keras-tuner` "
                "is searching it; wait for it to finish (a keras-tuner project has one searcher at a time)"
            ) from None
        info_path = self.path / "autofinetune.json"
        info = json.loads(info_path.read_text()) if info_path.is_file() else {}
        if info.get("tuner", tuner) != tuner:
            self.close()
            raise ConfigError(
                f"--tuner: got {tuner!r}, but the keras-tuner project {str(self.path)!r} of study {name!r} "
                f"searches with {info['tuner']!r}; resume with --tuner {info['tuner']}, or start another study"
            )
        self.id = info.get("project_id") or uuid.uuid4().hex
        info_path.write_text(json.dumps({"study": name, "tuner": tuner, "project_id": self.id}, indent=2))

    def close(self) -> None:
        """Let another process search the project."""
        if not self._lock.closed:
            fcntl.flock(self._lock, fcntl.LOCK_UN)
            self._lock.close()


# --- mirroring keras-tuner trials into the study database -------------------------------------


class _StudyMirror:
    """Keeps one study trial per keras-tuner trial: opened when it starts, finished when it ends.

    A mirrored trial is RUNNING while keras-tuner runs it (the dashboard shows its epochs as they
    come), then COMPLETE, PRUNED or FAIL with the record every engine writes. It also decides
    whether keras-tuner may start another trial (the study's trial budget and ``--timeout``),
    and hands keras-tuner the study's queued (WAITING) trials, the baseline first.

    Args:
        study: The Optuna study.
        spec: Its spec.
        recorder: Records each trial as every engine does (the best models kept, curves, notes).
        project: The keras-tuner project searched.
        deadline: Unix time after which no trial starts.
        progress: The progress display (:class:`~autofinetune.engines.progress.TrialProgressBar`).
    """

    def __init__(self, study, spec, recorder, project: _Project, *, deadline: float | None, progress) -> None:
        from autofinetune.search.space import optuna_distributions

        self.study = study
        self.spec = spec
        self.recorder = recorder
        self.project = project
        self.deadline = deadline
        self.progress = progress
        self.distributions = optuna_distributions(spec)
        self.stop_reason: str | None = None
        #: keras-tuner trial id -> the Optuna Trial of each open mirror.
        self._open: dict[str, Any] = {}
        #: keras-tuner trial id -> why its run raised.
        self._errors: dict[str, str] = {}
        #: Queued trials found not to fit the space (warned about once).
        self._unfit: set[int] = set()

    @property
    def storage(self):
        """The study's storage (mirrored trials are written by storage id)."""
        return storage_of(self.study)

    def mirrors_of(self, kt_trial_id: str | None = None) -> list:
        """The study's trials mirrored from this project (of one keras-tuner trial, if given)."""
        return [
            trial
            for trial in self.study.get_trials(deepcopy=False)
            if trial.user_attrs.get(KT_PROJECT_ATTR) == self.project.id
            and (kt_trial_id is None or trial.user_attrs.get(KT_TRIAL_ID_ATTR) == kt_trial_id)
        ]

    # -- what keras-tuner runs next -------------------------------------------------------

    def next_queued(self, exclude: set[int]) -> tuple[int, dict[str, Any]] | None:
        """The oldest WAITING study trial keras-tuner can run: ``(storage trial id, values)``.

        Queued trials (the baseline, retries queued by Optuna workers, ``enqueue_trial``) run
        before keras-tuner samples its own. One whose params do not cover the spec's space is
        left to the Optuna engine.
        """
        from optuna.trial import TrialState

        from autofinetune.search.space import params_from_keras_tuner

        for trial in self.study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
            if storage_id_of(trial) in exclude or storage_id_of(trial) in self._unfit:
                continue
            given = {**trial.params, **trial.system_attrs.get("fixed_params", {})}
            try:
                return storage_id_of(trial), params_from_keras_tuner(given, self.spec)
            except ConfigError as error:
                self._unfit.add(storage_id_of(trial))
                logger.warning("queued trial %d is left for the Optuna engine: %s", trial.number, error)
        return None

    def may_start_trial(self, claimed: set[int], *, retry: bool = False) -> bool:
        """Whether keras-tuner may start a trial: before the deadline, within the study's budget.

        Args:
            claimed: Storage ids of the queued trials keras-tuner has taken already.
            retry: keras-tuner is about to run an interrupted trial again. Its record replaces
                the failed one in the budget, so only the deadline applies.
        """
        from autofinetune.store.study import budget_used, study_budget

        if self.deadline is not None and time.time() >= self.deadline:
            self.stop_reason = "the --timeout has passed"
            return False
        if retry:
            return True
        counted, _ = budget_used(self.study)
        if counted < study_budget(self.study) or self.next_queued(claimed) is not None:
            return True  # a queued trial is counted already: running it uses no more budget
        self.stop_reason = "the study's trial budget is used"
        return False

    # -- one trial ------------------------------------------------------------------------

    def open(self, kt_trial, claimed_trial_id: int | None) -> None:
        """Start the study trial of a keras-tuner trial that starts.

        Args:
            kt_trial: The keras-tuner ``Trial``.
            claimed_trial_id: The storage id of the WAITING study trial whose params it runs,
                or ``None`` for params keras-tuner chose.
        """
        import optuna
        from optuna.trial import TrialState

        from autofinetune.search.space import params_from_keras_tuner
        from autofinetune.store.database import BASELINE_ATTR, FAIL_REASON_ATTR

        kt_id = kt_trial.trial_id
        values = kt_trial.hyperparameters.values
        params = params_from_keras_tuner(values, self.spec)
        previous = self.mirrors_of(kt_id)
        if any(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in previous):
            # Only when the keras-tuner project lags behind the study database (e.g. restored
            # from a copy): the trial's result is in the database already; keep one record.
            logger.warning("keras-tuner trial %s is in the study database already; not mirrored again", kt_id)
            return
        attrs: dict[str, Any] = {
            KT_TRIAL_ID_ATTR: kt_id,
            KT_PROJECT_ATTR: self.project.id,
            KT_DIR_ATTR: str(self.project.path),
        }
        if "tuner/epochs" in values:
            attrs["keras_tuner_epochs"] = int(values["tuner/epochs"])
            attrs["keras_tuner_bracket"] = int(values.get("tuner/bracket", 0))
            attrs["keras_tuner_round"] = int(values.get("tuner/round", 0))
        if "tuner/trial_id" in values:
            attrs["keras_tuner_promoted_from"] = values["tuner/trial_id"]
        system_attrs: dict[str, Any] = {}
        failed = [t for t in previous if t.state == TrialState.FAIL]
        if failed:
            # keras-tuner runs an interrupted trial again: the new record is its retry, so the
            # failed one no longer counts towards the budget (as for Optuna's retries).
            system_attrs = {"failed_trial": failed[0].number, "retry_history": [t.number for t in failed]}
            attrs["retry_reason"] = failed[-1].user_attrs.get(FAIL_REASON_ATTR, "interrupted")

        trial_id = self._take_waiting(claimed_trial_id)
        if trial_id is not None:
            for name, value in params.items():
                distribution = self.distributions[name]
                self.storage.set_trial_param(trial_id, name, distribution.to_internal_repr(value), distribution)
            for key, value in system_attrs.items():
                self.storage.set_trial_system_attr(trial_id, key, value)
        else:
            if claimed_trial_id is not None and self.storage.get_trial(claimed_trial_id).user_attrs.get(BASELINE_ATTR):
                attrs[BASELINE_ATTR] = True  # a retry of the baseline is the baseline
            template = optuna.trial.create_trial(
                state=TrialState.RUNNING,
                params=params,
                distributions=self.distributions,
                system_attrs=system_attrs,
            )
            trial_id = self.storage.create_new_trial(study_id(self.study), template_trial=template)
        self.recorder.start(trial_id)
        for key, value in attrs.items():
            self.storage.set_trial_user_attr(trial_id, key, value)
        trial = optuna.trial.Trial(self.study, trial_id)
        self._open[kt_id] = trial
        self.progress.start_trial(trial.number, int(values.get("tuner/epochs", self.spec.schedule.total_epochs)))

    def _take_waiting(self, trial_id: int | None) -> int | None:
        """Make the WAITING study trial RUNNING; ``None`` when it is gone (another worker took it)."""
        import optuna
        from optuna.trial import TrialState

        if trial_id is None:
            return None
        try:
            if self.storage.set_trial_state_values(trial_id, state=TrialState.RUNNING):
                return trial_id
        except optuna.exceptions.UpdateFinishedTrialError:
            pass
        return None

    def report(self, kt_trial_id: str, step: int, metrics: Mapping[str, Any]) -> None:
        """One epoch of a running trial: its objective value at the global step."""
        opened = self._open.get(kt_trial_id)
        if opened is None:
            return
        value = metrics.get(self.spec.objective.metric)
        if value is not None and math.isfinite(float(value)):
            opened.report(float(value), step)
        self.progress.epoch_done(step, {k: float(v) for k, v in metrics.items()})

    def note_error(self, kt_trial_id: str, error: BaseException) -> None:
        """Remember why a trial's run raised (the reason its study trial fails with)."""
        if isinstance(error, (keras_tuner.errors.FailedTrialError, keras_tuner.errors.FatalError)):
            reason = str(error)
        else:
            reason = f"{type(error).__name__}: {error}"
        self._errors[kt_trial_id] = reason[:2000]

    def close(self, kt_trial, result) -> None:
        """Finish the study trial of a keras-tuner trial that ended (after keras-tuner's bookkeeping).

        Args:
            kt_trial: The keras-tuner ``Trial``; its status is keras-tuner's verdict.
            result: The :class:`~autofinetune.trial.results.TrialResult` of its run, or ``None`` when
                the run raised before the schedule returned.
        """
        from optuna.trial import TrialState

        trial = self._open.pop(kt_trial.trial_id, None)
        reason = self._errors.pop(kt_trial.trial_id, None)
        if trial is None:
            return
        storage_id = storage_id_of(trial)
        completed = kt_trial.status == keras_tuner.engine.trial.TrialStatus.COMPLETED
        if result is not None:
            self.recorder.finish(storage_id, result, checkpoint_path=result.checkpoint_path if completed else None)
            reported = set(self.storage.get_trial(storage_id).intermediate_values)
            for record in result.history:  # an epoch a callback did not forward
                value = record.metrics.get(result.objective)
                if record.step not in reported and value is not None and math.isfinite(value):
                    trial.report(value, record.step)
        if completed and result is not None and result.state == "complete" and result.best_value is not None:
            self.study.tell(trial, result.best_value, state=TrialState.COMPLETE)
            self.progress.trial_done(trial.number, "complete", result.best_value, None)
        elif completed and result is not None and result.state == "pruned":
            self.study.tell(trial, state=TrialState.PRUNED)
            self.progress.trial_done(trial.number, f"pruned after step {result.pruned_at_step}", result.best_value, None)
        else:
            reason = (result.error if result is not None else None) or reason or _last_line(kt_trial.message)
            reason = self.recorder.fail(storage_id, reason or f"keras-tuner marked the trial {kt_trial.status}")
            self.study.tell(trial, state=TrialState.FAIL)
            self.progress.trial_done(trial.number, "failed", None, reason)
        if result is not None and result.checkpoint_path is not None:
            Path(result.checkpoint_path).unlink(missing_ok=True)  # uploaded, or not among the best
        self.progress.refresh()

    def fail_open(self, reason: str) -> None:
        """Fail every open study trial with ``reason`` (the search stopped while they ran)."""
        from optuna.trial import TrialState

        for kt_id in list(self._open):
            trial = self._open.pop(kt_id)
            self.recorder.fail(storage_id_of(trial), reason)
            self.study.tell(trial, state=TrialState.FAIL)
            self.progress.trial_done(trial.number, "failed", None, reason)

    def recover(self, oracle) -> list[int]:
        """Fail the study trials a previous search left RUNNING (it was killed), with a reason.

        keras-tuner runs a trial it had not finished again on resume; that run's record is a
        retry of the failed one. Only this project's trials are touched: the project lock means
        no other process runs them.

        Returns:
            Numbers of the trials failed.
        """
        from optuna.trial import TrialState

        finished = {keras_tuner.engine.trial.TrialStatus.COMPLETED, keras_tuner.engine.trial.TrialStatus.FAILED}
        failed = []
        for trial in self.mirrors_of():
            if trial.state != TrialState.RUNNING:
                continue
            kt_trial = oracle.trials.get(trial.user_attrs.get(KT_TRIAL_ID_ATTR))
            if kt_trial is not None and kt_trial.status in finished:
                reason = "the keras-tuner search stopped (killed) after this trial ended, before its result was recorded"
            else:
                reason = "the keras-tuner search stopped (killed) while this trial ran; keras-tuner runs it again"
            self.recorder.fail(storage_id_of(trial), reason)
            self.storage.set_trial_state_values(storage_id_of(trial), state=TrialState.FAIL)
            logger.warning("trial %d: %s", trial.number, reason)
            failed.append(trial.number)
        return failed


def _last_line(message: str | None) -> str | None:
    """The exception line at the end of a traceback keras-tuner stored as a trial's message."""
    lines = [line.strip() for line in (message or "").strip().splitlines() if line.strip()]
    return lines[-1][:2000] if lines else None


# --- keras-tuner's oracle and tuner, tied to the study -----------------------------------------


class _StudyOracle:
    """Mixin for a keras-tuner oracle that searches a study.

    Before sampling, it hands out the study's queued trials (the baseline first), and it stops
    creating trials when the study's budget is used or the deadline passed (keras-tuner's own
    ``max_trials`` would count only this project's trials). Which keras-tuner trial runs which
    queued study trial is part of the oracle's saved state, so a resumed search keeps it.
    """

    #: Set by the launcher; not part of the saved state.
    study_mirror: _StudyMirror | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: keras-tuner trial id -> storage id of the queued study trial it runs.
        self.queued_claims: dict[str, int] = {}

    def create_trial(self, tuner_id):
        mirror = self.study_mirror
        if mirror is not None and tuner_id not in self.ongoing_trials:
            # keras-tuner takes the trials of its retry queue (interrupted ones) first.
            retry = bool(self._retry_queue)
            if not mirror.may_start_trial(set(self.queued_claims.values()), retry=retry):
                return keras_tuner.engine.trial.Trial(self.get_space(), status=keras_tuner.engine.trial.TrialStatus.STOPPED)
        return super().create_trial(tuner_id)

    def populate_space(self, trial_id):
        mirror = self.study_mirror
        queued = mirror.next_queued(set(self.queued_claims.values())) if mirror is not None else None
        if queued is not None:
            storage_id, values = queued
            self.queued_claims[trial_id] = storage_id
            # No tuner/epochs: Hyperband's run_trial then runs the full schedule, outside its
            # brackets, so the baseline is a complete reference trial.
            return {"status": keras_tuner.engine.trial.TrialStatus.RUNNING, "values": dict(values)}
        return super().populate_space(trial_id)

    def get_state(self):
        state = super().get_state()
        state["autofinetune_queued_claims"] = self.queued_claims
        return state

    def set_state(self, state):
        super().set_state(state)
        self.queued_claims = dict(state.get("autofinetune_queued_claims", {}))


class _HyperbandStudyOracle(_StudyOracle, keras_tuner.oracles.HyperbandOracle):
    pass


class _BayesianStudyOracle(_StudyOracle, keras_tuner.oracles.BayesianOptimizationOracle):
    pass


class _RandomStudyOracle(_StudyOracle, keras_tuner.oracles.RandomSearchOracle):
    pass


def _make_oracle(tuner: str, hypermodel: TwoPhaseHyperModel, seed: int):
    """The study-bound oracle of ``--tuner``.

    Args:
        tuner: One of :data:`TUNERS`.
        hypermodel: Gives the objective and Hyperband's ``max_epochs``.
        seed: keras-tuner's seed (the spec's); a resumed project keeps its own random state.
    """
    common = {
        "objective": hypermodel.objective,
        "seed": seed,
        # A trial that raises an unexpected error is not retried: it would fail the same way.
        "max_retries_per_trial": 0,
        "max_consecutive_failed_trials": MAX_CONSECUTIVE_FAILED_TRIALS,
    }
    if tuner == "hyperband":
        # Endless iterations: the study's trial budget ends the search.
        return _HyperbandStudyOracle(
            max_epochs=hypermodel.max_epochs, factor=HYPERBAND_FACTOR, hyperband_iterations=None, **common
        )
    # max_trials=None: the study's budget decides (keras-tuner's would count only this project).
    if tuner == "bayesian":
        return _BayesianStudyOracle(max_trials=None, **common)
    return _RandomStudyOracle(max_trials=None, **common)


_TUNER_CLASSES = {
    "hyperband": keras_tuner.Hyperband,
    "bayesian": keras_tuner.BayesianOptimization,
    "random": keras_tuner.RandomSearch,
}


def _mirroring_tuner(
    tuner: str, *, oracle, hypermodel: TwoPhaseHyperModel, mirror: _StudyMirror, project: _Project, ctrl_c: "_CtrlC"
):
    """A keras-tuner tuner of kind ``tuner`` whose trials are mirrored into the study.

    Args:
        tuner: One of :data:`TUNERS`.
        oracle: The oracle it searches with (one of the ``_StudyOracle`` classes).
        hypermodel: The study's HyperModel.
        mirror: Records its trials in the study database.
        project: Its keras-tuner project.
        ctrl_c: Checked at every trial start and epoch end.
    """
    base = _TUNER_CLASSES[tuner]

    class MirroringTuner(base):
        """``base`` with an oracle of our making, and a study trial per keras-tuner trial."""

        def __init__(self) -> None:
            # keras_tuner.Tuner's constructor, not base's: base would build its own oracle.
            keras_tuner.Tuner.__init__(
                self, oracle=oracle, hypermodel=hypermodel, directory=str(project.directory),
                project_name=project.name, overwrite=False,
            )

        def on_trial_begin(self, trial) -> None:
            ctrl_c.check()
            super().on_trial_begin(trial)
            mirror.open(trial, self.oracle.queued_claims.get(trial.trial_id))

        def run_trial(self, trial, *args, **kwargs):
            hypermodel.last_result = None
            hypermodel.checkpoint_path = (
                Path(self.get_trial_dir(trial.trial_id)) / "model.keras" if mirror.recorder.keeps_checkpoints else None
            )
            try:
                return super().run_trial(trial, *args, **kwargs)
            except Exception as error:
                mirror.note_error(trial.trial_id, error)
                raise

        def on_epoch_end(self, trial, model, epoch, logs=None) -> None:
            super().on_epoch_end(trial, model, epoch, logs=logs)
            mirror.report(trial.trial_id, epoch + 1, logs or {})
            ctrl_c.check()

        def on_trial_end(self, trial) -> None:
            try:
                # keras-tuner's verdict first (Hyperband needs it to rank); it may raise when
                # too many trials failed in a row, and the trial is recorded all the same.
                super().on_trial_end(trial)
            finally:
                mirror.close(trial, hypermodel.last_result)

    return MirroringTuner()


# --- the launcher ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class KerasTunerOptions(EngineOptions):
    """Options of the keras-tuner engine.

    Attributes:
        tuner: ``"hyperband"`` (budget: the epochs of both phases), ``"bayesian"`` or ``"random"``.
    """

    tuner: str = "hyperband"

    def check(self) -> None:
        """Raises ConfigError naming the option, the value and what is allowed."""
        if self.tuner not in TUNERS:
            raise ConfigError(f"--tuner: got {self.tuner!r}; allowed: {', '.join(TUNERS)}")


class KerasTunerEngine(Engine):
    """A keras-tuner tuner searches; its trials are mirrored into the study (``--engine keras-tuner``).

    Importing this module already needs the extra (it raises :class:`MissingKerasTunerError`).
    """

    name = "keras-tuner"
    extra = "keras-tuner"
    options_type = KerasTunerOptions

    def check(self, spec, options: KerasTunerOptions) -> None:
        from autofinetune.search.space import keras_tuner_params

        options.check()
        _require_tensorboard()
        keras_tuner_params(keras_tuner.HyperParameters(), spec)  # the space must translate

    def launch(self, spec, url: str, study, options: KerasTunerOptions) -> ExitCode:
        return launch_with_keras_tuner(spec, url, study, options)


def launch_with_keras_tuner(spec, url: str, study, options: KerasTunerOptions | None = None) -> ExitCode:
    """Run a created (or resumed) study with a keras-tuner tuner, mirrored into the study database.

    The keras-tuner project lives beside the study database (:func:`keras_tuner_directory`, one
    folder per study) and is resumed when it exists. The study's queued trials (the baseline
    first) run before keras-tuner samples; the search stops when the study's trial budget is
    used (trials of every engine count), when ``deadline`` passes, or when keras-tuner has
    nothing new to try.

    Args:
        spec: The study's :class:`~autofinetune.spec.schema.StudySpec`.
        url: The study database's SQLAlchemy URL.
        study: The Optuna study, created or resumed with the spec.
        options: The tuner, the deadline and where checkpoints go (default: Hyperband).

    Returns:
        ``DONE``; ``BAD_INPUT`` when the search stopped on an error (too many failed trials in
        a row, a spec that cannot train); ``INTERRUPTED`` (Ctrl-C; the running trial is failed
        with that reason and runs again on resume).

    Raises:
        ConfigError: an unknown tuner, a project searched by another process or with another
            tuner, or a space keras-tuner cannot express; nothing ran.
        FatalError: the data differs from the data the study started with.
    """
    import optuna

    from autofinetune.engines.progress import TrialProgressBar
    from autofinetune.store.database import artifacts_location
    from autofinetune.store.recorder import TrialRecorder
    from autofinetune.store.study import study_budget

    options = options or KerasTunerOptions()
    options.check()
    tuner, deadline = options.tuner, options.deadline
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    # Retracing warnings are expected: every trial builds a new model.
    logging.getLogger("tensorflow").setLevel(logging.ERROR)
    project = _Project(keras_tuner_directory(url), spec.name, tuner)
    try:
        recorder = TrialRecorder.at(study, spec, artifacts=artifacts_location(url, options.artifacts))
        hypermodel = TwoPhaseHyperModel(spec, recorder.load_data())
        progress = TrialProgressBar(study, study_budget(study), enabled=sys.stderr.isatty())
        mirror = _StudyMirror(study, spec, recorder, project, deadline=deadline, progress=progress)
        oracle = _make_oracle(tuner, hypermodel, seed=spec.seed)
        ctrl_c = _CtrlC()
        kt_tuner = _mirroring_tuner(
            tuner, oracle=oracle, hypermodel=hypermodel, mirror=mirror, project=project, ctrl_c=ctrl_c
        )
        # keras-tuner replaced its oracle's state from the project on reload; the link to the
        # study is set afterwards, on the oracle it kept.
        kt_tuner.oracle.study_mirror = mirror
        # keras-tuner reloads a project only when its tuner file exists, and writes that file
        # first when a trial ends: a search stopped in its first trial would start over and
        # reuse that trial's id. Saved now, a resumed search runs the unfinished trial again.
        kt_tuner.save()
        mirror.recover(kt_tuner.oracle)
        try:
            with ctrl_c:
                return _search(kt_tuner, mirror)
        finally:
            progress.close()
    finally:
        project.close()


class _CtrlC:
    """Ctrl-C that is not lost when Python swallows its KeyboardInterrupt.

    An exception raised while Python runs a garbage-collection callback is printed and dropped
    ("Exception ignored in ..."); with JAX installed one such callback is registered, and a Ctrl-C
    arriving then is lost (measured: the study ran on to its end). The handler also records the
    request, and :meth:`check` (called at every epoch end and trial start) raises it again.
    """

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = True
        raise KeyboardInterrupt

    def check(self) -> None:
        """Raise ``KeyboardInterrupt`` if Ctrl-C was pressed."""
        if self.requested:
            raise KeyboardInterrupt

    def __enter__(self) -> "_CtrlC":
        # Only the main thread may set signal handlers; elsewhere Python's default stays.
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc_info: Any) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


@contextlib.contextmanager
def _sigint_ignored() -> Iterator[None]:
    """Ignore Ctrl-C inside the block (only the main thread may change signal handlers)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _search(kt_tuner, mirror: _StudyMirror) -> int:
    """Run ``kt_tuner.search()``, turning how it ends into an exit code and trial records."""
    try:
        kt_tuner.search(verbose=0)
    except KeyboardInterrupt:
        # A second Ctrl-C must not interrupt the bookkeeping of the first.
        with _sigint_ignored():
            mirror.fail_open("interrupted (Ctrl-C) while running")
        return ExitCode.INTERRUPTED
    except keras_tuner.errors.FatalError as error:
        mirror.fail_open(f"the search stopped: {error}")
        print(f"error: {error}", file=sys.stderr, flush=True)
        return ExitCode.BAD_INPUT
    except RuntimeError as error:  # keras-tuner's "Number of consecutive failures exceeded ..."
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        mirror.fail_open(f"the search stopped: {reason}")
        last = _last_line(str(error))
        print(f"error: keras-tuner stopped the search: {reason}" + (f" (last: {last})" if last != reason else ""),
              file=sys.stderr, flush=True)
        return ExitCode.BAD_INPUT
    except BaseException as error:
        mirror.fail_open(f"the search stopped: {type(error).__name__}: {error}")
        raise
    if mirror.stop_reason is None:
        print("keras-tuner has no new hyperparameters to try (its search space is exhausted)", flush=True)
    return ExitCode.DONE


__all__ = ["TwoPhaseHyperModel", "launch_with_keras_tuner", "keras_tuner_directory", "MissingKerasTunerError"]
