"""The sparsity-accuracy frontier: MxD vs TopK transcoder vs skip transcoder.

For every K in a list, one module of each method is built at matched parameters (the
transcoder's width W; the MxD gets the largest number of experts whose parameter count
does not exceed the transcoder's; the skip transcoder is the transcoder plus its I x O
skip matrix, as in the paper), all of them are trained from ONE activation stream of the
language model (`mxd_lens.training.fit`), and evaluated on held-out text
(`mxd_lens.evals.evaluate_many`). Outputs in the run folder:

    results.json          the numbers (keys listed in `RESULT_KEYS` / `ROW_KEYS`)
    <method>_k<K>/        every trained module (`mxd_lens.load` reads it back)
    frontier.html         delta CE (with stderr bars) and NMSE against K per method
    training.json         per-module training summaries and phase timings

results.json is written last, atomically: a folder without it holds no result.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from jaxtyping import Int
from torch import Tensor
from transformer_lens import HookedTransformer

from mxd_lens import registry
from mxd_lens.architectures.base import Replacement, Sizes
from mxd_lens.atomic import write_json
from mxd_lens.config import parse_dtype
from mxd_lens.precision import resolve_autocast
from mxd_lens.training.config import TrainerConfig
from mxd_lens.validation import check_layer

METHODS = tuple(registry.methods())
RESULT_KEYS = (
    "model", "layer", "train_tokens", "eval_tokens", "ce_clean", "ce_zero_ablation", "ce_mean_ablation",
    "seed", "config", "versions", "rows",
)
ROW_KEYS = (
    "method", "k", "n_params", "nmse", "ce", "delta_ce", "delta_ce_stderr", "ce_recovered", "kl", "l0",
    "dead_fraction", "usage_entropy", "expert_cos",
)
RESULTS_FILE = "results.json"


@dataclass(kw_only=True)
class FrontierConfig:
    """One frontier run: which model, data, methods, sizes and budget."""

    model: str | None = None
    """Language model: None for the embedded default (SmolLM2-135M-Instruct), a local
    Hugging Face folder, or a TransformerLens model name."""
    layer: int = 12
    """Block whose MLP is replaced."""
    dataset: str | None = None
    """Training text: None for the embedded corpus's train split, else a .txt file, a
    folder of them, or a Hugging Face dataset name."""
    eval_dataset: str | None = None
    """Held-out text: None for the embedded held-out book (Persuasion) when `dataset` is
    None, else the last `eval_fraction` of `dataset`'s documents."""
    eval_fraction: float = 0.1
    """Share of `dataset`'s documents held out when no `eval_dataset` is given."""
    context: int = 128
    """Tokens per row (each row starts with the separator token 0)."""
    methods: list[str] = field(default_factory=registry.methods)
    """Methods to train: any of 'mxd', 'transcoder', 'skip_transcoder' (architecture
    names such as 'topk_transcoder' are accepted as aliases)."""
    ks: list[int] = field(default_factory=lambda: [16, 32])
    """Active units per token (TopK's K) to train each method at."""
    width: int | None = None
    """Transcoder width W (latents); None: 16 * d_model. The MxD is matched to it."""
    d_hidden: int | None = None
    """MxD hidden width H; None: the model's d_mlp."""
    collect_tokens: int = 491_520
    """Unique training tokens run through the language model (the rest of
    `trainer.train_tokens` are further epochs over them)."""
    eval_tokens: int = 16_384
    """Held-out tokens for the evaluation (rounded down to whole rows)."""
    eval_batch_size: int = 8
    """Rows per forward pass in the evaluation."""
    dtype: str = "float32"
    """dtype of the language model and of the modules (evaluate CE in float32)."""
    device: str = "cpu"
    """Device of the model and the training."""
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    """Training settings shared by every module (tokens, batch, lr, seed...)."""
    progress: bool = True
    """Show progress bars."""

    def __post_init__(self) -> None:
        if isinstance(self.trainer, dict):
            self.trainer = TrainerConfig.from_dict(self.trainer)
        if not self.methods:
            raise ValueError(f"methods is empty; expected some of {registry.methods()}")
        self.methods = registry.canonical_methods(list(self.methods))
        if len(set(self.methods)) != len(self.methods):
            raise ValueError(f"methods={self.methods} lists a method twice")
        if not self.ks:
            raise ValueError("ks is empty; expected at least one K")
        for k in self.ks:
            if isinstance(k, bool) or not isinstance(k, int) or k < 1:
                raise ValueError(f"K={k!r} must be a positive integer")
        if len(set(self.ks)) != len(self.ks):
            raise ValueError(f"ks={self.ks} lists a K twice")
        for name in ("width", "d_hidden"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name}={value!r} must be a positive integer")
        if self.width is not None and max(self.ks) > self.width:
            raise ValueError(f"K={max(self.ks)} is larger than the transcoder width {self.width}")
        for name in ("context", "collect_tokens", "eval_tokens", "eval_batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive integer")
        if self.context < 2:
            raise ValueError(f"context={self.context} but a row needs at least 2 tokens")
        if not 0 < self.eval_fraction < 1:
            raise ValueError(f"eval_fraction={self.eval_fraction} must lie strictly between 0 and 1")
        parse_dtype(self.dtype)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def module_name(method: str, k: int) -> str:
    """The folder name of a trained module: '<method>_k<K>' (`registry.module_folder_name`)."""
    return registry.module_folder_name(method, k)


