"""GPU memory on demand in a trial process, whatever the engine.

TensorFlow maps nearly all memory of every GPU it sees when it first touches them, and JAX
preallocates most of it; several trial processes sharing a card (``--trials-per-gpu``, Ray's
fractional GPUs) would then run out of memory. Call :func:`enable_memory_growth` before the first
model is built.
"""

from __future__ import annotations

import logging
import os

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
