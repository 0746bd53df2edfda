"""Export a transcoder at every layer to circuit-tracer's transcoder-set layout.

circuit-tracer (0.5.0, and its main branch) reads a folder holding

- `layer_{i}.safetensors` for i = 0..n_layers-1: `W_enc` [d_sae, d_model] (stored
  transposed relative to ours), `b_enc` [d_sae], `W_dec` [d_sae, d_model], `b_dec`
  [d_model] and, for skip transcoders, `W_skip` [d_model, d_model] (applied as
  `x @ W_skip.T`, as ours);
- `config.yaml`: `model_kind: transcoder_set`, `feature_input_hook`,
  `feature_output_hook` (hook names relative to `blocks.{i}`) and, read by its main
  branch since PR #94, `activation: topk` with `k`. The released 0.5.0 loader ignores
  `activation` and builds ReLU: set `TopK(k)` from circuit_tracer.transcoder
  .activation_functions on each transcoder yourself there.

Hooks: `mlp.hook_in` / `mlp.hook_out`, the Hugging Face MLP's input and output in both
of circuit-tracer's backends (its TransformerLens backend loads the model with
fold_ln=False, so `mlp.hook_in` is the norm's output; its nnsight mapping for Llama has
only these). That input is ln2.hook_normalized times the norm weight, so the encoder
rows and skip columns are divided by it (see `mxd_lens.export.norms`).

circuit-tracer's TopK keeps the k largest pre-activations as they are, without ReLU;
ours is TopK then ReLU. They agree on every token with at least k positive
pre-activations (a trained transcoder's usual case); where fewer are positive,
circuit-tracer passes the negative ones through.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from safetensors.torch import save_file

from mxd_lens import registry
from mxd_lens.architectures.base import Replacement
from mxd_lens.atomic import write_dir, write_text
from mxd_lens.export.common import check_representable, skip_matrix
from mxd_lens.export.norms import MIN_NORM_WEIGHT, ModelNorms, model_norms, to_hf_input

FEATURE_INPUT_HOOK = "mlp.hook_in"
FEATURE_OUTPUT_HOOK = "mlp.hook_out"
CONFIG_FILE = "config.yaml"


def _yaml(config: Mapping[str, Any]) -> str:
    # JSON scalars are YAML scalars: no YAML writer needed for a flat mapping.
    return "".join(f"{key}: {json.dumps(value)}\n" for key, value in config.items())


def export_circuit_tracer(
    modules: Sequence[Replacement] | Mapping[int, Replacement],
    out: str | Path,
    *,
    model: Any = None,
    norms: ModelNorms | None = None,
    overwrite: bool = False,
    min_norm_weight: float = MIN_NORM_WEIGHT,
    names: Sequence[str] | None = None,
) -> Path:
    """Write `modules` (one TopK (skip) transcoder per layer of the model, all of one kind,
    width and k) to the folder `out` in circuit-tracer's layout.

    Args:
        modules: the transcoders, as a list (each at its `cfg.layer`) or {layer: module}.
        out: the folder to write (refused when it exists and is not empty, unless `overwrite`).
        model: the model they were trained on, for its norm weights (None: the default
            model; a Hugging Face folder; a HookedTransformer). Ignored when `norms` is given.
        norms: `mxd_lens.export.norms.model_norms(model)`, when already read.
        min_norm_weight: see `MlpInputNorm.check_divisible`.
        names: how to name each module in errors (default: its class and layer).

    Raises:
        ValueError: an MxD or another module circuit-tracer cannot hold; missing or
            repeated layers; mixed kinds, widths or k; a norm weight too small to divide by.
    """
    out = Path(out)
    if isinstance(modules, Mapping):
        items = list(modules.items())
    else:
        items = []
        for i, module in enumerate(modules):
            where = names[i] if names else f"module {i}"
            if module.cfg.layer is None:
                raise ValueError(f"{where}: cfg.layer is not set, so its layer is unknown; pass {{layer: module}}")
            items.append((module.cfg.layer, module))
    labels = [names[i] if names else f"the {type(m).__name__} at layer {layer}" for i, (layer, m) in enumerate(items)]
    transcoders = {}
    for label, (layer, module) in zip(labels, items):
        tc = check_representable(module, label, "circuit-tracer")
        if layer in transcoders:
            raise ValueError(f"{label}: layer {layer} is given twice; circuit-tracer holds one transcoder per layer")
        transcoders[layer] = (label, tc)
    first_label, first = transcoders[min(transcoders)]
    for label, tc in transcoders.values():
        for what, mine, theirs in (
            ("kind", type(tc).__name__, type(first).__name__),
            ("width d_sae", tc.cfg.d_sae, first.cfg.d_sae),
            ("k", tc.cfg.k, first.cfg.k),
        ):
            if mine != theirs:
                raise ValueError(
                    f"{label} has {what} {mine} but {first_label} has {theirs}: a circuit-tracer transcoder set "
                    "holds transcoders of one kind, width and k"
                )
    norms = norms if norms is not None else model_norms(model)
    missing = sorted(set(range(norms.n_layers)) - set(transcoders))
    extra = sorted(set(transcoders) - set(range(norms.n_layers)))
    if extra:
        raise ValueError(f"layers {extra} do not exist in {norms.name}, which has {norms.n_layers} layers")
    if missing:
        raise ValueError(
            f"circuit-tracer needs a transcoder at every layer of {norms.name} (0..{norms.n_layers - 1}); "
            f"missing layers {missing}"
        )
    if first.cfg.d_in != norms.d_model:
        raise ValueError(f"the transcoders have d_in={first.cfg.d_in} but {norms.name} has d_model={norms.d_model}")
    for layer, (label, _) in transcoders.items():
        try:
            norms.norms[layer].check_divisible(layer, min_norm_weight)
        except ValueError as err:
            raise ValueError(f"{label}: {err}") from None
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise ValueError(f"{out} exists and is not an empty folder; pass overwrite=True (--overwrite) to replace it")

    config = {
        "model_kind": "transcoder_set",
        "model_name": norms.name,
        "feature_input_hook": FEATURE_INPUT_HOOK,
        "feature_output_hook": FEATURE_OUTPUT_HOOK,
        "activation": "topk",
        "k": first.cfg.k,
        "scan": f"mxd-lens/{norms.name}/{registry.module_folder_name(first.architecture, first.cfg.k)}",
    }

    def write(tmp: Path) -> None:
        for layer, (_, tc) in sorted(transcoders.items()):
            W_enc, b_enc, b_dec, W_skip = to_hf_input(
                norms.norms[layer], tc.W_enc.detach().cpu(), tc.b_enc.detach().cpu(), tc.b_dec.detach().cpu(),
                None if skip_matrix(tc) is None else skip_matrix(tc).cpu(),
            )
            tensors = {"W_enc": W_enc.T.contiguous(), "b_enc": b_enc, "W_dec": tc.W_dec.detach().cpu().contiguous(),
                       "b_dec": b_dec}
            if W_skip is not None:
                tensors["W_skip"] = W_skip
            save_file(tensors, str(tmp / f"layer_{layer}.safetensors"))
        header = (
            "# Written by `mxd-lens export --format circuit-tracer`. Load with circuit-tracer's\n"
            "# load_transcoder_set / ReplacementModel.from_pretrained(model, <repo or cache>).\n"
            "# activation/k are read by circuit-tracer's main branch (PR #94); its 0.5.0 release\n"
            "# builds ReLU instead: set circuit_tracer.transcoder.activation_functions.TopK(k).\n"
        )
        write_text(tmp / CONFIG_FILE, header + _yaml(config))

    return write_dir(out, write)


__all__ = ["CONFIG_FILE", "FEATURE_INPUT_HOOK", "FEATURE_OUTPUT_HOOK", "export_circuit_tracer"]
