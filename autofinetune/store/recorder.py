"""What every engine writes into the study database, so one dashboard and export serve all.

The contract, for each trial an engine runs (Optuna, Ray Tune, keras-tuner):

* params: every search-space parameter with the spec's Optuna distribution;
* one intermediate value per epoch, at the global 1-based step (phase 2 continues phase 1);
* state: COMPLETE with the best epoch's objective value, PRUNED when stopped early (never
  COMPLETE with a truncated value), FAIL with the reason in the ``fail_reason`` user attribute;
* the user attributes of :func:`result_attributes`;
* for kept trials, the best epoch's model as an artifact, its id in ``checkpoint_artifact_id``;
* for every finished trial a dashboard note and the artifact ``learning_curve.svg``: both come
  with :func:`record_result` (pass ``artifact_store``), and :func:`record_failure` for a trial
  that ends by an exception instead of a result.
"""

from __future__ import annotations

import logging
import math
import os
import platform
import socket
from typing import Any, Mapping

from autofinetune.store.notes import RESULT_STATES
from autofinetune.trial.results import TrialResult
from autofinetune.store.database import FAIL_REASON_ATTR

logger = logging.getLogger(__name__)


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


def record_result(study, trial_id: int, result: TrialResult, *, phase1_epochs: int, artifact_store=None) -> None:
    """Write a finished schedule's attributes onto its (still running) trial, and its dashboard views.

    Every engine calls this, whatever asked for the params, so the study database holds the
    same record for each: the attributes of :func:`result_attributes`, a dashboard note for the
    trial's outcome (complete, pruned or failed) and, with an artifact store, its learning curve.

    Args:
        study: The Optuna study holding the trial.
        trial_id: The storage's id of the trial (``trial._trial_id``), which must be RUNNING.
        result: What the schedule returned.
        phase1_epochs: The spec's phase-1 epochs (the phase boundary step).
        artifact_store: The study's artifact store; when given, ``learning_curve.svg`` is
            uploaded to the trial (default: ``None``, no plot).
    """
    attrs = result_attributes(result, phase1_epochs=phase1_epochs)
    for key, value in attrs.items():
        study._storage.set_trial_user_attr(trial_id, key, value)
    value = result.best_value if result.state == "complete" else None
    record_dashboard_views(
        study, trial_id, state=RESULT_STATES[result.state], value=value, attrs=attrs, artifact_store=artifact_store
    )


def record_failure(study, trial_id: int, reason: str, *, artifact_store=None) -> None:
    """Record why a trial failed when it ended by an exception rather than a result.

    Sets the ``fail_reason`` user attribute and writes the trial's dashboard note. The trial
    must still be RUNNING; the engine then tells Optuna the trial FAILED.

    Args:
        study: The Optuna study holding the trial.
        trial_id: The storage's id of the trial.
        reason: Why it failed, for a person (cut to 2000 characters).
        artifact_store: The study's artifact store (a learning curve is uploaded when the
            trial recorded epochs before failing).
    """
    reason = reason[:2000]
    study._storage.set_trial_user_attr(trial_id, FAIL_REASON_ATTR, reason)
    record_dashboard_views(study, trial_id, state="FAIL", attrs={FAIL_REASON_ATTR: reason}, artifact_store=artifact_store)


def record_dashboard_views(
    study,
    trial_id: int,
    *,
    state: str,
    value: float | None = None,
    attrs: Mapping[str, Any] | None = None,
    artifact_store=None,
) -> None:
    """Write a trial's dashboard note (and, with an artifact store, its learning curve).

    Cheap (a few small writes) and never raises: a dashboard note must not fail a trial.

    Args:
        study: The Optuna study holding the trial.
        trial_id: The storage's id of the trial.
        state: ``"COMPLETE"``, ``"PRUNED"`` or ``"FAIL"``.
        value: The objective value of a complete trial.
        attrs: Attributes just written (the rest are read from the storage).
        artifact_store: Where the learning curve goes; only while the trial is RUNNING.
    """
    try:
        from autofinetune.viewing.dashboard import write_trial_views

        write_trial_views(study, trial_id, state=state, value=value, attrs=attrs, artifact_store=artifact_store)
    except Exception as error:  # write_trial_views logs its own failures; this is a last guard
        logger.warning("could not write the dashboard views of trial id %d: %s", trial_id, error)


def host_attributes() -> dict[str, Any]:
    """Where a trial ran: host name, process id and the accelerator Keras uses."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "device": device_description()}


def device_description() -> str:
    """``"<backend>: <device>"``, e.g. ``"tensorflow: CPU"`` or ``"jax: NVIDIA H100 80GB HBM3"``."""
    import keras

    backend = keras.backend.backend()
    name = platform.processor() or platform.machine() or "CPU"
    try:
        if backend == "tensorflow":
            import tensorflow as tf

            gpus = tf.config.list_logical_devices("GPU")
            if gpus:
                details = tf.config.experimental.get_device_details(tf.config.list_physical_devices("GPU")[0])
                name = details.get("device_name", gpus[0].name)
        elif backend == "jax":
            import jax

            device = jax.devices()[0]
            name = getattr(device, "device_kind", str(device))
        elif backend == "torch":
            import torch

            if torch.cuda.is_available():
                name = torch.cuda.get_device_name(0)
    except Exception:  # a device query is informative only; never fail a trial for it
        pass
    # Which card of the machine: the worker's own device list (see engines/devices.py).
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return f"{backend}: {name}" + (f", CUDA_VISIBLE_DEVICES={visible}" if visible else "")
