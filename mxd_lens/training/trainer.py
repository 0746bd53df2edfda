"""Training several replacement modules at once from one activation stream.

Loss (`TrainerConfig.loss_norm`, default 'batch'): the normalised MSE
sum||y_hat - y||^2 / sum||y||^2 over the batch, the same quantity as the NMSE reported on
held-out text; scale-invariant, unlike the paper's code, which divides each token's
squared error by ||y|| (not ||y||^2). 'token' averages ||e||^2/||y||^2 over tokens.

Dead units (no activation in the last `dead_tokens` tokens) are revived with an AuxK loss
(Gao et al. 2024): the aux_k most active dead units reconstruct the residual y - y_hat,
weighted by `aux_coeff`. For an MxD the dead experts' mixture modulates the (detached)
dense output D^T z, exactly as live experts do.

Several processes (torch.distributed, torchrun) train data-parallel with the result of
one process: see `fit`.
"""

from __future__ import annotations

import contextlib
import dataclasses
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
from mxd_lens.config import parse_dtype
from mxd_lens.functional import nmse, select_topk, squared_error_sums
from mxd_lens.model_io import model_device
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
from mxd_lens.training import distributed
from mxd_lens.training import init as data_init
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
    groups = data_init.optimizer_groups(module, cfg)  # per-group lr multipliers (`lr_scale`)
    params = [p for g in groups for p in g["params"]]
    fused = all(p.device.type in ("cpu", "cuda") and p.dtype in (torch.float32, torch.float64) for p in params)
    return torch.optim.AdamW(
        groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=0.0, fused=fused or None
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


class FitResult(dict):
    """`fit`'s result: {name: TrainSummary}, plus what the run as a whole measured."""

    distributed: dict[str, Any]
    """{"world_size", "rows_per_rank", "collect_seconds_per_rank", "collected_tokens_per_rank"}."""
    memory: dict[str, Any]
    """The activation buffer's bound (bytes per layer, per process; see `ActivationSource`)."""


def _aux_terms(
    module: Replacement, x: Tensor, out: StepOutput, y: Tensor, dead: Tensor, aux_k: int, select: Tensor | None
) -> tuple[Tensor, Tensor]:
    """AuxK without a host synchronisation: (sum of squared errors of the top-aux_k dead
    units' reconstruction of the residual, sum of the residual's energy) over the tokens
    `select` (all if None). Equals `aux_k_loss`'s numerator and denominator: the TopK runs
    over all units with the live ones masked out, and any live unit it still has to pick
    (fewer than aux_k dead) contributes 0, so no data-dependent shape is needed."""
    if select is not None:
        x, y, y_hat, pre = x[select], y[select], out.y_hat[select], out.pre[select]
        context = None if out.context is None else out.context[select]
    else:
        y_hat, pre, context = out.y_hat, out.pre, out.context
    residual = (y.float() - y_hat.float()).detach()
    k = min(aux_k, module.n_units)
    idx = pre.masked_fill(~dead, float("-inf")).topk(k, dim=-1, sorted=False).indices
    sparse = select_topk(x, module.W_enc, module.b_enc, pre, idx)
    sparse = type(sparse)(sparse.values * dead[idx].to(sparse.values.dtype), idx)
    err = (module.aux_output(sparse, context).float() - residual).pow(2).sum()
    return err, residual.pow(2).sum()


def _to_device(t: Tensor, device: torch.device, dtype: torch.dtype) -> Tensor:
    """A host batch on the training device: through a pinned buffer and an asynchronous
    copy on CUDA (the caching host allocator keeps the buffer until the copy is done)."""
    if t.device == device:  # already there (module parallelism assembles batches on the device)
        return t.to(dtype)
    if device.type == "cuda":
        pinned = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        pinned.copy_(t)
        return pinned.to(device, non_blocking=True).to(dtype)
    return t.to(device, dtype)


def _check_same_everywhere(
    modules: Mapping[str, tuple[int, Replacement]], tokens: Tensor, cfg: TrainerConfig, ctx: distributed.DistContext
) -> None:
    """Every process must train the same modules on the same token rows with the same
    settings (else the collectives would pair up different tensors): compare them once."""
    rows = min(tokens.shape[0], 64)
    mine = {
        "modules": [(n, layer, m.architecture, [tuple(p.shape) for p in m.parameters()]) for n, (layer, m) in modules.items()],
        "tokens": [list(tokens.shape), int(tokens[:rows].sum()), int(tokens[-rows:].sum())],
        "config": {k: v for k, v in cfg.to_dict().items() if k not in ("progress", "wandb_project", "device", "activations")}
        | {"activations": {k: v for k, v in cfg.activations.to_dict().items() if k != "rank"}},
    }
    everyone = distributed.gather_objects(mine, ctx)
    for rank, theirs in enumerate(everyone):
        for key in mine:
            if theirs[key] != everyone[0][key]:
                raise ValueError(
                    f"data-parallel fit: rank {rank} has different {key} from rank 0 "
                    f"({str(theirs[key])[:200]} vs {str(everyone[0][key])[:200]}); every process must call fit "
                    "with the same modules, token rows and config"
                )


def _dtype_name(dtype: torch.dtype | None) -> str | None:
    return None if dtype is None else str(dtype).removeprefix("torch.")


def fit(
    model: HookedTransformer,
    modules: Mapping[str, tuple[int, Replacement]],
    tokens: Int[Tensor, "rows ctx"],
    cfg: TrainerConfig | None = None,
    *,
    eval_tokens: Int[Tensor, "rows ctx"] | None = None,
    on_step: Callable[[int, Mapping[str, Replacement]], None] | None = None,
) -> FitResult:
    """Train `modules` (name -> (layer, module)) in place on one activation stream.

    One forward pass of `model` over `tokens` feeds every module (several methods, K and
    layers at once). Each module gets its own AdamW; an MxD's expert rows are kept at unit
    norm (parallel gradient removed before the step, renormalised after). With
    `cfg.checkpoint_every` checkpoints are written, and `cfg.resume` continues from the
    latest one exactly. `eval_tokens` (held-out rows) give a held-out NMSE every
    `cfg.eval_every` steps and at the end. `on_step(steps_done, {name: module})` runs
    after every optimizer step (learning curves use it), on rank 0 only when several
    processes train together (the modules are the same on every rank); it must leave
    the modules as it found them (train mode, parameters untouched) and must not call
    torch.distributed collectives (the other ranks are not there).

    Data parallelism. Inside a torch.distributed process group (torchrun, or one the
    caller made) every process calls `fit` with the same arguments; each runs the
    language model on its own disjoint share of every chunk's rows and trains on its own
    tokens of every global batch (`ActivationSource.shares`). The result equals one
    process's with the same settings and seed, to float summation order, because every
    quantity that mixes tokens is a SUM over the global batch, taken over the processes:
    the gradients (each process's loss is its tokens' share of the global loss: squared
    errors divided by the GLOBAL sum||y||^2, or by the global batch size for
    loss_norm='token'), AuxK's residual energy (over the global batch's first
    `aux_tokens` slots), the b_dec data initialisation (global batch mean), the fired
    units (so `since_fired`, the dead set and AuxK's selection are the same everywhere)
    and the target means. Parameters start as rank 0's, AdamW then sees identical
    gradients everywhere, and the MxD's renormalisation runs after the synchronised step,
    so every process holds the same modules at every step. The precision (autocast) is
    resolved once on rank 0 and broadcast. `on_step`, held-out evaluation, progress bars
    and checkpoint writing happen on rank 0 only (checkpoints must be readable by every
    rank on resume, and resume needs the same number of processes).

    Module parallelism (`cfg.parallel='modules'`, as sparsify's distribute_modules).
    Collection is shared as above, but each global batch is then assembled whole on
    every process (each scatters its tokens into their slots, one all-reduce SUM per
    step over every layer's pairs: a sum with zeros, so the batch is bit-for-bit what
    one process serves), and each process trains only the modules it owns (the sorted
    names, module i on rank i % N) exactly as one process would, with no collective in
    the step. Ranks that own no module (fewer modules than processes) only collect.
    Before anything rank 0 needs (`on_step`, held-out evaluation, checkpoints, the
    result) the owners broadcast their modules' state to rank 0; checkpoints then
    hold every module, and resume needs the same N and mode. On ranks other than 0
    the returned modules that rank does not own are stale.

    Gradients are summed with an explicit all-reduce rather than DistributedDataParallel:
    the losses are already normalised by global quantities (DDP would average, i.e.
    divide by N again), the modules train through `train_forward` rather than `forward`
    (DDP's hooks assume the latter), the MxD's gradient projection must act on the summed
    gradient, and one flat all-reduce per step carries every module's gradients AND
    fired-unit counts at once.

    On CUDA the hot path does not synchronise with the host: losses, metrics and
    dead-unit counters stay on the device and are read every `cfg.log_every` steps (a
    non-finite loss is reported then, naming the steps), host batches go through pinned
    buffers with asynchronous copies.
    """
    cfg = cfg or TrainerConfig()
    if not modules:
        raise ValueError("modules is empty; expected at least one {name: (layer, module)}")
    device = torch.device(cfg.device)
    if device.type == "cuda" and device.index is None and torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())  # torchrun: this rank's GPU
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
    ctx = distributed.current()
    acfg = cfg.activations
    if ctx.active:
        if acfg.world_size != 1 and (acfg.world_size, acfg.rank) != (ctx.world_size, ctx.rank):
            raise ValueError(
                f"activations has rank={acfg.rank}, world_size={acfg.world_size} but this process is rank "
                f"{ctx.rank} of {ctx.world_size} in the torch.distributed process group; leave them at 0, 1"
            )
        acfg = dataclasses.replace(acfg, rank=ctx.rank, world_size=ctx.world_size)
        _check_same_everywhere(modules, tokens, cfg, ctx)
    elif acfg.world_size > 1:
        raise ValueError(
            f"activations.world_size={acfg.world_size} but no torch.distributed process group is running; "
            "launch with torchrun (`torchrun --nproc_per_node=N -m mxd_lens train ...`) or call "
            "torch.distributed.init_process_group first"
        )
    # precision is decided once, on rank 0, so that the processes never disagree
    precision = None
    if ctx.is_main:
        precision = (
            _dtype_name(resolve_autocast(cfg.autocast, device)),
            _dtype_name(resolve_autocast(acfg.autocast, model_device(model))),
        )
    train_precision, collect_precision = distributed.broadcast_object(precision, ctx)
    acfg = dataclasses.replace(acfg, autocast=collect_precision)
    autocast_dtype = parse_dtype(train_precision) if train_precision else None

    layers = sorted({layer for layer, _ in modules.values()})
    source = ActivationSource(model, layers, tokens, acfg, seed=cfg.seed)
    # per-method settings (`TrainerConfig.per_method`): each module trains with its own
    mcfg = {name: cfg.for_architecture(module.architecture) for name, (_, module) in modules.items()}
    for name, (layer, module) in modules.items():
        _record_sites(model, name, layer, module)
        data_init.prepare_(module, model, layer, mcfg[name])  # warm start / expert rows (options), before the broadcast
        distributed.broadcast_module_(module, ctx)  # every process starts from rank 0's weights

    torch.manual_seed(cfg.seed)
    runs = {
        name: _ModuleRun(
            name, layer, module, _make_optimizer(module, mcfg[name]), mcfg[name],
            since_fired=torch.zeros(module.n_units, dtype=torch.long, device=device),
            target_sum=torch.zeros(module.cfg.d_out, dtype=torch.float64, device=device),
            target_count=torch.zeros((), dtype=torch.float64, device=device),
            window=torch.zeros(len(_WINDOW), dtype=torch.float64, device=device),
        )
        for name, (layer, module) in modules.items()
    }
    # module parallelism: `owned` are the modules this process trains, with no collective
    # (`train_ctx` is a one-process context); data parallelism: every module, with `ctx`
    modules_mode = ctx.active and cfg.parallel == "modules"
    owner = {name: i % ctx.world_size if modules_mode else ctx.rank for i, name in enumerate(sorted(runs))}
    owned = {name: run for name, run in runs.items() if owner[name] == ctx.rank}
    train_ctx = distributed.DistContext() if modules_mode else ctx
    step, position = 0, DataPosition()
    if cfg.resume:
        step, position = _resume(cfg, runs, ctx, modules_mode)

    memory = {
        "layers": len(layers),
        "store_dtype": acfg.store_dtype,
        "buffer_bytes_per_layer": source.buffer_bytes_per_layer,
        "buffer_bytes": source.buffer_bytes,
        "keep_in_memory": acfg.keep_in_memory,
        "kept_bytes_max": source.total_bytes if acfg.keep_in_memory else source.buffer_bytes,
    }
    if cfg.progress and ctx.is_main:
        mib = 2**20
        tqdm.write(
            f"activation buffer per process: {memory['buffer_bytes_per_layer'] / mib:.1f} MiB per layer x "
            f"{len(layers)} layer(s) = {memory['buffer_bytes'] / mib:.1f} MiB ({acfg.store_dtype}); "
            + (f"keeping every chunk in memory: up to {memory['kept_bytes_max'] / mib:.1f} MiB"
               if acfg.keep_in_memory else "one chunk at a time")
        )

    eval_pairs = None
    if eval_tokens is not None and ctx.is_main:
        eval_cfg = ActivationConfig(
            model_batch_rows=acfg.model_batch_rows,
            buffer_tokens=max(eval_tokens.numel(), cfg.batch_size),
            shuffle_rows=False, autocast=None, keep_in_memory=True,
            exclude_special_tokens=acfg.exclude_special_tokens,
        )
        eval_source = ActivationSource(model, layers, eval_tokens, eval_cfg, seed=cfg.seed)
        eval_pairs = eval_source.collect_kept(eval_source.rows)

    autocast = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
    aux_k_default = next(iter(modules.values()))[1].cfg.d_out // 2
    wandb_run = _wandb(cfg) if ctx.is_main else None
    total = cfg.total_steps
    show = cfg.progress and ctx.is_main
    bar = tqdm(total=total, initial=step, disable=not show, desc="train", dynamic_ncols=True)
    source.status = bar if show else None
    stream = source.shares(cfg.batch_size, position)
    # rank 0 alone holds on_step and the held-out pairs; module parallelism's collectives
    # before them must run on every process alike
    wants_step, has_eval = distributed.broadcast_object((on_step is not None, eval_pairs is not None), ctx)
    assemble_seconds = 0.0
    try:
        while step < total:
            share = next(stream)
            position = share.position
            data, slots = share.data, share.slots
            if modules_mode:
                t1 = time.perf_counter()
                data = _assemble_batch(share, cfg.batch_size, device, ctx)
                slots = torch.arange(cfg.batch_size)
                assemble_seconds += time.perf_counter() - t1
                for run in owned.values():
                    run.seconds += (time.perf_counter() - t1) / len(owned)
            select = None
            if any(run.cfg.aux_coeff > 0 for run in owned.values()) and cfg.aux_tokens is not None:
                select = (slots < cfg.aux_tokens).nonzero().flatten().to(device, non_blocking=True)
            on_device: dict[tuple[int, torch.dtype], tuple[Tensor, Tensor]] = {}
            for run in owned.values():
                key = (run.layer, run.module.dtype)
                if key not in on_device:
                    x, y = data[run.layer]
                    on_device[key] = (_to_device(x, device, run.module.dtype), _to_device(y, device, torch.float32))
                x, y = on_device[key]
                t1 = time.perf_counter()
                _train_step(run, x, y, select, step, run.cfg, autocast, run.cfg.aux_k or aux_k_default, train_ctx)
                run.seconds += time.perf_counter() - t1
            t1 = time.perf_counter()
            _synchronised_step(owned, step, train_ctx)
            for run in owned.values():
                run.seconds += (time.perf_counter() - t1) / len(owned)
            step += 1
            bar.update(1)
            if wants_step:
                if modules_mode:
                    _sync_to_main(runs, owned, owner, ctx, full=False)
                if ctx.is_main:
                    on_step(step, {name: run.module for name, run in runs.items()})
            if step % cfg.log_every == 0 or step == total:
                _log(owned, step, cfg, bar, wandb_run, train_ctx)
            if has_eval and cfg.eval_every and step % cfg.eval_every == 0 and step < total:
                if modules_mode:
                    _sync_to_main(runs, owned, owner, ctx, full=False)
                scores = _evaluate(runs, eval_pairs, step, wandb_run) if eval_pairs is not None else None
                if modules_mode:  # the owners keep the history: they hear the scores
                    scores = distributed.broadcast_object(scores, ctx)
                    if not ctx.is_main:
                        for name, run in owned.items():
                            run.history.append({"step": step, "heldout_nmse": scores[name]})
            if cfg.checkpoint_every and (step % cfg.checkpoint_every == 0 or step == total):
                if modules_mode:
                    _sync_to_main(runs, owned, owner, ctx, full=True)
                _checkpoint(cfg, runs, step, position, ctx, reduce_targets=not modules_mode)
    finally:
        bar.close()
        if wandb_run is not None:
            wandb_run.finish()
    if modules_mode:  # every module's state on rank 0 (its target sums are its owner's, whole)
        _sync_to_main(runs, owned, owner, ctx, full=True)
    else:
        for run in runs.values():  # the target means over every process's tokens
            distributed.all_reduce_many_([run.target_sum, run.target_count], ctx)
    heldout = _evaluate(runs, eval_pairs, step, None) if eval_pairs is not None else {}
    per_rank = distributed.gather_objects(
        {"rows": len(source.rows), "seconds": source.collect_seconds, "tokens": source.collected_tokens}, ctx
    )
    result = FitResult({name: _summary(run, step, cfg, heldout.get(name)) for name, run in runs.items()})
    result.distributed = {
        "world_size": ctx.world_size,
        "parallel": "modules" if modules_mode else "data",
        "owners": owner if modules_mode else None,
        "assemble_seconds": assemble_seconds,
        "rows_per_rank": [r["rows"] for r in per_rank],
        "collect_seconds_per_rank": [r["seconds"] for r in per_rank],
        "collected_tokens_per_rank": [r["tokens"] for r in per_rank],
    }
    result.memory = memory
    collect_seconds = max(r["seconds"] for r in per_rank)
    for s in result.values():
        s.autocast = train_precision
        if collect_seconds > 0:
            s.collect_tokens_per_second = sum(r["tokens"] for r in per_rank) / collect_seconds
    return result


