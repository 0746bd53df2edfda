"""Training several replacement modules at once from one activation stream.

Loss (`TrainerConfig.loss_norm`, default 'batch'): the normalised MSE
sum||y_hat - y||^2 / sum||y||^2 over the batch, the same quantity as the NMSE reported on
held-out text; scale-invariant, unlike the paper's code, which divides each token's
squared error by ||y|| (not ||y||^2). 'token' averages ||e||^2/||y||^2 over tokens.

Dead units (no activation in the last `dead_tokens` tokens) are revived with an AuxK loss
(Gao et al. 2024): the aux_k most active dead units reconstruct the residual y - y_hat,
weighted by `aux_coeff`. For an MxD the dead experts' mixture modulates the (detached)
dense output D^T z, exactly as live experts do.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from mxd_lens.architectures.base import Replacement, StepOutput
from mxd_lens.functional import nmse, select_topk, squared_error_sums
from mxd_lens.training.activations import (
    ActivationSource,
    DataPosition,
    Pair,
    input_hook_name,
    output_hook_name,
)
from mxd_lens.training.checkpoint import (
    ModuleCheckpoint,
    latest_checkpoint,
    load_checkpoint,
    nan_from_null,
    save_checkpoint,
    set_rng_state,
)
from mxd_lens.precision import resolve_autocast
from mxd_lens.training.config import ActivationConfig, TrainerConfig


def train_forward(module: Replacement, x: Float[Tensor, "tokens d_in"]) -> StepOutput:
    """`module.train_forward(x)`: the architecture's own training forward pass."""
    return module.train_forward(x)


def nmse_loss(y_hat: Tensor, y: Tensor, norm: str = "batch") -> Tensor:
    """The training loss: `mxd_lens.functional.nmse`."""
    return nmse(y_hat, y, norm)


def aux_k_loss(
    module: Replacement, x: Tensor, out: StepOutput, y: Tensor, dead: Tensor, aux_k: int, tokens: int | None = None
) -> Tensor | None:
    """AuxK: the residual reconstructed by the top-aux_k dead units only, on the first
    `tokens` tokens of the batch (all if None); None if no unit is dead. The dead units'
    output is the architecture's own (`Replacement.aux_output`: for an MxD their mixture
    modulates the detached dense branch D^T z, exactly as live experts do)."""
    n_dead = int(dead.sum())
    if n_dead == 0:
        return None
    t = slice(None) if tokens is None else slice(0, tokens)
    x, y, y_hat, pre = x[t], y[t], out.y_hat[t], out.pre[t]
    context = None if out.context is None else out.context[t]
    residual = (y.float() - y_hat.float()).detach()
    # TopK among the dead columns only: cheap when AuxK keeps the dead set small
    dead_idx = dead.nonzero().flatten()
    local = pre[:, dead_idx].topk(min(aux_k, n_dead), dim=-1, sorted=False).indices
    sparse = select_topk(x, module.W_enc, module.b_enc, pre, dead_idx[local])
    return nmse(module.aux_output(sparse, context), residual)


def lr_at(step: int, cfg: TrainerConfig) -> float:
    """Linear warm-up to cfg.lr, then constant or cosine decay to lr * min_lr_ratio."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    span = max(1, cfg.total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


@dataclass
class TrainSummary:
    """How training went for one module."""

    name: str
    layer: int
    architecture: str
    k: int
    n_units: int
    steps: int
    tokens: int
    """Training tokens seen."""
    loss: float
    """Mean training loss over the last logging window."""
    nmse: float
    """Mean training NMSE over the last logging window."""
    l0: float
    """Mean active units per token over the last logging window."""
    dead_fraction: float
    """Units that did not fire in the last `dead_tokens` tokens, at the end."""
    seconds: float
    """Time spent in this module's steps (forward, backward, update)."""
    tokens_per_second: float
    """Training throughput of this module alone (tokens / seconds)."""
    autocast: str | None = None
    """The autocast dtype training ran under (None: none)."""
    collect_tokens_per_second: float = float("nan")
    """Throughput of the shared activation collection (language model forward passes)."""
    heldout_nmse: float | None = None
    """NMSE on the held-out activations at the end (when eval tokens were given)."""
    target_mean: Tensor | None = field(default=None, repr=False)
    """Mean MLP output at this layer over the training tokens seen (for mean ablation)."""
    history: list[dict[str, float]] = field(default_factory=list, repr=False)
    """One entry per logging step (and per evaluation)."""

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if k != "target_mean"}
        return d


