"""What every engine writes into the study database, so one dashboard and export serve all.

The contract, for each trial an engine runs (Optuna, Ray Tune, keras-tuner):

* params: every search-space parameter with the spec's Optuna distribution;
* one intermediate value per epoch, at the global 1-based step (phase 2 continues phase 1);
* state: COMPLETE with the best epoch's objective value, PRUNED when stopped early (never
  COMPLETE with a truncated value), FAIL with the reason in the ``fail_reason`` user attribute;
* the user attributes of :func:`result_attributes`;
* for kept trials, the best epoch's model as an artifact, its id in ``checkpoint_artifact_id``.
"""

from __future__ import annotations

import math
import os
import platform
import socket
from typing import Any

from autofinetune.results import TrialResult
from autofinetune.storage import FAIL_REASON_ATTR


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


def record_result(study, trial_id: int, result: TrialResult, *, phase1_epochs: int) -> None:
    """Write a finished schedule's attributes onto its (still running) trial.

    Every engine calls this, whatever asked for the params, so the study database holds the
    same record for each.

    Args:
        study: The Optuna study holding the trial.
        trial_id: The storage's id of the trial (``trial._trial_id``), which must be RUNNING.
        result: What the schedule returned.
        phase1_epochs: The spec's phase-1 epochs (the phase boundary step).
    """
    for key, value in result_attributes(result, phase1_epochs=phase1_epochs).items():
        study._storage.set_trial_user_attr(trial_id, key, value)


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
    return f"{backend}: {name}"
