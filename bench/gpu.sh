#!/usr/bin/env bash
# SD-v1-shaped txt2img on a CUDA GPU: latency, images/s, MFU, with and without cuDNN attention (bench/gpu.py).
# Needs jax with CUDA in the active Python (e.g. pip install "jax[cuda12]==0.10.2" flax==0.12.8 plus this
# repo's requirements). Arguments are passed on, e.g.:
#   bash bench/gpu.sh --batches 1,8 --peak_tflops 989
#   bash bench/gpu.sh --tiny          # CPU smoke test
# Not yet run on a GPU (see bench/README.md).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
python="${PYTHON:-python}"
[[ -x "$root/.venv/bin/python" && -z "${PYTHON:-}" ]] && python="$root/.venv/bin/python"
cd "$root"
exec "$python" bench/gpu.py "$@"
