#!/usr/bin/env bash
# The benchmark on a GPU machine, in under 10 minutes; results are named after the card
# (benchmarks/results/<card>.json and .md, e.g. nvidia-h100-80gb-hbm3.md).
#
#   bash benchmarks/gpu.sh            # needs a CUDA jaxlib: pip install -e . "jax[cuda12]"
#
# Runs every section except the PyTorch peers (a CPU torch against a GPU JAX says nothing),
# at the full sizes (10k/100k/1M-parameter HVPs, 2k/8k dense Hessians, 1M-parameter Lanczos),
# then the scaling study's matrix-free AIC check and order-6 Taylor onset at 10M and 30M
# parameters (float64; the exact Fisher trace one example at a time, ~8 GB of Jacobian at 30M).
# Each section is written as soon as it finishes, so a run cut off by the time limit keeps what
# it measured.
set -euo pipefail
cd "$(dirname "$0")/.."
python - <<'PY'
import jax
backend = jax.default_backend()
if backend != "gpu":
    raise SystemExit(f"JAX sees no GPU (backend {backend!r}); install a CUDA jaxlib first")
print("devices:", jax.devices())
PY
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # report real peaks, leave room for eigh workspaces
timeout "${QUARTIC_BENCH_TIMEOUT:-290}" \
  python benchmarks/run.py --only hvp,dense,lanczos,aic,sweep "$@"
QUARTIC_SCALING_SIZES="${QUARTIC_SCALING_SIZES:-10m,30m}" timeout "${QUARTIC_SCALING_TIMEOUT:-280}" \
  python benchmarks/run.py --only scaling "$@"
