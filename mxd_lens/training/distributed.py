"""Data-parallel training on torch.distributed: the process group and the few collectives
the trainer needs.

Launch with torchrun (`torchrun --nproc_per_node=N -m mxd_lens train ...`): `init_from_env`
reads RANK / WORLD_SIZE / LOCAL_RANK and starts the process group (gloo on CPU, NCCL on
CUDA, one GPU per process: cuda:LOCAL_RANK). Inside a process group the caller made
itself, `current()` picks it up. Without either, everything here is a no-op for one
process, so the single-process path runs the same code with no communication.

Every collective is SUM (or a broadcast from rank 0); the trainer arranges its sums so that
they equal the one-process quantities (see `mxd_lens.training.trainer.fit`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.distributed as dist
from torch import Tensor


@dataclass(frozen=True)
class DistContext:
    """Where this process stands among the data-parallel workers."""

    rank: int = 0
    """This process's index (0: the one that writes files and shows progress)."""
    world_size: int = 1
    """Number of processes training together."""

    @property
    def active(self) -> bool:
        """True when there is more than one process (collectives are needed)."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """True on rank 0, the only process that writes files and prints."""
        return self.rank == 0


def env_world_size() -> int:
    """WORLD_SIZE as torchrun sets it (1 when not launched by torchrun)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise ValueError(f"WORLD_SIZE={os.environ.get('WORLD_SIZE')!r} is not an integer") from None


def init_from_env(device: str = "cpu") -> DistContext:
    """Start the process group when launched by torchrun with WORLD_SIZE > 1 (no-op
    otherwise, or when a group already exists). Backend: NCCL for a CUDA `device`
    (this process then uses cuda:LOCAL_RANK), gloo otherwise."""
    if dist.is_available() and dist.is_initialized():
        return current()
    if env_world_size() <= 1:
        return DistContext()
    for key in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        if key not in os.environ:
            raise RuntimeError(
                f"WORLD_SIZE={os.environ['WORLD_SIZE']} but {key} is not set; launch with torchrun "
                "(e.g. `torchrun --standalone --nproc_per_node=2 -m mxd_lens train ...`)"
            )
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend="nccl" if cuda else "gloo")
    _OWNED.append(True)
    return current()


_OWNED: list[bool] = []  # set when init_from_env started the group (shutdown ends only that one)


def shutdown() -> None:
    """End the process group if `init_from_env` started it (a caller's own group is left)."""
    if _OWNED and dist.is_initialized():
        dist.destroy_process_group()
    _OWNED.clear()


def current() -> DistContext:
    """The process group's rank and size, or (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return DistContext(dist.get_rank(), dist.get_world_size())
    return DistContext()


def all_reduce_(tensor: Tensor, ctx: DistContext) -> Tensor:
    """Sum `tensor` over the processes, in place (no-op for one process)."""
    if ctx.active:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_many_(tensors: Sequence[Tensor], ctx: DistContext) -> None:
    """Sum several same-device tensors over the processes in place, with ONE collective
    per dtype (each group is flattened into one buffer and copied back)."""
    if not ctx.active or not tensors:
        return
    groups: dict[torch.dtype, list[Tensor]] = {}
    for t in tensors:
        groups.setdefault(t.dtype, []).append(t)
    for group in groups.values():
        flat = torch.cat([t.reshape(-1) for t in group])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for t in group:
            n = t.numel()
            t.copy_(flat[offset : offset + n].view_as(t))
            offset += n


def broadcast_object(value: Any, ctx: DistContext) -> Any:
    """Rank 0's `value` on every process (a small picklable value sent by the process
    group itself; nothing is read from disk)."""
    if not ctx.active:
        return value
    box = [value if ctx.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(value: Any, ctx: DistContext) -> list[Any]:
    """Every process's `value`, in rank order (on every process)."""
    if not ctx.active:
        return [value]
    out: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, value)
    return out


def broadcast_module_(module: torch.nn.Module, ctx: DistContext) -> None:
    """Copy rank 0's parameters and buffers into every process's `module`."""
    if not ctx.active:
        return
    with torch.no_grad():
        for t in [*module.parameters(), *module.buffers()]:
            dist.broadcast(t.data, src=0)


def broadcast_many_(tensors: Sequence[Tensor], src: int, ctx: DistContext) -> None:
    """Copy rank `src`'s values of several same-device tensors into every process's, in
    place, with ONE collective per dtype (module parallelism: an owner's module state)."""
    if not ctx.active or not tensors:
        return
    groups: dict[torch.dtype, list[Tensor]] = {}
    for t in tensors:
        groups.setdefault(t.dtype, []).append(t)
    with torch.no_grad():
        for group in groups.values():
            flat = torch.cat([t.reshape(-1) for t in group])
            dist.broadcast(flat, src=src)
            offset = 0
            for t in group:
                n = t.numel()
                t.copy_(flat[offset : offset + n].view_as(t))
                offset += n


def barrier(ctx: DistContext) -> None:
    """Wait until every process gets here (no-op for one process)."""
    if ctx.active:
        dist.barrier()


__all__ = [
    "DistContext",
    "all_reduce_",
    "all_reduce_many_",
    "barrier",
    "broadcast_many_",
    "broadcast_module_",
    "broadcast_object",
    "current",
    "env_world_size",
    "gather_objects",
    "init_from_env",
    "shutdown",
]
