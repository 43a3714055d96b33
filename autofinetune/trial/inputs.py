"""What ``model.fit`` is fed: the arrays themselves, a tf.data pipeline or a PyDataset.

* ``numpy`` -- :class:`EpochBatches`: the default, and the path every trial takes unless its
  spec says otherwise. Batches of the arrays in the schedule's own seeded order per epoch
  (:func:`epoch_order`), built on the training thread; the same batches with and without the
  feature cache, and in a phase that continues the epoch count.
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


def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    """The order training examples are visited in during ``epoch`` (0-based, global).

    The schedule shuffles by itself instead of through ``fit(shuffle=True)``: the backend RNG's
    order depends on what else drew from it, and the cached and uncached runs of a trial must
    see the very same batches.
    """
    return np.random.default_rng([seed, epoch]).permutation(n)


class EpochBatches(keras.utils.PyDataset):
    """Batches of ``(x, y)``: training ones in a seeded order per epoch, or in order.

    A training dataset is endless (``fit`` gets ``steps_per_epoch``): batch ``i`` belongs to
    epoch ``first_epoch + i // batches_per_epoch``, so the order does not depend on when
    Keras asks for a batch (it prefetches across epoch boundaries).

    Args:
        x: Images or cached features, ``(n, ...)``; float16 features are served as float32.
        y: Targets with the same first dimension.
        batch_size: Samples per batch; the last batch of an epoch may be smaller.
        seed: Seed of the per-epoch order; ``None`` serves the rows in order, once per epoch
            (validation data).
        first_epoch: The global epoch of the first batch (a phase's ``initial_epoch``).
    """

    def __init__(self, x, y, *, batch_size: int, seed: int | None, first_epoch: int = 0) -> None:
        super().__init__()
        self.x, self.y = x, y
        self.batch_size = batch_size
        self.seed = seed
        self.first_epoch = first_epoch
        self.per_epoch = max(1, math.ceil(len(y) / batch_size))
        self._orders: dict[int, np.ndarray] = {}

    @property
    def num_batches(self) -> int | None:
        return None if self.seed is not None else self.per_epoch

    def __len__(self) -> int:
        return self.per_epoch

    def __getitem__(self, index: int):
        epoch, batch = divmod(int(index), self.per_epoch)
        start = batch * self.batch_size
        if self.seed is None:
            rows = np.arange(start, min(start + self.batch_size, len(self.y)))
        else:
            epoch += self.first_epoch
            if epoch not in self._orders:
                self._orders = {epoch: epoch_order(self.seed, epoch, len(self.y))}
            rows = self._orders[epoch][start : start + self.batch_size]
        x = self.x[rows]
        if x.dtype == np.float16:  # float16 cache: the model computes in float32
            x = x.astype(np.float32)
        return x, self.y[rows]


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
    first_epoch: int = 0,
) -> FitInputs:
    """Wrap training (and validation) arrays in the chosen input pipeline.

    The schedule feeds every phase of every trial through this function, and
    ``benchmarks/gpu_throughput.py`` measures the same calls.

    Args:
        x_train: Training images (or cached features).
        y_train: Training targets (e.g. one-hot float32).
        x_val: Validation images, or ``None`` for no validation.
        y_val: Validation targets, or ``None``.
        batch_size: Samples per batch.
        pipeline: ``"numpy"``, ``"auto"``, ``"tf_data"`` or ``"py_dataset"``.
        workers: Worker threads of ``py_dataset``.
        seed: Seed of the training order.
        first_epoch: The global epoch the fit starts at (its ``initial_epoch``): ``numpy``
            continues the per-epoch orders from there, the others seed with
            ``seed + first_epoch``.

    Raises:
        ValueError: an unknown pipeline name.
    """
    pipeline = resolve_pipeline(pipeline)
    validation = (x_val, y_val) if x_val is not None and y_val is not None else None
    if pipeline == "numpy":
        train = EpochBatches(x_train, y_train, batch_size=batch_size, seed=seed, first_epoch=first_epoch)
        val = EpochBatches(*validation, batch_size=batch_size, seed=None) if validation else None
        # shuffle=False: the batches come in the schedule's own seeded order.
        return FitInputs(
            "numpy", {"x": train, "steps_per_epoch": train.per_epoch, "validation_data": val, "shuffle": False}
        )
    seed += first_epoch
    if pipeline == "tf_data":
        from autofinetune.trial.inputs_tf import array_dataset

        train = array_dataset(x_train, y_train, batch_size=batch_size, shuffle=True, seed=seed)
        val = array_dataset(*validation, batch_size=batch_size, shuffle=False) if validation else None
        # The dataset shuffles and batches itself: fit takes no batch_size, and shuffle=False
        # stops Keras from warning that it would ignore its default shuffle=True.
        return FitInputs("tf_data", {"x": train, "validation_data": val, "shuffle": False})
    train_batches = ArrayBatches(x_train, y_train, batch_size=batch_size, shuffle=True, seed=seed, workers=workers)
    val_batches = (
        ArrayBatches(*validation, batch_size=batch_size, shuffle=False, workers=workers) if validation else None
    )
    # shuffle=False: fit would otherwise also permute the batch order with Python's random.
    return FitInputs("py_dataset", {"x": train_batches, "validation_data": val_batches, "shuffle": False})
