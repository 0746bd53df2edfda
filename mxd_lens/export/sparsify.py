"""EleutherAI sparsify's transcoder folders: export our TopK (skip) transcoders to them,
and read them (what `mxd_lens.load` calls for such a folder).

sparsify (eai-sparsify 1.3.3) keeps one folder per hookpoint, named after the Hugging
Face module it hooks (`layers.12.mlp`), holding

- `cfg.json`: `SparseCoderConfig` (`activation`, `k`, `num_latents` or
  `expansion_factor`, `skip_connection`, `transcode`...) plus `d_in`; extra keys are
  ignored by `SparseCoder.load_from_disk` (drop_extra_fields), so ours adds an `mxd_lens`
  entry naming the model and layer;
- `sae.safetensors`: `encoder.weight` [n, d_in], `encoder.bias` [n], `W_dec` [n, d_in],
  `b_dec` [d_in], `W_skip` [d_in, d_in] (skip connection; applied as `x @ W_skip.mT`).

Its encoder is ReLU then TopK, ours TopK then ReLU: the same units and values. It hooks
the HF MLP's input, ln2.hook_normalized times the norm weight: exporting divides the
encoder rows and skip columns by the weight, reading multiplies them back
(`mxd_lens.export.norms`).
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from mxd_lens.architectures.base import Replacement
from mxd_lens.architectures.transcoder import SkipTranscoder, TopKTranscoder, TranscoderConfig
from mxd_lens.atomic import write_dir, write_json
from mxd_lens.config import dtype_name, parse_dtype
from mxd_lens.export.common import check_representable, skip_matrix
from mxd_lens.export.norms import MIN_NORM_WEIGHT, ModelNorms, from_hf_input, model_norms, to_hf_input
from mxd_lens.validation import check_tensors

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae.safetensors"
HOOKPOINT = "layers.{layer}.mlp"
"""sparsify's name of block L's MLP (a module name of the Hugging Face base model)."""
_HOOKPOINT_RE = re.compile(r"(?:^|\.)(?:layers|h|blocks)\.(\d+)\.mlp$")
_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def hookpoint(layer: int) -> str:
    """The sparsify hookpoint (folder name) of block `layer`'s MLP."""
    return HOOKPOINT.format(layer=layer)


