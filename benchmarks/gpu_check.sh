#!/usr/bin/env bash
# The prepared GPU check: one command, within 5 minutes on the lent GPU machine (H200).
#
#   bash benchmarks/gpu_wheels.sh                 # here, once: wheels into .gpu_wheels/ (~28 MB)
#   device run, carry [".gpu_wheels"]:  bash benchmarks/gpu_check.sh
#   bash benchmarks/gpu_check.sh --cpu-smoke      # anywhere: every step at tiny sizes on CPU
#
# The GPU machine reaches no network and has Python 3.12 with its own torch (CUDA), but no
# TransformerLens or SAE-Lens: the carried wheels are installed with --no-deps into a folder
# put first on PYTHONPATH, on top of the machine's own packages. (Not a venv with
# --system-site-packages: the machine's python3 is itself a venv, /opt/torch/.venv, whose
# packages a nested venv would not see.) mxd_lens runs from this checkout (PYTHONPATH).
# Prints the CUDA tests' result, the matmul rates, collection and training throughput as
# fractions of them, and the NCCL note (benchmarks/gpu_check.py).
set -uo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 OMP_WAIT_POLICY=PASSIVE
MODE=()
[[ "${1:-}" == "--cpu-smoke" ]] && MODE=(--cpu-smoke)

PY=python3
if [[ ${#MODE[@]} -gt 0 && -x .venv/bin/python ]]; then
  PY=.venv/bin/python  # the CPU smoke test uses the project's environment where there is one
fi
SITE=${MXD_GPU_SITE:-/tmp/mxd-gpu-site}
if ! "$PY" -c "import transformer_lens, sae_lens" 2>/dev/null; then
  if ! ls .gpu_wheels/*.whl >/dev/null 2>&1; then
    echo "gpu_check: TransformerLens/SAE-Lens are not importable and .gpu_wheels/ is empty;" \
         "run 'bash benchmarks/gpu_wheels.sh' here and carry .gpu_wheels" >&2
    exit 2
  fi
  start=$(date +%s)
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
    .gpu_wheels/*.whl || { echo "gpu_check: installing the wheels failed" >&2; exit 2; }
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
  echo "installed $(ls .gpu_wheels/*.whl | wc -l) wheels into $SITE in $(( $(date +%s) - start )) s"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$PY" -c "import pyarrow, huggingface_hub, transformers, numpy; print('pyarrow', pyarrow.__version__, '| huggingface_hub', huggingface_hub.__version__, '| transformers', transformers.__version__, '| numpy', numpy.__version__)"
# A hard stop inside the 5 minutes: the output is unbuffered, so whatever ran is printed.
exec timeout "${MXD_GPU_CHECK_LIMIT_S:-270}" "$PY" benchmarks/gpu_check.py "${MODE[@]}"
