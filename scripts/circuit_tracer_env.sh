#!/usr/bin/env bash
# Make .venv-circuit-tracer: circuit-tracer 0.5.0 in an environment of its own.
#
# circuit-tracer pins transformers<=4.57.3 while mxd_lens needs transformers 5, so the
# two cannot share .venv. tests/export/test_circuit_tracer.py runs circuit-tracer's own
# loader in this environment (as a subprocess) on what `mxd-lens export --format
# circuit-tracer` wrote. Idempotent: a few milliseconds when nothing changed.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
ENV=.venv-circuit-tracer
# The CPU build on this kind of machine's package mirror (an unpinned torch would pull
# a multi-GB CUDA build), then circuit-tracer with the dependencies it declares.
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
CIRCUIT_TRACER_SPEC=${CIRCUIT_TRACER_SPEC:-circuit-tracer==0.5.0}
# circuit-tracer 0.5.0 asks for nnsight>=0.6.0, but its nnsight backend imports
# nnsight.intervention.tracing, which nnsight 0.8 no longer has: the last 0.6 release.
NNSIGHT_SPEC=${NNSIGHT_SPEC:-nnsight==0.6.3}

quiet_pip() {  # pip's own warnings about absent local mirrors are noise here
    "$ENV/bin/python" -m pip "$@" 2> >(grep -v "is ignored: it is neither" >&2)
}

stamp="$ENV/.mxd-lens-setup"
want="$(printf '%s\n%s\n%s\n' "$TORCH_SPEC" "$CIRCUIT_TRACER_SPEC" "$NNSIGHT_SPEC" | cat - scripts/circuit_tracer_env.sh | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then
    exit 0
fi
echo "circuit_tracer_env: installing $TORCH_SPEC, $CIRCUIT_TRACER_SPEC and $NNSIGHT_SPEC into $ENV"
[ -x "$ENV/bin/python" ] || "$PYTHON" -m venv "$ENV"
echo '*' > "$ENV/.gitignore"  # the environment is a build output, never committed
quiet_pip install -q --upgrade pip
quiet_pip install -q "$TORCH_SPEC"
quiet_pip install -q "$TORCH_SPEC" "$CIRCUIT_TRACER_SPEC" "$NNSIGHT_SPEC"
"$ENV/bin/python" -c "import circuit_tracer.transcoder, circuit_tracer.utils.hf_utils, circuit_tracer.replacement_model.replacement_model_nnsight"
echo "$want" > "$stamp"
