"""Which GPUs this machine has, and which one each local worker process sees.

Worker processes of one machine must not share every card: TensorFlow maps nearly all memory of
each GPU it sees, so the first worker would hold them all. Each worker therefore gets its own
``CUDA_VISIBLE_DEVICES`` (one device), and memory growth is switched on in every worker that
sees a GPU, so several workers can share a card (``--trials-per-gpu``).

The GPUs are found without importing a framework where possible (that costs seconds):
``CUDA_VISIBLE_DEVICES`` when set, else ``nvidia-smi -L``, else the Keras backend's own device
list (only when an NVIDIA driver is present, so a CPU machine never pays for the import).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from autofinetune.errors import ConfigError

VISIBLE_DEVICES_ENV = "CUDA_VISIBLE_DEVICES"

#: Environment that makes the frameworks allocate GPU memory on demand instead of all at once.
MEMORY_GROWTH_ENV = {
    "TF_FORCE_GPU_ALLOW_GROWTH": "true",  # TensorFlow
    "XLA_PYTHON_CLIENT_PREALLOCATE": "false",  # JAX
}

_NVIDIA_SMI_LINE = re.compile(r"^GPU (\d+):")


@dataclass(frozen=True)
class GpuDiscovery:
    """The GPUs found, and how they were found (for messages).

    Attributes:
        ids: Device ids as ``CUDA_VISIBLE_DEVICES`` takes them (indices or ``GPU-<uuid>``).
        how: Where they came from: ``"CUDA_VISIBLE_DEVICES"``, ``"nvidia-smi -L"``, the
            backend's name, or ``"none found"``.
    """

    ids: tuple[str, ...]
    how: str


def _from_visible_devices(value: str) -> tuple[str, ...]:
    # "" or "-1" hides every GPU; CUDA stops at the first invalid entry, so "-1" ends the list.
    ids = []
    for part in value.split(","):
        part = part.strip()
        if not part or part.startswith("-"):
            break
        ids.append(part)
    return tuple(ids)


def _from_nvidia_smi(executable: str) -> tuple[str, ...] | None:
    try:
        listing = subprocess.run([executable, "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    if listing.returncode != 0:
        return None  # e.g. "NVIDIA-SMI has failed because it couldn't communicate with the driver"
    return tuple(match.group(1) for line in listing.stdout.splitlines() if (match := _NVIDIA_SMI_LINE.match(line.strip())))


def _from_backend() -> tuple[str, ...]:
    """GPU indices the Keras backend sees (imports the framework: only where a driver exists)."""
    backend = os.environ.get("KERAS_BACKEND", "tensorflow")
    try:
        if backend == "tensorflow":
            import tensorflow as tf

            count = len(tf.config.list_physical_devices("GPU"))
        elif backend == "jax":
            import jax

            count = len([d for d in jax.devices() if d.platform == "gpu"])
        elif backend == "torch":
            import torch

            count = torch.cuda.device_count()
        else:
            count = 0
    except Exception:  # no framework, or no usable driver: then there is no GPU to use
        count = 0
    return tuple(str(index) for index in range(count))


def discover_gpus() -> GpuDiscovery:
    """The GPUs worker processes of this machine may use.

    ``CUDA_VISIBLE_DEVICES`` when set (an empty value or ``-1`` means none), else the devices
    ``nvidia-smi -L`` lists, else the Keras backend's GPUs where an NVIDIA driver is loaded.
    """
    visible = os.environ.get(VISIBLE_DEVICES_ENV)
    if visible is not None:
        return GpuDiscovery(_from_visible_devices(visible), VISIBLE_DEVICES_ENV)
    executable = shutil.which("nvidia-smi")
    if executable is not None:
        found = _from_nvidia_smi(executable)
        if found is not None:
            return GpuDiscovery(found, "nvidia-smi -L")
    if sys.platform.startswith("linux") and Path("/proc/driver/nvidia").exists():
        return GpuDiscovery(_from_backend(), f"the {os.environ.get('KERAS_BACKEND', 'tensorflow')} backend")
    return GpuDiscovery((), "none found")


def parse_gpus(value: str | None, discovery: GpuDiscovery | None = None) -> tuple[str, ...]:
    """The GPUs that ``--gpus`` asks for.

    Args:
        value: ``None`` (the default: every GPU found, none on a CPU machine), ``"all"`` (every
            GPU found; an error when there is none), ``"none"`` (CPU workers), or device ids
            separated by commas (``"0,1"``), as ``nvidia-smi -L`` numbers them.
        discovery: The GPUs found (default: :func:`discover_gpus`).

    Raises:
        ConfigError: an id is malformed or repeated, is not among the GPUs found, or ``all``
            finds no GPU.
    """
    if value is not None and value.strip().lower() == "none":
        return ()
    found = discovery if discovery is not None else discover_gpus()
    if value is None:
        return found.ids
    if value.strip().lower() == "all":
        if not found.ids:
            raise ConfigError(
                f"--gpus all: no GPU found ({found.how}: CUDA_VISIBLE_DEVICES unset or empty, nvidia-smi "
                "missing or listing none); give device ids such as 0,1, or leave --gpus out to run on the CPU"
            )
        return found.ids
    ids = [part.strip() for part in value.split(",")]
    if not all(part.isdigit() or part.startswith(("GPU-", "MIG-")) for part in ids):
        raise ConfigError(
            f"--gpus: got {value!r}; allowed: all, none, or device ids separated by commas, e.g. 0,1,2,3"
        )
    if len(set(ids)) != len(ids):
        raise ConfigError(f"--gpus: got {value!r}; a device is listed twice (use --trials-per-gpu to share one)")
    unknown = [part for part in ids if part not in found.ids]
    if unknown:
        # A device nobody can see would run the worker elsewhere (or on the CPU) unnoticed.
        has = f"this machine has {', '.join(found.ids)}" if found.ids else "no GPU is visible here"
        raise ConfigError(
            f"--gpus: got {value!r}; device(s) {', '.join(unknown)} not found; {has} ({found.how}); "
            "give visible device ids, all, or none"
        )
    return tuple(ids)


def worker_environments(gpus: tuple[str, ...], *, workers: int | None = None,
                        trials_per_gpu: int | None = None) -> list[dict[str, str]]:
    """The extra environment of each local worker process.

    Without GPUs, ``workers`` processes (default 1) with no extra environment: the CPU path.
    With GPUs, ``trials_per_gpu`` workers (default 1) per GPU, each seeing only its device and
    growing its memory on demand; an explicit ``workers`` count instead spreads that many
    workers over the GPUs in turn.

    Raises:
        ConfigError: both ``workers`` and ``trials_per_gpu`` are given.
    """
    if workers is not None and trials_per_gpu is not None:
        raise ConfigError(
            f"--workers {workers} and --trials-per-gpu {trials_per_gpu}: give one of them; with GPUs the "
            "workers are --trials-per-gpu per GPU, without GPUs --workers"
        )
    if not gpus:
        return [{} for _ in range(workers or 1)]
    if workers is not None:
        assigned = [gpus[index % len(gpus)] for index in range(workers)]
    else:
        assigned = [gpu for gpu in gpus for _ in range(trials_per_gpu or 1)]
    return [{VISIBLE_DEVICES_ENV: gpu, **MEMORY_GROWTH_ENV} for gpu in assigned]


def describe_slots(environments: list[dict[str, str]]) -> str:
    """One line for the terminal: how many workers, on which devices."""
    devices = [env.get(VISIBLE_DEVICES_ENV, "") for env in environments]
    if not any(devices):
        return f"{len(devices)} worker(s) on the CPU"
    return f"{len(devices)} worker(s), GPU " + ", ".join(devices)
