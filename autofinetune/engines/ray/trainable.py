"""One trial in its own Ray actor: the two-phase schedule, recorded by the trial recorder.

The actor writes what the Optuna engine's worker writes (host attributes, one intermediate
value per epoch at the global step, the result, the checkpoint) and finally how its schedule
ended (``autofinetune:outcome``), which the driver's searcher tells Optuna. It gets the
storage URL through ``tune.with_parameters`` (Ray's object store), never in a file. Import
only after :func:`~autofinetune.engines.ray.options.require_ray`.
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import optuna
import ray
from ray import tune

from autofinetune.engines.ray.options import EARLY_STOP_ATTR, GLOBAL_STEP_KEY, OPTUNA_TRIAL_ID_KEY, OUTCOME_ATTR
from autofinetune.trial.devices import device_description
from autofinetune.errors import ConfigError, FatalError, PruneTrial
from autofinetune.engines.recorder import TrialRecorder


@dataclass(frozen=True)
class TrialContext:
    """What every trial actor needs besides its params (sent through Ray's object store).

    Attributes:
        spec: The study's spec, unchanged.
        storage_url: The study database's URL.
        artifacts: Where checkpoints go (an absolute folder or a bucket URI).
        cpus: CPUs of the trial (TensorFlow's thread count).
    """

    spec: Any
    storage_url: str
    artifacts: str
    cpus: float


def _configure_backend(cpus: float) -> None:
    """Grow GPU memory on demand (trials may share a GPU) and, on TensorFlow, use the trial's
    CPUs, not the whole machine's. Must run before the backend touches a device."""
    import keras

    from autofinetune.trial.devices import enable_memory_growth

    enable_memory_growth()
    if keras.backend.backend() != "tensorflow":
        return
    import tensorflow as tf

    try:
        if cpus >= 1:
            tf.config.threading.set_intra_op_parallelism_threads(int(math.ceil(cpus)))
            tf.config.threading.set_inter_op_parallelism_threads(int(math.ceil(cpus)))
    except RuntimeError:  # devices already initialized in this process; keep what is there
        pass


class RayReporter:
    """Writes each epoch to the Optuna trial and to Ray, and obeys the scheduler's stop signal.

    Args:
        storage: The study database.
        trial_id: The Optuna trial's storage id.
        objective: The metric that is the trial's value.
    """

    def __init__(self, storage, trial_id: int, objective: str) -> None:
        self.storage = storage
        self.trial_id = trial_id
        self.objective = objective
        self.reported = False

    def report_nothing_happened(self) -> None:
        """For a trial that ends before its first epoch: Tune rejects a trial whose results
        never hold the objective, so report it once, as NaN at step 0, which no rung records."""
        if not self.reported:
            tune.report({GLOBAL_STEP_KEY: 0, self.objective: math.nan})

    def report(self, step: int, metrics: Mapping[str, float]) -> None:
        self.reported = True
        value = metrics.get(self.objective)
        if value is not None and math.isfinite(value):
            # Straight to the storage, which overwrites a step: a retried attempt replaces the
            # values of the attempt whose actor died.
            self.storage.set_trial_intermediate_value(self.trial_id, step, value)
        tune.report({GLOBAL_STEP_KEY: step, **metrics})
        # tune.report returned, so the driver has made its decision about this epoch.
        signal = self.storage.get_trial_system_attrs(self.trial_id).get(EARLY_STOP_ATTR)
        if signal is not None and step >= int(signal["step"]):
            raise PruneTrial(step, f"stopped by {signal.get('scheduler', 'the scheduler')} after step {step}")


def autofinetune_trial(config: dict[str, Any], context: TrialContext) -> None:
    """One trial of the two-phase schedule, in a Ray actor; records itself in the study database.

    Args:
        config: The params, plus the Optuna trial's id and number (from :class:`StudySearch`).
        context: See :class:`TrialContext`.
    """
    from autofinetune.logs import configure_logging
    from autofinetune.store.database import open_storage
    from autofinetune.trial.schedule import run_trial

    # The command line's level and log file (passed in the actor's environment); below -v this
    # also keeps TensorFlow's C++ start-up lines, printed while it is imported, out of the output.
    configure_logging()
    _configure_backend(context.cpus)
    spec = context.spec
    optuna_id = int(config[OPTUNA_TRIAL_ID_KEY])
    storage = open_storage(context.storage_url, create=False)
    reporter = RayReporter(storage, optuna_id, spec.objective.metric)
    if storage.get_trial(optuna_id).state.is_finished():
        # A resumed experiment re-ran a trial whose result was recorded before the crash.
        reporter.report_nothing_happened()
        return
    study = optuna.load_study(study_name=spec.name, storage=storage)
    recorder = TrialRecorder.at(study, spec, artifacts=context.artifacts)
    recorder.start(optuna_id, device=device_description())
    reporter = recorder.reporter(optuna_id, reporter)  # every epoch reaches the trackers too
    storage.set_trial_user_attr(optuna_id, "ray_trial_id", tune.get_context().get_trial_id())
    # On a cluster, which node ran (the last attempt of) the trial; host names may repeat.
    storage.set_trial_user_attr(optuna_id, "ray_node", ray.get_runtime_context().get_node_id())
    params = {name: config[name] for name in spec.search.params()}
    outcome: dict[str, Any]
    try:
        data = recorder.load_data()
        with tempfile.TemporaryDirectory(prefix="autofinetune-") as scratch:
            checkpoint = Path(scratch) / "model.keras" if recorder.keeps_checkpoints else None
            result = run_trial(
                spec, params, data, reporter=reporter, checkpoint_path=checkpoint,
                keep_checkpoint=recorder.checkpoint_wanted(optuna_id),
            )
            recorder.finish(optuna_id, result, checkpoint_path=checkpoint)
        outcome = {"state": result.state, "value": result.best_value}
    except (ConfigError, FatalError) as error:
        # Bad input or a broken node: this trial fails and the search stops starting new ones.
        recorder.fail(optuna_id, str(error))
        outcome = {"state": "failed", "fatal": True}
    except Exception as error:  # an unexpected error fails this trial; repeated ones stop the search
        recorder.fail(optuna_id, f"{type(error).__name__}: {error}")
        outcome = {"state": "failed", "unexpected": True}
    # Last: the driver reads this when Ray reports the trial done, and tells Optuna its state.
    storage.set_trial_system_attr(optuna_id, OUTCOME_ATTR, outcome)
    reporter.report_nothing_happened()
