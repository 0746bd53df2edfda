"""`mxd-lens` (also `python -m mxd_lens`): train, evaluate and compare replacement layers.

    mxd-lens demo --out runs/demo            the frontier on the embedded model (< 15 min, 2 cores)
    mxd-lens frontier --ks 16,32,64 --out DIR
    mxd-lens train --methods mxd --ks 32 --out DIR [--checkpoint-every 100] [--resume]
    mxd-lens eval DIR/mxd_k32 DIR/transcoder_k32 [--out DIR]

Bad input ends with one line on stderr and a non-zero exit status.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Any, Sequence

from mxd_lens.experiments.frontier import METHODS, FrontierConfig

# Other subcommands live beside their code; each module offers add_subcommand(subparsers).
PLUGIN_MODULES = ("mxd_lens.publish", "mxd_lens.circuits")


def demo_config() -> FrontierConfig:
    """The demo's budget: the frontier at K = 16, 32 on the embedded model (layer 12,
    default sizes), sized to finish within 15 minutes on 2 CPU cores: 98k unique tokens
    collected once, 197k training tokens per module (2 epochs), 8k held-out tokens.
    lr 3e-3 at batch 512 was the best of the settings tried at this budget for MxD and the
    skip transcoder alike (benchmarks/README.md); revival starts after 32k tokens."""
    from mxd_lens.training import ActivationConfig, TrainerConfig

    return FrontierConfig(
        ks=[16, 32],
        collect_tokens=98_304,
        eval_tokens=8_192,
        trainer=TrainerConfig(
            train_tokens=196_608,
            batch_size=512,
            lr=3e-3,
            warmup_steps=20,
            dead_tokens=32_768,
            activations=ActivationConfig(autocast="auto"),
        ),
    )


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of integers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError(f"expected at least one integer, got {text!r}")
    return values


def _methods(text: str) -> list[str]:
    values = [v.strip() for v in text.split(",") if v.strip()]
    bad = [v for v in values if v not in METHODS]
    if bad or not values:
        raise argparse.ArgumentTypeError(f"unknown method(s) {bad or text!r}; expected some of {','.join(METHODS)}")
    return values


def _autocast(text: str) -> str:
    value = text.lower()
    value = "none" if value in ("off", "no", "float32") else value
    if value not in ("auto", "none", "bfloat16", "float16"):
        raise argparse.ArgumentTypeError(f"expected auto, bfloat16, float16 or none, got {text!r}")
    return value


def _add_run_flags(p: argparse.ArgumentParser, with_eval: bool) -> None:
    """Flags shared by train, frontier and demo (None = keep the config's default)."""
    g = p.add_argument_group("model and data")
    g.add_argument("--model", default=None, help="model: embedded SmolLM2-135M (default), a local HF folder or a TransformerLens name")
    g.add_argument("--layer", type=int, default=None, help="block whose MLP is replaced (default 12)")
    g.add_argument("--dataset", default=None, help="training text: .txt file, folder of them, or HF dataset (default: embedded corpus)")
    g.add_argument("--eval-dataset", default=None, help="held-out text (default: Persuasion, or the last 10%% of --dataset)")
    g.add_argument("--context", type=int, default=None, help="tokens per row (default 128)")
    g.add_argument("--collect-tokens", type=int, default=None, help="unique training tokens run through the model")
    if with_eval:
        g.add_argument("--eval-tokens", type=int, default=None, help="held-out tokens for the evaluation")
    g = p.add_argument_group("modules")
    g.add_argument("--methods", type=_methods, default=None, help=f"comma list of {','.join(METHODS)} (default: all)")
    g.add_argument("--ks", type=_int_list, default=None, help="comma list of K (active units per token), e.g. 16,32")
    g.add_argument("--width", type=int, default=None, help="transcoder width; the MxD is parameter-matched (default 16*d_model)")
    g.add_argument("--d-hidden", type=int, default=None, help="MxD hidden width H (default: the model's d_mlp)")
    g = p.add_argument_group("training")
    g.add_argument("--train-tokens", type=int, default=None, help="training tokens per module")
    g.add_argument("--batch-size", type=int, default=None, help="tokens per optimiser step")
    g.add_argument("--lr", type=float, default=None, help="peak learning rate")
    g.add_argument("--warmup-steps", type=int, default=None, help="linear warm-up steps")
    g.add_argument("--schedule", choices=("constant", "cosine"), default=None, help="after warm-up")
    g.add_argument("--aux-coeff", type=float, default=None, help="AuxK dead-unit loss weight (0 disables)")
    g.add_argument("--seed", type=int, default=None, help="random seed")
    g.add_argument("--autocast", type=_autocast, default=None, help="training autocast: auto (default), bfloat16 or none")
    g.add_argument("--collect-autocast", type=_autocast, default=None, help="activation collection autocast: auto, bfloat16 or none")
    g.add_argument("--cache-dir", default=None, help="folder for a safetensors activation cache reused across runs")
    g.add_argument("--checkpoint-every", type=int, default=None, help="steps between checkpoints (into OUT/checkpoints)")
    g.add_argument("--resume", action="store_true", help="continue from OUT/checkpoints")
    g = p.add_argument_group("run")
    g.add_argument("--out", required=True, help="output folder")
    g.add_argument("--overwrite", action="store_true", help="replace a finished run in --out")
    g.add_argument("--device", default=None, help="torch device (default cpu)")
    g.add_argument("--dtype", default=None, help="dtype of model and modules (default float32)")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")


def config_from_args(args: argparse.Namespace, base: FrontierConfig) -> FrontierConfig:
    """`base` with every flag that was given applied (validated by the dataclasses)."""
    from mxd_lens.training import ActivationConfig, TrainerConfig

    top = {
        "model": args.model, "layer": args.layer, "dataset": args.dataset, "eval_dataset": args.eval_dataset,
        "context": args.context, "collect_tokens": args.collect_tokens,
        "eval_tokens": getattr(args, "eval_tokens", None), "methods": args.methods, "ks": args.ks,
        "width": args.width, "d_hidden": args.d_hidden, "device": args.device, "dtype": args.dtype,
    }
    trainer = {
        "train_tokens": args.train_tokens, "batch_size": args.batch_size, "lr": args.lr,
        "warmup_steps": args.warmup_steps, "schedule": args.schedule, "aux_coeff": args.aux_coeff,
        "seed": args.seed, "device": args.device,
        "checkpoint_every": args.checkpoint_every,
    }
    acts: dict[str, Any] = {"cache_dir": args.cache_dir}
    d = base.to_dict()
    d.update({k: v for k, v in top.items() if v is not None})
    t = d["trainer"]
    t.update({k: v for k, v in trainer.items() if v is not None})
    if args.autocast is not None:
        t["autocast"] = None if args.autocast == "none" else args.autocast
    if args.collect_autocast is not None:
        t["activations"]["autocast"] = None if args.collect_autocast == "none" else args.collect_autocast
    t["activations"].update({k: v for k, v in acts.items() if v is not None})
    if args.checkpoint_every or args.resume:
        t["checkpoint_dir"] = str(Path(args.out) / "checkpoints")
    t["resume"] = bool(args.resume)
    t["progress"] = d["progress"] = not args.no_progress
    if t["batch_size"] > t["activations"]["buffer_tokens"]:
        t["activations"]["buffer_tokens"] = t["batch_size"]
    t["activations"] = ActivationConfig.from_dict(t["activations"])
    d["trainer"] = TrainerConfig.from_dict(t)
    return FrontierConfig(**d)


def _cmd_frontier(args: argparse.Namespace, base: FrontierConfig) -> int:
    from mxd_lens.experiments.frontier import run_frontier

    cfg = config_from_args(args, base)
    run_frontier(cfg, args.out, overwrite=args.overwrite)
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from mxd_lens.config import parse_dtype
    from mxd_lens.experiments.frontier import load_docs, prepare_out_dir, tokenize_docs, train_modules, write_json_atomic
    from mxd_lens.sources import load_model

    cfg = config_from_args(args, FrontierConfig())
    out = prepare_out_dir(args.out, overwrite=True)
    docs = load_docs(cfg)
    model = load_model(cfg.model, device=cfg.device, dtype=parse_dtype(cfg.dtype))
    if not 0 <= cfg.layer < model.cfg.n_layers:
        raise ValueError(f"layer={cfg.layer} is out of range: the model has layers 0..{model.cfg.n_layers - 1}")
    train_rows, eval_rows = tokenize_docs(cfg, model.tokenizer, *docs)
    modules, info = train_modules(model, cfg, train_rows, out, eval_rows=eval_rows)
    write_json_atomic(out / "training.json", {"config": cfg.to_dict(), "summaries": info["summaries"]})
    for name, s in info["summaries"].items():
        print(f"{name}: held-out NMSE {s['heldout_nmse']:.4f}, L0 {s['l0']:.1f}, dead {s['dead_fraction']:.1%}, "
              f"{s['tokens_per_second']:,.0f} tok/s -> {out / name}")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from mxd_lens.evals import evaluate_many
    from mxd_lens.experiments.frontier import format_table, prepare_out_dir, write_json_atomic
    from mxd_lens.storage import load
    from mxd_lens.sources import load_default_corpus, load_model, load_texts, token_rows

    out = prepare_out_dir(args.out, overwrite=True) if args.out else None
    if not args.modules:
        raise ValueError("no module folders given; expected e.g. `mxd-lens eval RUN/mxd_k32`")
    modules = {}
    for folder in args.modules:
        module = load(folder)
        layer = args.layer if args.layer is not None else module.cfg.layer
        if layer is None:
            raise ValueError(f"{folder}: the module's config has no layer; pass --layer")
        modules[Path(folder).name] = {layer: module}
    model = load_model(args.model)
    dtype = next(model.parameters()).dtype
    modules = {n: {l: m.to(dtype) for l, m in c.items()} for n, c in modules.items()}
    if args.eval_tokens < args.context:
        raise ValueError(f"--eval-tokens={args.eval_tokens} is less than one row of --context={args.context}")
    docs = load_default_corpus("heldout") if args.eval_dataset is None else load_texts(args.eval_dataset)
    rows = token_rows(model.tokenizer, docs, args.context, max_rows=args.eval_tokens // args.context)
    report = evaluate_many(model, modules, rows, batch_size=args.batch_size, progress=not args.no_progress)
    table = []
    for name, r in report.results.items():
        (layer, module), = modules[name].items()
        row = {"method": module.architecture, "k": module.cfg.k, "n_params": module.n_params(), **r.to_dict()}
        table.append(row)
    print(format_table(table))
    b = report.baselines
    print(f"clean CE {b.ce_clean:.4f}, zero-ablated {b.ce_zero_ablation:.4f}, mean-ablated {b.ce_mean_ablation:.4f}")
    if out is not None:
        write_json_atomic(out / "eval.json", report.to_dict())
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse with usage errors as ONE line on stderr (exit status 2)."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="mxd-lens", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("demo", help="the frontier on the embedded model within 15 minutes on 2 CPU cores")
    _add_run_flags(p, with_eval=True)
    p.set_defaults(func=lambda a: _cmd_frontier(a, demo_config()))

    p = sub.add_parser("frontier", help="MxD vs transcoder vs skip transcoder at matched parameters over a K list")
    _add_run_flags(p, with_eval=True)
    p.set_defaults(func=lambda a: _cmd_frontier(a, FrontierConfig()))

    p = sub.add_parser("train", help="train modules (methods x K) at one layer and save them")
    _add_run_flags(p, with_eval=True)
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("eval", help="evaluate saved modules on held-out text (CE, NMSE, KL, L0...)")
    p.add_argument("modules", nargs="*", help="module folders")
    p.add_argument("--model", default=None, help="model (default: the embedded SmolLM2-135M)")
    p.add_argument("--layer", type=int, default=None, help="layer (default: each module's cfg.layer)")
    p.add_argument("--eval-dataset", default=None, help="held-out text (default: Persuasion)")
    p.add_argument("--eval-tokens", type=int, default=16_384, help="held-out tokens")
    p.add_argument("--context", type=int, default=128, help="tokens per row")
    p.add_argument("--batch-size", type=int, default=8, help="rows per forward pass")
    p.add_argument("--out", default=None, help="folder for eval.json")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_eval)

    for name in PLUGIN_MODULES:
        if importlib.util.find_spec(name) is not None:
            importlib.import_module(name).add_subcommand(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status (0 on success)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # argparse has already printed its one-line usage error
        return int(exit_.code or 0)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, RuntimeError, OSError) as err:
        print(f"mxd-lens {args.command}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"mxd-lens {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
