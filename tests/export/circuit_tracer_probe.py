"""Run inside .venv-circuit-tracer (scripts/circuit_tracer_env.sh), not under pytest:
load an exported transcoder set with circuit-tracer's own loader and run its forward.

    python circuit_tracer_probe.py CACHE_DIR REF INPUTS OUTPUTS [MODEL_FOLDER]

CACHE_DIR/REF is the export (circuit-tracer's local cache layout, which its
`load_transcoder_from_hub` reads before any download); INPUTS holds `x_<layer>`, each
layer's Hugging Face MLP input [tokens, d_model]; OUTPUTS receives `out_<layer>` (the
transcoder's forward) and `acts_<layer>` (its encoder's activations). With MODEL_FOLDER
(a Hugging Face folder transformers 4.57 reads), circuit-tracer's own ReplacementModel
(nnsight backend) is built on it with the set, and `model_acts` [n_layers, pos,
d_transcoder] are its feature activations on INPUTS' `tokens` (its hooks, not ours).
Prints a JSON summary.
"""

import json
import sys

import torch
from safetensors.torch import load_file, save_file

from circuit_tracer.transcoder.activation_functions import TopK
from circuit_tracer.utils.hf_utils import load_transcoder_from_hub

cache_dir, ref, inputs, outputs = sys.argv[1:5]
model_folder = sys.argv[5] if len(sys.argv) > 5 else None
transcoders, config = load_transcoder_from_hub(
    ref, device=torch.device("cpu"), dtype=torch.float32, cache_dir=cache_dir, lazy_encoder=False, lazy_decoder=True
)  # ReplacementModel.from_pretrained's defaults: W_dec is read from our file when used
released_activation = type(transcoders[0].activation_function).__name__
# circuit-tracer's main branch builds TopK(k) from config.yaml's `activation: topk` and `k`
# (load_transcoder_set since PR #94); the 0.5.0 release ignores them and builds ReLU.
if config.get("activation") == "topk":
    for transcoder in transcoders:
        transcoder.activation_function = TopK(int(config["k"]))
xs = load_file(inputs)
result = {}
with torch.no_grad():
    for layer, transcoder in enumerate(transcoders):
        x = xs[f"x_{layer}"]
        result[f"out_{layer}"] = transcoder(x).contiguous()
        result[f"acts_{layer}"] = transcoder.encode(x).contiguous()
if model_folder is not None:
    from circuit_tracer import ReplacementModel

    model = ReplacementModel.from_pretrained_and_transcoders(
        model_folder, transcoders, backend="nnsight", device=torch.device("cpu"), dtype=torch.float32
    )
    _, model_acts = model.get_activations(xs["tokens"])
    result["model_acts"] = (model_acts.to_dense() if model_acts.is_sparse else model_acts).contiguous()
save_file(result, outputs)
print(json.dumps({
    "n_layers": transcoders.n_layers,
    "d_transcoder": transcoders.d_transcoder,
    "skip_connection": transcoders.skip_connection,
    "feature_input_hook": transcoders.feature_input_hook,
    "feature_output_hook": transcoders.feature_output_hook,
    "released_activation": released_activation,
    "activation": config.get("activation"),
    "k": config.get("k"),
}))
