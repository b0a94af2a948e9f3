#!/usr/bin/env bash
# Build the comparison venv .venv-ref (diffusers 0.39 Flax + transformers 4.57.6 Flax) used by
# bench/bench_pipeline.py and bench/reference_flax.py. A few minutes, ~2 GB. Never run in CI.
#   bash bench/make_reference_venv.sh            # -> /work/main/.venv-ref (repo root/.venv-ref)
#   VENV_REF=/path bash bench/make_reference_venv.sh
set -euo pipefail
if [[ "${CI:-}" == "true" ]]; then
  echo "make_reference_venv.sh: refusing to run in CI (CI=true)" >&2
  exit 1
fi
here="$(cd "$(dirname "$0")" && pwd)"
root="$(dirname "$here")"
venv="${VENV_REF:-$root/.venv-ref}"
python="${PYTHON:-python3}"
"$python" -c 'import sys; assert sys.version_info[:2] == (3, 11), "need Python 3.11 (jax 0.10.2)"'
"$python" -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --upgrade pip
"$venv/bin/python" -m pip install -r "$here/requirements-reference.txt"
"$venv/bin/python" -m pip check
"$venv/bin/python" - <<'PY'
import diffusers, transformers, jax, flax, torch
from diffusers import FlaxUNet2DConditionModel, FlaxAutoencoderKL, FlaxDDIMScheduler  # noqa: F401
from transformers import FlaxCLIPTextModel  # noqa: F401
print("reference venv ok:", "diffusers", diffusers.__version__, "transformers", transformers.__version__,
      "jax", jax.__version__, "flax", flax.__version__, "torch", torch.__version__)
PY
