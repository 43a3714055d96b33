"""What ``model.fit`` is fed: the arrays themselves, a tf.data pipeline or a PyDataset.

* ``numpy`` -- ``model.fit(x, y, batch_size=..., shuffle=True)``: the default. Keras slices
  the arrays itself (on TensorFlow through its own tf.data pipeline).
* ``tf_data`` -- :func:`autofinetune.trial.inputs_tf.array_dataset`: shuffled index batches,
  gathered in parallel and prefetched (``AUTOTUNE``), never copying the whole array into
  TensorFlow. TensorFlow only; it lives in its own module so this one stays backend-neutral.
* ``py_dataset`` -- :class:`ArrayBatches`, a ``keras.utils.PyDataset`` whose worker threads
  build the next batches while the accelerator runs the current step; every backend.
* ``auto`` -- ``tf_data`` on the TensorFlow backend, ``py_dataset`` on the others.

Every pipeline keeps the images uint8 until they reach the model (which casts and
preprocesses them on the device): a quarter of the bytes of float32 cross the bus.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping

import keras
import numpy as np


def resolve_pipeline(name: str, backend: str | None = None) -> str:
    """The concrete pipeline of a ``performance.input_pipeline`` value.

    Args:
        name: ``"numpy"``, ``"auto"``, ``"tf_data"`` or ``"py_dataset"``.
        backend: The Keras backend; defaults to the running one.

    Raises:
        ValueError: an unknown name; the message lists the allowed ones.
    """
    allowed = ("numpy", "auto", "tf_data", "py_dataset")
    if name not in allowed:
        raise ValueError(f"performance.input_pipeline: got {name!r}; allowed: {', '.join(allowed)}")
    if name != "auto":
        return name
    backend = backend or keras.backend.backend()
    return "tf_data" if backend == "tensorflow" else "py_dataset"


class ArrayBatches(keras.utils.PyDataset):
    """Batches of in-memory (or memory-mapped) arrays, built ahead by worker threads.

    With ``shuffle`` the sample order is drawn anew after every epoch from a seeded
    generator, so two runs with the same seed see the same batches. The last batch may be
    smaller, as with ``model.fit`` on arrays.

    Args:
        x: Images, ``(n, height, width, channels)``; any dtype, usually uint8.
        y: Targets with the same first dimension.
        batch_size: Samples per batch.
        shuffle: Draw a new sample order after each epoch.
        seed: Seed of the sample order.
        workers: Threads that build batches ahead (1 builds them on the training thread).
        max_queue_size: Batches kept ready at most.
    """

    def __init__(
        self,
        x: np.ndarray,
        y: np.ndarray,
        *,
        batch_size: int,
        shuffle: bool,
        seed: int = 0,
        workers: int = 4,
        max_queue_size: int = 8,
    ) -> None:
        # Threads, not processes: numpy's gather copies without holding the GIL for long,
        # and processes would pickle the whole array to each worker.
        super().__init__(workers=workers, use_multiprocessing=False, max_queue_size=max_queue_size)
        if len(x) != len(y):
            raise ValueError(f"x and y must have the same length, but got {len(x)} and {len(y)}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, but got {batch_size}")
        self._x = x
        self._y = y
        self._batch_size = int(batch_size)
        self._shuffle = shuffle
        self._rng = np.random.default_rng(seed)
        self._order = self._new_order()

    def _new_order(self) -> np.ndarray:
        n = len(self._x)
        return self._rng.permutation(n) if self._shuffle else np.arange(n)

    def __len__(self) -> int:
        return math.ceil(len(self._x) / self._batch_size)

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        if not 0 <= index < len(self):
            raise IndexError(f"batch index {index} out of range [0, {len(self)})")
        rows = self._order[index * self._batch_size : (index + 1) * self._batch_size]
        # Sorted rows read a memory-mapped array front to back; a batch's order is irrelevant.
        rows = np.sort(rows)
        return self._x[rows], self._y[rows]

    def on_epoch_end(self) -> None:
        # Keras stops the worker threads before calling this, so no batch mixes two orders.
        if self._shuffle:
            self._order = self._new_order()


@dataclass(frozen=True)
class FitInputs:
    """The data arguments of ``model.fit`` for one pipeline.

    Attributes:
        pipeline: The concrete pipeline (``numpy``, ``tf_data`` or ``py_dataset``).
        fit_kwargs: ``x`` (and ``y``, ``batch_size``, ``shuffle`` where the pipeline needs
            them) and ``validation_data``; pass them as ``model.fit(**inputs.fit_kwargs, ...)``.
    """

    pipeline: str
    fit_kwargs: Mapping[str, Any] = field(default_factory=dict)


def make_fit_inputs(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_val: np.ndarray | None,
    y_val: np.ndarray | None,
    *,
    batch_size: int,
    pipeline: str = "numpy",
    workers: int = 4,
    seed: int = 0,
) -> FitInputs:
    """Wrap training (and validation) arrays in the chosen input pipeline.

    Args:
        x_train: Training images.
        y_train: Training targets (e.g. one-hot float32).
        x_val: Validation images, or ``None`` for no validation.
        y_val: Validation targets, or ``None``.
        batch_size: Samples per batch.
        pipeline: ``"numpy"``, ``"auto"``, ``"tf_data"`` or ``"py_dataset"``.
        workers: Worker threads of ``py_dataset``.
        seed: Seed of the shuffled order (``tf_data`` and ``py_dataset``).

    Raises:
        ValueError: an unknown pipeline name.
    """
    pipeline = resolve_pipeline(pipeline)
    has_val = x_val is not None and y_val is not None
    if pipeline == "numpy":
        kwargs: dict[str, Any] = {"x": x_train, "y": y_train, "batch_size": batch_size, "shuffle": True}
        kwargs["validation_data"] = (x_val, y_val) if has_val else None
        return FitInputs("numpy", kwargs)
    if pipeline == "tf_data":
        from autofinetune.trial.inputs_tf import array_dataset

        train = array_dataset(x_train, y_train, batch_size=batch_size, shuffle=True, seed=seed)
        val = array_dataset(x_val, y_val, batch_size=batch_size, shuffle=False) if has_val else None
        # The dataset shuffles and batches itself: fit takes no batch_size, and shuffle=False
        # stops Keras from warning that it would ignore its default shuffle=True.
        return FitInputs("tf_data", {"x": train, "validation_data": val, "shuffle": False})
    train_batches = ArrayBatches(x_train, y_train, batch_size=batch_size, shuffle=True, seed=seed, workers=workers)
    val_batches = (
        ArrayBatches(x_val, y_val, batch_size=batch_size, shuffle=False, workers=workers) if has_val else None
    )
    # shuffle=False: fit would otherwise also permute the batch order with Python's random.
    return FitInputs("py_dataset", {"x": train_batches, "validation_data": val_batches, "shuffle": False})
