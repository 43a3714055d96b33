# Sourced by the GPU scripts (gpu_check.sh, gpu_trials.sh) from the repository root: installs
# the wheels carried in .whl/ into /tmp/site (see the top of gpu_check.sh for how to download
# them), puts them and this checkout on PYTHONPATH, selects the JAX backend and prints the
# device and versions.

if ! ls .whl/*.whl >/dev/null 2>&1; then
    echo "error: no wheels in .whl/; download them as the top of benchmarks/gpu_check.sh shows" >&2
    exit 2
fi
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
# ml_dtypes is bound to numpy's ABI: where the machine's JAX brought one, keep that one
# rather than shadow it with the carried copy (which needs numpy >= 2).
if python3 -c "import ml_dtypes" 2>/dev/null; then
    rm -rf /tmp/site/ml_dtypes /tmp/site/ml_dtypes-*.dist-info
fi
export PYTHONPATH=/tmp/site:$PWD
export KERAS_BACKEND=jax

command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -c "import sys, jax, keras; print('python', sys.version.split()[0], '| jax', jax.__version__, jax.devices(), '| keras', keras.__version__, keras.backend.backend())"