def resolve_sizes(model: HookedTransformer, cfg: FrontierConfig) -> Sizes:
    """The model-derived sizes every method is built at; raises ValueError when a K
    does not fit a method's number of units (checked on meta-device modules)."""
    d = model.cfg.d_model
    sizes = Sizes(
        d_model=d,
        width=cfg.width or 16 * d,
        d_hidden=cfg.d_hidden or model.cfg.d_mlp,
        glu=bool(model.cfg.gated_mlp),
        act_fn=str(model.cfg.act_fn),
    )
    for method in cfg.methods:
        for k in cfg.ks:
            try:
                build_module(method, k, sizes, cfg.layer, None, cfg.dtype, "meta")
            except ValueError as err:
                raise ValueError(f"{method} at K={k}: {err}") from None
    return sizes


def build_module(method: str, k: int, sizes: Sizes, layer: int, model_name: str | None, dtype: str, device: str) -> Replacement:
    """A freshly initialised module of `method` at the run's matched sizes."""
    arch = registry.get(method)
    return arch.module_class.build(sizes, k, layer=layer, model_name=model_name, dtype=dtype, device=device)


def versions() -> dict[str, str | None]:
    """Installed versions of the packages a result depends on."""
    out = {}
    for key, dist in (("mxd_lens", "mxd-lens"), ("torch", "torch"), ("transformer_lens", "transformer-lens"), ("sae_lens", "sae-lens")):
        try:
            out[key] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[key] = None
    return out


def write_json_atomic(path: Path, payload: Any) -> None:
    """results.json / training.json, atomically."""
    write_json(path, payload)


