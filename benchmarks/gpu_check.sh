#!/usr/bin/env bash
# The GPU check on a bare GPU machine: install the wheels carried in .whl/ (see benchmarks/README.md, "GPU
# check"), then run benchmarks/gpu_check.py with its figures in OUT/gpu_check.json.
#
#   bash benchmarks/gpu_check.sh OUT [DATA_DIR [GPU_CHECK.PY OPTIONS]]   # DATA_DIR: default .gpu_data
#
# PYTHON (default python3) is the interpreter and GPU_CHECK_WHEELS (default .whl) the wheels to install; the test
# suite runs `... OUT DATA --dry_run` with its own interpreter and no wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: benchmarks/gpu_check.sh OUT [DATA_DIR [OPTIONS]]}
data=${2:-.gpu_data}
shift $(($# < 2 ? $# : 2))
python=${PYTHON:-python3}
wheels=${GPU_CHECK_WHEELS:-.whl}  # the wheels made for the GPU machine (Python 3.12) by gpu_wheels.sh
if compgen -G "$wheels/*.whl" > /dev/null; then
  # the carried versions (transformers, datasets, medmnist, ...) first on the path, over the machine's own
  "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$wheels"/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
"$python" benchmarks/gpu_check.py --output_dir "$out" --data_dir "$data" "$@"
