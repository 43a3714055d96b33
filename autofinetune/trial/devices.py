"""The devices of a trial process: readied once, whatever the engine, and which device it is.

Every process that trains calls :func:`prepare_devices` before the backend touches a device:

* TensorFlow maps nearly all memory of every GPU it sees when it first touches them, and JAX
  preallocates most of it; several trial processes sharing a card (``--trials-per-gpu``, Ray's
  fractional GPUs) would then run out of memory (:func:`enable_memory_growth`).
* TensorFlow 2.21's oneDNN convolution kernels corrupt the heap when two run at once on the
  CPU: the process aborts ("double free or corruption") a few trials in
  (:func:`onednn_kernels_race_here`).
"""

from __future__ import annotations

import logging
import math
import os
import platform

logger = logging.getLogger(__name__)


def prepare_devices(cpus: float | None = None) -> None:
    """Ready this process's devices for training; call it before the backend touches one.

    On TensorFlow, ops run one at a time where :func:`onednn_kernels_race_here`, else on the
    trial's CPUs; a count of ops at once already set in this process (the user's, or an
    earlier call's) is kept.

    Args:
        cpus: The CPUs this process's trials may use (a Ray trial's share); TensorFlow then
            runs each op on that many threads instead of one per core of the machine.
    """
    enable_memory_growth()
    import keras

    if keras.backend.backend() != "tensorflow":
        return
    import tensorflow as tf

    threads = int(math.ceil(cpus)) if cpus is not None and cpus >= 1 else None
    if tf.config.threading.get_inter_op_parallelism_threads():  # the user's, or an earlier call's
        ops_at_once = None
    else:
        ops_at_once = 1 if onednn_kernels_race_here() else threads
    try:
        if threads is not None:
            tf.config.threading.set_intra_op_parallelism_threads(threads)
        if ops_at_once is not None:
            tf.config.threading.set_inter_op_parallelism_threads(ops_at_once)
    except RuntimeError:  # TensorFlow has initialized its runtime already; keep what is there
        logger.debug("TensorFlow's thread counts not set: its runtime is initialized already")


def onednn_kernels_race_here() -> bool:
    """Whether TensorFlow must run its ops one at a time here: on the CPU, with oneDNN kernels.

    With TensorFlow 2.21's oneDNN kernels, two convolution gradients running at once (one per
    inter-op thread) corrupt the heap: both threads abort in the gradient primitive's destructor
    ("double free or corruption"), or the process segfaults, in about one launch in three of a
    few small trials on two cores. One inter-op thread removes the race; each op keeps its
    intra-op threads, so a convolution network on a CPU loses little
    (``docs/benchmarks/cpu_op_threads.md``). Not where the user chose how many ops run at once
    (``TF_NUM_INTEROP_THREADS``; a count set in this process, :func:`prepare_devices` keeps), where
    a GPU runs the model, or where oneDNN is off (``TF_ENABLE_ONEDNN_OPTS=0``, or a CPU that
    TensorFlow does not turn it on for).
    """
    import tensorflow as tf
    from tensorflow.python.util import _pywrap_util_port

    if os.environ.get("TF_NUM_INTEROP_THREADS"):
        return False
    return not tf.config.list_physical_devices("GPU") and bool(_pywrap_util_port.IsMklEnabled())


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
