"""`mxd-lens` (also `python -m mxd_lens`): train, evaluate and compare replacement layers.

    mxd-lens demo --out runs/demo            the frontier on the embedded model (< 15 min, 2 cores)
    mxd-lens frontier --ks 16,32,64 --out DIR
    mxd-lens train --methods mxd --ks 32 --layers 6,12 --out DIR [--checkpoint-every 100] [--resume]
    mxd-lens eval DIR/mxd_k32 DIR/transcoder_k32 [--out DIR]
    mxd-lens eval DIR                        a frontier run's numbers again, from its folder
    mxd-lens train --layers 0-29 --stream-activations --out DIR   every layer from one pass
    torchrun --standalone --nproc_per_node=N -m mxd_lens train ...  data-parallel (N processes)
    mxd-lens circuit DIR/mxd_k32 --out DIR   faithfulness curves (refuses layers that carry nothing)
    mxd-lens dashboard DIR/mxd_k32 --top 5 --out DIR
    mxd-lens probe --run DIR --tasks language,topic,book --out DIR
    mxd-lens steer --run DIR --out DIR
    mxd-lens export --format circuit-tracer|sparsify DIR --out DIR
    mxd-lens publish DIR --repo user/name --dry-run

Bad input ends with one line on stderr and a non-zero exit status, before any model is
loaded where that can be told, and always before `--out` is touched: a failed command
leaves `--out` as it was (a finished run in it included, `--overwrite` or not).
"""

from __future__ import annotations

import os

# Idle OpenMP threads spin (busy-wait) by default, which on a shared 2-core machine takes
# the cores from whoever else runs; must be set before torch is first imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import contextlib  # noqa: E402
import dataclasses  # noqa: E402
import importlib  # noqa: E402
import sys  # noqa: E402
import typing  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Callable, Sequence  # noqa: E402

# Everything imported up here is torch-free: `--help`, `--version` and usage errors must
# answer at once. The commands import the heavy parts when they run.
import mxd_lens  # noqa: E402  (lazy: no torch)
from mxd_lens import registry  # noqa: E402
from mxd_lens.config import field_docs  # noqa: E402
from mxd_lens.experiments.config import EvalConfig, FrontierConfig, demo_config  # noqa: E402
from mxd_lens.run_folder import RunFolder  # noqa: E402
from mxd_lens.training.config import ActivationConfig, TrainerConfig  # noqa: E402

METHODS = tuple(registry.methods())
CHECKPOINTS = "checkpoints"  # = mxd_lens.experiments.frontier.CHECKPOINTS (that module imports torch)

# Subcommands that live beside their code: (module offering add_subcommand, its one-line
# help). The module is imported only when its command runs (it may import torch).
PLUGINS: dict[str, tuple[str, str]] = {
    "circuit": ("mxd_lens.circuits", "faithfulness curves (and patching heatmaps) of saved modules on the IOI task"),
    "dashboard": (
        "mxd_lens.circuits.dashboard_command",
        "one HTML page per unit of a saved module (and SAEDashboard's page)",
    ),
    "publish": (
        "mxd_lens.experiments.publish",
        "lay out a training run as a Hugging Face repo (SAE-Lens layout + model card) and upload it",
    ),
    "export": ("mxd_lens.export", "write saved transcoders in circuit-tracer's or sparsify's format"),
    "probe": ("mxd_lens.probing", "sparse probing of saved modules on labelled text (no hub)"),
    "steer": ("mxd_lens.probing.steer_cli", "steering by single units, evaluated against equal-strength controls"),
}
PLUGIN_MODULES = tuple(module for module, _ in PLUGINS.values())

__all__ = ["FLAGS", "EVAL_FLAGS", "Flag", "build_parser", "config_from_args", "demo_config", "main"]


# --- list and choice parsers (argparse `type=`) ----------------------------------------------
def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of integers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError(f"expected at least one integer, got {text!r}")
    return values


