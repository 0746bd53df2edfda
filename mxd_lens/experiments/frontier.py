"""The sparsity-accuracy frontier: MxD vs TopK transcoder vs skip transcoder.

For every K in a list, one module of each method is built at matched parameters (the
transcoder's width W; the MxD gets the largest number of experts whose parameter count
does not exceed the transcoder's; the skip transcoder is the transcoder plus its I x O
skip matrix, as in the paper), all of them are trained from ONE activation stream of the
language model (`mxd_lens.training.fit`), and evaluated on held-out text
(`mxd_lens.evals.evaluate_many`). Outputs in the run folder:

    results.json          the numbers of the main layer (keys listed in `RESULT_KEYS` / `ROW_KEYS`)
    <method>_k<K>/        every trained module of the main layer (`mxd_lens.load` reads it back)
    evaluation.json       the main layer's full evaluation: baselines with the special positions'
                          shares and massive-activation flags, delta CE ratios with per-row
                          bootstrap intervals, per-row differences, learning curves
    eval_inputs.safetensors  the held-out rows and mean-ablation vectors (`mxd-lens eval RUN_DIR`)
    frontier.html         delta CE (stderr: rows as units) and NMSE against K per method, and
                          the learning curves
    training.json         per-module training summaries and phase timings
    layers.json, layers.html, layer_<L>/<method>_k<K>/   with `sweep_layers` (`--layers`): every
                          layer's summary and figure, the other layers' modules

Special positions (the separator starting each row, BOS/EOS/pad) are excluded by default
from training and from the comparison (`FrontierConfig.exclude_special_tokens`,
`mxd_lens.evals.runner`).

results.json is written last, atomically: a folder without it holds no result.
"""

from __future__ import annotations

import importlib.metadata
import json
import time
from pathlib import Path
from typing import Any, Sequence

from jaxtyping import Int
from torch import Tensor
from transformer_lens import HookedTransformer

from mxd_lens import registry
from mxd_lens.architectures.base import Replacement, Sizes
from mxd_lens.atomic import write_file, write_json
from mxd_lens.config import parse_dtype
from mxd_lens.experiments.config import FrontierConfig, demo_config
from mxd_lens.experiments.results import (
    RESULT_KEYS,
    RESULTS_FILE,
    ROW_KEYS,
    ResultRow,
    RunResults,
    previous_module_folders,
)
from mxd_lens.precision import resolve_autocast
from mxd_lens.run_folder import RunFolder
from mxd_lens.validation import check_layer

METHODS = tuple(registry.methods())
CHECKPOINTS = "checkpoints"
"""The run folder's checkpoint subfolder (kept when a run fails, for `--resume`)."""


def module_name(method: str, k: int) -> str:
    """The folder name of a trained module: '<method>_k<K>' (`registry.module_folder_name`)."""
    return registry.module_folder_name(method, k)


def sizes_of(cfg: FrontierConfig, d_model: int, d_mlp: int, glu: bool, act_fn: str) -> Sizes:
    """The sizes every method is built at, from the model's shape and the run's config."""
    return Sizes(
        d_model=d_model,
        width=cfg.width or 16 * d_model,
        d_hidden=cfg.d_hidden or d_mlp,
        glu=bool(glu),
        act_fn=str(act_fn),
    )


def check_sizes(sizes: Sizes, cfg: FrontierConfig) -> Sizes:
    """Raise ValueError when a K does not fit a method's number of units (checked on
    meta-device modules: the modules' own checks, nothing allocated)."""
    for method in cfg.methods:
        n_units = build_module(method, 1, sizes, cfg.layer, None, cfg.dtype, "meta").n_units
        for k in cfg.ks:
            if k > n_units:
                raise ValueError(
                    f"K={k} is larger than the {registry.label(method)}'s {n_units} units at this model's sizes "
                    f"(transcoder width {sizes.width}); pass a smaller K or a larger width"
                )
            try:
                build_module(method, k, sizes, cfg.layer, None, cfg.dtype, "meta")
            except ValueError as err:
                raise ValueError(f"{method} at K={k}: {err}") from None
    return sizes