@dataclass
class _ModuleRun:
    name: str
    layer: int
    module: Replacement
    optimizer: torch.optim.Optimizer
    since_fired: Tensor
    target_sum: Tensor
    target_count: Tensor
    seconds: float = 0.0
    window: dict[str, float] = field(default_factory=lambda: {"loss": 0.0, "nmse": 0.0, "l0": 0.0, "aux": 0.0, "n": 0})
    last: dict[str, float] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)

    def extra(self) -> ModuleCheckpoint:
        return ModuleCheckpoint(
            self.optimizer.state_dict(),
            {"since_fired": self.since_fired, "target_sum": self.target_sum, "target_count": self.target_count,
             "seconds": torch.tensor([self.seconds], dtype=torch.float64)},
        )


def _record_sites(model: HookedTransformer, name: str, layer: int, module: Replacement) -> None:
    """Write the training sites into the module's config; refuse a conflicting one."""
    cfg = module.cfg
    wanted = {
        "layer": layer,
        "hook_name": input_hook_name(layer),
        "hook_name_out": output_hook_name(layer),
    }
    for key, value in wanted.items():
        current = getattr(cfg, key)
        if current is not None and current != value:
            raise ValueError(f"module {name!r} has {key}={current!r} but is being trained on {value!r}")
        setattr(cfg, key, value)
    if cfg.input_site != "mlp_in":
        raise ValueError(f"module {name!r} has input_site={cfg.input_site!r}; training needs 'mlp_in'")
    if cfg.model_name is None:
        cfg.model_name = model.cfg.model_name
    if cfg.d_in != model.cfg.d_model or cfg.d_out != model.cfg.d_model:
        raise ValueError(
            f"module {name!r} maps d_in={cfg.d_in} -> d_out={cfg.d_out} but the model's MLP maps "
            f"{model.cfg.d_model} -> {model.cfg.d_model}"
        )


def _make_optimizer(module: Replacement, cfg: TrainerConfig) -> torch.optim.Optimizer:
    params = [p for p in module.parameters() if p.requires_grad]
    fused = all(p.device.type in ("cpu", "cuda") and p.dtype in (torch.float32, torch.float64) for p in params)
    return torch.optim.AdamW(
        params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=0.0, fused=fused or None
    )


@torch.no_grad()
def heldout_nmse(module: Replacement, pairs: Pair, batch_size: int = 4096) -> float:
    """sum||y_hat - y||^2 / sum||y||^2 over held-out pairs, in the module's dtype (no autocast)."""
    x_all, y_all = pairs
    err = energy = 0.0
    for s in range(0, x_all.shape[0], batch_size):
        x = x_all[s : s + batch_size].to(module.device, module.dtype)
        y = y_all[s : s + batch_size].to(module.device)
        e, n = squared_error_sums(module.reconstruct(x, hooked=False), y)
        err, energy = err + e, energy + n
    return err / max(energy, 1e-12)


