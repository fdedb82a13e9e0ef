#!/usr/bin/env bash
# The one command to run on a CUDA machine (bench/README.md, "GPU check"): installs the carried
# wheels (bench/gpu_wheels.sh fetched them), then checks every tensor path on CUDA against the
# CPU and times the 270M triple's merges (ours on cpu and cuda, mergekit-yaml --cuda), writing
# ${OUT:-bench/work}/gpu_check.json and its log.
set -uo pipefail
cd "$(dirname "$0")/.."
RESULTS="${OUT:-bench/work}"
mkdir -p "$RESULTS"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
MERGEKIT=()
if python3 -c "import mergekit" 2>/dev/null; then
  printf '#!/usr/bin/env bash\nexec python3 -m mergekit.scripts.run_yaml "$@"\n' > /tmp/mergekit-yaml
  chmod +x /tmp/mergekit-yaml
  MERGEKIT=(--mergekit /tmp/mergekit-yaml)
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee "$RESULTS/gpu_check.log"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
timeout "${GPU_CHECK_TIMEOUT:-540}" python3 bench/gpu_check.py --out "$RESULTS/gpu_check.json" --speed \
  --work /tmp/gpu-check "${MERGEKIT[@]}" "$@" 2>&1 | tee -a "$RESULTS/gpu_check.log"
exit "${PIPESTATUS[0]}"