def resolve_sizes(model: HookedTransformer, cfg: FrontierConfig) -> Sizes:
    """The model-derived sizes every method is built at; raises ValueError when a K
    does not fit a method's number of units (checked on meta-device modules)."""
    c = model.cfg
    return check_sizes(sizes_of(cfg, c.d_model, c.d_mlp, bool(c.gated_mlp), str(c.act_fn)), cfg)


# Hugging Face model types whose MLP is gated (TransformerLens's gated_mlp), and some that
# are not; for any other type the sizes are checked once the model is loaded.
_GATED_TYPES = {"llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "olmo", "olmo2", "granite"}
_PLAIN_TYPES = {"gpt2", "gpt_neox", "gptj", "opt", "bloom", "phi", "gpt_neo"}


def _first(config: dict[str, Any], *keys: str) -> Any:
    return next((config[k] for k in keys if isinstance(config.get(k), int) and not isinstance(config.get(k), bool)), None)


def model_config_file(model: str | None) -> Path | None:
    """The config.json that describes `model` without loading it: the default model's
    converted folder, or a local folder's own (None for hub names, or before the default
    model's first conversion). A local folder without one is an error."""
    if model is None or str(model).lower() in _default_aliases():
        from mxd_lens.sources.model import default_model_folder

        path = default_model_folder() / "config.json"
        return path if path.is_file() else None
    folder = Path(model).expanduser()
    if folder.is_dir():
        if not (folder / "config.json").is_file():
            raise ValueError(f"model {str(model)!r} is not a Hugging Face model folder: it has no config.json")
        return folder / "config.json"
    return None


def _default_aliases() -> set[str]:
    from mxd_lens.sources import model as sources_model

    return set(getattr(sources_model, "_DEFAULT_ALIASES", {sources_model.DEFAULT_MODEL_NAME.lower()}))


def model_shape(model: str | None) -> dict[str, Any]:
    """What a model's config.json says about its shape, read without loading weights:
    `n_layers`, and `d_model`, `d_mlp`, `glu`, `act_fn` where the model type is known
    (a key is absent when it cannot be told)."""
    path = model_config_file(model)
    if path is None:
        return {}
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not a readable config.json ({err})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a JSON object")  # noqa: TRY004
    config = {**config.get("text_config", {}), **config} if isinstance(config.get("text_config"), dict) else config
    shape: dict[str, Any] = {}
    n_layers = _first(config, "num_hidden_layers", "n_layer", "num_layers")
    if n_layers is not None:
        shape["n_layers"] = n_layers
    d_model = _first(config, "hidden_size", "n_embd", "d_model")
    model_type = config.get("model_type")
    if d_model is not None and model_type in _GATED_TYPES | _PLAIN_TYPES:
        d_mlp = _first(config, "intermediate_size", "n_inner", "ffn_dim") or 4 * d_model
        act = config.get("hidden_act") or config.get("activation_function") or "gelu"
        shape.update(d_model=d_model, d_mlp=d_mlp, glu=model_type in _GATED_TYPES, act_fn=str(act))
    return shape


def preflight(cfg: FrontierConfig, layers: Sequence[int] | None = None) -> dict[str, Any]:
    """Check the run against the model before loading it: the model folder, every
    layer's range and every K against each method's number of units, from the model's
    config.json (what cannot be told from it is checked once the model is loaded).
    Returns the shape it read (`model_shape`)."""
    check_model_name(cfg.model, cfg.model_name)
    shape = model_shape(cfg.model)
    for layer in layers if layers is not None else [cfg.layer]:
        if "n_layers" in shape:
            check_layer(layer, shape["n_layers"])
    if "d_model" in shape:
        check_sizes(sizes_of(cfg, shape["d_model"], shape["d_mlp"], shape["glu"], shape["act_fn"]), cfg)
    return shape


def check_model_name(model: str | None, model_name: str | None) -> None:
    """`model_name` picks the TransformerLens conversion of a local folder: refuse it for
    anything else before loading."""
    if model_name is None:
        return
    if model is None or not Path(model).expanduser().is_dir():
        shown = "the default model" if model is None else repr(model)
        raise ValueError(
            f"model_name={model_name!r} picks the TransformerLens conversion of a local model folder, "
            f"but {shown} is not a folder; pass --model FOLDER with it"
        )


def load_run_model(
    model: str | None, model_name: str | None, device: str, dtype: str, echo=print, fold_ln: bool = True
) -> HookedTransformer:
    """`mxd_lens.sources.load_model` with the run's settings; `echo`es one line saying
    which TransformerLens conversion and weight processing the model got."""
    from mxd_lens.sources import load_model

    loaded = load_model(model, device=device, dtype=parse_dtype(dtype), model_name=model_name, fold_ln=fold_ln)
    echo(describe_processing(loaded))
    return loaded


def describe_processing(model: HookedTransformer) -> str:
    """'model X: <processing flags that are on>, built as <official TL name>' from
    `model.mxd_lens_processing` (what `load_model` records)."""
    record = getattr(model, "mxd_lens_processing", None) or {}
    flags = [k for k in ("fold_ln", "center_writing_weights", "center_unembed", "fold_value_biases") if record.get(k)]
    text = f"model {model.cfg.model_name}: {', '.join(flags) or 'no weight processing'}"
    if record.get("config_from_folder"):
        text += f" (TransformerLens's {record.get('architecture')} conversion, sizes from the folder's config.json)"
    elif record.get("official_name"):
        text += f" (TransformerLens conversion of {record['official_name']})"
    return text


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
    """Refuse an `out` that cannot take a new run (not a folder; holds results.json and
    not `overwrite`), then create it. Deletes nothing: commands write through
    `mxd_lens.run_folder.RunFolder`, which replaces an old result only on success."""
    folder = RunFolder(out, overwrite=overwrite)
    folder.check()
    try:
        Path(out).mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"--out {str(out)!r} is not writable ({err.strerror or err})") from None
    return Path(out)