_WINDOW = ("loss", "nmse", "l0", "aux", "nonfinite")
"""The per-module sums a logging window accumulates on the device (each process's share
of every step's global value: summed over the processes they are the global values)."""


@dataclass
class _ModuleRun:
    name: str
    layer: int
    module: Replacement
    optimizer: torch.optim.Optimizer
    cfg: TrainerConfig
    """This module's settings: the run's with its method's `per_method` overrides."""
    since_fired: Tensor
    target_sum: Tensor
    """This process's sum of targets (all processes' after a resume on rank 0)."""
    target_count: Tensor
    window: Tensor
    """`_WINDOW` sums since the last log, on the device."""
    window_steps: int = 0
    fired: Tensor | None = None
    """This step's fired-unit counts (this process's tokens), until the synchronised step."""
    seconds: float = 0.0
    last: dict[str, float] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)

    def extra(self, target_sum: Tensor, target_count: Tensor) -> ModuleCheckpoint:
        return ModuleCheckpoint(
            self.optimizer.state_dict(),
            {"since_fired": self.since_fired, "target_sum": target_sum, "target_count": target_count,
             "seconds": torch.tensor([self.seconds], dtype=torch.float64)},
        )


def _train_step(
    run: _ModuleRun, x: Tensor, y: Tensor, select: Tensor | None, step: int, cfg: TrainerConfig, autocast,
    aux_k: int, ctx: distributed.DistContext,
) -> None:
    """This process's share of one module's step: forward, loss (normalised by global
    sums), backward. The gradient is summed over the processes in `_synchronised_step`."""
    module = run.module
    batch = cfg.batch_size  # every global batch holds exactly batch_size tokens
    if step == 0 and cfg.init_bias_from_data:
        with torch.no_grad():
            total_y = distributed.all_reduce_(y.double().sum(0), ctx)
            module.b_dec.copy_((total_y / batch).to(module.b_dec.dtype))
    if step == 0:  # data-dependent inits (options; statistics all-reduced like the bias's)
        data_init.init_from_data_(module, x, cfg, ctx)
    dead = run.since_fired >= cfg.dead_tokens
    use_aux = cfg.aux_coeff > 0
    with autocast:
        out = train_forward(module, x)
        err_tok = (out.y_hat.float() - y.float()).pow(2).sum(-1)
        energy_tok = y.float().pow(2).sum(-1)
        sums = [energy_tok.sum()]
        if use_aux:
            aux_err, aux_energy = _aux_terms(module, x, out, y, dead, aux_k, select)
            sums.append(aux_energy)
        sums = distributed.all_reduce_(torch.stack(sums).detach(), ctx)  # global denominators
        nmse_part = err_tok.sum() / sums[0].clamp_min(1e-12)
        if cfg.loss_norm == "batch":
            loss = nmse_part
        else:
            loss = (err_tok / energy_tok.clamp_min(1e-12)).sum() / batch
        aux = aux_err / sums[1].clamp_min(1e-12) * dead.any() if use_aux else torch.zeros((), device=x.device)
        total = loss + cfg.aux_coeff * aux
    total.backward()
    with torch.no_grad():
        active = out.sparse.values > 0
        # counts via index_add_ (no boolean indexing: no host synchronisation)
        run.fired = torch.zeros(module.n_units, dtype=torch.float32, device=x.device)
        run.fired.index_add_(0, out.sparse.indices.flatten(), active.flatten().float())
        run.target_sum += y.double().sum(0)
        run.target_count += y.shape[0]
        run.window += torch.stack([
            total.detach().double(), nmse_part.detach().double(), active.sum().double() / batch,
            aux.detach().double(), (~torch.isfinite(total.detach())).double(),
        ])
        run.window_steps += 1


