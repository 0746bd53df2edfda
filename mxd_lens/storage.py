"""Saving and loading replacement modules in SAE-Lens's folder layout (safetensors + JSON).

A module folder holds

- `cfg.json`: SAE-Lens's config layout (`architecture`, `d_in`, `d_sae`, ..., `metadata`
  with model_name, hook_name, hook_name_out, context_size, prepend_bos, dataset_path,
  model_from_pretrained_kwargs, neuronpedia_id) plus the fields mxd_lens needs and our
  `mxd_lens_format` version, so one folder loads with `mxd_lens.load` and with
  `sae_lens.SAE.load_from_disk` / `SAE.from_pretrained`;
- `sae_weights.safetensors`: the parameters, under the modules' own names;
- `sparsity.safetensors` (when firing rates are known): SAE-Lens's `sparsity` tensor,
  log10 of each unit's firing rate.

`load("user/repo", "mxd_k32")` reads the folder `mxd_k32` of a Hugging Face model repo
through huggingface_hub (only that folder is downloaded; with HF_HUB_OFFLINE=1 it comes
from the hub cache); `load(path)` a local folder.

Folders are written into a temporary sibling and renamed into place, so a crash never
leaves a half-written module. Loading never unpickles: a folder is untrusted input, so
cfg.json is validated and every tensor's name, shape and dtype is checked against it
(from the safetensors header, before any data is read).
"""

from __future__ import annotations

import dataclasses
import importlib.metadata

import json
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from sae_lens.constants import SAE_CFG_FILENAME, SAE_WEIGHTS_FILENAME, SPARSITY_FILENAME
from torch import Tensor

from mxd_lens import registry
from mxd_lens.architectures.base import Replacement, ReplacementConfig, expected_tensors as _expected
from mxd_lens.atomic import write_dir, write_file, write_json
from mxd_lens.config import dtype_name, parse_dtype
from mxd_lens.validation import check_tensors

atomic_write_dir = write_dir
"""The old name (from when this module was `mxd_lens.io`) of `mxd_lens.atomic.write_dir`."""

FORMAT_VERSION = 1
"""Version of the folder layout written by `save`; `load` reads this and every older one."""
CFG_FILE = SAE_CFG_FILENAME
WEIGHTS_FILE = SAE_WEIGHTS_FILENAME
SPARSITY_FILE = SPARSITY_FILENAME
SPARSITY_EPS = 1e-10
"""SAE-Lens stores log10(firing rate + 1e-10)."""

METADATA_KEYS: tuple[str, ...] = (
    "model_name",
    "model_class_name",
    "hook_name",
    "hook_name_out",
    "context_size",
    "prepend_bos",
    "sequence_separator_token",
    "exclude_special_tokens",
    "dataset_path",
    "model_from_pretrained_kwargs",
    "neuronpedia_id",
)
"""SAE-Lens metadata written for every module (None when unknown); the commands that
train modules fill them all (`mxd_lens.metadata.run_metadata`) but neuronpedia_id."""
_VERSION_KEYS = ("sae_lens_version", "sae_lens_training_version", "mxd_lens_version")
_ENVELOPE_KEYS = ("architecture", "mxd_lens_format", "metadata")
# SAE-Lens options that mxd_lens modules do not implement, with the only accepted value.
_FIXED = {"apply_b_dec_to_input": False, "normalize_activations": "none", "reshape_activations": "none"}


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


