#!/usr/bin/env bash
# Download, here (where PyPI is reachable), the wheels that benchmarks/gpu_check.sh installs on
# the lent GPU machine, which reaches no network. That machine has Python 3.12 with its own
# torch 2.11 (CUDA 13), transformers 5.x, numpy, pyarrow, safetensors, jaxtyping, einops, tqdm,
# pytest ... (.library/device/KINDS.md lists them), but no TransformerLens or SAE-Lens. So this
# fetches exactly what importing mxd_lens's training path needs beyond that list (measured:
# the distributions behind every module `import mxd_lens.training.trainer` and
# `from mxd_lens import MxD` load, minus the machine's packages), WITHOUT torch, at the
# versions this project's .venv runs, for CPython 3.12 on x86-64 manylinux. Declared
# requirements that nothing on that path imports are left out on purpose (checked against the
# wheels' METADATA): SAE-Lens's babe, nltk, plotly, plotly-express, python-dotenv, tenacity;
# TransformerLens's transformers-stream-generator; wandb's cwevals. They install with --no-deps.
#
#   bash benchmarks/gpu_wheels.sh            # -> .gpu_wheels/ (git-ignored), prints its size
#
# Then name `.gpu_wheels` in the device tool's `carry` and run `bash benchmarks/gpu_check.sh`.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${1:-.gpu_wheels}
PY=${PYTHON:-.venv/bin/python}
PKGS=(
  transformer-lens==3.9.0 sae-lens==6.54.12
  # TransformerLens's and SAE-Lens's import-time needs that the machine lacks
  better-abc==0.0.3 beartype==0.23.1 fancy-einsum==0.0.3 typeguard==4.6.1
  datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
  simple-parsing==0.1.9 docstring-parser==0.18.0
  # SAE-Lens imports wandb at module level; wandb imports these
  wandb==0.31.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
  platformdirs==4.14.9 sniffio==1.3.1 googleapis-common-protos==1.76.0
  opentelemetry-api==1.45.2 opentelemetry-sdk==1.45.2 opentelemetry-proto==1.45.2
  opentelemetry-semantic-conventions==0.66b2 opentelemetry-exporter-otlp-proto-http==1.45.2
  opentelemetry-exporter-otlp-proto-common==1.45.2
  opentelemetry-exporter-http-transport==0.66b2 opentelemetry-exporter-otlp-common==0.66b2
)
mkdir -p "$DEST"
PLATFORMS=()
for n in 17 24 27 28 31 34; do PLATFORMS+=(--platform "manylinux_2_${n}_x86_64"); done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${PLATFORMS[@]}" --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$DEST" "${PKGS[@]}"
echo "$(ls "$DEST"/*.whl | wc -l) wheels in $DEST: $(du -sh "$DEST" | cut -f1) (the device tool carries at most 64 MiB with the working tree)"