def _synchronised_step(runs: Mapping[str, _ModuleRun], step: int, ctx) -> None:
    """Sum every module's gradients and fired counts over the processes (one collective
    per dtype), then step every optimiser at its own learning rate (`lr_at(step, run.cfg)`):
    the same update on every process."""
    params = [p for run in runs.values() for p in run.module.parameters() if p.requires_grad]
    for p in params:  # an unused parameter gets a zero gradient on every process alike
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    distributed.all_reduce_many_([p.grad for p in params] + [run.fired for run in runs.values()], ctx)
    for run in runs.values():
        module = run.module
        module.before_optimizer_step()
        cfg = run.cfg
        data_init.constrain_grads_(module, cfg)
        lr = lr_at(step, cfg)
        for group in run.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        run.optimizer.step()
        run.optimizer.zero_grad(set_to_none=True)
        module.after_optimizer_step()
        data_init.constrain_rows_(module, cfg)
        with torch.no_grad():
            run.since_fired += cfg.batch_size
            run.since_fired.masked_fill_(run.fired > 0, 0)
        run.fired = None


def _log(runs: Mapping[str, _ModuleRun], step: int, cfg: TrainerConfig, bar, wandb_run, ctx) -> None:
    """Read the windows (the one host synchronisation, every log_every steps)."""
    names = list(runs)
    if not names:  # module parallelism: a process that owns no module
        return
    windows = torch.stack([runs[n].window for n in names])
    distributed.all_reduce_(windows, ctx)
    dead = torch.stack([(runs[n].since_fired >= runs[n].cfg.dead_tokens).double().mean() for n in names])
    windows, dead = windows.tolist(), dead.tolist()
    postfix = []
    metrics = {}
    for name, w, d in zip(names, windows, dead):
        run = runs[name]
        values = dict(zip(_WINDOW, w))
        n = max(run.window_steps, 1)
        if values["nonfinite"] > 0:
            raise FloatingPointError(
                f"module {run.name!r}: the loss became non-finite in {int(values['nonfinite'])} of the steps "
                f"{step - run.window_steps + 1}..{step}"
            )
        run.last = {
            "step": step,
            "loss": values["loss"] / n,
            "nmse": values["nmse"] / n,
            "l0": values["l0"] / n,
            "aux": values["aux"] / n,
            "dead": d,
            "lr": run.optimizer.param_groups[0]["lr"],
        }
        run.history.append(dict(run.last))
        run.window.zero_()
        run.window_steps = 0
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
        dead_fraction=float((run.since_fired >= run.cfg.dead_tokens).float().mean()),
        seconds=run.seconds,
        tokens_per_second=tokens / run.seconds if run.seconds > 0 else float("nan"),
        heldout_nmse=heldout,
        target_mean=(run.target_sum / max(count, 1.0)).float().cpu(),
        history=run.history,
    )


