"""Lay out a training run as a Hugging Face repo (and upload it): `mxd-lens publish`.

The repo holds one folder per module in the SAE-Lens layout that `mxd_lens.save` writes
(so `SAE.from_pretrained("user/name", "mxd_k32")` works after `import mxd_lens`) and a
README model card with the run's model, layer, training tokens and frontier numbers.
Every module is loaded (validated) and saved again, never copied byte for byte, so a
published folder is always one that `mxd_lens.load` accepts.
"""

from __future__ import annotations

import argparse
import re
import socket
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from mxd_lens import registry
from mxd_lens.experiments import results as run_format  # the one definition of the run format
from mxd_lens.experiments.results import RESULTS_FILE, ROW_KEYS, previous_module_folders
from mxd_lens.experiments.results import RESULT_KEYS as RESULTS_KEYS
from mxd_lens.run_folder import RunFolder

# Torch-free at import (storage is imported where a module is read), so that the command
# line can register this subcommand without paying for torch.
CFG_FILE = "cfg.json"
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


def read_results(run_dir: Path) -> dict[str, Any]:
    """results.json of a run, with every key the model card needs checked."""
    path = Path(run_dir) / RESULTS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: publish needs a finished training run's results")
    return run_format.read_results(run_dir)


def _folder_key(name: str) -> tuple[str, int] | None:
    try:
        return registry.parse_module_folder_name(name)
    except ValueError:
        return None


def module_dirs(run_dir: Path) -> dict[str, Path]:
    """The run's module folders (`<method>_k<K>` holding a cfg.json), by name."""
    found = {
        p.name: p
        for p in sorted(Path(run_dir).iterdir())
        if p.is_dir() and _folder_key(p.name) is not None and (p / CFG_FILE).is_file()
    }
    if not found:
        raise FileNotFoundError(f"{run_dir} holds no module folders (<method>_k<K>/ with {CFG_FILE})")
    return found


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):  # CE differences of 1e-4 nats matter: 4 decimals
        if value == 0 or abs(value) >= 1:
            return f"{value:.4f}"
        return f"{value:.4g}" if abs(value) >= 1e-3 else f"{value:.2e}"
    return str(value)


def model_card(repo_id: str, results: dict[str, Any], folders: dict[str, dict[str, Any]]) -> str:
    """The README.md of the repo: what the modules are, how good, how to load them."""
    example = next((n for n in folders if n.startswith("mxd")), next(iter(folders)))
    cols = (
        "method",
        "k",
        "n_params",
        "nmse",
        "ce",
        "delta_ce",
        "delta_ce_stderr",
        "ce_recovered",
        "kl",
        "l0",
        "dead_fraction",
    )
    rows = sorted(results["rows"], key=lambda r: (str(r["method"]), r["k"]))
    table = ["| folder | " + " | ".join(cols) + " |", "|" + " --- |" * (len(cols) + 1)]
    by_key = {_folder_key(name): name for name in folders}
    for row in rows:
        arch = registry.find(str(row["method"]))
        name = by_key.get((registry.method_of(arch.name), row["k"])) if arch is not None else None
        folder = f"`{name}`" if name is not None else "(not published)"
        table.append(f"| {folder} | " + " | ".join(_fmt(row[c]) for c in cols) + " |")
    listing = "\n".join(
        f"- `{name}`: {info['architecture']}, d_in={info['d_in']}, {info['n_units']:,} "
        f"{'experts' if info['architecture'] == 'mxd' else 'latents'}, k={info['k']}, "
        f"hooks {info['hook_name']} -> {info['hook_name_out']}"
        for name, info in folders.items()
    )
    from mxd_lens.storage import FORMAT_VERSION as format_version

    versions = (
        ", ".join(f"{k} {v}" for k, v in sorted(results["versions"].items()))
        if isinstance(results["versions"], dict)
        else _fmt(results["versions"])
    )
    return f"""---
library_name: saelens
tags:
- mxd_lens
- sae_lens
- mixture-of-decoders
- transcoder
- interpretability
---

# {repo_id}

Sparse replacements for the MLP of layer {results["layer"]} of **{results["model"]}**:
Mixture of Decoders (MxD, Oldfield et al. 2025, arXiv 2505.21364) and the TopK
transcoder / skip transcoder baselines, trained with
mxd_lens on {_fmt(results["train_tokens"])} tokens
(seed {results["seed"]}). Each folder maps the MLP's input to its output and loads with
SAE-Lens (after `import mxd_lens`, which registers the architectures) or with mxd_lens.

## Modules

{listing}

## Faithfulness

Next-token cross-entropy (nats) on {_fmt(results["eval_tokens"])} held-out tokens with the
module spliced in place of the MLP. Clean model: {_fmt(results["ce_clean"])}; MLP
zero-ablated: {_fmt(results["ce_zero_ablation"])}; MLP mean-ablated:
{_fmt(results["ce_mean_ablation"])}. `delta_ce` is the increase over the clean model,
`ce_recovered` the fraction of the zero-ablation gap that the module recovers, `nmse`
the normalised reconstruction error of the MLP output, `l0` the active units per token.

{chr(10).join(table)}

## Load with SAE-Lens

```python
import mxd_lens  # registers "mxd", "topk_transcoder", "topk_skip_transcoder" with SAE-Lens
from sae_lens import SAE, HookedSAETransformer
sae = SAE.from_pretrained("{repo_id}", "{example}")
# model: a HookedSAETransformer of {results["model"]}; the expert coefficients are at
# blocks.{results["layer"]}.hook_mlp_out.hook_sae_acts_post
logits = model.run_with_saes(tokens, saes=[sae])
```

## Load with mxd_lens

```python
from huggingface_hub import snapshot_download
import mxd_lens
folder = snapshot_download("{repo_id}", allow_patterns="{example}/*")
module = mxd_lens.load(f"{{folder}}/{example}")
with mxd_lens.attach(model, {{{results["layer"]}: module}}):  # model: a HookedTransformer
    logits = model(tokens)
```

Weights are safetensors only (`sae_weights.safetensors`, plus `sparsity.safetensors`
with log10 firing rates where known); `cfg.json` follows SAE-Lens's layout with
`mxd_lens_format` {format_version}. Software: {versions}.
"""