def export_sparsify(
    modules: Sequence[Replacement] | Mapping[int, Replacement],
    out: str | Path,
    *,
    model: Any = None,
    norms: ModelNorms | None = None,
    overwrite: bool = False,
    min_norm_weight: float = MIN_NORM_WEIGHT,
    names: Sequence[str] | None = None,
) -> Path:
    """Write each TopK (skip) transcoder to `out/layers.<L>.mlp/` in sparsify's layout
    (any set of layers). Arguments as `export_circuit_tracer`'s."""
    out = Path(out)
    if isinstance(modules, Mapping):
        items = list(modules.items())
    else:
        items = []
        for i, module in enumerate(modules):
            where = names[i] if names else f"module {i}"
            if module.cfg.layer is None:
                raise ValueError(f"{where}: cfg.layer is not set, so its hookpoint is unknown; pass {{layer: module}}")
            items.append((module.cfg.layer, module))
    chosen: dict[int, tuple[str, TopKTranscoder]] = {}
    for i, (layer, module) in enumerate(items):
        label = names[i] if names else f"the {type(module).__name__} at layer {layer}"
        tc = check_representable(module, label, "sparsify")
        if layer in chosen:
            raise ValueError(f"{label}: layer {layer} is given twice; sparsify holds one coder per hookpoint")
        chosen[layer] = (label, tc)
    norms = norms if norms is not None else model_norms(model)
    for layer, (label, tc) in chosen.items():
        if layer not in norms.norms:
            raise ValueError(f"{label}: layer {layer} does not exist in {norms.name} ({norms.n_layers} layers)")
        if tc.cfg.d_in != norms.d_model:
            raise ValueError(f"{label}: d_in={tc.cfg.d_in} but {norms.name} has d_model={norms.d_model}")
        try:
            norms.norms[layer].check_divisible(layer, min_norm_weight)
        except ValueError as err:
            raise ValueError(f"{label}: {err}") from None
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise ValueError(f"{out} exists and is not an empty folder; pass overwrite=True (--overwrite) to replace it")

    def write(tmp: Path) -> None:
        for layer, (_, tc) in sorted(chosen.items()):
            W_enc, b_enc, b_dec, W_skip = to_hf_input(
                norms.norms[layer], tc.W_enc.detach().cpu(), tc.b_enc.detach().cpu(), tc.b_dec.detach().cpu(),
                None if skip_matrix(tc) is None else skip_matrix(tc).cpu(),
            )
            tensors = {"encoder.weight": W_enc.T.contiguous(), "encoder.bias": b_enc,
                       "W_dec": tc.W_dec.detach().cpu().contiguous(), "b_dec": b_dec}
            if W_skip is not None:
                tensors["W_skip"] = W_skip
            folder = tmp / hookpoint(layer)
            folder.mkdir()
            save_file(tensors, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
            write_json(folder / CFG_FILE, {
                "activation": "topk",
                "expansion_factor": max(1, tc.cfg.d_sae // tc.cfg.d_in),
                "normalize_decoder": False,
                "num_latents": tc.cfg.d_sae,
                "k": tc.cfg.k,
                "multi_topk": False,
                "skip_connection": W_skip is not None,
                "transcode": True,
                "d_in": tc.cfg.d_in,
                "mxd_lens": {"model": norms.source, "model_name": norms.name, "layer": layer,
                             "architecture": tc.architecture},
            })

    return write_dir(out, write)


# --- reading ---------------------------------------------------------------------------------
def is_sparsify_folder(path: str | Path) -> bool:
    """True for a folder sparsify's `SparseCoder.save_to_disk` (or `export_sparsify`) wrote:
    a cfg.json without SAE-Lens's `architecture` but with sparsify's fields, beside sae.safetensors."""
    folder = Path(path)
    try:
        raw = json.loads((folder / CFG_FILE).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return (
        isinstance(raw, dict) and "architecture" not in raw and "d_in" in raw
        and ("transcode" in raw or "expansion_factor" in raw) and (folder / WEIGHTS_FILE).is_file()
    )


def _int(raw: dict, key: str, where: str, minimum: int = 1) -> int:
    value = raw.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{where}: {key}={value!r}; expected an integer >= {minimum}")
    return value


def load_sparsify(
    path: str | Path,
    *,
    model: Any = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    layer: int | None = None,
) -> TopKTranscoder:
    """A sparsify transcoder folder as an mxd_lens TopKTranscoder (SkipTranscoder with a
    skip connection), reading the MLP input as mxd_lens's modules do (ln2.hook_normalized
    of the fold_ln=True model): the encoder rows and skip columns are multiplied by the
    norm weight.

    Args:
        path: the hookpoint folder (`.../layers.12.mlp`).
        model: the model it was trained on, for the norm weights (None: what our export
            recorded in cfg.json, else the default model).
        device, dtype: where and in which dtype to put the parameters (default cpu, as saved).
        layer: the block (default: from the folder name `layers.<L>.mlp`, or our cfg.json entry).
    """
    folder = Path(path)
    where = str(folder / CFG_FILE)
    if not folder.is_dir():
        raise FileNotFoundError(f"no sparsify folder at {folder}")
    try:
        raw = json.loads((folder / CFG_FILE).read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{where} is missing: not a sparsify folder") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{where}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: expected a JSON object")
    if raw.get("transcode") is not True:
        raise ValueError(
            f"{where}: transcode={raw.get('transcode')!r}: this is a sparsify SAE (it reconstructs its input), "
            "not a transcoder of the MLP; mxd_lens reads sparsify transcoders only"
        )
    if raw.get("activation", "topk") != "topk":
        raise ValueError(f"{where}: activation={raw.get('activation')!r}; mxd_lens reads TopK coders only ('topk')")
    d_in = _int(raw, "d_in", where)
    k = _int(raw, "k", where)
    n = raw.get("num_latents") or d_in * _int(raw, "expansion_factor", where)
    skip = bool(raw.get("skip_connection", False))
    ours = raw.get("mxd_lens") if isinstance(raw.get("mxd_lens"), dict) else {}
    if layer is None:
        match = _HOOKPOINT_RE.search(folder.name)
        layer = int(match.group(1)) if match else ours.get("layer")
    if layer is None:
        raise ValueError(
            f"{folder}: cannot tell which layer this coder hooks (its folder is not named like 'layers.12.mlp'); "
            "pass layer="
        )
    expected = {"encoder.weight": (n, d_in), "encoder.bias": (n,), "W_dec": (n, d_in), "b_dec": (d_in,)}
    if skip:
        expected["W_skip"] = (d_in, d_in)
    weights = folder / WEIGHTS_FILE
    try:
        with safe_open(str(weights), framework="pt", device="cpu") as f:
            found = {}
            for name in f.keys():  # noqa: SIM118
                sl = f.get_slice(name)
                code = sl.get_dtype()
                if code not in _ST_DTYPES:
                    raise ValueError(f"{weights}: tensor {name!r} has dtype {code}; expected a float dtype")
                found[name] = (tuple(sl.get_shape()), _ST_DTYPES[code])
            check_tensors(expected, found, None, str(weights))
            state = {name: f.get_tensor(name) for name in expected}
    except FileNotFoundError:
        raise FileNotFoundError(f"{weights} is missing") from None
    except SafetensorError as e:
        raise ValueError(f"{weights}: not a readable safetensors file ({e})") from None
    if model is None and ours.get("model") and Path(ours["model"]).is_dir():
        model = ours["model"]
    norms = model_norms(model)
    if d_in != norms.d_model or layer not in norms.norms:
        raise ValueError(
            f"{folder}: a coder with d_in={d_in} at layer {layer} does not fit {norms.name} (d_model={norms.d_model}, "
            f"{norms.n_layers} layers); pass the model it was trained on with model="
        )
    stored = state["encoder.weight"].dtype
    W_enc, b_enc, b_dec, W_skip = from_hf_input(
        norms.norms[layer], state["encoder.weight"].T, state["encoder.bias"], state["b_dec"], state.get("W_skip")
    )
    target = stored if dtype is None else parse_dtype(dtype)
    device = str(device or "cpu")
    cfg = TranscoderConfig(
        d_in=d_in, d_out=d_in, d_sae=n, k=k, layer=layer, model_name=norms.name,
        dtype=dtype_name(target), device="meta",
    )
    cls = SkipTranscoder if skip else TopKTranscoder
    module = cls(cfg)
    params = {"W_enc": W_enc, "b_enc": b_enc, "W_dec": state["W_dec"], "b_dec": b_dec}
    if skip:
        params["W_skip"] = W_skip
    module.load_state_dict({k_: v.to(device, target) for k_, v in params.items()}, assign=True)
    module.cfg = dataclasses.replace(cfg, device=device)
    module.sae_metadata = {"sparsify_source": str(folder.resolve())}
    return module


__all__ = ["CFG_FILE", "HOOKPOINT", "WEIGHTS_FILE", "export_sparsify", "hookpoint", "is_sparsify_folder", "load_sparsify"]