def _checkpoint(
    cfg: TrainerConfig, runs: Mapping[str, _ModuleRun], step: int, position: DataPosition, ctx,
    reduce_targets: bool = True,
) -> None:
    """Every process takes part (the target sums are summed over them unless
    `reduce_targets` is False: module parallelism, whose owners hold whole sums); rank 0
    writes."""
    targets = {}
    for name, r in runs.items():
        pair = [r.target_sum.clone(), r.target_count.clone()]
        if reduce_targets:
            distributed.all_reduce_many_(pair, ctx)
        targets[name] = pair
    if not ctx.is_main:
        return
    state = {
        "position": position.to_dict(),
        "config": cfg.to_dict(),
        "distributed": {"world_size": ctx.world_size} | ({"parallel": cfg.parallel} if ctx.active else {}),
        "modules": {name: {"layer": r.layer, "architecture": r.module.architecture} for name, r in runs.items()},
        "history": {name: r.history for name, r in runs.items()},
        "last": {name: r.last for name, r in runs.items()},
    }
    save_checkpoint(
        cfg.checkpoint_dir, step, state,
        {name: r.module for name, r in runs.items()},
        {name: r.extra(*targets[name]) for name, r in runs.items()},
        keep=cfg.keep_checkpoints,
    )


def _resume(
    cfg: TrainerConfig, runs: Mapping[str, _ModuleRun], ctx, modules_mode: bool = False
) -> tuple[int, DataPosition]:
    """Load the latest checkpoint into `runs` (every process reads it); (0, start) if
    there is none yet. Under module parallelism every process keeps the saved target sums
    (each module's owner carries them on alone)."""
    path = latest_checkpoint(cfg.checkpoint_dir)
    found = distributed.gather_objects(None if path is None else path.name, ctx)
    if len(set(found)) != 1:
        raise RuntimeError(f"the processes see different latest checkpoints in {cfg.checkpoint_dir}: {found}")
    if path is None:
        return 0, DataPosition()
    ckpt = load_checkpoint(path)
    saved_world = ckpt.state.get("distributed", {}).get("world_size", 1)
    if saved_world != ctx.world_size:
        raise ValueError(
            f"{path} was written by {saved_world} process(es), this run has {ctx.world_size}; exact resumption "
            f"needs the same number (launch with --nproc_per_node={saved_world})"
        )
    saved_parallel = ckpt.state.get("distributed", {}).get("parallel", "data")
    if ctx.active and saved_parallel != cfg.parallel:
        raise ValueError(
            f"{path} was written with parallel={saved_parallel!r}, this run has parallel={cfg.parallel!r}; "
            f"exact resumption needs the same mode (--parallel {saved_parallel})"
        )
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
        # the saved sums are every process's: rank 0 carries them on, the others restart at 0
        keep = ctx.is_main or modules_mode
        run.target_sum.copy_(t["target_sum"] if keep else torch.zeros_like(t["target_sum"]))
        run.target_count.copy_(t["target_count"] if keep else torch.zeros_like(t["target_count"]))
        run.seconds = float(t["seconds"][0])
        run.history = [nan_from_null(entry) for entry in ckpt.state["history"][name]]
        run.last = nan_from_null(ckpt.state["last"][name])
    set_rng_state(ckpt.rng)
    return int(ckpt.state["step"]), DataPosition(**ckpt.state["position"])