def fit(
    model: HookedTransformer,
    modules: Mapping[str, tuple[int, Replacement]],
    tokens: Int[Tensor, "rows ctx"],
    cfg: TrainerConfig | None = None,
    *,
    eval_tokens: Int[Tensor, "rows ctx"] | None = None,
    on_step: Callable[[int, Mapping[str, Replacement]], None] | None = None,
) -> dict[str, TrainSummary]:
    """Train `modules` (name -> (layer, module)) in place on one activation stream.

    One forward pass of `model` over `tokens` feeds every module (several methods, K and
    layers at once). Each module gets its own AdamW; an MxD's expert rows are kept at unit
    norm (parallel gradient removed before the step, renormalised after). With
    `cfg.checkpoint_every` checkpoints are written, and `cfg.resume` continues from the
    latest one exactly. `eval_tokens` (held-out rows) give a held-out NMSE every
    `cfg.eval_every` steps and at the end. `on_step(steps_done, {name: module})` runs
    after every optimizer step (learning curves use it); it must leave the modules as it
    found them (train mode, parameters untouched).
    """
    cfg = cfg or TrainerConfig()
    if not modules:
        raise ValueError("modules is empty; expected at least one {name: (layer, module)}")
    device = torch.device(cfg.device)
    for name, entry in modules.items():
        if not (isinstance(entry, tuple) and len(entry) == 2 and isinstance(entry[1], Replacement)):
            raise ValueError(f"modules[{name!r}] must be a (layer, module) pair; got {type(entry).__name__}")
        layer, module = entry
        if "/" in name or name.startswith(".") or not name:
            raise ValueError(f"module name {name!r} is not usable as a folder name")
        if module.device != device:
            raise ValueError(f"module {name!r} is on {module.device} but cfg.device={cfg.device!r}; move it first")
        if module.cfg.k > module.n_units:
            raise ValueError(f"module {name!r}: k={module.cfg.k} is larger than its {module.n_units} units")
        if not module.trainable:
            raise ValueError(
                f"module {name!r}: a {type(module).__name__} ({module.architecture}) cannot be trained by "
                "mxd_lens.training.fit"
            )
    layers = sorted({layer for layer, _ in modules.values()})
    source = ActivationSource(model, layers, tokens, cfg.activations, seed=cfg.seed)
    for name, (layer, module) in modules.items():
        _record_sites(model, name, layer, module)

    torch.manual_seed(cfg.seed)
    runs = {
        name: _ModuleRun(
            name, layer, module, _make_optimizer(module, cfg),
            since_fired=torch.zeros(module.n_units, dtype=torch.long),
            target_sum=torch.zeros(module.cfg.d_out, dtype=torch.float64),
            target_count=torch.zeros((), dtype=torch.float64),
        )
        for name, (layer, module) in modules.items()
    }
    step, position = 0, DataPosition()
    if cfg.resume:
        step, position = _resume(cfg, runs)

    eval_pairs = None
    if eval_tokens is not None:
        eval_cfg = ActivationConfig(
            model_batch_rows=cfg.activations.model_batch_rows,
            buffer_tokens=max(eval_tokens.numel(), cfg.batch_size),
            shuffle_rows=False, autocast=None, keep_in_memory=True,
        )
        eval_source = ActivationSource(model, layers, eval_tokens, eval_cfg, seed=cfg.seed)
        eval_pairs = eval_source.collect(eval_source.rows)

    autocast_dtype = resolve_autocast(cfg.autocast, device)
    autocast = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
    aux_k_default = next(iter(modules.values()))[1].cfg.d_out // 2
    wandb_run = _wandb(cfg)
    total = cfg.total_steps
    bar = tqdm(total=total, initial=step, disable=not cfg.progress, desc="train", dynamic_ncols=True)
    source.status = bar if cfg.progress else None
    stream = source.batches(cfg.batch_size, position)
    collect_seconds = 0.0
    try:
        while step < total:
            t0 = time.perf_counter()
            position, batch = next(stream)
            collect_seconds += time.perf_counter() - t0
            lr = lr_at(step, cfg)
            for run in runs.values():
                x, y = batch[run.layer]
                x = x.to(device, run.module.dtype)
                y = y.to(device, torch.float32)
                t1 = time.perf_counter()
                _train_step(run, x, y, lr, step, cfg, autocast, cfg.aux_k or aux_k_default)
                run.seconds += time.perf_counter() - t1
            step += 1
            bar.update(1)
            if on_step is not None:
                on_step(step, {name: run.module for name, run in runs.items()})
            if step % cfg.log_every == 0 or step == total:
                _log(runs, step, cfg, bar, wandb_run)
            if eval_pairs is not None and cfg.eval_every and step % cfg.eval_every == 0 and step < total:
                _evaluate(runs, eval_pairs, step, wandb_run)
            if cfg.checkpoint_every and (step % cfg.checkpoint_every == 0 or step == total):
                _checkpoint(cfg, runs, step, position, source)
    finally:
        bar.close()
        if wandb_run is not None:
            wandb_run.finish()
    heldout = _evaluate(runs, eval_pairs, step, None) if eval_pairs is not None else {}
    summaries = {name: _summary(run, step, cfg, heldout.get(name)) for name, run in runs.items()}
    for s in summaries.values():
        s.autocast = None if autocast_dtype is None else str(autocast_dtype).removeprefix("torch.")
        if source.collect_seconds > 0:
            s.collect_tokens_per_second = source.collected_tokens / source.collect_seconds
    return summaries