# --- cfg.json <-> config ----------------------------------------------------------------
def config_json(module: Replacement, metadata: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The cfg.json dict of `module` (SAE-Lens layout plus our fields).

    `metadata` adds SAE-Lens metadata (context_size, dataset_path, neuronpedia_id...) to
    what the module already carries in `module.sae_metadata`; model_name, hook_name and
    hook_name_out always come from `module.cfg` and may not contradict it.
    """
    arch = registry.find(module.architecture)
    if arch is None or arch.module_class is not type(module):
        known = sorted(a.name for a in registry.architectures())
        raise ValueError(
            f"cannot save a {type(module).__name__} (architecture {module.architecture!r}): it is not the "
            f"registered module class of any of {known}; register it with mxd_lens.registry.register first"
        )
    top, own_meta = module.cfg.to_cfg_json()
    meta: dict[str, Any] = {key: None for key in METADATA_KEYS}
    meta["model_from_pretrained_kwargs"] = {}
    meta.update(getattr(module, "sae_metadata", None) or {})
    for key, value in (metadata or {}).items():
        if key in own_meta and value is not None and own_meta[key] is not None and value != own_meta[key]:
            raise ValueError(f"metadata {key}={value!r} contradicts the module's cfg.{key}={own_meta[key]!r}")
        meta[key] = value
    for key, value in own_meta.items():
        meta[key] = value if value is not None else meta.get(key)
    meta["sae_lens_version"] = meta.get("sae_lens_version") or _version("sae-lens")
    meta["sae_lens_training_version"] = meta.get("sae_lens_training_version")
    meta["mxd_lens_version"] = _version("mxd_lens") or _version("mxd-lens")
    # The parameters' dtype, not the construction-time one (a module.to(bfloat16) since).
    top["dtype"] = dtype_name(module.dtype)
    return {"architecture": module.architecture, "mxd_lens_format": FORMAT_VERSION, **top, **_FIXED, "metadata": meta}


def _fail(where: str, problem: str) -> ValueError:
    return ValueError(f"{where}: {problem}")


def config_from_json(raw: Any, where: str = CFG_FILE) -> tuple[str, ReplacementConfig, dict[str, Any]]:
    """Validate a cfg.json dict: (architecture, mxd_lens config, extra SAE-Lens metadata).

    Raises ValueError naming `where` and the offending key for an unknown architecture
    or format version, unknown or missing keys, non-positive sizes, k out of range, or
    SAE-Lens options that mxd_lens modules do not implement.
    """
    if not isinstance(raw, dict):
        raise _fail(where, f"expected a JSON object, got {type(raw).__name__}")
    name = raw.get("architecture")
    arch = registry.find(name) if isinstance(name, str) else None
    if arch is None or arch.name != name:
        known = sorted(a.name for a in registry.architectures())
        raise _fail(where, f"unknown architecture {name!r}; expected one of {known}")
    version = raw.get("mxd_lens_format", FORMAT_VERSION)  # SAE-Lens's save_model omits it
    if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= FORMAT_VERSION:
        raise _fail(
            where,
            f"mxd_lens_format={version!r} is not supported by this mxd_lens (formats 1..{FORMAT_VERSION}); "
            "upgrade mxd_lens to read it",
        )
    cfg_cls = arch.config_class
    keys, required = cfg_cls.cfg_json_keys()
    allowed = keys | set(_ENVELOPE_KEYS) | set(_FIXED)
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise _fail(
            where, f"unknown keys {unknown} for architecture {name!r}; expected a subset of {sorted(allowed)}"
        )
    missing = sorted(required - set(raw))
    if missing:
        raise _fail(where, f"missing keys {missing}")
    for key, expected in _FIXED.items():
        if key in raw and raw[key] != expected:
            raise _fail(
                where, f"{key}={raw[key]!r} is not supported by mxd_lens modules (expected {expected!r})"
            )
    meta = raw.get("metadata", {})
    if not isinstance(meta, dict):
        raise _fail(where, f"metadata must be a JSON object, got {type(meta).__name__}")
    try:
        cfg = cfg_cls.from_cfg_json(raw, meta)
    except ValueError as e:
        raise _fail(where, str(e)) from None
    extra = {k: v for k, v in meta.items() if k not in cfg_cls.metadata_fields and k not in _VERSION_KEYS}
    return name, cfg, extra


def read_config(path: str | Path) -> tuple[str, ReplacementConfig, dict[str, Any]]:
    """Read and validate `path/cfg.json` (see `config_from_json`)."""
    folder = _folder(path)
    cfg_path = folder / CFG_FILE
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{cfg_path} is missing: not a module folder written by mxd_lens or SAE-Lens")
    try:
        raw = json.loads(cfg_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _fail(str(cfg_path), f"not valid JSON ({e}); the file may be truncated") from None
    return config_from_json(raw, str(cfg_path))


def _folder(path: str | Path) -> Path:
    folder = Path(path)
    if not folder.exists():
        raise FileNotFoundError(
            f"no module folder at {folder}; a module on the Hugging Face hub is named by its repo and "
            f"folder: mxd_lens.load('user/repo', 'mxd_k32') (or, after `import mxd_lens`, "
            f"sae_lens.SAE.from_pretrained('user/repo', 'mxd_k32'))"
        )
    if not folder.is_dir():
        raise FileNotFoundError(
            f"{folder} is a file, not a module folder (expected a folder holding {CFG_FILE})"
        )
    return folder


# --- tensors ------------------------------------------------------------------------------
def expected_tensors(arch: str, cfg: ReplacementConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every parameter of architecture `arch` with `cfg`."""
    return _expected(registry.get(arch).module_class, cfg)


def _read_safetensors(
    path: Path, check: Callable[[Mapping[str, tuple[tuple[int, ...], torch.dtype]]], None], device: str
) -> dict[str, Tensor]:
    """Check the header with `check`, then read the tensors. Never unpickles."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing")
    try:
        with safe_open(str(path), framework="pt", device=device) as f:
            found = {}
            for name in f.keys():  # noqa: SIM118  (safe_open is not iterable)
                sl = f.get_slice(name)
                found[name] = (tuple(sl.get_shape()), _st_dtype(sl.get_dtype(), path, name))
            check(found)
            return {name: f.get_tensor(name) for name in found}
    except SafetensorError as e:
        raise _fail(
            str(path),
            f"not a readable safetensors file ({e}); it may be truncated or another format (mxd_lens never unpickles)",
        ) from None


_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def _st_dtype(code: str, path: Path, name: str) -> torch.dtype:
    if code not in _ST_DTYPES:
        raise _fail(str(path), f"tensor {name!r} has dtype {code}; expected one of {sorted(_ST_DTYPES)}")
    return _ST_DTYPES[code]


# --- folders ------------------------------------------------------------------------------
def save(
    module: Replacement,
    path: str | Path,
    *,
    metadata: Mapping[str, Any] | None = None,
    firing_rates: Float[Tensor, " n_units"] | None = None,
) -> Path:
    """Write `module` to the folder `path` (created or replaced atomically).

    Args:
        module: an MxD, TopKTranscoder or SkipTranscoder.
        path: the folder to write.
        metadata: extra SAE-Lens metadata (context_size, prepend_bos, dataset_path,
            model_from_pretrained_kwargs, neuronpedia_id...).
        firing_rates: fraction of tokens on which each unit is active; written as
            SAE-Lens's sparsity.safetensors when given.
    """
    cfg = config_json(module, metadata)
    if firing_rates is not None:
        firing_rates = _check_firing_rates(firing_rates, module.n_units)

    def write(tmp: Path) -> None:
        write_json(tmp / CFG_FILE, cfg)
        tensors = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        if firing_rates is not None:
            _write_sparsity(tmp / SPARSITY_FILE, firing_rates)

    return write_dir(path, write)


def load(
    path: str | Path,
    folder: str | None = None,
    *,
    device: str | None = None,
    dtype: str | torch.dtype | None = None,
    revision: str | None = None,
) -> Replacement:
    """Read a module folder (written by `save`, SAE-Lens or `publish`) as an mxd_lens module,
    from disk or from the Hugging Face hub.

    `load("runs/demo/mxd_k32")` reads a local folder; `load("user/repo", "mxd_k32")` reads
    the folder `mxd_k32` of the hub repo `user/repo` (downloaded with huggingface_hub,
    only that folder; offline, from the hub cache), or of the local folder `user/repo`
    when one exists.

    Args:
        path: the module folder, or a hub repo id ("user/repo") with `folder`.
        folder: the module folder inside the repo (or inside the local folder `path`).
        device: where to put the parameters (default: cfg.json's device).
        dtype: cast the parameters to this dtype after loading (default: as saved).
            `attach` refuses a module whose dtype differs from the model's, so pass the
            model's dtype here to load a module saved in another precision.
        revision: the hub revision (branch, tag or commit; default main).

    Raises:
        FileNotFoundError: the folder, cfg.json or the weights are missing, or the hub
            repo cannot be reached and is not in the cache.
        ValueError: cfg.json is invalid, or a file is truncated, not safetensors, or
            contradicts cfg.json (names, shapes, dtypes); a malformed repo id or folder.
    """
    folder = resolve(path, folder, revision=revision)
    from mxd_lens.export.sparsify import is_sparsify_folder, load_sparsify

    if is_sparsify_folder(folder):  # EleutherAI sparsify's layout: cfg.json + sae.safetensors
        return load_sparsify(folder, device=device, dtype=dtype)
    foreign = _foreign_architecture(folder)
    if foreign is not None:  # an SAE-Lens architecture of another package: served as it is
        from mxd_lens.architectures.saelens_adapter import load_saelens_folder

        return load_saelens_folder(folder, device=device, dtype=dtype)
    arch, cfg, extra = read_config(folder)
    if device is not None:
        cfg = dataclasses.replace(cfg, device=str(device))
    stored = parse_dtype(cfg.dtype)
    expected = expected_tensors(arch, cfg)
    state = _read_safetensors(
        folder / WEIGHTS_FILE,
        lambda found: check_tensors(expected, found, stored, str(folder / WEIGHTS_FILE)),
        device=cfg.device,
    )
    load_sparsity(folder, cfg.n_units)  # a contradictory sparsity file is an error too
    module_cls = registry.get(arch).module_class
    module = module_cls(dataclasses.replace(cfg, device="meta"))
    module.load_state_dict(state, assign=True)
    module.sae_metadata = extra
    if dtype is not None:
        target = parse_dtype(dtype)
        module.to(target)
        module.cfg = dataclasses.replace(module.cfg, dtype=dtype_name(target))
    module.cfg = dataclasses.replace(module.cfg, device=cfg.device)
    return module


def _foreign_architecture(folder: Path) -> str | None:
    """The cfg.json architecture when it is not ours but SAE-Lens's (standard, topk,
    jumprelu, transcoder, skip_transcoder, jumprelu_transcoder...), else None."""
    try:
        raw = json.loads((folder / CFG_FILE).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None  # read_config gives the precise error
    name = raw.get("architecture") if isinstance(raw, dict) else None
    if not isinstance(name, str):
        return None
    ours = registry.find(name)  # finds method names too: SAE-Lens's 'skip_transcoder' is our method name
    if ours is not None and ours.name == name:
        return None
    from sae_lens.registry import SAE_CLASS_REGISTRY

    return name if name in SAE_CLASS_REGISTRY else None


# --- the Hugging Face hub -------------------------------------------------------------------
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


def resolve(path: str | Path, folder: str | None = None, *, revision: str | None = None) -> Path:
    """The local module folder that `path` (and `folder`) name: `path` itself, `path/folder`
    when `path` is a local folder, else the folder `folder` of the hub repo `path`
    (`hub_folder`)."""
    if folder is None:
        return _folder(path)
    if not isinstance(folder, str) or not folder or folder.startswith("/") or ".." in Path(folder).parts:
        raise ValueError(f"folder={folder!r} must name a module folder inside the repo, e.g. 'mxd_k32'")
    if Path(path).is_dir():
        return _folder(Path(path) / folder)
    return hub_folder(str(path), folder, revision=revision)


def hub_folder(repo_id: str, folder: str, *, revision: str | None = None) -> Path:
    """Download the module folder `folder` of the Hugging Face model repo `repo_id` (only
    that folder's files) and return where it lies in the hub cache. With HF_HUB_OFFLINE=1
    it is read from the cache, as huggingface_hub resolves any offline download."""
    if not isinstance(repo_id, str) or not _REPO_ID.match(repo_id):
        raise FileNotFoundError(
            f"no module folder at {repo_id!r}, and it is not a Hugging Face repo id of the form 'user/repo' "
            f"either; expected a local folder or mxd_lens.load('user/repo', {folder!r})"
        )
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled

    at = f" at revision {revision!r}" if revision else ""
    try:
        root = snapshot_download(repo_id, repo_type="model", revision=revision, allow_patterns=[f"{folder}/*"])
    except (LocalEntryNotFoundError, OfflineModeIsEnabled) as err:
        raise FileNotFoundError(
            f"no local folder {repo_id!r}, and the hub repo {repo_id!r}{at} is not in the hub cache while the hub "
            f"cannot be reached ({type(err).__name__}); download it once online (mxd_lens.load({repo_id!r}, "
            f"{folder!r}) or SAE.from_pretrained({repo_id!r}, {folder!r})) or pass a local module folder"
        ) from None
    except (HfHubHTTPError, OSError) as err:
        raise FileNotFoundError(
            f"cannot fetch {folder!r} from the hub repo {repo_id!r}{at}: {type(err).__name__}: {err}"
        ) from None
    found = Path(root) / folder
    if not (found / CFG_FILE).is_file():
        raise FileNotFoundError(
            f"the hub repo {repo_id!r}{at} has no module folder {folder!r} (no {folder}/{CFG_FILE}); "
            f"its module folders are named <method>_k<K>, e.g. 'mxd_k32'"
        )
    return found


def save_sparsity(path: str | Path, firing_rates: Float[Tensor, " n_units"]) -> Path:
    """Write SAE-Lens's sparsity.safetensors (log10 firing rates, key "sparsity") into the
    module folder `path`, atomically, after checking the rates against its cfg.json."""
    folder = _folder(path)
    rates = _check_firing_rates(firing_rates, read_config(folder)[1].n_units)
    return write_file(folder / SPARSITY_FILE, lambda tmp: _write_sparsity(tmp, rates))


def _check_firing_rates(firing_rates: Any, n_units: int) -> Tensor:
    rates = torch.as_tensor(firing_rates).detach()
    if tuple(rates.shape) != (n_units,):
        raise ValueError(f"firing_rates has shape {tuple(rates.shape)}; expected ({n_units},), one rate per unit")
    if rates.isnan().any() or not bool(((rates >= 0) & (rates <= 1)).all()):
        raise ValueError("firing_rates must be fractions in [0, 1]")
    return rates


def _write_sparsity(path: Path, rates: Tensor) -> None:
    # float32, as SAE-Lens computes it: a rate of 1 then stores exactly 0 (float64 would store +4e-11)
    log_rates = torch.log10(rates.float().cpu() + SPARSITY_EPS)
    save_file({"sparsity": log_rates.contiguous()}, str(path))


def load_sparsity(path: str | Path, n_units: int | None = None) -> Float[Tensor, " n_units"] | None:
    """log10 firing rates from `path/sparsity.safetensors`, or None when there is no such file."""
    folder = _folder(path)
    file = folder / SPARSITY_FILE
    if not file.exists():
        return None
    if n_units is None:
        n_units = read_config(folder)[1].n_units

    def check(found: Mapping[str, tuple[tuple[int, ...], torch.dtype]]) -> None:
        check_tensors({"sparsity": (n_units,)}, found, None, str(file))

    log_rates = _read_safetensors(file, check, device="cpu")["sparsity"]
    if not bool((log_rates <= 0).all()) or bool(log_rates.isnan().any()):
        raise _fail(str(file), "sparsity must hold log10 firing rates (all <= 0)")
    return log_rates


def firing_rates(path: str | Path) -> Float[Tensor, " n_units"] | None:
    """Each unit's firing rate (fraction of tokens) from sparsity.safetensors, or None."""
    log_rates = load_sparsity(path)
    return None if log_rates is None else (10.0 ** log_rates.double() - SPARSITY_EPS).clamp_min(0).float()


__all__ = [
    "CFG_FILE",
    "FORMAT_VERSION",
    "METADATA_KEYS",
    "SPARSITY_FILE",
    "WEIGHTS_FILE",
    "atomic_write_dir",
    "check_tensors",
    "config_from_json",
    "config_json",
    "expected_tensors",
    "firing_rates",
    "load",
    "load_sparsity",
    "hub_folder",
    "read_config",
    "resolve",
    "save",
    "save_sparsity",
]