def _assemble_batch(share, batch_size: int, device: torch.device, ctx) -> dict[int, Pair]:
    """Module parallelism: the whole global batch {layer: (x, y)}, on every process, in
    the slot order one process serves. Each process scatters its tokens into their slots
    of zero tensors and one all-reduce SUM per dtype fills the rest (every slot is held
    by exactly one process, so the sum adds only zeros: exact)."""
    full: dict[int, Pair] = {}
    slots = share.slots.to(device)
    for layer, (x, y) in share.data.items():
        fx = torch.zeros((batch_size, x.shape[1]), dtype=x.dtype, device=device)
        fy = torch.zeros((batch_size, y.shape[1]), dtype=y.dtype, device=device)
        fx[slots], fy[slots] = x.to(device), y.to(device)
        full[layer] = (fx, fy)
    distributed.all_reduce_many_([t for pair in full.values() for t in pair], ctx)
    return full


def _to_cpu(value: Any) -> Any:
    """`value` (nested dicts / lists of tensors, e.g. an optimizer state dict) with its
    tensors on the host, to travel through `gather_objects`."""
    if isinstance(value, Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_cpu(v) for v in value)
    return value


def _sync_to_main(
    runs: Mapping[str, _ModuleRun], owned: Mapping[str, _ModuleRun], owner: Mapping[str, int], ctx, full: bool
) -> None:
    """Module parallelism: every module's parameters, buffers, dead-unit counters and
    target sums from its owner into rank 0's copy (one broadcast per owner and dtype;
    the other processes receive them too). `full` also moves what a checkpoint and the
    result need: the optimizer state, time spent, history and last logged values."""
    for rank in range(ctx.world_size):
        tensors = []
        for name in sorted(runs):
            if owner[name] == rank:
                run = runs[name]
                tensors += [*run.module.parameters(), *run.module.buffers(), run.since_fired, run.target_sum,
                            run.target_count]
        distributed.broadcast_many_(tensors, rank, ctx)
    if not full:
        return
    mine = {
        name: {"optimizer": _to_cpu(run.optimizer.state_dict()), "seconds": run.seconds, "history": run.history,
               "last": run.last}
        for name, run in owned.items()
    }
    everyone = distributed.gather_objects(mine, ctx)
    if ctx.is_main:
        for theirs in everyone[1:]:
            for name, state in theirs.items():
                run = runs[name]
                run.optimizer.load_state_dict(state["optimizer"])
                run.seconds, run.history, run.last = state["seconds"], state["history"], state["last"]


def _wandb(cfg: TrainerConfig):
    if not cfg.wandb_project:
        return None
    try:
        import wandb
    except ImportError:
        raise RuntimeError("wandb_project is set but the `wandb` package is not installed") from None
    return wandb.init(project=cfg.wandb_project, config=cfg.to_dict())


__all__ = ["fit", "FitResult", "TrainSummary", "train_forward", "nmse_loss", "aux_k_loss", "lr_at", "heldout_nmse", "StepOutput"]
