"""Evaluate replacement layers on held-out text, sharing the language model's work.

The language model is the expensive part on a CPU, so each batch runs the layers
before the first replaced one once, then the clean model from there once (recording
the replaced MLPs' true inputs and outputs and the clean predictions), then every
candidate and the ablations from that layer on with `model(resid, start_at_layer=L)`.

Special positions (`model_io.special_positions`: the separator that starts each row,
BOS/EOS/pad) are excluded by default. Attention sinks put massive MLP outputs there
(norm ~20,500 against ~42 elsewhere at the default model's layer 11, 98% of the
output energy), so an all-position NMSE or ablation would mostly measure one token.
Excluded positions keep the clean MLP output for every candidate AND for the zero-
and mean-ablation baselines (otherwise CE recovered would be inflated for free), and
NMSE and unit statistics skip them. `attach` itself is unchanged: the exclusion is a
second forward hook, put on whatever module sits at `blocks[L].mlp` while it runs.

Where the time goes (benchmarks/bench_eval_stderr.py): per candidate, the blocks after
L and the 49k-token unembedding (at layer 12 of 30 about half each on a CPU); the
prefix and the clean pass are shared by all candidates and baselines.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator, Mapping, Sequence

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor
from transformer_lens import HookedTransformer

from mxd_lens.attach import attach
from mxd_lens.evals.checks import check_batch_size, check_candidates, check_layers, check_mean_outputs, check_tokens
from mxd_lens.evals.metrics import (
    CleanNextToken,
    UnitStats,
    clean_next_token,
    fraction_recovered,
    masked_energy,
    next_token_ce_kl,
    paired_stderr,
    row_differences,
)
from mxd_lens.model_io import (
    Prefix,
    batches,
    capture_mlp_io,
    constant_mlp_outputs,
    model_device,
    model_dtype,
    run_prefix,
    special_positions,
    special_token_ids,
)
from mxd_lens.evals.results import CEBaselines, EvalReport, EvalResult
from mxd_lens.functional import squared_error_sums
from mxd_lens.architectures.base import Replacement
from mxd_lens.architectures.saelens_adapter import as_modules
from mxd_lens.validation import check_positive_int

MASSIVE_FACTOR = 20.0
"""A compared position whose MLP output norm exceeds this many times the median norm is
flagged as a massive activation (the default model's layer-11 sink is ~500x)."""
MAX_EXAMPLES = 5


@contextlib.contextmanager
def keep_clean_outputs(
    model: HookedTransformer,
    clean_outputs: Mapping[int, Float[Tensor, "rows ctx d_model"]],
    positions: Bool[Tensor, "rows ctx"] | None,
) -> Iterator[None]:
    """While inside, `model.blocks[L].mlp` (whatever module sits there now: the original,
    a spliced replacement, an ablated MLP) outputs `clean_outputs[L]` at `positions`.
    Enter it inside `attach` / `constant_mlp_outputs`: the hook must run after theirs."""
    if positions is None or not bool(positions.any()):
        yield
        return

    def hook(layer: int):
        keep = positions[..., None]

        def replace(module, args, output: Tensor) -> Tensor:
            return torch.where(keep, clean_outputs[layer].to(output.dtype), output)

        return replace

    handles = [model.blocks[layer].mlp.register_forward_hook(hook(layer)) for layer in clean_outputs]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@dataclass
class _Batch:
    """One batch's clean pass: what every candidate and baseline of it is measured against."""

    tokens: Int[Tensor, "rows ctx"]
    prefix: Prefix
    io: dict[int, tuple[Tensor, Tensor]]
    clean: CleanNextToken | None
    """None when KL is not needed (learning curves): then only `clean_ce` is kept."""
    clean_ce: Float[Tensor, "rows ctx-1"]
    special: Bool[Tensor, "rows ctx"] | None
    """Special positions of the batch (None: none, or not looked for)."""
    excluded: Bool[Tensor, "rows ctx"] | None
    """`special` when special positions are excluded, else None."""
    first_row: int = 0


def _clean_batch(
    model: HookedTransformer,
    tokens: Int[Tensor, "rows ctx"],
    layers: tuple[int, ...],
    special_ids: Sequence[int],
    exclude: bool,
    with_kl: bool = True,
    first_row: int = 0,
) -> _Batch:
    prefix = run_prefix(model, tokens, layers[0])
    with capture_mlp_io(model, layers) as io:
        logits = prefix.resume(model)
    io = dict(io)
    if with_kl:
        clean = clean_next_token(logits, tokens)
        clean_ce = clean.ce
    else:
        clean, (clean_ce, _) = None, next_token_ce_kl(logits, tokens)
    del logits
    special = special_positions(tokens, list(special_ids))
    special = special if bool(special.any()) else None
    return _Batch(tokens, prefix, io, clean, clean_ce, special, special if exclude else None, first_row)


def _clean_outputs(b: _Batch) -> dict[int, Tensor]:
    return {layer: y for layer, (_, y) in b.io.items()}


@dataclass
class _Tally:
    """Running sums of one candidate over the batches."""

    ce_sum: float = 0.0
    kl_sum: float = 0.0
    row_deltas: list[float] = field(default_factory=list)
    err_sq: dict[int, float] = field(default_factory=dict)
    target_sq: dict[int, float] = field(default_factory=dict)
    units: dict[int, UnitStats] = field(default_factory=dict)

    def add_batch(
        self, model: HookedTransformer, b: _Batch, replacements: Mapping[int, Replacement], use_error_term: bool
    ) -> None:
        """Splice the candidate in and score one batch: CE, KL, and each module's
        reconstruction and unit activations on the clean MLP input (compared positions)."""
        with attach(model, replacements, use_error_term=use_error_term), keep_clean_outputs(
            model, _clean_outputs(b), b.excluded
        ):
            logits = b.prefix.resume(model)
        self.add_logits(logits, b)
        del logits
        self.add_reconstruction(b, replacements)

    def add_logits(self, logits: Float[Tensor, "rows ctx vocab"], b: _Batch) -> None:
        """CE and KL of one batch's spliced logits."""
        ce, kl = next_token_ce_kl(logits, b.tokens, b.clean)
        self.ce_sum += float(ce.double().sum())
        if kl is not None:
            self.kl_sum += float(kl.double().sum())
        else:
            self.kl_sum = float("nan")
        self.row_deltas.extend(row_differences(ce, b.clean_ce))

    def add_reconstruction(self, b: _Batch, replacements: Mapping[int, Replacement]) -> None:
        """Each module's reconstruction error and unit activations on the batch's clean MLP
        inputs (compared positions)."""
        for layer, module in replacements.items():
            x, y = b.io[layer]
            inp = x if module.cfg.input_site == "mlp_in" else y
            if b.excluded is not None:
                compared = ~b.excluded
                inp, y = inp[compared], y[compared]
            y_hat = _reconstruct_with_stats(module, inp, self.units[layer])
            err, energy = squared_error_sums(y_hat, y)
            self.err_sq[layer] = self.err_sq.get(layer, 0.0) + err
            self.target_sq[layer] = self.target_sq.get(layer, 0.0) + energy


def _stacked_logits(
    model: HookedTransformer, b: _Batch, group: Sequence[Mapping[int, Replacement]]
) -> Float[Tensor, "copies_rows ctx vocab"]:
    """The logits of every candidate of `group` from ONE forward pass: the batch repeated
    once per candidate along the rows (`Prefix.repeat`), copy c with candidate c's modules
    in place of the MLPs. A forward hook on each original MLP returns, per copy, what
    `attach` would splice (`hook_out(reconstruct(x, hooked=True))`, no error term), with the
    clean output kept at excluded positions."""
    rows = b.tokens.shape[0]

    def hook(layer: int):
        def replace(mlp, args, output: Tensor) -> Tensor:
            x, parts = args[0], []
            for c, reps in enumerate(group):
                module, sl = reps[layer], slice(c * rows, (c + 1) * rows)
                inp = (x[sl] if module.cfg.input_site == "mlp_in" else output[sl]).to(module.dtype)
                y = module.hook_out(module.reconstruct(inp, hooked=True)).to(output.dtype)
                if b.excluded is not None:
                    y = torch.where(b.excluded[..., None], b.io[layer][1], y)
                parts.append(y)
            return torch.cat(parts)

        return replace

    handles = [model.blocks[layer].mlp.register_forward_hook(hook(layer)) for layer in b.io]
    try:
        return b.prefix.repeat(len(group)).resume(model)
    finally:
        for handle in handles:
            handle.remove()


@dataclass
class _SiteStats:
    """What the MLP outputs of one layer are made of: energy at special positions, and
    the norms of the compared positions (for the massive-activation flags)."""

    special_energy: float = 0.0
    energy: float = 0.0
    special_norm_sum: float = 0.0
    special_count: int = 0
    norms: list[Tensor] = field(default_factory=list)
    where: list[Tensor] = field(default_factory=list)

    def add(self, b: _Batch, y: Tensor) -> None:
        special = b.special if b.special is not None else torch.zeros(y.shape[:2], dtype=torch.bool, device=y.device)
        s_energy, energy = masked_energy(y, special)
        self.special_energy += s_energy
        self.energy += energy
        norms = y.double().norm(dim=-1)
        self.special_norm_sum += float(norms[special].sum())
        self.special_count += int(special.sum())
        compared = ~special if b.excluded is not None else torch.ones_like(special)
        self.norms.append(norms[compared].float().cpu())
        rows, pos = compared.nonzero(as_tuple=True)
        self.where.append(torch.stack([rows + b.first_row, pos, b.tokens[rows, pos]], -1).cpu())

    def summary(self, factor: float) -> dict[str, object]:
        norms = torch.cat(self.norms)
        where = torch.cat(self.where)
        median = float(norms.median()) if norms.numel() else float("nan")
        ratio = norms / median if median > 0 else torch.full_like(norms, float("nan"))
        flagged = (ratio > factor).nonzero(as_tuple=True)[0]
        top = flagged[ratio[flagged].argsort(descending=True)][:MAX_EXAMPLES]
        return dict(
            share=self.special_energy / self.energy if self.energy else float("nan"),
            median=median,
            special_ratio=(self.special_norm_sum / self.special_count / median) if self.special_count and median > 0 else float("nan"),
            massive=int(flagged.numel()),
            max_ratio=float(ratio.max()) if ratio.numel() else float("nan"),
            examples=[[int(v) for v in where[i]] for i in top],
        )


def _ablated_ce_sum(
    model: HookedTransformer, b: _Batch, outputs: Mapping[int, Tensor | None], keep: Bool[Tensor, "rows ctx"] | None
) -> float:
    """Summed next-token CE of the batch with the listed MLP outputs held constant,
    except at `keep` (clean outputs there)."""
    with constant_mlp_outputs(model, outputs), keep_clean_outputs(model, _clean_outputs(b), keep):
        logits = b.prefix.resume(model)
    ce, _ = next_token_ce_kl(logits, b.tokens)
    return float(ce.double().sum())


def _reconstruct_with_stats(module: Replacement, x: Tensor, stats: UnitStats) -> Tensor:
    """module.reconstruct(x), counting unit activations at `module.acts_hook` (so they
    are the activations any user hook would see)."""
    handle = module.acts_hook.register_forward_hook(lambda hook, args, acts: stats.update(acts))
    try:
        return module.reconstruct(x.to(module.dtype), hooked=True)
    finally:
        handle.remove()


def _special_ids(model: HookedTransformer, special_ids: Sequence[int] | None) -> list[int]:
    if special_ids is None:
        return special_token_ids(model)
    ids = sorted({int(i) for i in special_ids})
    bad = [i for i in ids if not 0 <= i < model.cfg.d_vocab]
    if bad:
        raise ValueError(f"special_ids {bad} are not token ids of the model's vocabulary (0..{model.cfg.d_vocab - 1})")
    return ids


def evaluate_many(
    model: HookedTransformer,
    candidates: Mapping[str, Mapping[int, Replacement]],
    tokens: Int[Tensor, "rows ctx"],
    *,
    batch_size: int = 8,
    use_error_term: bool = False,
    mean_outputs: Mapping[int, Tensor] | None = None,
    progress: bool = True,
    exclude_special_tokens: bool = True,
    special_ids: Sequence[int] | None = None,
    massive_factor: float = MASSIVE_FACTOR,
    layers: Sequence[int] | None = None,
    mean_ablation: bool = True,
    stack_candidates: int = 1,
) -> EvalReport:
    """Evaluate several candidates, each a {layer: module} set spliced in at once, on
    the same tokens with one clean pass of the model per batch. With no candidates and
    `layers` given, only the baselines of those layers (`ablation_baselines`).

    Every candidate must replace the same layers. CE and KL average over all
    next-token predictions of each row (positions 0..ctx-2 predicting 1..ctx-1); the
    model runs in its own dtype (log-softmax in at least float32). NMSE and the unit
    statistics use each module on the clean model's MLP input (see `EvalResult`).
    The standard errors take rows as the independent units.

    Args:
        model: the language model; its MLPs at the candidates' layers are the originals.
        candidates: name -> {layer: module}; modules must match the model's dtype/device.
            A module may be a SAE-Lens SAE or transcoder (see `saelens_adapter.as_module`).
        tokens: [rows, ctx] token ids (held-out text; rows starting with the separator).
        batch_size: rows per forward pass.
        use_error_term: splice with `attach(..., use_error_term=True)` (the model's output
            is then unchanged: a check of the machinery rather than of the modules).
        mean_outputs: {layer: [d_model]} MLP output means for mean ablation, e.g. from
            training activations. When None, the means over the evaluation tokens
            themselves are used (compared positions only), at the cost of one extra
            partial pass (`mlp_output_means`, up to the last replaced layer).
        progress: show tqdm progress bars.
        exclude_special_tokens: keep the clean MLP output at positions holding a special
            token for every candidate and both ablations, and leave those positions out of
            NMSE and the unit statistics (module docstring). With several layers the
            clean output is the one recorded in the clean pass.
        special_ids: the token ids that count as special; None: `special_token_ids(model)`.
        massive_factor: flag compared positions whose MLP output norm exceeds this many
            times the median (`CEBaselines.massive_positions`).
        layers: the layers of a baselines-only call (no candidates).
        mean_ablation: run the mean-ablation baseline (False: ce_mean_ablation is NaN and
            the pass is saved).
        stack_candidates: candidates per forward pass, stacked along the rows (one pass
            of batch_size * stack_candidates rows instead of several). It pays where a
            larger batch runs faster per row (13-16% less CPU time for 3 candidates on 2
            cores at layer 12, more on a GPU: benchmarks/bench_eval_stderr.py), at the cost
            of stack_candidates times the logits' memory; the figures equal the one-by-one
            ones to float rounding. Ignored with use_error_term (it needs `attach`).
    """
    check_tokens(model, tokens)
    batch_size = check_batch_size(batch_size)
    stack = 1 if use_error_term else check_positive_int("stack_candidates", stack_candidates)
    if not candidates and layers is not None:
        layers = check_layers(model, layers)
    else:
        layers = check_candidates(model, candidates)
    ids = _special_ids(model, special_ids)
    candidates = {name: as_modules(reps) for name, reps in candidates.items()}  # SAE-Lens SAEs: wrapped once
    if not mean_ablation:
        means, mean_source = None, "not computed"
    elif mean_outputs is None:
        means = mlp_output_means(
            model, tokens, layers, batch_size=batch_size, progress=progress,
            exclude_ids=ids if exclude_special_tokens else None,
        )
        mean_source = "evaluation tokens"
    else:
        means = check_mean_outputs(model, mean_outputs, layers)
        mean_source = "given"

    tallies = {
        name: _Tally(units={layer: UnitStats(m.n_units) for layer, m in reps.items()})
        for name, reps in candidates.items()
    }
    sites = {layer: _SiteStats() for layer in layers}
    clean_sum = zero_sum = zero_other_sum = mean_sum = 0.0
    any_special = False
    n_pred = n_excluded = 0
    device = model_device(model)
    first_row = 0
    with torch.no_grad():
        for batch in batches(tokens, batch_size, progress, "eval"):
            b = _clean_batch(model, batch.to(device), layers, ids, exclude_special_tokens, first_row=first_row)
            first_row += batch.shape[0]
            n_pred += b.clean_ce.numel()
            clean_sum += float(b.clean_ce.double().sum())
            for layer in layers:
                sites[layer].add(b, b.io[layer][1])
            names = list(candidates)
            for start in range(0, len(names), stack):
                group = names[start:start + stack]
                if len(group) == 1:
                    tallies[group[0]].add_batch(model, b, candidates[group[0]], use_error_term)
                    continue
                logits = _stacked_logits(model, b, [candidates[n] for n in group])
                for c, name in enumerate(group):
                    tallies[name].add_logits(logits[c * batch.shape[0]:(c + 1) * batch.shape[0]], b)
                    tallies[name].add_reconstruction(b, candidates[name])
                del logits
            zeros = {layer: None for layer in layers}
            zero_batch = _ablated_ce_sum(model, b, zeros, b.excluded)
            zero_sum += zero_batch
            mean_sum += _ablated_ce_sum(model, b, means, b.excluded) if means is not None else float("nan")
            if b.special is not None:
                # the other choice of the zero ablation, for the share of its effect at special positions
                any_special = True
                n_excluded += int(b.special.sum())
                zero_other_sum += _ablated_ce_sum(model, b, zeros, None if exclude_special_tokens else b.special)
            else:
                zero_other_sum += zero_batch
            del b

    ce_zero = zero_sum / n_pred
    all_positions = special_kept = None
    share = None
    ce_clean = clean_sum / n_pred
    if any_special:
        other = zero_other_sum / n_pred
        all_positions, special_kept = (other, ce_zero) if exclude_special_tokens else (ce_zero, other)
        gap = all_positions - ce_clean
        share = (all_positions - special_kept) / gap if gap != 0 else float("nan")
    summaries = {layer: sites[layer].summary(massive_factor) for layer in layers}
    baselines = CEBaselines(
        ce_clean=ce_clean,
        ce_zero_ablation=ce_zero,
        ce_mean_ablation=mean_sum / n_pred,
        n_tokens=n_pred,
        layers=layers,
        mean_source=mean_source,
        exclude_special_tokens=bool(exclude_special_tokens),
        special_ids=ids,
        n_rows=int(tokens.shape[0]),
        excluded_positions=n_excluded,
        ce_zero_ablation_all_positions=all_positions,
        ce_zero_ablation_special_kept=special_kept,
        excluded_ablation_share=share,
        excluded_energy_share={l: s["share"] for l, s in summaries.items()},
        median_norm={l: s["median"] for l, s in summaries.items()},
        excluded_norm_ratio={l: s["special_ratio"] for l, s in summaries.items()},
        massive_factor=float(massive_factor),
        massive_positions={l: s["massive"] for l, s in summaries.items()},
        max_norm_ratio={l: s["max_ratio"] for l, s in summaries.items()},
        massive_examples={l: s["examples"] for l, s in summaries.items()},
    )
    results = {name: _result(tallies[name], candidates[name], baselines, n_pred) for name in candidates}
    return EvalReport(baselines=baselines, results=results)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _result(
    tally: _Tally, replacements: Mapping[int, Replacement], baselines: CEBaselines, n_pred: int
) -> EvalResult:
    layers = sorted(replacements)
    nmse_per_layer = {l: tally.err_sq[l] / tally.target_sq[l] if tally.target_sq[l] else float("nan") for l in layers}
    units = [tally.units[l] for l in layers]
    own: dict[str, list[float]] = {}
    for module in replacements.values():
        for key, value in module.metrics().items():
            own.setdefault(key, []).append(value)
    ce = tally.ce_sum / n_pred
    return EvalResult(
        nmse=_mean(list(nmse_per_layer.values())),
        ce=ce,
        delta_ce=ce - baselines.ce_clean,
        delta_ce_stderr=paired_stderr(tally.row_deltas),
        ce_recovered=fraction_recovered(baselines.ce_zero_ablation, ce, baselines.ce_clean),
        kl=tally.kl_sum / n_pred,
        l0=_mean([u.l0 for u in units]),
        dead_fraction=sum(u.n_dead for u in units) / sum(u.n_units for u in units),
        usage_entropy=_mean([u.entropy for u in units]),
        expert_cos=_mean(own["expert_cos"]) if "expert_cos" in own else None,
        n_tokens=n_pred,
        usage_entropy_normalized=_mean([u.entropy_normalized for u in units]),
        nmse_per_layer=nmse_per_layer,
        module_metrics={key: _mean(values) for key, values in own.items()},
        row_delta_ce=list(tally.row_deltas),
        firing_rates={l: (tally.units[l].fires / tally.units[l].n_tokens).float() for l in layers
                      if tally.units[l].n_tokens},
    )


def ablation_baselines(
    model: HookedTransformer, tokens: Int[Tensor, "rows ctx"], layers: Sequence[int], **kwargs
) -> CEBaselines:
    """The baselines `evaluate_many` would give candidates replacing `layers` (clean, zero-
    and mean-ablated CE, the special positions' shares, massive-activation flags), without
    candidates: what a layer's MLP does and what its numbers would be made of."""
    return evaluate_many(model, {}, tokens, layers=layers, **kwargs).baselines


def evaluate(
    model: HookedTransformer,
    replacements: Mapping[int, Replacement],
    tokens: Int[Tensor, "rows ctx"],
    **kwargs,
) -> tuple[CEBaselines, EvalResult]:
    """`evaluate_many` for one candidate: returns (baselines, result)."""
    report = evaluate_many(model, {"candidate": replacements}, tokens, **kwargs)
    return report.baselines, report.results["candidate"]


class HeldoutProbe:
    """A fixed small held-out set whose clean pass (prefix, MLP inputs and outputs, clean
    CE, zero ablation) is run once, so that modules can be measured on it many times
    during training (learning curves): `measure` gives exactly what `evaluate_many`
    gives for CE, delta CE, its stderr, CE recovered, NMSE and unit statistics on the
    same tokens and batch size (KL is not computed: NaN)."""

    def __init__(
        self,
        model: HookedTransformer,
        tokens: Int[Tensor, "rows ctx"],
        layers: Sequence[int],
        *,
        batch_size: int = 8,
        exclude_special_tokens: bool = True,
        special_ids: Sequence[int] | None = None,
    ) -> None:
        check_tokens(model, tokens)
        batch_size = check_batch_size(batch_size)
        self.model = model
        self.layers = check_layers(model, layers)
        ids = _special_ids(model, special_ids)
        device = model_device(model)
        self.batches: list[_Batch] = []
        zero_sum = clean_sum = 0.0
        with torch.no_grad():
            for i, batch in enumerate(tokens.split(batch_size)):
                b = _clean_batch(model, batch.to(device), self.layers, ids, exclude_special_tokens,
                                 with_kl=False, first_row=i * batch_size)
                self.batches.append(b)
                clean_sum += float(b.clean_ce.double().sum())
                zero_sum += _ablated_ce_sum(model, b, {layer: None for layer in self.layers}, b.excluded)
        self.n_pred = sum(b.clean_ce.numel() for b in self.batches)
        self.baselines = CEBaselines(
            ce_clean=clean_sum / self.n_pred, ce_zero_ablation=zero_sum / self.n_pred, ce_mean_ablation=float("nan"),
            n_tokens=self.n_pred, layers=self.layers, mean_source="not computed",
            exclude_special_tokens=bool(exclude_special_tokens), special_ids=ids, n_rows=int(tokens.shape[0]),
        )

    def measure(self, candidates: Mapping[str, Mapping[int, Replacement]]) -> dict[str, EvalResult]:
        """Each candidate's figures on the probe's tokens (modules left in the mode they
        were in; run under no_grad)."""
        layers = check_candidates(self.model, candidates)
        if layers != self.layers:
            raise ValueError(f"the probe was built for layers {list(self.layers)}; the candidates replace {list(layers)}")
        candidates = {name: as_modules(reps) for name, reps in candidates.items()}
        out = {}
        with torch.no_grad():
            for name, reps in candidates.items():
                modes = {layer: m.training for layer, m in reps.items()}
                for m in reps.values():
                    m.eval()
                try:
                    tally = _Tally(units={layer: UnitStats(m.n_units) for layer, m in reps.items()})
                    for b in self.batches:
                        tally.add_batch(self.model, b, reps, use_error_term=False)
                finally:
                    for layer, m in reps.items():
                        m.train(modes[layer])
                out[name] = _result(tally, reps, self.baselines, self.n_pred)
        return out


def mlp_output_means(
    model: HookedTransformer,
    tokens: Int[Tensor, "rows ctx"],
    layers: tuple[int, ...] | list[int],
    *,
    batch_size: int = 8,
    progress: bool = True,
    exclude_ids: Sequence[int] | None = None,
) -> dict[int, Float[Tensor, " d_model"]]:
    """Mean output of `model.blocks[L].mlp` over every position of `tokens` (those not
    holding one of `exclude_ids` when given), per layer (the mean-ablation vectors),
    accumulated in float64; stops after the last layer."""
    check_tokens(model, tokens)
    batch_size = check_batch_size(batch_size)
    layers = check_layers(model, layers)
    sums = {layer: torch.zeros(model.cfg.d_model, dtype=torch.float64) for layer in layers}
    count = 0
    device = model_device(model)
    with torch.no_grad():
        for batch in batches(tokens, batch_size, progress, "mean MLP outputs"):
            batch = batch.to(device)
            keep = ~special_positions(batch, list(exclude_ids or []))
            count += int(keep.sum())
            with capture_mlp_io(model, layers) as io:
                model(batch, stop_at_layer=layers[-1] + 1)
            for layer in layers:
                sums[layer] += io[layer][1][keep].double().sum(0).cpu()
    if count == 0:
        raise ValueError("every position of the tokens holds a special token: no MLP output to average")
    return {l: (s / count).to(device, model_dtype(model)) for l, s in sums.items()}
