"""The activation source: (MLP input, MLP output) pairs of `model.blocks[L].mlp`.

One forward pass of the language model, stopped after the last layer needed, feeds every
layer (and so every module) being trained. Rows of tokens are permuted (seeded), cut into
chunks of at most `buffer_tokens` tokens, and each chunk's tokens are served in a seeded
random order: the shuffling buffer holds one chunk, and a position in the stream is
(epoch, chunk, batch), which is all a checkpoint needs to resume exactly.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch
from jaxtyping import Float, Int
from safetensors.torch import load_file, save_file
from torch import Tensor
from transformer_lens import HookedTransformer

from mxd_lens.architectures.base import Replacement, default_hook_names
from mxd_lens.atomic import write_file
from mxd_lens.config import parse_dtype
from mxd_lens.functional import nmse
from mxd_lens.model_io import capture_mlp_io, model_device
from mxd_lens.precision import resolve_autocast
from mxd_lens.training.config import ActivationConfig
from mxd_lens.validation import check_layer, check_token_matrix

Pair = tuple[Float[Tensor, "tokens d_in"], Float[Tensor, "tokens d_out"]]


class NonFiniteActivationError(ValueError):
    """The language model produced NaN or inf at a site being collected."""


def input_hook_name(layer: int) -> str:
    """The TransformerLens hook recorded as the module's input site in cfg.json (the MLP's
    input for a pre-norm model loaded with fold_ln=True; activations are captured with a
    module hook on `blocks[L].mlp` itself, which is exact for every model)."""
    return default_hook_names(layer, "mlp_in")[0]


def output_hook_name(layer: int) -> str:
    """The TransformerLens hook recorded as the module's output site in cfg.json."""
    return default_hook_names(layer, "mlp_in")[1]


def check_servable(model: HookedTransformer, layer: int) -> None:
    """Raise ValueError unless `model.blocks[layer].mlp` is an original MLP whose input
    and output can be captured (module hooks on the MLP itself: every normalisation
    scheme, folded or not, pre- or post-norm, is served)."""
    if not isinstance(model, HookedTransformer):
        raise ValueError(f"expected a transformer_lens.HookedTransformer, got {type(model).__name__}")
    check_layer(layer, model.cfg.n_layers)
    block = model.blocks[layer]
    if model.cfg.attn_only or not hasattr(block, "mlp"):
        raise ValueError(f"layer {layer} has no MLP to replace (attention-only model)")
    if isinstance(block.mlp, Replacement):
        raise ValueError(f"layer {layer} has a replacement attached; collect activations outside attach()")


@dataclass(frozen=True)
class DataPosition:
    """Where the stream stands: the next batch served is batch `batch` of the chunk at
    index `chunk` of epoch `epoch`'s chunk order."""

    epoch: int = 0
    chunk: int = 0
    batch: int = 0

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