def _int_ranges(text: str) -> list[int]:
    """'0-29' or '3,7-9,12': integers and inclusive ranges (e.g. every layer of a model)."""
    values: list[int] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        lo, dash, hi = part.partition("-")
        try:
            values.extend(range(int(lo), int(hi) + 1) if dash else [int(part)])
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected comma-separated integers or ranges like 0-29, got {text!r}"
            ) from None
        if dash and int(hi) < int(lo):
            raise argparse.ArgumentTypeError(f"range {part!r} runs backwards; expected LOW-HIGH, e.g. 0-29")
    if not values:
        raise argparse.ArgumentTypeError(f"expected at least one integer, got {text!r}")
    return values


def _str_list(text: str) -> list[str]:
    values = [v.strip() for v in text.split(",") if v.strip()]
    if not values:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}")
    return values


def _methods(text: str) -> list[str]:
    values = [v.strip() for v in text.split(",") if v.strip()]
    if not values:
        raise argparse.ArgumentTypeError(f"expected some of {','.join(METHODS)}, got {text!r}")
    try:
        return registry.canonical_methods(values)  # architecture names are aliases
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _per_method(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"expected JSON such as '{{\"mxd\": {{\"lr\": 0.001}}}}', got {text!r} ({err})")
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object of method -> {{field: value}}, got {text!r}")
    return value


def _autocast(text: str) -> str | None:
    value = text.lower()
    value = "none" if value in ("off", "no", "float32") else value
    if value not in ("auto", "none", "bfloat16", "float16"):
        raise argparse.ArgumentTypeError(f"expected auto, bfloat16, float16 or none, got {text!r}")
    return None if value == "none" else value


# --- flags from config fields -----------------------------------------------------------------
@dataclass(frozen=True)
class Flag:
    """One command-line flag that sets one config field: its help is the field's docstring
    and its default the field's value in the command's base config."""

    name: str
    """The flag, e.g. '--ks'."""
    path: str
    """Dotted field path in the command's config, e.g. 'trainer.activations.cache_dir'."""
    group: str
    """Help section."""
    parse: Callable[[str], Any] | None = None
    """argparse `type=`; None: from the field's annotation (int, float, str, lists, Literal)."""
    also: tuple[str, ...] = ()
    """Further fields set to the same value (e.g. --device sets the trainer's too)."""
    help: str | None = None
    """Replaces the docstring (for switches whose docstring reads the other way round)."""
    metavar: str | None = None


MODEL_FLAGS: tuple[Flag, ...] = (
    Flag("--model", "model", "model and data"),
    Flag("--model-name", "model_name", "model and data"),
    Flag("--no-fold-ln", "fold_ln", "model and data",
         help="Load the model with fold_ln=False (norm weights kept; modules still read the MLP's own input)."),
)
"""The flags of `ModelChoice`, shared by every command that loads a model."""