def load_docs(cfg: FrontierConfig) -> tuple[Any, Any]:
    """(training data, held-out data), checked before any model loads: document lists for
    the embedded corpus, `mxd_lens.sources.TokenDataset`s (opened, not read) for
    `dataset` / `eval_dataset`; held-out None: the rows after the training rows."""
    from mxd_lens.sources import load_default_corpus, open_dataset

    columns = {"text_column": cfg.text_column, "token_column": cfg.token_column}
    eval_data = None if cfg.eval_dataset is None else open_dataset(cfg.eval_dataset, split="test", **columns)
    if cfg.dataset is None:
        return load_default_corpus("train"), load_default_corpus("heldout") if eval_data is None else eval_data
    return open_dataset(cfg.dataset, **columns), eval_data


def tokenize_docs(
    cfg: FrontierConfig, tokenizer, train_docs: Any, eval_docs: Any
) -> tuple[Int[Tensor, "rows ctx"], Int[Tensor, "rows ctx"]]:
    """(training rows, held-out rows), capped at collect_tokens / eval_tokens. A dataset's
    rows are a memory-mapped token file (`dataset_token_rows`); with no held-out data the
    rows following the training rows are held out (with too little data for both,
    `eval_fraction` of its rows, the last ones)."""
    from mxd_lens.sources import dataset_token_rows, token_rows

    n_train, n_eval = max(1, cfg.collect_tokens // cfg.context), max(1, cfg.eval_tokens // cfg.context)

    def rows(data: Any, n: int) -> Tensor:
        if isinstance(data, list):
            return token_rows(tokenizer, data, cfg.context, max_rows=n)
        return dataset_token_rows(data, tokenizer, cfg.context, max_rows=n, progress=cfg.progress)

    if eval_docs is not None:
        return rows(train_docs, n_train), rows(eval_docs, n_eval)
    both = rows(train_docs, n_train + n_eval)
    if both.shape[0] < n_train + n_eval:
        if both.shape[0] < 2:
            raise ValueError(
                f"dataset {cfg.dataset!r} gives {both.shape[0]} row(s) of {cfg.context} tokens; holding out a "
                "share for evaluation needs at least 2 (or pass --eval-dataset)"
            )
        n_eval = min(both.shape[0] - 1, max(1, round(both.shape[0] * cfg.eval_fraction)))
        n_train = both.shape[0] - n_eval
    return both[:n_train], both[n_train : n_train + n_eval]


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


def module_folders(
    cfg: FrontierConfig, layers: Sequence[int] | None = None, main: int | None = None
) -> dict[str, tuple[int, str, int]]:
    """Relative folder -> (layer, method, K) of every module a run trains: '<method>_k<K>'
    at one layer, 'layer_<L>/<method>_k<K>' when several layers are trained at once
    (except the `main` layer's, which stay '<method>_k<K>': a frontier run's sweep)."""
    layers = list(layers) if layers is not None else [cfg.layer]
    out = {}
    for layer in layers:
        for k in cfg.ks:
            for method in cfg.methods:
                name = module_name(method, k)
                out[name if len(layers) == 1 or layer == main else f"layer_{layer}/{name}"] = (layer, method, k)
    return out


def fit_name_of(folder: str) -> str:
    """The name `fit` trains a module folder under: fit's names must not hold '/', so
    'layer_3/mxd_k8' trains as 'layer_3.mxd_k8'."""
    return folder.replace("/", ".")


def frontier_layers(cfg: FrontierConfig) -> list[int]:
    """The layers a frontier run trains: its main `layer`, then `sweep_layers` (sorted)."""
    return [cfg.layer, *sorted(set(cfg.sweep_layers) - {cfg.layer})]


def train_modules(
    model: HookedTransformer,
    cfg: FrontierConfig,
    train_rows: Tensor,
    out: Path | None,
    eval_rows: Tensor | None = None,
    layers: Sequence[int] | None = None,
    main: int | None = None,
    on_step=None,
) -> tuple[dict[str, Replacement], dict[str, Any]]:
    """Build and train every (method, K) (at every layer of `layers`, default
    [cfg.layer]) from one activation stream; save each module into out/<folder>
    (`module_folders`, `main` as there) when `out` is given; `on_step` goes to `fit`
    (learning curves), called with fit's names (`fit_name_of`). Returns (modules by
    folder, info: the sizes, training summaries by folder, and the mean MLP output per layer)."""
    from mxd_lens.training import fit

    plan = module_folders(cfg, layers, main=main)
    for layer in {layer for layer, _, _ in plan.values()}:
        check_layer(layer, model.cfg.n_layers)
    sizes = resolve_sizes(model, cfg)
    import torch

    # the seed decides the initial weights too: a rerun (or N data-parallel processes,
    # which start from rank 0's weights) gives the same modules
    torch.manual_seed(cfg.trainer.seed)
    modules = {
        folder: build_module(method, k, sizes, layer, model.cfg.model_name, cfg.dtype, cfg.device)
        for folder, (layer, method, k) in plan.items()
    }
    fit_name = {folder: fit_name_of(folder) for folder in plan}
    summaries = fit(
        model, {fit_name[f]: (plan[f][0], m) for f, m in modules.items()}, train_rows, cfg.trainer, eval_tokens=eval_rows,
        on_step=on_step,
    )
    if out is not None:
        from mxd_lens.metadata import save_module, write_sparsity

        for folder, module in modules.items():
            save_module(out / folder, module, model, cfg)  # with the complete metadata (mxd_lens.metadata)
        if eval_rows is not None:  # `train`: firing rates on its held-out rows (frontier: after its evaluation)
            write_sparsity(out, model, modules, eval_rows, cfg)
    by_folder = {f: summaries[fit_name[f]] for f in plan}
    target_mean = {}
    for folder, (layer, _, _) in plan.items():
        target_mean.setdefault(layer, by_folder[folder].target_mean)
    info = {
        "sizes": sizes._asdict(),
        "summaries": {f: s.to_dict() for f, s in by_folder.items()},
        "target_mean": target_mean,
        # data parallelism and the activation buffer's bound (mxd_lens.training.fit)
        "distributed": getattr(summaries, "distributed", None),
        "activation_memory": getattr(summaries, "memory", None),
    }
    return modules, info


def _train_as_worker(cfg: FrontierConfig, ctx, model: HookedTransformer | None, train_rows: Tensor | None) -> dict:
    """A data-parallel worker (rank > 0) of a frontier run: loads the model and the rows
    as rank 0 does, trains its share of every batch (`train_modules` -> `fit`; its call
    must mirror rank 0's, which `fit` checks), writes nothing, and waits at a barrier
    while rank 0 evaluates and writes the run. Returns {} (rank 0 returns the results)."""
    from mxd_lens.training import distributed

    if model is None:
        model = load_run_model(cfg.model, cfg.model_name, cfg.device, cfg.dtype, echo=lambda *a, **k: None,
                               fold_ln=cfg.fold_ln)
    if train_rows is None:
        train_rows, _ = tokenize_docs(cfg, model.tokenizer, *load_docs(cfg))
    # the same modules as rank 0's call in run_frontier (fit refuses a mismatch)
    train_modules(model, cfg, train_rows, None, layers=frontier_layers(cfg), main=cfg.layer)
    distributed.barrier(ctx)
    return {}


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

    `model`, `train_rows` and `eval_rows` default to loading what `cfg` names. Everything
    is checked that can be before the model loads (`preflight`), and the run is written
    through `RunFolder`: a failure leaves `out` as it was (an old finished run included,
    `overwrite` or not); with `overwrite` a finished run is replaced only on success.
    """
    from mxd_lens.evals import evaluate_many
    from mxd_lens.experiments.layers import EVALUATION_FILE, LAYERS_FILE, format_layers, layer_summary, names_of
    from mxd_lens.experiments.plots import write_frontier_html, write_layers_html
    from mxd_lens.storage import save_sparsity

    timings: dict[str, float] = {}
    folder = RunFolder(out, overwrite=overwrite, keep_on_failure=[CHECKPOINTS])
    folder.check()
    if model is None:
        preflight(cfg, frontier_layers(cfg))
    from mxd_lens.training import distributed

    dist_ctx = distributed.init_from_env(cfg.device)  # under torchrun: data-parallel training
    if not dist_ctx.is_main:
        return _train_as_worker(cfg, dist_ctx, model, train_rows)
    t = time.perf_counter()
    docs = load_docs(cfg) if train_rows is None or eval_rows is None else None  # data errors before the model loads
    timings["load_text"] = time.perf_counter() - t
    with folder:
        stale = previous_module_folders(folder.out)
        t = time.perf_counter()
        if model is None:
            model = load_run_model(cfg.model, cfg.model_name, cfg.device, cfg.dtype, echo=echo, fold_ln=cfg.fold_ln)
        timings["load_model"] = time.perf_counter() - t
        check_layer(cfg.layer, model.cfg.n_layers)
        resolve_sizes(model, cfg)  # size errors before any data work
        t = time.perf_counter()
        if docs is not None:
            loaded_train, loaded_eval = tokenize_docs(cfg, model.tokenizer, *docs)
            train_rows = loaded_train if train_rows is None else train_rows
            eval_rows = loaded_eval if eval_rows is None else eval_rows
        timings["tokenize"] = time.perf_counter() - t

        layers = frontier_layers(cfg)
        for layer in layers:
            check_layer(layer, model.cfg.n_layers)
        plan = module_folders(cfg, layers, main=cfg.layer)
        t = time.perf_counter()
        curves = learning_curves(model, cfg, eval_rows, plan)
        timings["curve_setup"] = time.perf_counter() - t

        t = time.perf_counter()
        all_modules, info = train_modules(model, cfg, train_rows, folder.staging, layers=layers, main=cfg.layer,
                                          on_step=curves)
        timings["train"] = time.perf_counter() - t
        if curves is not None:
            timings["learning_curves"] = curves.seconds  # inside "train"

        t = time.perf_counter()
        means = {layer: info["target_mean"][layer].to(cfg.device, parse_dtype(cfg.dtype)) for layer in layers}
        reports = {}
        for layer in layers:  # one evaluation per layer: candidates of one call share their ablations
            reports[layer] = evaluate_many(
                model, {n: {layer: m} for n, m in all_modules.items() if plan[n][0] == layer}, eval_rows,
                batch_size=cfg.eval_batch_size, mean_outputs={layer: means[layer]}, progress=cfg.progress,
                exclude_special_tokens=cfg.exclude_special_tokens, stack_candidates=cfg.eval_stack,
            )
        report = reports[cfg.layer]
        modules = {n: m for n, m in all_modules.items() if plan[n][0] == cfg.layer}
        for layer, layer_report in reports.items():  # sparsity.safetensors from the evaluation's own counts
            for name, result in layer_report.results.items():
                save_sparsity(folder.staging / name, result.firing_rates[layer])
        timings["eval"] = time.perf_counter() - t
        save_eval_inputs(folder.staging, eval_rows, means)

        rows = []
        for name, module in modules.items():
            r = report.results[name].to_dict()
            method, k = registry.parse_module_folder_name(name)
            fixed = {"method": method, "k": k, "n_params": module.n_params()}
            rows.append(ResultRow(**fixed, **{key: r[key] for key in ROW_KEYS if key not in fixed}))
        base = report.baselines
        run_config = cfg.to_dict()
        run_config["resolved"] = {
            **info["sizes"],
            "train_autocast": str(resolve_autocast(cfg.trainer.autocast, cfg.device)),
            "collect_autocast": str(resolve_autocast(cfg.trainer.activations.autocast, cfg.device)),
            "train_rows": list(train_rows.shape),
            "eval_rows": list(eval_rows.shape),
            # which TransformerLens conversion and weight processing the model got (load_model)
            "model_processing": getattr(model, "mxd_lens_processing", None),
        }
        results = RunResults(
            model=model.cfg.model_name,
            layer=cfg.layer,
            train_tokens=cfg.trainer.total_steps * cfg.trainer.batch_size,
            eval_tokens=base.n_tokens,
            ce_clean=base.ce_clean,
            ce_zero_ablation=base.ce_zero_ablation,
            ce_mean_ablation=base.ce_mean_ablation,
            seed=cfg.trainer.seed,
            config=run_config,
            versions=versions(),
            rows=rows,
        ).to_dict()
        summaries = {layer: layer_summary(layer, reports[layer], names_of(
            {n: None for n in all_modules if plan[n][0] == layer})) for layer in layers}
        curves_dict = curves.to_dict() if curves is not None else None
        write_json_atomic(folder.staging / EVALUATION_FILE,
                          {"main": summaries[cfg.layer], "learning_curves": curves_dict})
        t = time.perf_counter()
        write_frontier_html(results, folder.staging / "frontier.html", curves=curves_dict,
                            summary=summaries[cfg.layer])
        if len(layers) > 1:
            ordered = [summaries[layer] for layer in sorted(layers)]
            write_json_atomic(folder.staging / LAYERS_FILE, {"main_layer": cfg.layer, "layers": ordered})
            write_layers_html(ordered, folder.staging / "layers.html", title=f"{model.cfg.model_name}: "
                              f"{results['train_tokens']:,} training tokens per module, {base.n_tokens:,} held-out predictions")
        timings["plot"] = time.perf_counter() - t
        write_json_atomic(folder.staging / "training.json", {
            "timings_seconds": timings, "summaries": info["summaries"],
            "distributed": info.get("distributed"), "activation_memory": info.get("activation_memory"),
        })
        write_json_atomic(folder.staging / RESULTS_FILE, results)  # moved in last: its presence marks a finished run
        folder.commit(stale=stale)
    distributed.barrier(dist_ctx)  # the workers wait here until the run is written
    echo(format_table(results["rows"]))
    echo(
        f"clean CE {base.ce_clean:.4f}, zero-ablated {base.ce_zero_ablation:.4f}, mean-ablated "
        f"{base.ce_mean_ablation:.4f} on {base.n_tokens:,} held-out predictions"
    )
    echo(describe_exclusion(base))
    for r in summaries[cfg.layer]["ratios"]:
        echo(f"dCE ratio {registry.label(r['numerator'])} / {registry.label(r['denominator'])} at K={r['k']}: "
             f"{_num(r['ratio'])} (95% bootstrap over rows [{_num(r['low'])}, {_num(r['high'])}])")
    if len(layers) > 1:
        echo(format_layers([summaries[layer] for layer in sorted(layers)]))
    echo("time: " + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items()))
    return results


def describe_exclusion(b: Any) -> str:
    """One line on the special positions of an evaluation's baselines (`CEBaselines`)."""
    layer = b.layers[0]
    share = b.excluded_energy_share.get(layer)
    text = (
        f"special positions ({b.excluded_positions:,} of the held-out tokens) "
        f"{'excluded (clean MLP output kept there)' if b.exclude_special_tokens else 'included'}: they hold "
        f"{_pct(share)} of layer {layer}'s MLP output energy and {_pct(b.excluded_ablation_share)} of its "
        f"zero-ablation effect"
    )
    n = b.massive_positions.get(layer, 0)
    return text + (
        f"; {n} compared position(s) with an MLP output norm above {b.massive_factor:g}x the median "
        f"(max {b.max_norm_ratio.get(layer, float('nan')):.1f}x)"
    )


def _num(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _pct(value: float | None) -> str:
    return "n/a" if value is None or value != value else f"{value:.1%}"


def learning_curves(model: HookedTransformer, cfg: FrontierConfig, eval_rows: Tensor, plan: dict[str, tuple[int, str, int]]):
    """The `on_step` recorder of the main layer's learning curves (None when
    cfg.curve_points is 0): a `HeldoutProbe` of the first cfg.curve_tokens held-out rows."""
    from mxd_lens.evals import HeldoutProbe
    from mxd_lens.experiments.curves import LearningCurves, curve_steps

    if not cfg.curve_points:
        return None
    rows = eval_rows[: max(1, cfg.curve_tokens // eval_rows.shape[1])]
    probe = HeldoutProbe(model, rows, [cfg.layer], batch_size=cfg.eval_batch_size,
                         exclude_special_tokens=cfg.exclude_special_tokens)
    names = {fit_name_of(f): f for f, (layer, _, _) in plan.items() if layer == cfg.layer}
    steps = curve_steps(cfg.trainer.total_steps, cfg.curve_points)
    return LearningCurves(probe, cfg.layer, names, steps, cfg.trainer.batch_size)


EVAL_INPUTS = "eval_inputs.safetensors"
"""The held-out token rows and the mean-ablation vectors of a run (`mxd-lens eval RUN_DIR`)."""


def save_eval_inputs(out: Path, eval_rows: Tensor, means: dict[int, Tensor]) -> Path:
    """out/eval_inputs.safetensors: 'heldout_tokens' [rows, ctx] and 'mean_output.<L>' per layer."""
    from safetensors.torch import save_file

    tensors = {"heldout_tokens": eval_rows.detach().cpu().contiguous()}
    tensors.update({f"mean_output.{layer}": m.detach().float().cpu().contiguous() for layer, m in means.items()})
    return write_file(out / EVAL_INPUTS, lambda tmp: save_file(tensors, str(tmp)))


__all__ = [
    "CHECKPOINTS",
    "FrontierConfig",
    "METHODS",
    "RESULTS_FILE",
    "RESULT_KEYS",
    "ROW_KEYS",
    "build_module",
    "check_sizes",
    "demo_config",
    "describe_processing",
    "load_run_model",
    "model_shape",
    "module_folders",
    "preflight",
    "format_table",
    "module_name",
    "prepare_out_dir",
    "resolve_sizes",
    "run_frontier",
    "sizes_of",
    "train_modules",
]