def prepare_out_dir(out: str | Path, overwrite: bool = False) -> Path:
    """Create `out` and prove it writable before any expensive work; refuse to mix a
    new run into a folder that already holds a result unless `overwrite`."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {str(out)!r} exists and is not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=out)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise ValueError(f"--out {str(out)!r} is not writable ({err.strerror or err})") from None
    if (out / RESULTS_FILE).exists():
        if not overwrite:
            raise ValueError(f"--out {str(out)!r} already holds {RESULTS_FILE}; pass --overwrite or choose another folder")
        (out / RESULTS_FILE).unlink()  # a failed rerun must not leave the old result beside new modules
    return out


def load_docs(cfg: FrontierConfig) -> tuple[list[str], list[str]]:
    """(training documents, held-out documents) from the configured datasets."""
    from mxd_lens.sources import load_default_corpus, load_texts

    if cfg.dataset is None:
        train_docs = load_default_corpus("train")
        eval_docs = load_default_corpus("heldout") if cfg.eval_dataset is None else load_texts(cfg.eval_dataset, split="test")
        return train_docs, eval_docs
    docs = load_texts(cfg.dataset)
    if cfg.eval_dataset is not None:
        return docs, load_texts(cfg.eval_dataset, split="test")
    if len(docs) < 2:
        raise ValueError(
            f"dataset {cfg.dataset!r} has {len(docs)} document(s); holding out a share for evaluation "
            "needs at least 2 (or pass --eval-dataset)"
        )
    cut = min(len(docs) - 1, max(1, round(len(docs) * (1 - cfg.eval_fraction))))
    return docs[:cut], docs[cut:]


def tokenize_docs(
    cfg: FrontierConfig, tokenizer, train_docs: list[str], eval_docs: list[str]
) -> tuple[Int[Tensor, "rows ctx"], Int[Tensor, "rows ctx"]]:
    """(training rows, held-out rows), capped at collect_tokens / eval_tokens."""
    from mxd_lens.sources import token_rows

    train = token_rows(tokenizer, train_docs, cfg.context, max_rows=max(1, cfg.collect_tokens // cfg.context))
    heldout = token_rows(tokenizer, eval_docs, cfg.context, max_rows=max(1, cfg.eval_tokens // cfg.context))
    return train, heldout


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """A fixed-width text table of result rows."""
    head = f"{'method':<16}{'K':>5}{'params':>11}{'NMSE':>9}{'dCE':>10}{'+-':>8}{'CE rec':>8}{'KL':>8}{'L0':>6}{'dead':>7}{'H(use)':>8}{'cos':>7}"
    lines = [head, "-" * len(head)]

    def f(v: Any, spec: str) -> str:
        return "n/a" if v is None else format(v, spec)

    for r in rows:
        lines.append(
            f"{r['method']:<16}{r['k']:>5}{r['n_params']:>11,}{f(r['nmse'], '.4f'):>9}{f(r['delta_ce'], '.4f'):>10}"
            f"{f(r['delta_ce_stderr'], '.4f'):>8}{f(r['ce_recovered'], '.3f'):>8}{f(r['kl'], '.4f'):>8}"
            f"{f(r['l0'], '.1f'):>6}{f(r['dead_fraction'], '.1%'):>7}{f(r['usage_entropy'], '.2f'):>8}"
            f"{f(r['expert_cos'], '.3f'):>7}"
        )
    return "\n".join(lines)


def train_modules(
    model: HookedTransformer,
    cfg: FrontierConfig,
    train_rows: Tensor,
    out: Path | None,
    eval_rows: Tensor | None = None,
) -> tuple[dict[str, Replacement], dict[str, Any]]:
    """Build and train every (method, K) from one activation stream; save each module
    into out/<method>_k<K> when `out` is given. Returns (modules, training summaries)."""
    from mxd_lens.training import fit

    check_layer(cfg.layer, model.cfg.n_layers)
    sizes = resolve_sizes(model, cfg)
    modules = {
        module_name(m, k): build_module(m, k, sizes, cfg.layer, model.cfg.model_name, cfg.dtype, cfg.device)
        for k in cfg.ks for m in cfg.methods
    }
    summaries = fit(model, {n: (cfg.layer, m) for n, m in modules.items()}, train_rows, cfg.trainer, eval_tokens=eval_rows)
    if out is not None:
        for name, module in modules.items():
            module.save(out / name)
    info = {
        "sizes": sizes._asdict(),
        "summaries": {n: s.to_dict() for n, s in summaries.items()},
        "target_mean": {cfg.layer: next(iter(summaries.values())).target_mean},
    }
    return modules, info


def run_frontier(
    cfg: FrontierConfig,
    out: str | Path,
    *,
    model: HookedTransformer | None = None,
    train_rows: Tensor | None = None,
    eval_rows: Tensor | None = None,
    overwrite: bool = False,
    echo=print,
) -> dict[str, Any]:
    """Train, evaluate and write a frontier run into `out`; returns results.json's payload.

    `model`, `train_rows` and `eval_rows` default to loading what `cfg` names.
    """
    from mxd_lens.evals import evaluate_many
    from mxd_lens.experiments.plots import write_frontier_html

    timings: dict[str, float] = {}
    out = prepare_out_dir(out, overwrite)
    t = time.perf_counter()
    docs = load_docs(cfg) if train_rows is None or eval_rows is None else None  # data errors before the model loads
    timings["load_text"] = time.perf_counter() - t
    t = time.perf_counter()
    if model is None:
        from mxd_lens.sources import load_model

        model = load_model(cfg.model, device=cfg.device, dtype=parse_dtype(cfg.dtype))
    timings["load_model"] = time.perf_counter() - t
    check_layer(cfg.layer, model.cfg.n_layers)
    resolve_sizes(model, cfg)  # size errors before any data work
    t = time.perf_counter()
    if docs is not None:
        loaded_train, loaded_eval = tokenize_docs(cfg, model.tokenizer, *docs)
        train_rows = loaded_train if train_rows is None else train_rows
        eval_rows = loaded_eval if eval_rows is None else eval_rows
    timings["tokenize"] = time.perf_counter() - t

    t = time.perf_counter()
    modules, info = train_modules(model, cfg, train_rows, out)
    timings["train"] = time.perf_counter() - t

    t = time.perf_counter()
    mean = {cfg.layer: info["target_mean"][cfg.layer].to(cfg.device, parse_dtype(cfg.dtype))}
    report = evaluate_many(
        model, {n: {cfg.layer: m} for n, m in modules.items()}, eval_rows,
        batch_size=cfg.eval_batch_size, mean_outputs=mean, progress=cfg.progress,
    )
    timings["eval"] = time.perf_counter() - t

    rows = []
    for name, module in modules.items():
        r = report.results[name].to_dict()
        method, k = registry.parse_module_folder_name(name)
        row = {"method": method, "k": k, "n_params": module.n_params()}
        row.update({key: r[key] for key in ROW_KEYS if key not in row})
        rows.append(row)
    base = report.baselines
    run_config = cfg.to_dict()
    run_config["resolved"] = {
        **info["sizes"],
        "train_autocast": str(resolve_autocast(cfg.trainer.autocast, cfg.device)),
        "collect_autocast": str(resolve_autocast(cfg.trainer.activations.autocast, cfg.device)),
        "train_rows": list(train_rows.shape),
        "eval_rows": list(eval_rows.shape),
    }
    results = {
        "model": model.cfg.model_name,
        "layer": cfg.layer,
        "train_tokens": cfg.trainer.total_steps * cfg.trainer.batch_size,
        "eval_tokens": base.n_tokens,
        "ce_clean": base.ce_clean,
        "ce_zero_ablation": base.ce_zero_ablation,
        "ce_mean_ablation": base.ce_mean_ablation,
        "seed": cfg.trainer.seed,
        "config": run_config,
        "versions": versions(),
        "rows": rows,
    }
    t = time.perf_counter()
    write_frontier_html(results, out / "frontier.html")
    timings["plot"] = time.perf_counter() - t
    summaries = info["summaries"]
    write_json_atomic(out / "training.json", {"timings_seconds": timings, "summaries": summaries})
    write_json_atomic(out / RESULTS_FILE, results)  # last: its presence marks a finished run
    echo(format_table(rows))
    echo(
        f"clean CE {base.ce_clean:.4f}, zero-ablated {base.ce_zero_ablation:.4f}, mean-ablated "
        f"{base.ce_mean_ablation:.4f} on {base.n_tokens:,} held-out predictions"
    )
    echo("time: " + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items()))
    return results


__all__ = [
    "FrontierConfig",
    "METHODS",
    "RESULT_KEYS",
    "ROW_KEYS",
    "build_module",
    "format_table",
    "module_name",
    "prepare_out_dir",
    "resolve_sizes",
    "run_frontier",
    "train_modules",
]
