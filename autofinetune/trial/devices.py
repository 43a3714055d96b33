"""The devices of a trial process: GPU memory on demand, whatever the engine, and which device it is.

TensorFlow maps nearly all memory of every GPU it sees when it first touches them, and JAX
preallocates most of it; several trial processes sharing a card (``--trials-per-gpu``, Ray's
fractional GPUs) would then run out of memory. Call :func:`enable_memory_growth` before the first
model is built.
"""

from __future__ import annotations

import logging
import os
import platform

logger = logging.getLogger(__name__)


def enable_memory_growth() -> int:
    """Let every visible GPU's memory grow on demand in this process.

    TensorFlow: ``set_memory_growth`` on each physical GPU (too late once TensorFlow has used
    them; then what is there is kept). JAX: no preallocation, effective while JAX has not yet
    started its GPU client. PyTorch allocates on demand already.

    Returns:
        How many GPUs TensorFlow was told to grow memory on (0 on other backends and CPUs).
    """
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    import keras

    if keras.backend.backend() != "tensorflow":
        return 0
    import tensorflow as tf

    grown = 0
    for gpu in tf.config.list_physical_devices("GPU"):
        try:
            tf.config.experimental.set_memory_growth(gpu, True)
            grown += 1
        except RuntimeError:  # devices already initialized in this process; keep what is there
            logger.debug("memory growth not set on %s: TensorFlow has initialized it already", gpu.name)
    return grown


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
