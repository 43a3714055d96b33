#!/usr/bin/env bash
# Pretrain the search benchmarks' stand-in backbone on a GPU (JAX backend): what
# benchmarks/pretrain_backbone.py does on a CPU in an hour, with many more images and
# updates in a few minutes. Renders the glyphs (matplotlib's fonts; about a minute), trains
# ResNet50 at 32x32 for MINUTES (default 4.5) in batches of 256, prints the held-back accuracy on
# the glyphs and packs the weights as float16 parts of at most 15 MB into $OUT (or ./pretrained)
# with benchmarks/weights_parts.py (and their SHA256SUMS), since a GPU machine may hand back only
# small files. Needs the same .whl/ as gpu_check.sh (see its top); matplotlib comes with the machine.
#
#   bash benchmarks/gpu_pretrain.sh
# then, to make them the benchmarks' stand-in on every machine (the parts in DIR), replace the
# committed ones and commit: every later search_quality.py run unpacks them, checked by hash.
#   rm -r benchmarks/pretrained/resnet50_glyphs_32 && cp -r DIR benchmarks/pretrained/resnet50_glyphs_32
set -euo pipefail
cd "$(dirname "$0")/.."

source benchmarks/gpu_env.sh

out="${OUT:-$PWD/pretrained}"
mkdir -p "$out"
cache="$(mktemp -d)"
export PYTHONUNBUFFERED=1
python3 benchmarks/pretrain_backbone.py --minutes "${MINUTES:-4.5}" --images "${IMAGES:-160000}" \
    --batch-size 256 --learning-rate 1e-3 --cache-dir "$cache" "$@" 2>&1 | tee "$out/gpu_pretrain.txt"
python3 benchmarks/weights_parts.py pack "$cache/resnet50_glyphs_32.weights.h5" "$out" 2>&1 | tee -a "$out/gpu_pretrain.txt"
