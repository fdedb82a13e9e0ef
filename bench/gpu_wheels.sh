#!/usr/bin/env bash
# Fetch, on a machine with PyPI, the wheels the GPU machine's image lacks (Python 3.12, x86-64):
# the engine's pydantic and duckdb, and mergekit 0.1.5 with the dependencies that image does not
# have, into .whl/ at the repository root (git-ignored through .git/info/exclude).
# Then run bench/gpu_check.sh there with .whl carried along.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any -d .whl \
  'pydantic>=2.7,<3' 'pydantic-core' annotated-types typing-inspection typing-extensions 'duckdb>=1.1' \
  mergekit==0.1.5 immutables datasets dill multiprocess
du -sh .whl
