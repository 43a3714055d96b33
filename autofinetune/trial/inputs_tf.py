"""The TensorFlow input pipeline: tf.data over in-memory or memory-mapped arrays.

The one module that uses ``tf.data``; model and schedule code stay on the ``keras`` API.
Imported only when ``performance.input_pipeline`` resolves to ``tf_data``.
"""

from __future__ import annotations

import numpy as np


def array_dataset(x: np.ndarray, y: np.ndarray, *, batch_size: int, shuffle: bool, seed: int = 0):
    """A ``tf.data.Dataset`` of ``(x, y)`` batches, gathered in parallel and prefetched.

    Only row indices enter TensorFlow; each batch is gathered from the numpy arrays by a
    parallel map, so a large (or memory-mapped) array is never copied whole into a tensor,
    as ``Dataset.from_tensor_slices`` would. ``prefetch(AUTOTUNE)`` keeps batches ready
    while the accelerator runs the current step.

    Args:
        x: Images, ``(n, height, width, channels)``.
        y: Targets with the same first dimension.
        batch_size: Samples per batch (the last batch may be smaller).
        shuffle: Reshuffle the sample order every epoch.
        seed: Seed of the order.

    Raises:
        ValueError: ``x`` and ``y`` differ in length.
    """
    import tensorflow as tf

    if len(x) != len(y):
        raise ValueError(f"x and y must have the same length, but got {len(x)} and {len(y)}")
    n = len(x)
    indices = tf.data.Dataset.range(n)
    if shuffle:
        indices = indices.shuffle(n, seed=seed, reshuffle_each_iteration=True)
    batches = indices.batch(batch_size)

    def gather(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        rows = np.sort(rows)  # front-to-back reads of a memory-mapped array
        return x[rows], y[rows]

    def load(rows):
        xb, yb = tf.numpy_function(gather, [rows], (tf.as_dtype(x.dtype), tf.as_dtype(y.dtype)), stateful=False)
        xb.set_shape((None, *x.shape[1:]))
        yb.set_shape((None, *y.shape[1:]))
        return xb, yb

    # deterministic=True: parallel gathering must not reorder batches, so a seed gives one order.
    dataset = batches.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return dataset.prefetch(tf.data.AUTOTUNE)
