"""Benchmark: what running TensorFlow's ops one at a time costs a CPU trial.

With its oneDNN kernels on, TensorFlow 2.21 corrupts the heap when two convolution gradients run
at once, so a trial process on a CPU runs one op at a time
(:func:`autofinetune.trial.devices.onednn_kernels_race_here`); each op still runs on every core.
This trains ResNet50 with every block unfrozen (the convolution gradients of phase 2) on random
images at each size, in a fresh process per run, both ways in turn:

* ``every core``: TensorFlow's default, as many inter-op threads as cores;
* ``one op at a time``: one inter-op thread (``TF_NUM_INTEROP_THREADS=1``), what trials use.

Each run times its second and third epochs (the first traces the step) and prints images per
second; the table shows each way's median and their ratio.

    python benchmarks/cpu_op_threads.py                    # 32 and 64 pixels, 3 runs each way
    python benchmarks/cpu_op_threads.py --sizes 32 --runs 5
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

#: The two ways compared: name -> the environment a run adds.
WAYS = {"every core": {}, "one op at a time": {"TF_NUM_INTEROP_THREADS": "1"}}
IMAGES = 256
BATCH_SIZE = 32


def train_and_time(size: int) -> float:
    """Images per second of ResNet50's every block at ``size`` pixels, after one tracing epoch."""
    import keras
    import numpy as np

    backbone = keras.applications.ResNet50(include_top=False, weights=None, input_shape=(size, size, 3), pooling="avg")
    model = keras.Sequential([backbone, keras.layers.Dense(10, activation="softmax")])
    model.compile(optimizer=keras.optimizers.SGD(1e-3, momentum=0.9), loss="sparse_categorical_crossentropy")
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (IMAGES, size, size, 3)).astype("float32")
    y = rng.integers(0, 10, IMAGES)
    model.fit(x, y, batch_size=BATCH_SIZE, epochs=1, verbose=0)
    start = time.perf_counter()
    model.fit(x, y, batch_size=BATCH_SIZE, epochs=2, verbose=0)
    return 2 * IMAGES / (time.perf_counter() - start)


def run_once(way: str, size: int) -> float:
    """One fresh process's images per second, trained ``way``."""
    env = {name: value for name, value in os.environ.items() if name != "TF_NUM_INTEROP_THREADS"}
    env.update(TF_CPP_MIN_LOG_LEVEL="2", TF_ENABLE_ONEDNN_OPTS="1", **WAYS[way])
    out = subprocess.run([sys.executable, __file__, "--child", str(size)], env=env, capture_output=True, text=True,
                         check=True)
    return float(json.loads(out.stdout.strip().splitlines()[-1])["images_per_second"])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 64], help="image sizes in pixels")
    parser.add_argument("--runs", type=int, default=3, help="fresh processes per way and size")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps({"images_per_second": train_and_time(args.child)}))
        return
    print(f"ResNet50, every block trained, {IMAGES} random images in batches of {BATCH_SIZE}, {os.cpu_count()} cores;")
    print("images/s of epochs 2-3, median of the runs (each way in turn, a fresh process each run)\n")
    print(f"{'size':>5}  {'every core':>11}  {'one op at a time':>16}  {'one op / every core':>19}")
    for size in args.sizes:
        speeds: dict[str, list[float]] = {way: [] for way in WAYS}
        for _ in range(args.runs):
            for way in WAYS:
                speeds[way].append(run_once(way, size))
        every, one = (statistics.median(speeds[way]) for way in WAYS)
        print(f"{size:>5}  {every:>11.1f}  {one:>16.1f}  {one / every:>19.3f}", flush=True)
        print(f"       runs: {', '.join(f'{way}: ' + ' '.join(f'{v:.1f}' for v in speeds[way]) for way in WAYS)}")


if __name__ == "__main__":
    main()
