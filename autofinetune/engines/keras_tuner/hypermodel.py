"""The two-phase schedule as a keras-tuner ``HyperModel``.

:class:`TwoPhaseHyperModel` is an ordinary ``keras_tuner.HyperModel``: pass it to any tuner
(``Hyperband``, ``BayesianOptimization``, ``RandomSearch``, ``GridSearch`` or your own). Its
space is the spec's, translated by :func:`~autofinetune.engines.keras_tuner.space.keras_tuner_params`; its
``fit`` runs the schedule through the one trial path
(:func:`autofinetune.engines.trial_path.run_recorded_trial`), recorded in the study when
``launch`` runs the tuner. ``autofinetune launch --engine
keras-tuner`` (:mod:`.engine`) runs such a tuner on a study, mirrored into the study database.

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

This is the only module of the package that imports ``keras_tuner`` itself; the others of this
engine import it from here, so a missing extra is reported once, by name.
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
import threading
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from autofinetune.engines.keras_tuner.space import keras_tuner_params
from autofinetune.errors import ConfigError, PruneTrial
from autofinetune.spec import TrialParams
from autofinetune.trial.session import TrialSession

if TYPE_CHECKING:
    from autofinetune.engines.trial_path import TrialRecording

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


def require_tensorboard() -> None:
    """keras-tuner 1.4 imports TensorBoard's hparams plugin in every trial on TensorFlow."""
    import importlib.util

    import keras

    if keras.backend.backend() == "tensorflow" and importlib.util.find_spec("tensorboard") is None:
        raise MissingKerasTunerError(
            "keras-tuner needs TensorBoard to run trials on the TensorFlow backend, and it is not "
            f"installed; install the extra: {EXTRA_HINT}"
        )


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
        spec: The study spec (a :class:`~autofinetune.spec.StudySpec` or the path of its TOML
            file).
        data: The :class:`~autofinetune.data.sources.ImageData` to train on; default: loaded from the
            spec on first use.
        name: keras-tuner's name of this HyperModel.
        tunable: keras-tuner's flag; ``False`` keeps the parameters out of the search space.

    Attributes:
        last_result: The :class:`~autofinetune.trial.results.TrialResult` of the latest ``fit`` (also
            when that trial failed), or ``None``.
        last_outcome: The :class:`~autofinetune.engines.trial_path.TrialOutcome` of the latest
            ``fit`` (every run goes through the one trial path, recorded or not), or ``None``.
        checkpoint_path: Where ``fit`` saves the best epoch's full model (``.keras``); ``None``
            (default) uses a temporary file. Set by an engine that keeps checkpoints.

    Raises:
        ConfigError: the spec's space cannot be expressed in keras-tuner (see
            :func:`autofinetune.engines.keras_tuner.space.keras_tuner_hyperparameter`).
    """

    def __init__(self, spec, data=None, *, name: str | None = None, tunable: bool = True) -> None:
        from autofinetune.spec import StudySpec, load_spec

        super().__init__(name=name, tunable=tunable)
        self.spec: StudySpec = spec if isinstance(spec, StudySpec) else load_spec(spec)
        # Fail here, before a tuner exists, when the space does not translate.
        keras_tuner_params(keras_tuner.HyperParameters(), self.spec)
        require_tensorboard()
        self._data = data
        self.last_result = None
        self.last_outcome = None
        #: What its trials reuse from one to the next: the backbone, compiled parts, feature cache.
        self.session = TrialSession()
        self.checkpoint_path: str | Path | None = None
        #: Set on Ctrl-C: the running trial stops after its current batch (KeyboardInterrupt).
        self.stop_event: threading.Event | None = None
        #: Set by ``launch --engine keras-tuner``: where ``fit`` records the trial (the study's
        #: :class:`~autofinetune.engines.trial_path.TrialRecording`), and which study trial (its
        #: storage id and number) mirrors the keras-tuner trial that ``fit`` runs.
        self.recording: TrialRecording | None = None
        self.study_trial: tuple[int, int] | None = None
        #: The ``hp`` of the running trial and its parameters (declared once per trial).
        self._declared: tuple[Any, Any] | None = None

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
        """The spec's objective as a ``keras_tuner.Objective`` (metric and direction).

        keras-tuner's oracles optimise one objective: with ``objective.pareto_with`` they search
        on the main metric, while the one trial path records every objective's value in the
        study (its Pareto front is the study's, whichever engine ran the trials).
        """
        return keras_tuner.Objective(self.spec.objective.metric, direction=self.spec.objective.mode)

    # -- keras-tuner's interface ------------------------------------------------------------

    def declare_hyperparameters(self, hp) -> None:
        """Declare the spec's search space on ``hp`` (defaults: the seed recipe)."""

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
        from autofinetune.trial.schedule import phase_plan

        params = self._params(hp)
        spec = self.spec.for_trial(params)  # its backbone, augmentation and optimizer
        backbone = build_backbone(
            spec.backbone.name, image_size=spec.data.image_size, weights=spec.weights_path or spec.backbone.weights,
            base_dir=spec.base_dir,
        )
        model = build_classifier(
            backbone,
            num_classes=self.data.num_classes,
            head_units=params.head_units,
            dropout=params.dropout,
            augmentation=spec.data.augmentation,
            preprocessing=spec.backbone_info(spec.backbone.name).preprocessing,
        )
        freeze_backbone(backbone)
        head_phase = phase_plan(spec, params)[0]
        optimizer = make_optimizer(
            head_phase.optimizer, learning_rate=head_phase.learning_rate, momentum=head_phase.momentum,
            weight_decay=head_phase.weight_decay,
        )
        compile_classifier(model, optimizer, label_smoothing=params.label_smoothing)
        return model

    def _params(self, hp) -> TrialParams:
        """The trial's parameters from ``hp``, declared on it once per trial (``build`` then
        ``fit`` ask for them with the same ``hp``)."""
        if self._declared is None or self._declared[0] is not hp:
            self._declared = (hp, TrialParams.from_values(keras_tuner_params(hp, self.spec)))
        return self._declared[1]

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

        del initial_epoch, verbose  # see the docstring: accepted, not used
        _refuse_data_arguments(args, kwargs)
        total = self.max_epochs
        budget = _epoch_budget(epochs, total)
        params = self._params(hp)
        callbacks = list(callbacks or [])
        savers = [callback for callback in callbacks if _is_best_epoch_saver(callback)]
        listeners = keras.callbacks.CallbackList(
            [callback for callback in callbacks if not _is_best_epoch_saver(callback)], model=model
        )
        model.stop_training = False
        reporter = _CallbackReporter(listeners, model, budget=budget, total=total)
        self.last_result = self.last_outcome = None
        with tempfile.TemporaryDirectory(prefix="autofinetune-kt-") as scratch:
            checkpoint = Path(self.checkpoint_path) if self.checkpoint_path else Path(scratch) / "model.keras"
            # A file left by an interrupted run of the same trial must not pass for this run's.
            checkpoint.unlink(missing_ok=True)
            listeners.on_train_begin()
            outcome = self._run(params, reporter, checkpoint)
            result = outcome.result
            if result is not None and self.checkpoint_path is None:
                # The temporary file is gone when fit returns.
                result = dataclasses.replace(result, checkpoint_path=None)
            self.last_outcome, self.last_result = outcome, result
            _raise_unless_finished(outcome)
            listeners.on_train_end()
            if outcome.state == "failed" or result is None:
                raise keras_tuner.errors.FailedTrialError(outcome.reason)
            if result.best_value is None:
                raise keras_tuner.errors.FailedTrialError(
                    f"no epoch gave a finite {result.objective}; nothing to score"
                )
            if checkpoint.is_file():
                # After on_train_end, so a callback restoring "best weights" of the untrained
                # model cannot overwrite the schedule's.
                _load_weights(model, checkpoint)
        best = next(record for record in result.history if record.step == result.best_step)
        for saver in savers:
            saver.set_model(model)
            saver.on_epoch_end(best.step - 1, dict(best.metrics))
        return _history(result, model)


    def _run(self, params, reporter, checkpoint: Path):
        """The trial on the one trial path: recorded in the study when ``launch`` runs it."""
        from autofinetune.engines.trial_path import run_recorded_trial
        from autofinetune.store.outages import StorageUnavailableError

        recorded = self.study_trial is not None and self.recording is not None
        try:
            return run_recorded_trial(
                self.recording if recorded else None, self.spec, params.to_dict(),
                self._data if self._data is not None else (lambda: self.data),
                trial_id=self.study_trial[0] if recorded else None,  # type: ignore[index]
                number=self.study_trial[1] if recorded else None,  # type: ignore[index]
                reporter=reporter, checkpoint_path=checkpoint, stop_event=self.stop_event, session=self.session,
            )
        except StorageUnavailableError as error:
            # Nothing can be recorded: stop the search (keras-tuner's FatalError).
            raise keras_tuner.errors.FatalError(str(error)) from error


def _refuse_data_arguments(args: tuple, kwargs: Mapping[str, Any]) -> None:
    """The images come from the spec: ``search(x, y, ...)`` is a mistake, said as one."""
    if args or kwargs:
        received = [f"{len(args)} positional argument(s)"] if args else []
        received += sorted(kwargs)
        raise keras_tuner.errors.FatalValueError(
            f"TwoPhaseHyperModel.fit: got {', '.join(received)}; the images, split and batch size come "
            "from the study spec, so search() takes only callbacks, epochs and verbose"
        )


def _epoch_budget(epochs: Any, total: int) -> int:
    """Epochs to train, of the schedule's ``total``: all of them for ``None``."""
    if epochs is None:
        return total
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise keras_tuner.errors.FatalValueError(
            f"TwoPhaseHyperModel.fit: epochs: got {epochs!r}; must be a positive integer (the global epoch budget)"
        )
    return min(epochs, total)


def _load_weights(model, checkpoint: Path) -> None:
    with warnings.catch_warnings():
        # The file holds the last phase's optimizer state and `model` is compiled for phase 1;
        # only the weights are wanted.
        warnings.filterwarnings("ignore", message="Skipping variable loading for optimizer")
        model.load_weights(checkpoint)


def _raise_unless_finished(outcome) -> None:
    """Turn an outcome whose schedule did not return into keras-tuner's signal for it.

    Ctrl-C stops the search (``KeyboardInterrupt``); bad input or a broken node stops it too
    (keras-tuner's ``FatalError``); any other error is raised as it is, an invalid trial
    keras-tuner retries ``max_retries_per_trial`` times.
    """
    if outcome.kind == "interrupted":
        raise KeyboardInterrupt(outcome.reason)
    if outcome.kind == "fatal":
        raise keras_tuner.errors.FatalError(outcome.reason) from outcome.error
    if outcome.kind in ("unexpected", "taken_over") and outcome.error is not None:
        raise outcome.error


def _history(result, model):
    """A ``keras.callbacks.History`` of the schedule's epochs, as ``model.fit`` would return."""
    import keras

    history = keras.callbacks.History()
    history.set_model(model)
    names = sorted({name for record in result.history for name in record.metrics})
    history.epoch = [record.step - 1 for record in result.history]
    history.history = {name: [float(record.metrics.get(name, math.nan)) for record in result.history] for name in names}
    return history


__all__ = ["MissingKerasTunerError", "TwoPhaseHyperModel"]
