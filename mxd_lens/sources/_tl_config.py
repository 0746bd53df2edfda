"""Which official TransformerLens model a local Hugging Face folder holds, and the
HookedTransformerConfig to build it with -- all offline.

TransformerLens (TL) only builds configs for its official model names. For most
architectures (Llama, Qwen2, Mistral, GPT-2, ...) its converter reads that model's
config.json from the hub; for others (Gemma 1/2/3, OLMo 1/2, the named Llama
releases) it holds one built-in config per name. Here the folder's own
config.json stands in for the hub's: it is copied into a throw-away hub cache
under each candidate name, and TL is called with ``local_files_only=True``, so
whatever TL reads comes from the folder and nothing is downloaded.

Matching (:func:`match_official_name`):

1. the folder's architecture class (``architectures[0]`` in config.json) picks
   the candidates: official names of that architecture, per TL's model registry;
2. each candidate's TL config (built from the folder's config.json where TL
   reads one) is scored by how many of n_layers, d_model, d_mlp, n_heads,
   n_key_value_heads, d_head and d_vocab equal the folder's; ties go to the name
   most like the folder's name or its ``_name_or_path`` (untrusted, so only a
   tie-breaker), then to TL's list order;
3. when the winner's config describes a model of another size (a built-in
   config: its n_layers or d_model differ from the folder's), every field the
   folder's config.json determines is taken from the folder
   (:func:`folder_overrides`).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import math
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Mapping

import torch

from mxd_lens.atomic import copy_file, write_text

if TYPE_CHECKING:
    from transformer_lens import HookedTransformerConfig
    from transformers import PretrainedConfig

__all__ = [
    "TLMatch",
    "folder_architecture",
    "official_architectures",
    "match_official_name",
    "folder_overrides",
    "build_config",
    "processing_flags",
]

# Official names TL's model registry (tools/model_registry/data) does not list,
# with the architecture in their hub config.json; without these, GPT-J would
# have no candidate at all.
_REGISTRY_GAPS = {
    "gpt2": "GPT2LMHeadModel",
    "gpt2-medium": "GPT2LMHeadModel",
    "gpt2-large": "GPT2LMHeadModel",
    "gpt2-xl": "GPT2LMHeadModel",
    "distilgpt2": "GPT2LMHeadModel",
    "EleutherAI/gpt-j-6B": "GPTJForCausalLM",
    "EleutherAI/gpt-neo-125M": "GPTNeoForCausalLM",
    "bigcode/santacoder": "GPT2LMHeadCustomModel",
    "Qwen/Qwen-1_8B": "QWenLMHeadModel",
    "Qwen/Qwen-1_8B-Chat": "QWenLMHeadModel",
    "Qwen/Qwen-7B": "QWenLMHeadModel",
    "Qwen/Qwen-7B-Chat": "QWenLMHeadModel",
    "Qwen/Qwen-14B": "QWenLMHeadModel",
    "Qwen/Qwen-14B-Chat": "QWenLMHeadModel",
}

# The fields that identify a model's size, compared between TL's config and the folder's.
SIZE_FIELDS = ("n_layers", "d_model", "d_mlp", "n_heads", "n_key_value_heads", "d_head", "d_vocab")
# Any revision name works: the throw-away cache holds one snapshot per name.
_REVISION = "0" * 40


@dataclass(frozen=True)
class TLMatch:
    """The official TL name a folder is built as.

    Attributes:
        official_name: the TL name whose config conversion is used.
        architecture: the Hugging Face architecture class (folder and TL agree).
        cfg_dict: TL's ``convert_hf_model_config`` result for ``official_name``
            (fed the folder's config.json).
        overrides: TL config fields taken from the folder instead (empty when
            TL's config already has the folder's sizes).
        score: how many :data:`SIZE_FIELDS` TL's config shared with the folder.
        name_is_route: True when every candidate of the architecture gave the same
            config (TL builds it from the folder's config.json, e.g. Llama, Qwen2): the
            name then only routes the conversion and says nothing about the model.
    """

    official_name: str
    architecture: str
    cfg_dict: dict[str, Any]
    overrides: dict[str, Any]
    score: int
    name_is_route: bool = False


# -- reading Hugging Face configs ------------------------------------------------


def _attr(config: Any, name: str) -> Any:
    """``config.name`` or None; transformers >= 5.15 raises (not only AttributeError)
    on global reads of per-layer fields."""
    try:
        return getattr(config, name, None)
    except Exception:
        return None


def _first(config: Any, *names: str) -> Any:
    for name in names:
        value = _attr(config, name)
        if value is not None:
            return value
    return None


def _has(config: Any, name: str) -> bool:
    try:
        return name in config.to_dict()
    except Exception:
        return False


def text_config(hf_config: PretrainedConfig) -> PretrainedConfig:
    """The language-model part of a config (itself, or ``text_config`` of a multimodal one)."""
    try:
        return hf_config.get_text_config()
    except Exception:
        return hf_config


def folder_architecture(hf_config: PretrainedConfig, folder: Path) -> str:
    """The folder's architecture class: ``architectures[0]``, else the causal-LM
    class transformers maps its ``model_type`` to (old configs lack architectures)."""
    architectures = _attr(hf_config, "architectures")
    if architectures:
        return str(architectures[0])
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    model_type = _attr(hf_config, "model_type")
    if model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type]
    raise ValueError(
        f"{folder}/config.json names no architecture (no 'architectures' list, and "
        f"model_type {model_type!r} is no causal language model transformers knows)"
    )


def folder_sizes(config: PretrainedConfig) -> dict[str, Any]:
    """The :data:`SIZE_FIELDS` of a Hugging Face (text) config, in TL's terms.

    transformers' attribute maps give the common names for every model
    (``hidden_size`` is GPT-2's ``n_embd``); the MLP width has no common name.
    """
    d_model = _first(config, "hidden_size", "n_embd", "d_model")
    n_heads = _first(config, "num_attention_heads", "n_head", "num_heads")
    head_dim = _attr(config, "head_dim")
    d_head = head_dim if isinstance(head_dim, int) and head_dim > 0 else (
        d_model // n_heads if d_model and n_heads else None
    )
    d_mlp = _first(config, "intermediate_size", "ffn_dim", "n_inner")
    return {
        "n_layers": _first(config, "num_hidden_layers", "n_layer", "num_layers"),
        "d_model": d_model,
        "d_mlp": d_mlp if d_mlp is not None else (4 * d_model if d_model else None),
        "n_heads": n_heads,
        "n_key_value_heads": _attr(config, "num_key_value_heads") or n_heads,
        "d_head": d_head,
        "d_vocab": _attr(config, "vocab_size"),
    }


def tl_sizes(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The :data:`SIZE_FIELDS` of a TL config dict (TL leaves some implied)."""
    n_heads = cfg.get("n_heads")
    d_model = cfg.get("d_model")
    d_head = cfg.get("d_head")
    if not d_head or d_head < 0:
        d_head = d_model // n_heads if d_model and n_heads and n_heads > 0 else None
    return {
        "n_layers": cfg.get("n_layers"),
        "d_model": d_model,
        "d_mlp": cfg.get("d_mlp") or (4 * d_model if d_model else None),
        "n_heads": n_heads,
        "n_key_value_heads": cfg.get("n_key_value_heads") or n_heads,
        "d_head": d_head,
        "d_vocab": cfg.get("d_vocab"),
    }


def _rope(config: PretrainedConfig) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(global, sliding-window) rotary settings, from either config layout.

    transformers 5 keeps them in ``rope_parameters`` (one dict, or one per layer
    type for Gemma 3); older versions had ``rope_theta``, ``rope_scaling`` and
    Gemma 3's ``rope_local_base_freq``.
    """
    params = _attr(config, "rope_parameters")
    if isinstance(params, dict) and "full_attention" in params:
        return dict(params.get("full_attention") or {}), dict(params.get("sliding_attention") or {})
    if isinstance(params, dict):
        return dict(params), None
    full = dict(_attr(config, "rope_scaling") or {})
    theta = _attr(config, "rope_theta")
    if theta is not None:
        full["rope_theta"] = theta
    local = _attr(config, "rope_local_base_freq")
    return full, ({"rope_theta": local} if local is not None else None)


# -- official names ------------------------------------------------------------------


@contextmanager
def _hub_cache(folder: Path, architecture: str, names: Iterable[str]) -> Iterator[str]:
    """A throw-away Hugging Face hub cache holding the folder's config.json as every
    name's config (with ``architectures``, which TL reads, filled in if missing)."""
    raw = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    text = None
    if not raw.get("architectures"):
        text = json.dumps({**raw, "architectures": [architecture]}, indent=2)
    with tempfile.TemporaryDirectory(prefix="mxd-tl-config-") as tmp:
        for name in names:
            repo = Path(tmp) / f"models--{name.replace('/', '--')}"
            target = repo / "snapshots" / _REVISION / "config.json"
            if text is None:
                copy_file(folder / "config.json", target)
            else:
                write_text(target, text)
            write_text(repo / "refs" / "main", _REVISION)
        yield tmp


def _convert(name: str, cache: str) -> dict[str, Any]:
    """TL's config dict for ``name``, reading a config.json only from ``cache``."""
    from transformer_lens import loading_from_pretrained as loading

    return loading.convert_hf_model_config(name, cache_dir=cache, local_files_only=True)


@functools.lru_cache(maxsize=1)
def official_architectures() -> dict[str, str]:
    """Every official TL model name with its Hugging Face architecture class.

    From TL's model registry, the names it lacks (:data:`_REGISTRY_GAPS`), and for
    names TL itself recognises by name (e.g. ``llama-7b-hf``) TL's own conversion,
    which for those reads no config. Names with neither (Neel Nanda's toy models,
    which are not transformers models) are left out.
    """
    from transformer_lens.supported_models import OFFICIAL_MODEL_NAMES

    try:
        from transformer_lens.tools.model_registry import registry_io

        registry = {m["model_id"]: m["architecture_id"]
                    for m in registry_io.load_supported_models_raw()["models"]}
    except Exception:  # the registry is package data; without it the fallbacks remain
        registry = {}
    result: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="mxd-tl-empty-") as empty:
        for name in OFFICIAL_MODEL_NAMES:
            architecture = registry.get(name) or _REGISTRY_GAPS.get(name)
            if architecture is None:
                try:
                    architecture = _convert(name, empty).get("original_architecture")
                except Exception:  # needs a config nobody has here: not a candidate
                    architecture = None
            if architecture:
                result[name] = architecture
    return result


def _name_hints(folder: Path) -> list[str]:
    """Names the folder goes by: its own, and what its config.json claims to be."""
    hints = [folder.name, folder.resolve().name]
    try:
        raw = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raw = {}
    for key in ("_name_or_path", "_model_name_or_path"):
        if isinstance(raw.get(key), str) and raw[key].strip():
            hints.append(raw[key].strip())
    return [h.lower() for h in hints if h]


def _similarity(name: str, hints: list[str]) -> float:
    short = name.split("/")[-1].lower()
    return max(
        difflib.SequenceMatcher(None, hint.split("/")[-1], candidate).ratio()
        for hint in hints
        for candidate in (short, name.lower())
    )


def _resolve_model_name(model_name: str) -> str:
    from transformer_lens import loading_from_pretrained as loading

    try:
        return loading.get_official_model_name(model_name)
    except ValueError:
        known = list(loading.make_model_alias_map())
        close = difflib.get_close_matches(model_name.lower(), known, n=5, cutoff=0.4)
        raise ValueError(
            f"model_name={model_name!r} is not an official TransformerLens model name or "
            f"alias; closest: {close or 'none'} (see transformer_lens.supported_models."
            "OFFICIAL_MODEL_NAMES)"
        ) from None


def match_official_name(
    folder: Path, hf_config: PretrainedConfig, model_name: str | None = None
) -> TLMatch:
    """The official TL name to build ``folder`` as (see the module docstring).

    Args:
        folder: the Hugging Face model folder (holds config.json).
        hf_config: its config, as ``AutoConfig.from_pretrained(folder)`` reads it.
        model_name: an official TL name (or alias) to use instead of matching; it
            must have the folder's architecture.

    Raises:
        ValueError: no official TL model has the folder's architecture (naming it
            and the closest supported ones), or ``model_name`` is unknown or of
            another architecture.
    """
    architecture = folder_architecture(hf_config, folder)
    known = official_architectures()
    candidates = [name for name, arch in known.items() if arch == architecture]
    if model_name is not None:
        official = _resolve_model_name(model_name)
        if known.get(official) != architecture:
            what = (f"a {known[official]} in TransformerLens" if official in known
                    else "no Hugging Face transformers model")
            raise ValueError(
                f"model_name={model_name!r} is {what}, but {folder} holds a {architecture}; "
                f"official names of that architecture: {candidates[:6] or 'none'}"
            )
        candidates = [official]
    if not candidates:
        supported = sorted(set(known.values()))
        close = difflib.get_close_matches(architecture, supported, n=4, cutoff=0.0)
        example = {arch: name for name, arch in reversed(list(known.items()))}
        raise ValueError(
            f"{folder}: its config.json declares architecture {architecture!r}, which no "
            "official TransformerLens model has, so HookedTransformer cannot convert it; "
            "closest supported architectures: "
            + ", ".join(f"{arch} (e.g. {example[arch]})" for arch in close)
        )

    folder_size = folder_sizes(text_config(hf_config))
    hints = _name_hints(folder)
    scored: list[tuple[tuple[int, float, int], str, dict[str, Any]]] = []
    failures: dict[str, str] = {}
    with _hub_cache(folder, architecture, candidates) as cache:
        for order, name in enumerate(candidates):
            try:
                cfg_dict = _convert(name, cache)
            except Exception as err:  # TL's converter may choke on an unusual config
                failures[name] = f"{type(err).__name__}: {err}"
                continue
            if cfg_dict.get("original_architecture") != architecture:
                failures[name] = f"TransformerLens builds it as {cfg_dict.get('original_architecture')}"
                continue
            sizes = tl_sizes(cfg_dict)
            score = sum(sizes[f] == folder_size[f] for f in SIZE_FIELDS)
            scored.append(((score, _similarity(name, hints), -order), name, cfg_dict))
    if not scored:
        tried = "; ".join(f"{name}: {why}" for name, why in list(failures.items())[:3])
        raise ValueError(
            f"{folder}: TransformerLens could not build a config for its {architecture} from "
            f"any of the official names of that architecture ({tried})"
        )
    (score, _, _), official, cfg_dict = max(scored, key=lambda item: item[0])
    tied = [c for (sc, _, _), _, c in scored if sc == score]
    name_is_route = len(tied) > 1 and len({json.dumps(tl_sizes(c), sort_keys=True, default=str) for c in tied}) == 1
    sizes = tl_sizes(cfg_dict)
    same_model = all(sizes[f] == folder_size[f] for f in ("n_layers", "d_model"))
    overrides = {} if same_model else folder_overrides(
        cfg_dict, text_config(hf_config), source=f"{folder}/config.json"
    )
    return TLMatch(official, architecture, cfg_dict, overrides, score, name_is_route)


def folder_overrides(
    tl: Mapping[str, Any], config: PretrainedConfig, source: str = "config.json"
) -> dict[str, Any]:
    """TL config fields taken from the folder's (text) config, for a TL built-in
    config that describes a model of another size.

    Covers what the architectures with built-in TL configs (Gemma 1/2/3, OLMo 1/2,
    Llama) set in config.json: sizes, norm epsilon, activation, rotary bases and
    scaling, sliding windows and their layer pattern, the attention scale
    (Gemma's ``query_pre_attn_scalar``) and logit soft-caps.
    """
    from transformer_lens.utilities.activation_functions import (
        SOFTCAP_DISABLED,
        SUPPORTED_ACTIVATIONS,
    )

    sizes = folder_sizes(config)
    missing = [f for f in SIZE_FIELDS if sizes[f] is None]
    if missing:
        raise ValueError(
            f"{source} gives no {missing} (expected numbers for them, as TransformerLens's "
            f"built-in {tl.get('original_architecture')} config has another size)"
        )
    out: dict[str, Any] = {f: sizes[f] for f in ("n_layers", "d_model", "n_heads", "d_head",
                                                 "d_mlp", "d_vocab")}
    if tl.get("d_vocab_out", -1) in (-1, tl.get("d_vocab")):
        out["d_vocab_out"] = sizes["d_vocab"]
    kv = sizes["n_key_value_heads"]
    # TL's convention: None means plain multi-head attention.
    keep_kv = kv != sizes["n_heads"] or tl.get("n_key_value_heads") is not None
    out["n_key_value_heads"] = kv if keep_kv else None
    eps = _first(config, "rms_norm_eps", "layer_norm_eps", "layer_norm_epsilon")
    if eps is not None:
        out["eps"] = float(eps)
    act = _first(config, "hidden_activation", "hidden_act")
    if act in SUPPORTED_ACTIVATIONS:
        out["act_fn"] = act

    if tl.get("positional_embedding_type") == "rotary":
        tl_d_head = tl_sizes(tl)["d_head"]
        fraction = (tl.get("rotary_dim") or tl_d_head) / tl_d_head
        out["rotary_dim"] = round(sizes["d_head"] * fraction)
        full, sliding = _rope(config)
        if full.get("rope_theta") is not None:
            out["rotary_base"] = full["rope_theta"]
        if sliding and sliding.get("rope_theta") is not None:
            out["rotary_base_local"] = sliding["rope_theta"]
        rope_type = full.get("rope_type") or full.get("type") or "default"
        out["rotary_scaling_factor"] = float(full.get("factor", 1.0)) if rope_type == "linear" else 1.0
        out["use_NTK_by_parts_rope"] = rope_type == "llama3"
        if rope_type == "llama3":
            out.update(
                NTK_by_parts_factor=float(full.get("factor", 8.0)),
                NTK_by_parts_low_freq_factor=float(full.get("low_freq_factor", 1.0)),
                NTK_by_parts_high_freq_factor=float(full.get("high_freq_factor", 4.0)),
                NTK_original_ctx_len=int(full.get("original_max_position_embeddings", 8192)),
            )

    n_layers = sizes["n_layers"]
    layer_types = _attr(config, "layer_types")
    if isinstance(layer_types, (list, tuple)) and len(layer_types) == n_layers:
        attn_types = ["local" if t == "sliding_attention" else "global" for t in layer_types]
    elif tl.get("attn_types"):
        pattern = list(tl["attn_types"])  # periodic from layer 0 in every built-in config
        attn_types = [pattern[i % len(pattern)] for i in range(n_layers)]
    else:
        attn_types = None
    if attn_types is not None:
        out["attn_types"] = attn_types
    if tl.get("use_local_attn"):
        window = _attr(config, "sliding_window")
        out["use_local_attn"] = bool(window) and attn_types is not None and "local" in attn_types
        if out["use_local_attn"]:
            out["window_size"] = int(window)

    if tl.get("use_attn_scale", True):
        # HF scales scores by query_pre_attn_scalar**-0.5 where it has one (Gemma), else head_dim.
        scalar = _attr(config, "query_pre_attn_scalar")
        out["attn_scale"] = math.sqrt(scalar) if scalar else math.sqrt(sizes["d_head"])
    if _has(config, "attn_logit_softcapping"):
        cap = _attr(config, "attn_logit_softcapping")
        out["attn_scores_soft_cap"] = float(cap) if cap else SOFTCAP_DISABLED
    if _has(config, "final_logit_softcapping"):
        cap = _attr(config, "final_logit_softcapping")
        out["output_logits_soft_cap"] = float(cap) if cap else SOFTCAP_DISABLED
    if _has(config, "clip_qkv"):
        out["clip_qkv"] = _attr(config, "clip_qkv")
    return out


# -- the config --------------------------------------------------------------------------


def processing_flags(cfg: Mapping[str, Any], fold_ln: bool) -> dict[str, bool]:
    """The mxd_lens weight processing (``fold_ln`` as asked; centring and value-bias
    folding always asked for) that TL can apply to a model with this config.

    Mirrors TL's own gates so the flags say what was done, and TL never has to
    warn and switch one off: no LayerNorm folding or residual centring for
    post-norm models (OLMo 2/3) or shortformers, no unembedding centring under
    a logit soft-cap, and writing weights are only centred for LayerNorm models
    (RMSNorm does not subtract the mean).
    """
    from transformer_lens.utilities.activation_functions import softcap_enabled
    from transformer_lens.utilities.architectures import POST_NORM_ARCHITECTURES

    post_norm = cfg.get("original_architecture") in POST_NORM_ARCHITECTURES
    shortformer = cfg.get("positional_embedding_type") == "shortformer"
    norm = cfg.get("normalization_type")
    return {
        "fold_ln": bool(fold_ln) and not post_norm and not shortformer
        and norm in ("LN", "LNPre", "RMS", "RMSPre"),
        "center_writing_weights": not post_norm and not shortformer
        and norm in ("LN", "LNPre") and not cfg.get("final_rms", False),
        "center_unembed": not shortformer and not softcap_enabled(cfg.get("output_logits_soft_cap")),
        "fold_value_biases": True,
    }


def build_config(
    match: TLMatch,
    folder: Path,
    hf_config: PretrainedConfig,
    *,
    fold_ln: bool,
    device: str | torch.device | None,
    n_ctx_cap: int,
) -> tuple[HookedTransformerConfig, list[str]]:
    """TL's fp32 config for ``match``, with the folder's overrides and a context cap.

    Returns:
        The config and the names of the fields the overrides changed.
    """
    from transformer_lens import loading_from_pretrained as loading

    kwargs: dict[str, Any] = {"local_files_only": True}
    if match.official_name.startswith(loading.NEED_REMOTE_CODE_MODELS):
        # TL asks for it (and warns without it); the throw-away cache holds no code to run.
        kwargs["trust_remote_code"] = True
    with _hub_cache(folder, match.architecture, [match.official_name]) as cache:
        cfg = loading.get_pretrained_model_config(
            match.official_name,
            hf_cfg=hf_config.to_dict(),
            fold_ln=fold_ln,
            device=device,
            dtype=torch.float32,
            default_prepend_bos=False,
            cache_dir=cache,
            **kwargs,
        )
    changed = sorted(k for k, v in match.overrides.items() if getattr(cfg, k) != v)
    if cfg.positional_embedding_type in ("standard", "shortformer"):
        n_ctx = cfg.n_ctx  # learned positions: the weights have exactly this many rows
    else:
        limit = _first(text_config(hf_config), "max_position_embeddings", "n_positions")
        n_ctx = min(n for n in (n_ctx_cap, limit, cfg.n_ctx if not match.overrides else None) if n)
    # replace() re-runs __post_init__, which recomputes n_params from the new sizes.
    cfg = dataclasses.replace(
        cfg, **match.overrides, n_ctx=n_ctx, model_name=folder.name, tokenizer_name=str(folder)
    )
    return cfg, changed