def _train_step(
    run: _ModuleRun, x: Tensor, y: Tensor, lr: float, step: int, cfg: TrainerConfig, autocast, aux_k: int
) -> None:
    module = run.module
    if step == 0 and cfg.init_bias_from_data:
        with torch.no_grad():
            module.b_dec.copy_(y.mean(0).to(module.b_dec.dtype))
    dead = run.since_fired >= cfg.dead_tokens
    with autocast:
        out = train_forward(module, x)
        loss = nmse_loss(out.y_hat, y, cfg.loss_norm)
        aux = aux_k_loss(module, x, out, y, dead.to(x.device), aux_k, cfg.aux_tokens) if cfg.aux_coeff > 0 else None
        total = loss if aux is None else loss + cfg.aux_coeff * aux
    if not torch.isfinite(total):
        raise FloatingPointError(f"module {run.name!r}: the loss became {float(total)} at step {step}")
    total.backward()
    module.before_optimizer_step()
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    module.after_optimizer_step()

    with torch.no_grad():
        active = out.sparse.values > 0
        fired = torch.zeros(module.n_units, dtype=torch.bool, device=x.device)
        fired[out.sparse.indices[active]] = True
        run.since_fired += x.shape[0]
        run.since_fired[fired.cpu()] = 0
        run.target_sum += y.double().sum(0).cpu()
        run.target_count += y.shape[0]
        w = run.window
        w["loss"] += float(total)
        w["nmse"] += float(nmse_loss(out.y_hat, y, "batch"))
        w["l0"] += float(active.sum(-1).float().mean())
        w["aux"] += 0.0 if aux is None else float(aux)
        w["n"] += 1


def _log(runs: Mapping[str, _ModuleRun], step: int, cfg: TrainerConfig, bar, wandb_run) -> None:
    postfix = []
    metrics = {}
    for run in runs.values():
        w = run.window
        n = max(w["n"], 1)
        run.last = {
            "step": step,
            "loss": w["loss"] / n,
            "nmse": w["nmse"] / n,
            "l0": w["l0"] / n,
            "aux": w["aux"] / n,
            "dead": float((run.since_fired >= cfg.dead_tokens).float().mean()),
            "lr": run.optimizer.param_groups[0]["lr"],
        }
        run.history.append(dict(run.last))
        run.window = {k: 0.0 for k in w} | {"n": 0}
        postfix.append(f"{run.name} nmse={run.last['nmse']:.3f} L0={run.last['l0']:.0f} dead={run.last['dead']:.0%}")
        metrics.update({f"{run.name}/{k}": v for k, v in run.last.items() if k != "step"})
    bar.set_postfix_str("; ".join(postfix), refresh=False)
    if wandb_run is not None:
        wandb_run.log(metrics, step=step)


def _evaluate(runs: Mapping[str, _ModuleRun], pairs: dict[int, Pair], step: int, wandb_run) -> dict[str, float]:
    out = {}
    for run in runs.values():
        out[run.name] = heldout_nmse(run.module, pairs[run.layer])
        run.history.append({"step": step, "heldout_nmse": out[run.name]})
    if wandb_run is not None:
        wandb_run.log({f"{k}/heldout_nmse": v for k, v in out.items()}, step=step)
    return out