def _seed_for(*parts: int) -> int:
    digest = hashlib.sha256(json.dumps(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class ActivationSource:
    """Aligned (MLP input, MLP output) batches for several layers from one model pass.

    Args:
        model: a HookedTransformer (any normalisation: the MLP's own input and output
            are captured with module hooks).
        layers: the layers whose MLP pairs are needed.
        tokens: token rows [rows, ctx]; this worker reads its shard (rank, world_size).
        cfg: collection settings.
        seed: seeds the row permutation and the per-chunk shuffles.
    """

    def __init__(
        self,
        model: HookedTransformer,
        layers: Sequence[int],
        tokens: Int[Tensor, "rows ctx"],
        cfg: ActivationConfig | None = None,
        seed: int = 0,
    ) -> None:
        self.cfg = cfg = cfg or ActivationConfig()
        self.layers = sorted(set(layers))
        if not self.layers:
            raise ValueError("layers is empty; expected at least one layer")
        for layer in self.layers:
            check_servable(model, layer)
        check_token_matrix(tokens, model.cfg.d_vocab)
        ctx = tokens.shape[1]
        if ctx > cfg.buffer_tokens:
            raise ValueError(f"a token row has {ctx} tokens, more than buffer_tokens={cfg.buffer_tokens}")
        self.model = model
        self.tokens = tokens
        self.seed = seed
        self.d_model = model.cfg.d_model
        self.store_dtype = parse_dtype(cfg.store_dtype)
        self.autocast_dtype = resolve_autocast(cfg.autocast, next(model.parameters()).device)

        order = torch.arange(tokens.shape[0])
        if cfg.shuffle_rows:
            order = torch.randperm(tokens.shape[0], generator=torch.Generator().manual_seed(_seed_for(seed, -1)))
        self.rows = order[cfg.rank :: cfg.world_size]
        if len(self.rows) == 0:
            raise ValueError(
                f"rank {cfg.rank} of {cfg.world_size} gets no rows: there are only {tokens.shape[0]} rows"
            )
        self.chunk_rows = cfg.buffer_tokens // ctx
        self.n_chunks = -(-len(self.rows) // self.chunk_rows)
        self._memory: dict[int, dict[int, Pair]] = {}
        self.collect_seconds = 0.0
        """Wall time spent running the language model (throughput = collected_tokens / this)."""
        self.collected_tokens = 0
        """Tokens run through the language model so far."""
        self.status = None
        """Optional tqdm bar whose description shows collection progress."""
        self._checked = not cfg.check_site
        self._cache_folder = Path(cfg.cache_dir) / self._fingerprint() if cfg.cache_dir else None

    # --- sizes -------------------------------------------------------------------
    @property
    def n_tokens(self) -> int:
        """Tokens in this worker's shard (one epoch)."""
        return len(self.rows) * self.tokens.shape[1]

    def _bytes_per_token(self) -> int:
        itemsize = torch.empty((), dtype=self.store_dtype).element_size()
        return len(self.layers) * 2 * self.d_model * itemsize

    @property
    def buffer_bytes(self) -> int:
        """The shuffling buffer's bound: one chunk of activations, in bytes."""
        return self.chunk_rows * self.tokens.shape[1] * self._bytes_per_token()

    @property
    def total_bytes(self) -> int:
        """Memory of every chunk kept (keep_in_memory), in bytes."""
        return self.n_tokens * self._bytes_per_token()

    # --- collection --------------------------------------------------------------
    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        device_type = next(self.model.parameters()).device.type
        return torch.autocast(device_type, dtype=self.autocast_dtype)

    def _check_site(self, layer: int, x: Tensor, y: Tensor) -> None:
        """blocks[L].mlp(captured input) must equal the captured output: the MLP is a pure
        function of its input (no state or randomness a replacement could not copy)."""
        x, y = x[:2], y[:2]  # two rows are enough and cheap
        with torch.no_grad(), self._autocast():
            again = self.model.blocks[layer].mlp(x)
        err = nmse(again, y).sqrt()  # relative error ||again - y|| / ||y||
        tol = 1e-4 if self.autocast_dtype is None else 3e-2
        if not err <= tol:
            raise ValueError(
                f"layer {layer}: blocks[{layer}].mlp(its captured input) differs from its captured output "
                f"(relative error {float(err):.3g} > {tol}); the MLP is not a function of its input alone "
                "(dropout in train mode?), so no replacement can be trained on it"
            )

    def collect(self, row_indices: Tensor) -> dict[int, Pair]:
        """Run the model on the given rows; per layer, the (input, output) pairs
        [rows * ctx, d_model] in row-major token order."""
        device = model_device(self.model)
        parts: dict[int, tuple[list[Tensor], list[Tensor]]] = {layer: ([], []) for layer in self.layers}
        step = self.cfg.model_batch_rows
        started = time.perf_counter()
        for start in range(0, len(row_indices), step):
            rows = row_indices[start : start + step]
            if self.status is not None:
                self.status.set_description_str(f"collect {start}/{len(row_indices)} rows", refresh=True)
            with torch.no_grad(), self._autocast(), capture_mlp_io(self.model, self.layers) as captured:
                self.model(self.tokens[rows].to(device), stop_at_layer=self.layers[-1] + 1)
            for layer in self.layers:
                x, y = captured[layer]
                for site, act in ((f"blocks.{layer}.mlp input", x), (f"blocks.{layer}.mlp output", y)):
                    if not torch.isfinite(act).all():
                        bad = (~torch.isfinite(act)).flatten(1).any(1).nonzero().flatten()
                        raise NonFiniteActivationError(
                            f"{site} holds NaN/inf on token rows {rows[bad].tolist()[:8]}; expected finite "
                            "activations (try without autocast, or check the model's weights)"
                        )
                if not self._checked:
                    self._check_site(layer, x, y)
                parts[layer][0].append(x.reshape(-1, self.d_model).to("cpu", self.store_dtype))
                parts[layer][1].append(y.reshape(-1, self.d_model).to("cpu", self.store_dtype))
            self._checked = True
        if self.status is not None:
            self.status.set_description_str("train", refresh=True)
        self.collect_seconds += time.perf_counter() - started
        self.collected_tokens += len(row_indices) * self.tokens.shape[1]
        return {layer: (torch.cat(xs), torch.cat(ys)) for layer, (xs, ys) in parts.items()}

    def chunk_row_indices(self, chunk: int) -> Tensor:
        """The token rows of chunk `chunk` (chunk ids are fixed; epochs only reorder them)."""
        return self.rows[chunk * self.chunk_rows : (chunk + 1) * self.chunk_rows]

    def chunk(self, chunk: int) -> dict[int, Pair]:
        """Chunk `chunk`'s pairs, from memory, the disk cache or the model."""
        if chunk in self._memory:
            return self._memory[chunk]
        data = self._read_shard(chunk)
        if data is None:
            data = self.collect(self.chunk_row_indices(chunk))
            self._write_shard(chunk, data)
        if self.cfg.keep_in_memory:
            self._memory[chunk] = data
        return data

    # --- disk cache --------------------------------------------------------------
    def _fingerprint(self) -> str:
        """Identifies what a cached shard holds: model weights, tokens and settings."""
        h = hashlib.sha256()
        h.update(str(self.model.cfg.model_name).encode())
        for layer in self.layers:
            for p in self.model.blocks[layer].mlp.parameters():
                h.update(p.detach().float().cpu().numpy().tobytes()[:4096])
        h.update(self.tokens.cpu().numpy().tobytes())
        settings = {k: v for k, v in self.cfg.to_dict().items() if k not in ("keep_in_memory", "cache_dir")}
        h.update(json.dumps([settings, self.layers, self.seed], sort_keys=True).encode())
        return h.hexdigest()[:16]

    def _shard_path(self, chunk: int) -> Path:
        assert self._cache_folder is not None
        return self._cache_folder / f"chunk_{chunk:06d}.safetensors"

    def _read_shard(self, chunk: int) -> dict[int, Pair] | None:
        if self._cache_folder is None or not self._shard_path(chunk).is_file():
            return None
        flat = load_file(str(self._shard_path(chunk)))
        return {layer: (flat[f"{layer}.in"], flat[f"{layer}.out"]) for layer in self.layers}

    def _write_shard(self, chunk: int, data: dict[int, Pair]) -> None:
        if self._cache_folder is None:
            return
        flat = {}
        for layer, (x, y) in data.items():
            flat[f"{layer}.in"], flat[f"{layer}.out"] = x.contiguous(), y.contiguous()
        write_file(self._shard_path(chunk), lambda tmp: save_file(flat, str(tmp)))

    # --- the stream --------------------------------------------------------------
    def chunk_order(self, epoch: int) -> list[int]:
        """Epoch 0 reads the chunks in order; later epochs in a seeded random order."""
        if epoch == 0:
            return list(range(self.n_chunks))
        g = torch.Generator().manual_seed(_seed_for(self.seed, epoch, -2))
        return torch.randperm(self.n_chunks, generator=g).tolist()

    def token_order(self, epoch: int, chunk: int, n: int) -> Tensor:
        """The seeded order in which a chunk's n tokens are served in an epoch."""
        return torch.randperm(n, generator=torch.Generator().manual_seed(_seed_for(self.seed, epoch, chunk)))

    def batches(
        self, batch_size: int, start: DataPosition = DataPosition()
    ) -> Iterator[tuple[DataPosition, dict[int, Pair]]]:
        """Endless stream of (position of the NEXT batch, {layer: (x, y)}) from `start`.

        A chunk's last batch_size-incomplete tokens are skipped in that epoch (a
        different random few in every epoch).
        """
        if batch_size > self.n_tokens:
            raise ValueError(
                f"batch_size={batch_size} is larger than the {self.n_tokens} tokens available "
                f"to this worker; give more token rows or a smaller batch"
            )
        if self.chunk_rows * self.tokens.shape[1] < batch_size:
            raise ValueError(
                f"a chunk holds {self.chunk_rows * self.tokens.shape[1]} tokens ({self.chunk_rows} rows of "
                f"{self.tokens.shape[1]}), fewer than batch_size={batch_size}; raise buffer_tokens"
            )
        epoch, index, batch = start.epoch, start.chunk, start.batch
        while True:
            order = self.chunk_order(epoch)
            while index < len(order):
                cid = order[index]
                data = self.chunk(cid)
                n = next(iter(data.values()))[0].shape[0]
                perm = self.token_order(epoch, cid, n)
                n_batches = n // batch_size
                while batch < n_batches:
                    idx = perm[batch * batch_size : (batch + 1) * batch_size]
                    out = {layer: (x[idx], y[idx]) for layer, (x, y) in data.items()}
                    batch += 1
                    nxt = DataPosition(epoch, index, batch) if batch < n_batches else DataPosition(epoch, index + 1, 0)
                    if nxt.chunk == len(order):
                        nxt = DataPosition(epoch + 1, 0, 0)
                    yield nxt, out
                index, batch = index + 1, 0
            epoch, index, batch = epoch + 1, 0, 0


__all__ = [
    "ActivationSource",
    "DataPosition",
    "NonFiniteActivationError",
    "check_servable",
    "input_hook_name",
    "output_hook_name",
]
