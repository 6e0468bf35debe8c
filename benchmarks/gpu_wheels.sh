#!/usr/bin/env bash
# Download into .whl/ the wheels benchmarks/gpu_check.sh installs on the GPU machine (Python 3.12, torch 2.11,
# transformers 5.17, no datasets or medmnist, no network): the versions this package is developed and tested
# with, and what they need that the machine lacks. Run here, with PyPI reachable; .whl/ is not committed.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$p")
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${platforms[@]}" \
  -d .whl transformers==5.24.0 huggingface_hub==2.4.0 datasets==5.2.0 medmnist==3.0.2 \
  dill==0.4.0 multiprocess==0.70.18 httpx2==2.16.2 httpcore2==2.16.2 truststore click==8.5.1 "$@"
ls -la .whl
