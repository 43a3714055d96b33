#!/usr/bin/env bash
# What a trial costs on a GPU, where the epochs themselves take little: runs, on the JAX backend,
#   1. benchmarks/trial_fixed_cost.py (ResNet50 at 32x32 on the digits folder: fixed cost outside
#      fit, models built anew and kept, pruned trials), and
#   2. `autofinetune launch` of studies/digits-demo.toml for N_TRIALS trials (default 12) into a
#      fresh SQLite file: the whole product path on the GPU (worker per GPU, feature cache, kept
#      models, pruning), then `autofinetune status --json`.
# Outputs go to $OUT (gpu_trial_fixed_cost.txt, gpu_launch.txt, gpu_launch_status.json) when it
# is set, else to the current folder. Needs the same .whl/ as gpu_check.sh (see its top); about
# 4 minutes on an H200.
#
#   bash benchmarks/gpu_trials.sh [more trial_fixed_cost.py options, e.g. --trials 6]
set -euo pipefail
cd "$(dirname "$0")/.."

source benchmarks/gpu_env.sh

out="${OUT:-$PWD}"
n_trials="${N_TRIALS:-12}"
# The command line, run from this checkout (no console script is installed here).
autofinetune=(python3 -c 'import sys; from autofinetune.cli import main; sys.argv[0] = "autofinetune"; sys.exit(main())')

timeout 240 python3 benchmarks/trial_fixed_cost.py --trials 3 "$@" | tee "$out/gpu_trial_fixed_cost.txt"

study_dir="$(mktemp -d)"
cp studies/digits-demo.toml "$study_dir/"
(
    cd "$study_dir"
    started=$(date +%s.%N)
    timeout 240 "${autofinetune[@]}" launch digits-demo.toml --n-trials "$n_trials" 2>&1 | tee "$out/gpu_launch.txt"
    echo "launch wall time: $(python3 -c "print(f'{$(date +%s.%N) - $started:.1f}')") s" | tee -a "$out/gpu_launch.txt"
    "${autofinetune[@]}" status digits-demo --json > "$out/gpu_launch_status.json"
)
