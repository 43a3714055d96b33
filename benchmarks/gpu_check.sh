#!/usr/bin/env bash
# GPU throughput check for a machine with JAX + CUDA (Python 3.12), no TensorFlow and no network.
#
# It installs the wheels carried in .whl/ into /tmp/site, runs benchmarks/gpu_throughput.py on
# the JAX backend at 224x224 (about 2 minutes on an H200, 6 at most), and writes the table to
# $OUT/gpu_throughput.txt when $OUT is set. autofinetune itself is imported from this working
# tree through PYTHONPATH, so it needs no wheel.
#
# Prepare the wheels on a machine that reaches PyPI, from the repository root (.whl/ is
# git-ignored; about 36 MiB). numpy and scipy are not carried: JAX brings its own. Versions
# are the ones the test suite runs with.
#
#   rm -rf .whl && mkdir .whl
#   # compiled wheels for CPython 3.12 on x86_64 Linux
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#       -d .whl sqlalchemy==2.1.9 pydantic_core==2.46.4 scikit-learn==1.9.1 pillow==13.0.0 \
#       optree==0.20.0 ml_dtypes==0.6.0 h5py==3.14.0 greenlet==3.5.6 MarkupSafe==3.0.3 PyYAML==6.0.3
#   # pure-Python wheels
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation py \
#       --platform any -d .whl keras==3.15.1 optuna==5.0.0 pydantic==2.13.4 annotated-types==0.7.0 \
#       typing_extensions==4.15.0 typing-inspection==0.4.2 click==8.4.0 tqdm==4.70.1 joblib==1.6.0 \
#       threadpoolctl==3.8.0 narwhals==2.29.0 cloudpickle==3.1.3 namex==0.1.0 rich==15.0.0 \
#       markdown-it-py==4.3.0 mdurl==0.1.2 pygments==2.20.0 absl-py==2.5.1 packaging==26.2 \
#       alembic==1.20.1 Mako==1.4.3 colorlog==6.12.0
#
# Who needs what: keras (absl-py, h5py, ml_dtypes, namex, optree, packaging, rich ->
# markdown-it-py -> mdurl, pygments); optuna (alembic -> Mako -> MarkupSafe, sqlalchemy
# [greenlet], colorlog, PyYAML, tqdm); pydantic (pydantic_core, annotated-types,
# typing-inspection, typing_extensions); click; pillow (decoding the image folder);
# scikit-learn (joblib -> cloudpickle, narwhals, threadpoolctl) for load_data's stratified
# split, so the folder rows run the same code as a user's trial.
#
# Then, on the GPU machine, from the repository root (with .whl/ carried along):
#   bash benchmarks/gpu_check.sh [more gpu_throughput.py options, which override the ones below]
set -euo pipefail
cd "$(dirname "$0")/.."

source benchmarks/gpu_env.sh

out_args=()
if [[ -n "${OUT:-}" ]]; then
    out_args=(--out "$OUT/gpu_throughput.txt")
fi
# --max-seconds stops starting rows after 4.5 minutes (the rest are listed as skipped; the
# last precision listed loses rows first); timeout is the hard stop. The table file is
# rewritten after every row, so a stopped run keeps what it measured.
timeout 330 python3 benchmarks/gpu_throughput.py \
    --batch-size 256 --warmup 2 --steps 15 \
    --phases 1,2:3,2:16 --precisions off,mixed_bfloat16,mixed_float16 \
    --pipelines numpy,auto --sources memory,folder \
    --max-seconds 270 "${out_args[@]}" "$@"