def _summary(run: _ModuleRun, step: int, cfg: TrainerConfig, heldout: float | None) -> TrainSummary:
    last = run.last or {"loss": float("nan"), "nmse": float("nan"), "l0": float("nan")}
    tokens = step * cfg.batch_size
    count = float(run.target_count)
    return TrainSummary(
        name=run.name,
        layer=run.layer,
        architecture=run.module.architecture,
        k=run.module.cfg.k,
        n_units=run.module.n_units,
        steps=step,
        tokens=tokens,
        loss=last["loss"],
        nmse=last["nmse"],
        l0=last["l0"],
        dead_fraction=float((run.since_fired >= cfg.dead_tokens).float().mean()),
        seconds=run.seconds,
        tokens_per_second=tokens / run.seconds if run.seconds > 0 else float("nan"),
        heldout_nmse=heldout,
        target_mean=(run.target_sum / max(count, 1.0)).float(),
        history=run.history,
    )


def _checkpoint(cfg: TrainerConfig, runs: Mapping[str, _ModuleRun], step: int, position: DataPosition, source) -> None:
    state = {
        "position": position.to_dict(),
        "config": cfg.to_dict(),
        "modules": {name: {"layer": r.layer, "architecture": r.module.architecture} for name, r in runs.items()},
        "history": {name: r.history for name, r in runs.items()},
        "last": {name: r.last for name, r in runs.items()},
    }
    save_checkpoint(
        cfg.checkpoint_dir, step, state,
        {name: r.module for name, r in runs.items()},
        {name: r.extra() for name, r in runs.items()},
        keep=cfg.keep_checkpoints,
    )


def _resume(cfg: TrainerConfig, runs: Mapping[str, _ModuleRun]) -> tuple[int, DataPosition]:
    """Load the latest checkpoint into `runs`; (0, start) if there is none yet."""
    path = latest_checkpoint(cfg.checkpoint_dir)
    if path is None:
        return 0, DataPosition()
    ckpt = load_checkpoint(path)
    saved = ckpt.state["modules"]
    if set(saved) != set(runs):
        raise ValueError(f"{path} holds modules {sorted(saved)} but this run trains {sorted(runs)}")
    for key in ("batch_size", "seed", "train_tokens"):
        if ckpt.state["config"][key] != getattr(cfg, key):
            raise ValueError(
                f"{path} was written with {key}={ckpt.state['config'][key]!r}, this run has "
                f"{key}={getattr(cfg, key)!r}; exact resumption needs the same value"
            )
    for name, run in runs.items():
        if saved[name]["layer"] != run.layer or saved[name]["architecture"] != run.module.architecture:
            raise ValueError(f"{path}: module {name!r} was {saved[name]}, not layer {run.layer} {run.module.architecture}")
        run.module.load_state_dict(ckpt.modules[name].state_dict())
        run.optimizer.load_state_dict(ckpt.extra[name].optimizer)
        t = ckpt.extra[name].tensors
        run.since_fired.copy_(t["since_fired"])
        run.target_sum.copy_(t["target_sum"])
        run.target_count.copy_(t["target_count"])
        run.seconds = float(t["seconds"][0])
        run.history = [nan_from_null(entry) for entry in ckpt.state["history"][name]]
        run.last = nan_from_null(ckpt.state["last"][name])
    set_rng_state(ckpt.rng)
    return int(ckpt.state["step"]), DataPosition(**ckpt.state["position"])


def _wandb(cfg: TrainerConfig):
    if not cfg.wandb_project:
        return None
    try:
        import wandb
    except ImportError:
        raise RuntimeError("wandb_project is set but the `wandb` package is not installed") from None
    return wandb.init(project=cfg.wandb_project, config=cfg.to_dict())


__all__ = ["fit", "TrainSummary", "train_forward", "nmse_loss", "aux_k_loss", "lr_at", "heldout_nmse", "StepOutput"]