FLAGS: tuple[Flag, ...] = (
    *MODEL_FLAGS,
    Flag("--layer", "layer", "model and data"),
    Flag("--dataset", "dataset", "model and data"),
    Flag("--text-column", "text_column", "model and data"),
    Flag("--token-column", "token_column", "model and data"),
    Flag("--eval-dataset", "eval_dataset", "model and data"),
    Flag("--eval-fraction", "eval_fraction", "model and data"),
    Flag("--context", "context", "model and data"),
    Flag("--collect-tokens", "collect_tokens", "model and data"),
    Flag("--eval-tokens", "eval_tokens", "model and data"),
    Flag("--eval-batch-size", "eval_batch_size", "model and data"),
    Flag("--eval-stack", "eval_stack", "model and data"),
    Flag("--curve-points", "curve_points", "model and data"),
    Flag("--curve-tokens", "curve_tokens", "model and data"),
    Flag("--methods", "methods", "modules", parse=_methods, metavar="M1,M2"),
    Flag("--ks", "ks", "modules", metavar="K1,K2"),
    Flag("--width", "width", "modules"),
    Flag("--d-hidden", "d_hidden", "modules"),
    Flag("--train-tokens", "trainer.train_tokens", "training"),
    Flag("--batch-size", "trainer.batch_size", "training"),
    Flag("--lr", "trainer.lr", "training"),
    Flag("--warmup-steps", "trainer.warmup_steps", "training"),
    Flag("--schedule", "trainer.schedule", "training"),
    Flag("--min-lr-ratio", "trainer.min_lr_ratio", "training"),
    Flag("--aux-coeff", "trainer.aux_coeff", "training"),
    Flag("--dead-tokens", "trainer.dead_tokens", "training"),
    Flag("--center-encoder", "trainer.center_encoder", "training"),
    Flag("--zero-decoder", "trainer.zero_decoder", "training"),
    Flag("--unit-norm-decoder", "trainer.unit_norm_decoder", "training"),
    Flag("--gate-init", "trainer.gate_init", "training"),
    Flag("--gate-lr-scale", "trainer.gate_lr_scale", "training"),
    Flag("--experts-lr-scale", "trainer.experts_lr_scale", "training"),
    Flag("--dense-lr-scale", "trainer.dense_lr_scale", "training"),
    Flag("--warm-start-dense", "trainer.warm_start_dense", "training"),
    Flag("--warm-start-gate-scale", "trainer.warm_start_gate_scale", "training"),
    Flag("--expert-init-noise", "trainer.expert_init_noise", "training"),
    Flag("--per-method", "trainer.per_method", "training", parse=_per_method, metavar="JSON"),
    Flag("--seed", "trainer.seed", "training"),
    Flag("--parallel", "trainer.parallel", "training"),
    Flag("--autocast", "trainer.autocast", "training", parse=_autocast, metavar="{auto,bfloat16,float16,none}"),
    Flag("--collect-autocast", "trainer.activations.autocast", "training", parse=_autocast,
         metavar="{auto,bfloat16,float16,none}"),
    Flag("--buffer-tokens", "trainer.activations.buffer_tokens", "training"),
    Flag("--cache-dir", "trainer.activations.cache_dir", "training"),
    Flag("--store-dtype", "trainer.activations.store_dtype", "training"),
    Flag("--stream-activations", "trainer.activations.keep_in_memory", "training",
         help="Hold one chunk of activations at a time (later epochs re-run the model, or read --cache-dir): "
              "memory bounded by the buffer, --buffer-tokens x layers x 2 x d_model x itemsize / processes."),
    Flag("--include-special-tokens", "exclude_special_tokens", "training",
         also=("trainer.activations.exclude_special_tokens",),
         help="Keep the positions holding special tokens (BOS, the separator starting each row) in training "
              "and in the comparison; by default both exclude them (attention sinks put massive MLP outputs there)."),
    Flag("--checkpoint-every", "trainer.checkpoint_every", "training",
         help="Steps between checkpoints, written into OUT/checkpoints (0: none)."),
    Flag("--resume", "trainer.resume", "training",
         help="Continue from the latest checkpoint in OUT/checkpoints (exactly, on CPU)."),
    Flag("--device", "device", "run", also=("trainer.device",)),
    Flag("--dtype", "dtype", "run"),
    Flag("--no-progress", "progress", "run", also=("trainer.progress",), help="Hide the progress bars."),
)
"""The flags of demo, frontier and train (FrontierConfig and its TrainerConfig)."""

EVAL_FLAGS: tuple[Flag, ...] = (
    *MODEL_FLAGS,
    Flag("--layer", "layer", "model and data"),
    Flag("--eval-dataset", "eval_dataset", "model and data"),
    Flag("--eval-tokens", "eval_tokens", "model and data"),
    Flag("--context", "context", "model and data"),
    Flag("--batch-size", "batch_size", "model and data"),
    Flag("--include-special-tokens", "exclude_special_tokens", "model and data",
         help="Splice and compare at the positions holding special tokens too (BOS, the separator starting "
              "each row); by default the clean MLP output is kept there for every module and both ablations."),
    Flag("--no-progress", "progress", "run", help="Hide the progress bars."),
)
"""The flags of eval (EvalConfig)."""

_CONFIG_CLASSES = {"": None, "trainer": TrainerConfig, "trainer.activations": ActivationConfig}


