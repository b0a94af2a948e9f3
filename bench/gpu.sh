#!/usr/bin/env bash
# txt2img on a CUDA GPU, SD v1 at 512 px and SDXL base at 1024 px: latency, images/s, MFU, with and without cuDNN
# attention (bench/gpu.py).
# Needs jax with CUDA in the active Python (e.g. pip install "jax[cuda12]==0.10.2" flax==0.12.8 plus this
# repo's requirements). Arguments are passed on, e.g.:
#   bash bench/gpu.sh --peak_tflops 989                     # both configs, their default batches
#   bash bench/gpu.sh --configs sdxl_base --batches 1,4
#   bash bench/gpu.sh --tiny          # CPU smoke test
# Not yet run on a GPU (see bench/README.md).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
python="${PYTHON:-python}"
[[ -x "$root/.venv/bin/python" && -z "${PYTHON:-}" ]] && python="$root/.venv/bin/python"
cd "$root"
exec "$python" bench/gpu.py "$@"
