"""The activation source: (MLP input, MLP output) pairs of `model.blocks[L].mlp`.

One forward pass of the language model, stopped after the last layer needed, feeds every
layer (and so every module) being trained. Rows of tokens are permuted (seeded), cut into
chunks of at most `buffer_tokens` tokens, and each chunk's tokens are served in a seeded
random order: the shuffling buffer holds one chunk, and a position in the stream is
(epoch, chunk, batch), which is all a checkpoint needs to resume exactly.

Data parallelism (`world_size` workers). The row permutation, the chunks, the special-token
exclusion and every chunk's token order are defined over ALL rows, identically on every
worker (they need only the token ids). Worker r runs the language model on rows r,
r + world_size, ... of each chunk only, and serves, of each global batch, exactly the
tokens that fall in its rows (`ActivationSource.shares`, with their slots in the global
batch). The union over workers of what they serve is, token for token, the batch one
process would serve: so sums over the workers' shares (of gradients, errors, energies,
fired units) equal the one-process sums, up to float summation order. Excluded
(special) positions change how many tokens each worker holds per chunk and per batch,
not which tokens a global batch holds.
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
from mxd_lens.model_io import capture_mlp_io, model_device, special_positions, special_token_ids
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
class Share:
    """One global batch as this worker serves it."""

    position: "DataPosition"
    """Where the stream stands after this batch (the next batch's position)."""
    data: dict[int, Pair]
    """{layer: (x, y)}: this worker's tokens of the batch, in the order of `slots`."""
    slots: Int[Tensor, " tokens"]
    """Each token's index in the global batch (ascending; all of 0..batch_size-1 for one
    worker): the AuxK subset is the tokens with slot < aux_tokens on every worker."""


@dataclass(frozen=True)
class ChunkLayout:
    """Where a chunk's kept tokens live: the global token g (row-major over the chunk's
    rows, excluded positions skipped) is token `local[g]` of worker `owner[g]`'s data."""

    owner: Int[Tensor, " tokens"]
    local: Int[Tensor, " tokens"]

    @property
    def n_tokens(self) -> int:
        return self.owner.shape[0]


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
        tokens: token rows [rows, ctx], any torch tensor (a memory-mapped one too: rows
            are indexed a chunk at a time, never copied whole); this worker collects its
            share of every chunk's rows (cfg.rank, cfg.world_size).
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
        self.order = order
        """Every row in stream order (all workers)."""
        self.chunk_rows = cfg.buffer_tokens // ctx
        """Rows per chunk, over all workers (this worker holds every world_size-th)."""
        self.n_chunks = -(-tokens.shape[0] // self.chunk_rows)
        self.rank, self.world_size = cfg.rank, cfg.world_size
        self.rows = torch.cat([self.chunk_row_indices(c) for c in range(self.n_chunks)])
        """This worker's rows, in stream order (a partition of all rows over the workers)."""
        if len(self.rows) == 0:
            raise ValueError(
                f"rank {cfg.rank} of {cfg.world_size} gets no rows: there are only {tokens.shape[0]} rows"
            )
        self.excluded_ids = special_token_ids(model) if cfg.exclude_special_tokens else []
        """Token ids whose positions are dropped (`special_token_ids`; empty: none)."""
        self._layouts: dict[int, ChunkLayout] = {}
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
        """Token positions in this worker's rows (one epoch, excluded positions included)."""
        return len(self.rows) * self.tokens.shape[1]

    def _bytes_per_token(self) -> int:
        itemsize = torch.empty((), dtype=self.store_dtype).element_size()
        return len(self.layers) * 2 * self.d_model * itemsize

    @property
    def rows_per_chunk(self) -> int:
        """The most rows of one chunk this worker holds: ceil(chunk_rows / world_size)."""
        return -(-self.chunk_rows // self.world_size)

    @property
    def buffer_bytes(self) -> int:
        """The shuffling buffer's bound on this worker: its share of one chunk of
        activations (every layer, input and output), in bytes."""
        return self.rows_per_chunk * self.tokens.shape[1] * self._bytes_per_token()

    @property
    def buffer_bytes_per_layer(self) -> int:
        """`buffer_bytes` for one layer (the buffer grows linearly with the layers)."""
        return self.buffer_bytes // len(self.layers)

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

    def global_chunk_rows(self, chunk: int) -> Tensor:
        """Every worker's token rows of chunk `chunk` (chunk ids are fixed; epochs only
        reorder them)."""
        return self.order[chunk * self.chunk_rows : (chunk + 1) * self.chunk_rows]

    def chunk_row_indices(self, chunk: int) -> Tensor:
        """This worker's token rows of chunk `chunk`: every world_size-th, from its rank."""
        return self.global_chunk_rows(chunk)[self.rank :: self.world_size]

    def keep_mask(self, rows: Tensor) -> Tensor:
        """[len(rows), ctx] True where a position is served (not an excluded special token)."""
        block = self.tokens[rows]
        if not self.excluded_ids:
            return torch.ones(block.shape, dtype=torch.bool)
        return ~special_positions(torch.as_tensor(block), self.excluded_ids).cpu()

    def collect_kept(self, row_indices: Tensor) -> dict[int, Pair]:
        """`collect`, without the excluded positions (what training and held-out NMSE see)."""
        data = self.collect(row_indices)
        if not self.excluded_ids:
            return data
        keep = self.keep_mask(row_indices).flatten()
        return {layer: (x[keep], y[keep]) for layer, (x, y) in data.items()}

    def layout(self, chunk: int) -> ChunkLayout:
        """Which worker holds each of chunk `chunk`'s kept tokens, and where (from the
        token ids alone: the same on every worker, no communication)."""
        if chunk not in self._layouts:
            keep = self.keep_mask(self.global_chunk_rows(chunk))  # [R, ctx]
            counts = keep.sum(1)
            row_owner = torch.arange(keep.shape[0]) % self.world_size
            # tokens a worker holds before row j: the kept tokens of its earlier rows
            before = torch.zeros_like(counts)
            for r in range(min(self.world_size, keep.shape[0])):
                mine = counts[r :: self.world_size]
                before[r :: self.world_size] = torch.cumsum(mine, 0) - mine
            within = torch.cumsum(keep.long(), 1) - 1  # index of a kept token inside its row
            rows_of = torch.arange(keep.shape[0]).unsqueeze(1).expand_as(keep)[keep]
            if len(self._layouts) >= 4:  # 16 bytes a token: keep a few chunks' layouts, not a corpus's
                self._layouts.pop(next(iter(self._layouts)))
            self._layouts[chunk] = ChunkLayout(row_owner[rows_of], before[rows_of] + within[keep])
        return self._layouts[chunk]

    def chunk(self, chunk: int) -> dict[int, Pair]:
        """This worker's pairs of chunk `chunk` (excluded positions dropped), from
        memory, the disk cache or the model."""
        if chunk in self._memory:
            return self._memory[chunk]
        data = self._read_shard(chunk)
        if data is None:
            data = self.collect_kept(self.chunk_row_indices(chunk))
            self._write_shard(chunk, data)
        if self.cfg.keep_in_memory:
            self._memory[chunk] = data
        return data

    # --- disk cache --------------------------------------------------------------
    def _fingerprint(self) -> str:
        """Identifies what a cached shard holds, so that a shard is reused only where the
        model would give the same activations: every parameter and buffer that runs before
        the last layer's MLP output (embeddings and blocks[:max(layers) + 1], hashed whole:
        changing any weight of an early attention layer changes the key), the model's
        config (dtype, positional scheme, ...; not its device), the resolved autocast
        dtype, the layers, every token id (hashed a block of rows at a time, so a
        memory-mapped corpus is never read into memory whole), the excluded special ids,
        the seed (row order and chunks) and the collection settings (rank and world size
        included: a shard is one worker's share of a chunk)."""
        h = hashlib.blake2b(digest_size=16)
        h.update(b"mxd_lens activations v2")
        cfg_dict = {k: v for k, v in self.model.cfg.to_dict().items() if k not in ("device", "n_devices")}
        h.update(json.dumps(cfg_dict, sort_keys=True, default=str).encode())
        last = self.layers[-1]
        named = list(self.model.named_parameters()) + list(self.model.named_buffers())
        for name, t in sorted(named, key=lambda item: item[0]):
            parts = name.split(".")
            if parts[0] in ("unembed", "ln_final") or (parts[0] == "blocks" and int(parts[1]) > last):
                continue  # runs after blocks[last].mlp: cannot change what is collected
            t = t.detach()
            h.update(f"{name} {t.dtype} {tuple(t.shape)}".encode())
            h.update(t.reshape(-1).contiguous().cpu().view(torch.uint8).numpy())
        rows, ctx = self.tokens.shape
        h.update(f"tokens {self.tokens.dtype} {rows}x{ctx}".encode())
        step = max(1, (1 << 22) // ctx)  # ~4M tokens per block
        for start in range(0, rows, step):
            h.update(self.tokens[start : start + step].contiguous().cpu().numpy())
        settings = {k: v for k, v in self.cfg.to_dict().items() if k not in ("keep_in_memory", "cache_dir", "check_site")}
        settings["autocast"] = str(self.autocast_dtype)  # 'auto' resolves per machine: key on the outcome
        self._cache_key = {
            "model": str(self.model.cfg.model_name), "layers": self.layers, "seed": self.seed,
            "excluded_ids": [int(i) for i in getattr(self, "excluded_ids", [])],
            "settings": settings, "tokens": [rows, ctx],
        }
        h.update(json.dumps(self._cache_key, sort_keys=True).encode())
        self._cache_key["hash"] = h.hexdigest()
        return h.hexdigest()

    def _shard_path(self, chunk: int) -> Path:
        assert self._cache_folder is not None
        return self._cache_folder / f"chunk_{chunk:06d}.safetensors"

    def _read_shard(self, chunk: int) -> dict[int, Pair] | None:
        """A cached shard, or None to collect it. Shards appear only by atomic rename of a
        complete file (`_write_shard`), so a reader never sees a partial one; a file that
        still does not hold what this chunk needs (damaged by something else) is
        collected again and replaced, with a warning."""
        if self._cache_folder is None:
            return None
        path = self._shard_path(chunk)
        if not path.is_file():
            return None
        import warnings

        try:
            flat = load_file(str(path))
        except Exception as err:  # safetensors raises several types for a damaged file
            warnings.warn(f"activation cache: {path} is unreadable ({err}); collecting the chunk again", stacklevel=2)
            return None
        n = int(self.keep_mask(self.chunk_row_indices(chunk)).sum())
        expected = (n, self.d_model)
        for layer in self.layers:
            for key in (f"{layer}.in", f"{layer}.out"):
                t = flat.get(key)
                if t is None or tuple(t.shape) != expected or t.dtype != self.store_dtype:
                    found = None if t is None else (tuple(t.shape), t.dtype)
                    warnings.warn(
                        f"activation cache: {path} holds {key} as {found}, expected {expected} {self.store_dtype}; "
                        "collecting the chunk again", stacklevel=2,
                    )
                    return None
        return {layer: (flat[f"{layer}.in"], flat[f"{layer}.out"]) for layer in self.layers}

    def _write_shard(self, chunk: int, data: dict[int, Pair]) -> None:
        """Write a shard atomically: a private temporary file (unique per writer) renamed
        into place, so two processes collecting the same chunk at once each write a whole
        file and the last rename wins (both hold the same activations)."""
        if self._cache_folder is None:
            return
        flat = {}
        for layer, (x, y) in data.items():
            flat[f"{layer}.in"], flat[f"{layer}.out"] = x.contiguous(), y.contiguous()
        write_file(self._shard_path(chunk), lambda tmp: save_file(flat, str(tmp)))
        from mxd_lens.atomic import write_json

        manifest = self._cache_folder / "key.json"
        if not manifest.is_file():  # for people: what the folder's shards were keyed on
            write_json(manifest, getattr(self, "_cache_key", {}))

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
        """Endless stream of (position of the NEXT batch, {layer: (x, y)}) from `start`:
        this worker's tokens of each global batch (all of them for one worker)."""
        for share in self.shares(batch_size, start):
            yield share.position, share.data

    def shares(self, batch_size: int, start: DataPosition = DataPosition()) -> Iterator[Share]:
        """Endless stream of this worker's `Share` of each global batch, from `start`.

        A global batch is `batch_size` tokens of one chunk, drawn in the chunk's seeded
        token order (`token_order`, over the chunk's kept tokens of ALL workers); a
        chunk's last batch_size-incomplete tokens are skipped in that epoch (a different
        random few in every epoch).
        """
        total_positions = self.tokens.shape[0] * self.tokens.shape[1]
        if batch_size > total_positions:
            raise ValueError(
                f"batch_size={batch_size} is larger than the {total_positions} tokens available "
                f"({self.tokens.shape[0]} rows of {self.tokens.shape[1]}); give more token rows or a smaller batch"
            )
        if self.chunk_rows * self.tokens.shape[1] < batch_size:
            raise ValueError(
                f"a chunk holds {self.chunk_rows * self.tokens.shape[1]} tokens ({self.chunk_rows} rows of "
                f"{self.tokens.shape[1]}), fewer than batch_size={batch_size}; raise buffer_tokens"
            )
        first = self.layout(0).n_tokens
        if first < batch_size:
            raise ValueError(
                f"chunk 0 holds {first} tokens once the {self.chunk_rows * self.tokens.shape[1] - first} special-token "
                f"positions are excluded, fewer than batch_size={batch_size}; raise buffer_tokens "
                "(or include special tokens)"
            )
        epoch, index, batch = start.epoch, start.chunk, start.batch
        while True:
            order = self.chunk_order(epoch)
            while index < len(order):
                cid = order[index]
                layout = self.layout(cid)
                n_batches = layout.n_tokens // batch_size
                data = self.chunk(cid) if batch < n_batches else None
                if data is not None:
                    held = next(iter(data.values()))[0].shape[0]
                    if held != int((layout.owner == self.rank).sum()):
                        raise RuntimeError(
                            f"chunk {cid}: worker {self.rank} holds {held} pairs but the chunk's layout gives it "
                            f"{int((layout.owner == self.rank).sum())} (a stale cache shard?)"
                        )
                    perm = self.token_order(epoch, cid, layout.n_tokens)
                while batch < n_batches:
                    idx = perm[batch * batch_size : (batch + 1) * batch_size]
                    slots = (layout.owner[idx] == self.rank).nonzero().flatten()
                    local = layout.local[idx[slots]]
                    out = {layer: (x[local], y[local]) for layer, (x, y) in data.items()}
                    batch += 1
                    nxt = DataPosition(epoch, index, batch) if batch < n_batches else DataPosition(epoch, index + 1, 0)
                    if nxt.chunk == len(order):
                        nxt = DataPosition(epoch + 1, 0, 0)
                    yield Share(nxt, out, slots)
                index, batch = index + 1, 0
            epoch, index, batch = epoch + 1, 0, 0


__all__ = [
    "ActivationSource",
    "ChunkLayout",
    "DataPosition",
    "Share",
    "NonFiniteActivationError",
    "check_servable",
    "input_hook_name",
    "output_hook_name",
]