def publish(run_dir: str | Path, repo_id: str, dry_run: bool = True, out: str | Path | None = None) -> Path:
    """Lay out `run_dir` as the Hugging Face repo `repo_id` in `out`, and upload it
    unless `dry_run`.

    Args:
        run_dir: a training run: results.json plus module folders named <method>_k<K>.
        repo_id: "user/name" on the Hugging Face hub.
        dry_run: only write the folder.
        out: where to write it (default: `<run_dir>/hf_repo`).

    Returns:
        The repo folder.

    Raises:
        FileNotFoundError / ValueError: the run is incomplete or a module is invalid.
        RuntimeError: the upload was asked for and the hub cannot be reached.
    """
    from mxd_lens import atomic, storage

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"no run folder at {run_dir}")
    if not isinstance(repo_id, str) or not _REPO_ID.match(repo_id):
        raise ValueError(f"repo_id={repo_id!r} is not a Hugging Face repo id of the form 'user/name'")
    results = read_results(run_dir)
    out = Path(out) if out is not None else run_dir / "hf_repo"
    # A new layout replaces the previous publish's files (never anything else in `out`),
    # and only once it is complete.
    folder = RunFolder(out, overwrite=True, label="--out")
    folder.check()
    # Load (validate) every module before writing anything.
    modules = {}
    for name, path in module_dirs(run_dir).items():
        modules[name] = (storage.load(path), storage.firing_rates(path))

    with folder:
        stale = previous_module_folders(out)
        tmp = folder.staging
        folders = {}
        for name, (module, rates) in modules.items():
            meta = {"model_name": module.cfg.model_name or results["model"]}
            storage.save(module, tmp / name, metadata=meta, firing_rates=rates)
            cfg = module.cfg
            folders[name] = {
                "architecture": module.architecture,
                "d_in": cfg.d_in,
                "n_units": module.n_units,
                "k": cfg.k,
                "hook_name": cfg.hook_name,
                "hook_name_out": cfg.hook_name_out,
            }
        atomic.write_text(tmp / "README.md", model_card(repo_id, results, folders))
        atomic.write_json(tmp / RESULTS_FILE, results)
        folder.commit(stale=stale)
    if not dry_run:
        upload(out, repo_id)
    return out


def upload(folder: Path, repo_id: str) -> None:
    """Upload `folder` as the model repo `repo_id` (created if needed)."""
    from huggingface_hub import HfApi, constants

    if constants.HF_HUB_OFFLINE:
        raise RuntimeError(
            f"cannot upload {folder} to {repo_id}: HF_HUB_OFFLINE is set, so the hub is not contacted"
        )
    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=5).close()
    except OSError as e:
        raise RuntimeError(
            f"cannot upload {folder} to {repo_id}: the hub at {host} is unreachable ({e})"
        ) from None
    api = HfApi()
    try:
        api.create_repo(repo_id, repo_type="model", exist_ok=True)
        api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model")
    except Exception as e:  # noqa: BLE001  (any hub failure ends in one sentence, not a trace)
        raise RuntimeError(f"upload of {folder} to {repo_id} failed: {e}") from None


# --- CLI ----------------------------------------------------------------------------------
def add_subcommand(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `publish RUN_DIR --repo user/name [--dry-run] [--out DIR]`."""
    p = subparsers.add_parser(
        "publish",
        help="lay out a training run as a Hugging Face repo (SAE-Lens layout + model card) and upload it",
        description=__doc__,
    )
    p.add_argument(
        "run_dir", metavar="RUN_DIR", help="training run folder: results.json + <method>_k<K>/ module folders"
    )
    p.add_argument("--repo", required=True, help="Hugging Face repo id, user/name")
    p.add_argument("--dry-run", action="store_true", help="only write the repo folder, do not upload")
    p.add_argument("--out", default=None, help="where to write the repo folder (default RUN_DIR/hf_repo)")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """The `publish` subcommand: 0 on success, 1 with a one-line error otherwise."""
    try:
        folder = publish(args.run_dir, args.repo, dry_run=args.dry_run, out=args.out)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"mxd-lens publish: {e}", file=sys.stderr)
        return 1
    print(
        f"{'wrote' if args.dry_run else 'uploaded'} {folder}" + ("" if args.dry_run else f" to {args.repo}")
    )
    return 0


__all__ = [
    "RESULTS_KEYS",
    "ROW_KEYS",
    "add_subcommand",
    "model_card",
    "module_dirs",
    "publish",
    "read_results",
    "run",
    "upload",
]
