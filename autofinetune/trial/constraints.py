"""The measures a study's constraints limit, taken on a trial's classifier where it trained.

``params`` counts the classifier's weights; ``size_mb`` saves it as a ``.keras`` file (what
``export`` writes) and takes the file's size; ``latency_ms`` is a fixed small benchmark on the
machine that ran the trial: one image at a time, the median of :data:`LATENCY_RUNS` calls after
:data:`LATENCY_WARMUP` that are not counted. Only the measures a study constrains are taken.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

#: Calls of the single-image benchmark that are timed, and those run first and not timed.
LATENCY_RUNS = 20
LATENCY_WARMUP = 3


def measure_model(model: Any, measures: Sequence[str]) -> dict[str, float]:
    """Each of ``measures`` (names of :data:`autofinetune.spec.constraints.MEASURES`) of ``model``.

    Args:
        model: A classifier of raw 0..255 RGB images (its input is ``(size, size, 3)``).
        measures: Which to take.
    """
    found: dict[str, float] = {}
    if "params" in measures:
        found["params"] = float(model.count_params())
    if "size_mb" in measures:
        with tempfile.TemporaryDirectory(prefix="autofinetune-size-") as folder:
            path = Path(folder) / "model.keras"
            model.save(path)
            found["size_mb"] = round(path.stat().st_size / 1e6, 3)
    if "latency_ms" in measures:
        found["latency_ms"] = round(_latency_ms(model), 3)
    return found


def _latency_ms(model: Any) -> float:
    size = int(model.input_shape[1])
    image = np.random.default_rng(0).uniform(0, 255, (1, size, size, 3)).astype("float32")
    timings = []
    for run in range(LATENCY_WARMUP + LATENCY_RUNS):
        started = time.perf_counter()
        np.asarray(model(image, training=False))  # as a served model: one image, inference mode
        if run >= LATENCY_WARMUP:
            timings.append((time.perf_counter() - started) * 1000.0)
    return statistics.median(timings)