def _owner(root: type, path: str) -> tuple[type, str]:
    """(dataclass that declares the field, field name) of a dotted path."""
    prefix, _, name = path.rpartition(".")
    return (_CONFIG_CLASSES[prefix] or root) if prefix else root, name


def _get(cfg: Any, path: str) -> Any:
    for part in path.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _set(d: dict[str, Any], path: str, value: Any) -> None:
    *parents, name = path.split(".")
    for part in parents:
        d = d[part]
    d[name] = value


def _show(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return str(value)


def _type_of(hint: Any) -> tuple[Callable[[str], Any] | None, list[Any] | None]:
    """(argparse type, choices) for a field annotation."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    origin = typing.get_origin(hint)
    if origin is typing.Union or (origin is not None and type(hint).__name__ == "UnionType"):
        return _type_of(args[0]) if len(args) == 1 else (str, None)
    if origin is typing.Literal:
        return type(args[0]), list(args)
    if origin is list:
        return (_int_list if args and args[0] is int else _str_list), None
    if hint in (int, float, str):
        return hint, None
    return str, None


def _add_flags(parser: argparse.ArgumentParser, root: type, base: Any, flags: Sequence[Flag]) -> dict[str, Any]:
    """Add `flags` to `parser`; unset flags are absent from the namespace (SUPPRESS), so
    only what was given replaces the base config's values."""
    groups: dict[str, Any] = {}
    docs_cache: dict[type, dict[str, str]] = {}
    hints_cache: dict[type, dict[str, Any]] = {}
    for flag in flags:
        cls, name = _owner(root, flag.path)
        if cls not in docs_cache:
            docs_cache[cls] = field_docs(cls)
            hints_cache[cls] = typing.get_type_hints(cls)
        default = _get(base, flag.path)
        doc = flag.help or docs_cache[cls].get(name, "")
        group = groups.get(flag.group) or groups.setdefault(flag.group, parser.add_argument_group(flag.group))
        dest = flag.name.removeprefix("--").replace("-", "_")
        if hints_cache[cls][name] is bool:
            group.add_argument(flag.name, dest=dest, action="store_false" if default else "store_true",
                               default=argparse.SUPPRESS, help=doc.replace("%", "%%"))
            continue
        parse, choices = _type_of(hints_cache[cls][name])
        help_text = f"{doc} (default: {_show(default)})".replace("%", "%%")
        group.add_argument(flag.name, dest=dest, type=flag.parse or parse, choices=None if flag.parse else choices,
                           default=argparse.SUPPRESS, metavar=flag.metavar, help=help_text)
    return groups


def _apply(args: argparse.Namespace, base: Any, flags: Sequence[Flag]) -> dict[str, Any]:
    """`base.to_dict()` with every given flag applied."""
    d = base.to_dict()
    for flag in flags:
        dest = flag.name.removeprefix("--").replace("-", "_")
        if hasattr(args, dest):
            for path in (flag.path, *flag.also):
                _set(d, path, getattr(args, dest))
    return d


def config_from_args(args: argparse.Namespace, base: FrontierConfig) -> FrontierConfig:
    """`base` with every flag that was given applied (validated by the dataclasses)."""
    d = _apply(args, base, FLAGS)
    t = d["trainer"]
    if t["checkpoint_every"] or t["resume"]:
        t["checkpoint_dir"] = str(Path(args.out) / CHECKPOINTS)
    # a chunk must hold a batch: a larger --batch-size grows the default buffer with it
    if not hasattr(args, "buffer_tokens") and t["batch_size"] > t["activations"]["buffer_tokens"]:
        t["activations"]["buffer_tokens"] = t["batch_size"]
    return FrontierConfig.from_dict(d)


def _layers(args: argparse.Namespace, cfg: FrontierConfig) -> list[int]:
    layers = getattr(args, "layers", None)
    if layers is None:
        return [cfg.layer]
    if hasattr(args, "layer"):
        raise ValueError(f"--layer {args.layer} and --layers {_show(layers)} both given; pass one of them")
    if len(set(layers)) != len(layers):
        raise ValueError(f"--layers {_show(layers)} lists a layer twice")
    return layers


def _run_config(args: argparse.Namespace, base: FrontierConfig, multi_layer: bool) -> tuple[FrontierConfig, list[int]]:
    cfg = config_from_args(args, base)
    layers = _layers(args, cfg)
    if len(layers) > 1 and not multi_layer:
        raise ValueError(
            f"--layers {_show(layers)}: `mxd-lens {args.command}` compares the methods at one layer; "
            f"pass one layer (`mxd-lens train --layers {_show(layers)}` trains at several at once)"
        )
    cfg = dataclasses.replace(cfg, layer=layers[0])
    return cfg, layers


# --- the commands -----------------------------------------------------------------------------
def _frontier_config(args: argparse.Namespace, base: FrontierConfig) -> FrontierConfig:
    """The frontier's config; `--layers` adds a sweep (`sweep_layers`) around the main
    layer: `--layer` when given (it must be listed), else the first listed."""
    cfg = config_from_args(args, base)
    layers = getattr(args, "layers", None)
    if layers is None:
        return cfg
    if len(set(layers)) != len(layers):
        raise ValueError(f"--layers {_show(layers)} lists a layer twice")
    main = args.layer if hasattr(args, "layer") else layers[0]
    if main not in layers:
        raise ValueError(f"--layer {main} is not among --layers {_show(layers)}; the main layer must be swept too")
    return dataclasses.replace(cfg, layer=main, sweep_layers=[layer for layer in layers if layer != main])


def _cmd_frontier(args: argparse.Namespace, base: FrontierConfig) -> int:
    cfg = _frontier_config(args, base)
    from mxd_lens.experiments.frontier import run_frontier
    from mxd_lens.training import distributed

    try:  # under torchrun: data-parallel training, rank 0 evaluates, writes and prints
        quiet = distributed.env_world_size() > 1 and os.environ.get("RANK", "0") != "0"
        run_frontier(cfg, args.out, overwrite=args.overwrite, echo=_quiet if quiet else print)
    finally:
        distributed.shutdown()
    return 0


def _quiet(*args: Any, **kwargs: Any) -> None:
    """`echo` of a data-parallel worker (rank > 0): only rank 0 prints."""


def _cmd_train(args: argparse.Namespace, base: FrontierConfig) -> int:
    cfg, layers = _run_config(args, base, multi_layer=True)
    from mxd_lens.atomic import write_json
    from mxd_lens.experiments import frontier as fr
    from mxd_lens.validation import check_layer

    fr.preflight(cfg, layers)
    # training.json is moved in last; an old results.json (a finished frontier run) needs
    # --overwrite, and is removed only once the new modules are in place.
    folder = RunFolder(args.out, overwrite=args.overwrite, marker="training.json", keep_on_failure=[CHECKPOINTS])
    folder.check()
    docs = fr.load_docs(cfg)  # data errors before the model loads
    from mxd_lens.training import distributed

    # under torchrun every process trains its share of each batch; only rank 0 touches --out
    ctx = distributed.init_from_env(cfg.device)
    try:
        with folder if ctx.is_main else contextlib.nullcontext():
            model = fr.load_run_model(cfg.model, cfg.model_name, cfg.device, cfg.dtype, fold_ln=cfg.fold_ln,
                                      echo=print if ctx.is_main else _quiet)
            for layer in layers:
                check_layer(layer, model.cfg.n_layers)
            train_rows, eval_rows = fr.tokenize_docs(cfg, model.tokenizer, *docs)
            staging = folder.staging if ctx.is_main else None
            _, info = fr.train_modules(model, cfg, train_rows, staging, eval_rows=eval_rows, layers=layers)
            if ctx.is_main:
                write_json(folder.staging / "training.json", {
                    "config": cfg.to_dict(), "layers": layers, "summaries": info["summaries"],
                    "distributed": info.get("distributed"), "activation_memory": info.get("activation_memory"),
                })
                folder.commit()
        distributed.barrier(ctx)  # the workers wait until rank 0 has written the run
    finally:
        distributed.shutdown()
    if not ctx.is_main:
        return 0
    for name, s in info["summaries"].items():
        print(f"{name}: held-out NMSE {s['heldout_nmse']:.4f}, L0 {s['l0']:.1f}, dead {s['dead_fraction']:.1%}, "
              f"{s['tokens_per_second']:,.0f} tok/s -> {folder.out / name}")
    return 0


def _cmd_eval_run(args: argparse.Namespace) -> int:
    """`mxd-lens eval RUN_DIR`: a frontier run's numbers again, from its folder alone."""
    given = [f.name for f in EVAL_FLAGS if hasattr(args, f.name.removeprefix("--").replace("-", "_"))]
    if given:
        raise ValueError(
            f"`mxd-lens eval RUN_DIR` takes every setting from RUN_DIR/results.json; drop {', '.join(given)} "
            "(or evaluate its module folders: `mxd-lens eval RUN_DIR/<method>_k<K> ...`)"
        )
    out = RunFolder(args.out, overwrite=True, guard=None, marker="eval.json") if args.out else None
    if out is not None:
        out.check()
    from mxd_lens.atomic import write_json
    from mxd_lens.experiments.reeval import reevaluate_run

    found = reevaluate_run(args.modules[0])
    if out is not None:
        with out:
            write_json(out.staging / "eval.json", {**found["report"].to_dict(), "rows": found["rows"],
                                                   "max_abs_difference": found["max_abs_difference"]})
            out.commit()
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    if len(args.modules) == 1 and (Path(args.modules[0]) / "results.json").is_file():
        return _cmd_eval_run(args)
    cfg = EvalConfig.from_dict(_apply(args, EvalConfig(), EVAL_FLAGS) | {"modules": list(args.modules)})
    if not cfg.modules:
        raise ValueError("no module folders given; expected e.g. `mxd-lens eval RUN/mxd_k32`")
    names = [Path(m).name for m in cfg.modules]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"module folders named {twice} given twice; results are keyed by folder name")
    from mxd_lens.storage import load  # every module read and validated before anything else

    loaded = {}
    for folder in cfg.modules:
        module = load(folder)
        layer = cfg.layer if cfg.layer is not None else module.cfg.layer
        if layer is None:
            raise ValueError(f"{folder}: the module's config has no layer; pass --layer")
        loaded[Path(folder).name] = (layer, module)
    out = RunFolder(args.out, overwrite=True, guard=None, marker="eval.json") if args.out else None
    if out is not None:
        out.check()
    from mxd_lens.atomic import write_json
    from mxd_lens.evals import evaluate_many
    from mxd_lens.experiments.frontier import check_model_name, format_table, load_run_model, model_shape
    from mxd_lens.sources import load_default_corpus, load_texts, token_rows
    from mxd_lens.validation import check_layer

    check_model_name(cfg.model, cfg.model_name)
    shape = model_shape(cfg.model)
    for layer, _ in loaded.values():
        if "n_layers" in shape:
            check_layer(layer, shape["n_layers"])
    docs = load_default_corpus("heldout") if cfg.eval_dataset is None else load_texts(cfg.eval_dataset)
    model = load_run_model(cfg.model, cfg.model_name, "cpu", "float32", fold_ln=cfg.fold_ln)
    dtype = next(model.parameters()).dtype
    modules = {}
    for name, (layer, module) in loaded.items():
        check_layer(layer, model.cfg.n_layers)
        modules[name] = {layer: module.to(dtype)}
    rows = token_rows(model.tokenizer, docs, cfg.context, max_rows=cfg.eval_tokens // cfg.context)
    report = evaluate_many(model, modules, rows, batch_size=cfg.batch_size, progress=cfg.progress,
                           exclude_special_tokens=cfg.exclude_special_tokens)
    table = []
    for name, r in report.results.items():
        (layer, module), = modules[name].items()
        method = registry.method_of(module.architecture) if registry.find(module.architecture) else module.architecture
        table.append({"method": method, "k": module.cfg.k, "n_params": module.n_params(), **r.to_dict()})
    print(format_table(table))
    b = report.baselines
    print(f"clean CE {b.ce_clean:.4f}, zero-ablated {b.ce_zero_ablation:.4f}, mean-ablated {b.ce_mean_ablation:.4f}")
    if out is not None:
        with out:
            write_json(out.staging / "eval.json", report.to_dict())
            out.commit()
    return 0


# --- the parser -------------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    """argparse with usage errors as ONE line on stderr (exit status 2)."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def _add_run_command(sub: Any, name: str, help: str, base: FrontierConfig, func: Callable, multi_layer: bool) -> None:
    p = sub.add_parser(name, help=help, description=help)
    groups = _add_flags(p, FrontierConfig, base, FLAGS)
    layers_help = (
        "blocks to train at, as a comma list and/or ranges (0-29: every layer of the default model), all "
        "from one forward pass per batch (modules go to OUT/layer_<L>/<method>_k<K> when there are several; "
        "the activation buffer grows by one layer's share per layer, printed at start) (default: --layer)"
        if multi_layer else "comma list of blocks: the frontier at each, trained from one activation pass "
        "(OUT/layers.json, OUT/layers.html; modules of the other layers in OUT/layer_<L>/); results.json reports "
        "--layer, or the first listed (default: --layer alone)"
    )
    groups["model and data"].add_argument("--layers", type=_int_ranges, default=argparse.SUPPRESS, metavar="L1,L2", help=layers_help)
    g = p.add_argument_group("output")
    g.add_argument("--out", required=True, help="output folder (may exist; files already in it are never touched)")
    g.add_argument("--overwrite", action="store_true",
                   help="replace a finished run (results.json) in --out; it is replaced only once the new run succeeds")
    p.set_defaults(func=lambda a: func(a, base))


def _selected_command(argv: Sequence[str] | None) -> str | None:
    """The subcommand named in `argv` (top-level options take no values)."""
    if argv is None:
        return None
    return next((a for a in argv if not a.startswith("-")), None)


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The `mxd-lens` parser. With `argv`, only the plugin subcommand it names is imported
    (the others are listed by their help line), so `--help` imports no torch; without it
    every plugin is imported."""
    parser = _Parser(prog="mxd-lens", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"mxd-lens {mxd_lens.__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    _add_run_command(sub, "demo", "the frontier on the embedded model within 15 minutes on 2 CPU cores",
                     demo_config(), _cmd_frontier, multi_layer=False)
    _add_run_command(sub, "frontier", "MxD vs transcoder vs skip transcoder at matched parameters over a K list",
                     FrontierConfig(), _cmd_frontier, multi_layer=False)
    _add_run_command(sub, "train", "train modules (methods x K, at one or several layers) and save them",
                     FrontierConfig(), _cmd_train, multi_layer=True)

    help = "evaluate saved modules on held-out text (CE, NMSE, KL, L0...)"
    p = sub.add_parser("eval", help=help, description=help)
    p.add_argument("modules", nargs="*", help=field_docs(EvalConfig)["modules"]
                   + " Or ONE frontier run folder (holding results.json): its numbers again, with the held-out "
                   "tokens and settings it recorded.")
    _add_flags(p, EvalConfig, EvalConfig(), EVAL_FLAGS)
    p.add_argument("--out", default=None,
                   help="folder for eval.json (may exist; nothing else in it is touched) (default: print only)")
    p.set_defaults(func=_cmd_eval)

    selected = _selected_command(argv)
    for name, (module, help) in PLUGINS.items():
        if argv is None or selected == name:
            importlib.import_module(module).add_subcommand(sub)
        else:
            sub.add_parser(name, help=help, add_help=False)  # listed; built for real when chosen
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status (0 on success)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # argparse has already printed its one-line usage error
        return int(exit_.code or 0)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, RuntimeError, OSError) as err:
        message = " ".join(str(err).split("\n"))
        print(f"mxd-lens {args.command}: error: {message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"mxd-lens {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
