"""One trial in its own Ray actor: the two-phase schedule, through the one trial path.

The actor records what the Optuna engine's worker records (its outcome first, host attributes,
one intermediate value per epoch at the global step, the result, the checkpoint); the driver's
searcher reads the outcome (``autofinetune:outcome``) and tells Optuna. It gets the storage URL
through ``tune.with_parameters`` (Ray's object store), never in a file. Import only after
:func:`~autofinetune.engines.ray.options.require_ray`.
"""

from __future__ import annotations

import atexit
import math
import threading
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import optuna
import ray
from ray import tune

from autofinetune.engines.ray.options import EARLY_STOP_ATTR, GLOBAL_STEP_KEY, OPTUNA_TRIAL_ID_KEY, OPTUNA_TRIAL_NUMBER_KEY
from autofinetune.errors import PruneTrial

#: The fail reason of a trial whose actor process began to exit mid-run.
ACTOR_STOPPED = "its Ray actor stopped while it ran (its driver, node or job went away)"


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


class RayReporter:
    """Writes each epoch to the Optuna trial and to Ray, and obeys the scheduler's stop signal.

    Args:
        storage: The study database.
        trial_id: The Optuna trial's storage id.
        objective: The metric that is the trial's value.
        objectives: Every objective's name in a study of several (``objective.pareto_with``):
            Tune rejects a result without each metric its searcher names, so an objective that
            is no epoch metric (a measure of the finished model) is reported as NaN each epoch;
            the trial's values are recorded by the one trial path, not read from Ray's results.
    """

    def __init__(self, storage, trial_id: int, objective: str, *, objectives: Sequence[str] = ()) -> None:
        self.storage = storage
        self.trial_id = trial_id
        self.objective = objective
        self.objectives = tuple(objectives) or (objective,)
        self.reported = False

    def report_nothing_happened(self) -> None:
        """For a trial that ends before its first epoch: Tune rejects a trial whose results
        never hold the objective, so report it once, as NaN at step 0, which no rung records."""
        if not self.reported:
            tune.report({GLOBAL_STEP_KEY: 0, **{name: math.nan for name in self.objectives}})

    def report(self, step: int, metrics: Mapping[str, float]) -> None:
        self.reported = True
        value = metrics.get(self.objective)
        if value is not None and math.isfinite(value):
            # Straight to the storage, which overwrites a step: a retried attempt replaces the
            # values of the attempt whose actor died.
            self.storage.set_trial_intermediate_value(self.trial_id, step, value)
        tune.report({GLOBAL_STEP_KEY: step, **{name: math.nan for name in self.objectives}, **metrics})
        # tune.report returned, so the driver has made its decision about this epoch.
        signal = self.storage.get_trial_system_attrs(self.trial_id).get(EARLY_STOP_ATTR)
        if signal is not None and step >= int(signal["step"]):
            raise PruneTrial(step, f"stopped by {signal.get('scheduler', 'the scheduler')} after step {step}")


def autofinetune_trial(config: dict[str, Any], context: TrialContext) -> None:
    """One trial of the two-phase schedule, in a Ray actor, through the one trial path.

    Args:
        config: The params, plus the Optuna trial's id and number (from :class:`StudySearch`).
        context: See :class:`TrialContext`.
    """
    from autofinetune.engines.trial_path import TrialRecording, run_recorded_trial
    from autofinetune.logs import configure_logging
    from autofinetune.store.database import open_storage, redact_url
    from autofinetune.store.outages import OutagePolicy
    from autofinetune.store.optuna_internals import set_trial_user_attrs
    from autofinetune.store.study import load_study_data
    from autofinetune.store.trial_writer import host_attributes, ran_to_its_end
    from autofinetune.trial.devices import prepare_devices

    # The command line's level and log file (passed in the actor's environment); below -v this
    # also keeps TensorFlow's C++ start-up lines, printed while it is imported, out of the output.
    configure_logging()
    prepare_devices(context.cpus)  # the trial's CPUs, not the whole machine's
    spec = context.spec
    optuna_id = int(config[OPTUNA_TRIAL_ID_KEY])
    number = int(config[OPTUNA_TRIAL_NUMBER_KEY])
    outage = OutagePolicy(spec.search.outage_grace, where=redact_url(context.storage_url))
    storage = open_storage(context.storage_url, create=False, outage=outage, wait_to_connect=True)
    reporter = RayReporter(storage, optuna_id, spec.objective.metric, objectives=spec.objective.names)
    frozen = storage.get_trial(optuna_id)
    if frozen.state.is_finished() or ran_to_its_end(frozen):
        # A resumed experiment re-ran a trial whose result was recorded before the crash, or Ray
        # restarted an actor that died after recording its outcome: the driver tells that one.
        # One interrupted mid-run (its actor stopped with its driver) runs again.
        reporter.report_nothing_happened()
        return
    study = optuna.load_study(study_name=spec.name, storage=storage)
    recording = TrialRecording.at(study, spec, artifacts=context.artifacts)
    # On a cluster, which node and process ran (the last attempt of) the trial, in one write so
    # that a reader who sees the node also sees the process; host names may repeat.
    set_trial_user_attrs(storage, optuna_id, {
        "ray_trial_id": tune.get_context().get_trial_id(),
        "ray_node": ray.get_runtime_context().get_node_id(),
        **host_attributes(),
    })
    # A conditional parameter whose condition the trial does not meet is not in its config.
    params = {name: config[name] for name in spec.search.params() if name in config}
    # Ray may end the actor of a dead driver with SIGTERM, which exits the actor's main thread
    # while this trial's thread still runs: whatever then fails in the trial is that exit's
    # doing, so the trial is recorded as interrupted and runs again when the experiment resumes
    # (as it does when Ray kills the actor outright, before anything is recorded).
    actor_exiting = threading.Event()
    atexit.register(actor_exiting.set)
    try:
        # The path writes the outcome first (the driver's searcher reads it and tells Optuna
        # when Ray reports this trial done); data that cannot be loaded fails the trial like
        # any error. No session is kept: each trial runs in a fresh actor process
        # (``reuse_actors=False``).
        run_recorded_trial(
            recording, spec, params, lambda: load_study_data(study, spec), trial_id=optuna_id, number=number,
            reporter=reporter, stop_event=actor_exiting, stop_reason=ACTOR_STOPPED,
        )
    finally:
        atexit.unregister(actor_exiting.set)
    reporter.report_nothing_happened()
