"""A trial process's devices: TensorFlow's thread counts as prepare_devices leaves them.

Each case runs in a fresh process, since TensorFlow reads its thread counts once, when its
runtime starts; then trains a convolution there, so the counts are the ones it really ran with.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import cli_env

CHILD = """
import json, sys
import numpy as np
from autofinetune.trial.devices import prepare_devices

prepare_devices(json.loads(sys.argv[1]))
import keras
import tensorflow as tf

model = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Conv2D(4, 3), keras.layers.GlobalAveragePooling2D()])
model.compile(optimizer="sgd", loss="mse")
model.fit(np.zeros((4, 8, 8, 3), "float32"), np.zeros((4, 4), "float32"), verbose=0)
print(json.dumps({"ops_at_once": tf.config.threading.get_inter_op_parallelism_threads(),
                  "threads_per_op": tf.config.threading.get_intra_op_parallelism_threads()}))
"""


@pytest.mark.parametrize(("environment", "cpus", "expected"), [
    # oneDNN on, on the CPU: one op at a time, each on every core (0: TensorFlow's default).
    ({"TF_ENABLE_ONEDNN_OPTS": "1"}, None, {"ops_at_once": 1, "threads_per_op": 0}),
    # A Ray trial's 2 CPUs: 2 threads per op, still one op at a time.
    ({"TF_ENABLE_ONEDNN_OPTS": "1"}, 2, {"ops_at_once": 1, "threads_per_op": 2}),
    # oneDNN off: no race, TensorFlow's defaults or the trial's CPUs.
    ({"TF_ENABLE_ONEDNN_OPTS": "0"}, None, {"ops_at_once": 0, "threads_per_op": 0}),
    ({"TF_ENABLE_ONEDNN_OPTS": "0"}, 2, {"ops_at_once": 2, "threads_per_op": 2}),
    # The user chose how many ops run at once: left to TensorFlow, which reads the variable.
    ({"TF_ENABLE_ONEDNN_OPTS": "1", "TF_NUM_INTEROP_THREADS": "2"}, None, {"ops_at_once": 0, "threads_per_op": 0}),
], ids=["onednn", "onednn-ray-trial", "no-onednn", "no-onednn-ray-trial", "user-choice"])
def test_tensorflow_runs_one_cpu_op_at_a_time_where_its_onednn_kernels_would_race(environment, cpus, expected):
    env = {name: value for name, value in cli_env().items() if name not in ("TF_NUM_INTEROP_THREADS", "CUDA_VISIBLE_DEVICES")}
    env.update(environment, CUDA_VISIBLE_DEVICES="", KERAS_BACKEND="tensorflow")
    out = subprocess.run([sys.executable, "-c", CHILD, json.dumps(cpus)], env=env, capture_output=True, text=True,
                         timeout=300, cwd=os.path.dirname(__file__))
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == expected
