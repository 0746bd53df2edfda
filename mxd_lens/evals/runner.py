"""Evaluate replacement layers on held-out text, sharing the language model's work.

The language model is the expensive part on a CPU, so each batch runs the layers
before the first replaced one once, then the clean model from there once (recording
the replaced MLPs' true inputs and outputs and the clean predictions), then every
candidate and the two ablations from that layer on with `model(resid, start_at_layer=L)`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens import HookedTransformer

from mxd_lens.attach import attach
from mxd_lens.evals.checks import check_batch_size, check_candidates, check_layers, check_mean_outputs, check_tokens
from mxd_lens.evals.metrics import (
    CleanNextToken,
    UnitStats,
    clean_next_token,
    fraction_recovered,
    next_token_ce_kl,
    paired_stderr,
)
from mxd_lens.model_io import (
    Prefix,
    batches,
    capture_mlp_io,
    constant_mlp_outputs,
    model_device,
    model_dtype,
    run_prefix,
)
from mxd_lens.evals.results import CEBaselines, EvalReport, EvalResult
from mxd_lens.functional import squared_error_sums
from mxd_lens.architectures.base import Replacement
from mxd_lens.architectures.saelens_adapter import as_modules


@dataclass
class _Tally:
    """Running sums of one candidate over the batches."""

    ce_sum: float = 0.0
    kl_sum: float = 0.0
    batch_deltas: list[float] = field(default_factory=list)
    err_sq: dict[int, float] = field(default_factory=dict)
    target_sq: dict[int, float] = field(default_factory=dict)
    units: dict[int, UnitStats] = field(default_factory=dict)

    def add_batch(
        self,
        model: HookedTransformer,
        prefix: Prefix,
        tokens: Int[Tensor, "rows ctx"],
        replacements: Mapping[int, Replacement],
        mlp_io: Mapping[int, tuple[Tensor, Tensor]],
        clean: CleanNextToken,
        clean_ce_sum: float,
        use_error_term: bool,
    ) -> None:
        """Splice the candidate in and score one batch: CE, KL, and each module's
        reconstruction and unit activations on the clean MLP input."""
        with attach(model, replacements, use_error_term=use_error_term):
            logits = prefix.resume(model)
        ce, kl = next_token_ce_kl(logits, tokens, clean)
        del logits
        ce_sum = float(ce.double().sum())
        self.ce_sum += ce_sum
        self.kl_sum += float(kl.double().sum())
        self.batch_deltas.append((ce_sum - clean_ce_sum) / ce.numel())
        for layer, module in replacements.items():
            x, y = mlp_io[layer]
            y_hat = _reconstruct_with_stats(module, x if module.cfg.input_site == "mlp_in" else y, self.units[layer])
            err, energy = squared_error_sums(y_hat, y)
            self.err_sq[layer] = self.err_sq.get(layer, 0.0) + err
            self.target_sq[layer] = self.target_sq.get(layer, 0.0) + energy


def _ablated_ce_sum(
    model: HookedTransformer, prefix: Prefix, tokens: Int[Tensor, "rows ctx"], outputs: Mapping[int, Tensor | None]
) -> float:
    """Summed next-token CE of the batch with the listed MLP outputs held constant."""
    with constant_mlp_outputs(model, outputs):
        logits = prefix.resume(model)
    ce, _ = next_token_ce_kl(logits, tokens)
    return float(ce.double().sum())


def _reconstruct_with_stats(module: Replacement, x: Tensor, stats: UnitStats) -> Tensor:
    """module.reconstruct(x), counting unit activations at `module.acts_hook` (so they
    are the activations any user hook would see)."""
    handle = module.acts_hook.register_forward_hook(lambda hook, args, acts: stats.update(acts))
    try:
        return module.reconstruct(x.to(module.dtype), hooked=True)
    finally:
        handle.remove()


def evaluate_many(
    model: HookedTransformer,
    candidates: Mapping[str, Mapping[int, Replacement]],
    tokens: Int[Tensor, "rows ctx"],
    *,
    batch_size: int = 8,
    use_error_term: bool = False,
    mean_outputs: Mapping[int, Tensor] | None = None,
    progress: bool = True,
) -> EvalReport:
    """Evaluate several candidates, each a {layer: module} set spliced in at once, on
    the same tokens with one clean pass of the model per batch.

    Every candidate must replace the same layers. CE and KL average over all
    next-token predictions of each row (positions 0..ctx-2 predicting 1..ctx-1); the
    model runs in its own dtype (log-softmax in at least float32). NMSE and the unit
    statistics use each module on the clean model's MLP input (see `EvalResult`).

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
            themselves are used, at the cost of one extra partial pass
            (`mlp_output_means`, up to the last replaced layer).
        progress: show tqdm progress bars.
    """
    check_tokens(model, tokens)
    batch_size = check_batch_size(batch_size)
    layers = check_candidates(model, candidates)
    candidates = {name: as_modules(reps) for name, reps in candidates.items()}  # SAE-Lens SAEs: wrapped once
    if mean_outputs is None:
        means = mlp_output_means(model, tokens, layers, batch_size=batch_size, progress=progress)
        mean_source = "evaluation tokens"
    else:
        means = check_mean_outputs(model, mean_outputs, layers)
        mean_source = "given"

    tallies = {
        name: _Tally(units={layer: UnitStats(m.n_units) for layer, m in reps.items()})
        for name, reps in candidates.items()
    }
    clean_sum = zero_sum = mean_sum = 0.0
    n_pred = 0
    device = model_device(model)
    with torch.no_grad():
        for batch in batches(tokens, batch_size, progress, "eval"):
            batch = batch.to(device)
            prefix = run_prefix(model, batch, layers[0])
            with capture_mlp_io(model, layers) as io:
                logits = prefix.resume(model)
            clean = clean_next_token(logits, batch)
            del logits
            n_pred += clean.ce.numel()
            clean_batch = float(clean.ce.double().sum())
            clean_sum += clean_batch

            for name, replacements in candidates.items():
                tallies[name].add_batch(
                    model, prefix, batch, replacements, io, clean, clean_batch, use_error_term
                )
            zero_sum += _ablated_ce_sum(model, prefix, batch, {layer: None for layer in layers})
            mean_sum += _ablated_ce_sum(model, prefix, batch, means)
            del clean, io, prefix

    baselines = CEBaselines(
        ce_clean=clean_sum / n_pred,
        ce_zero_ablation=zero_sum / n_pred,
        ce_mean_ablation=mean_sum / n_pred,
        n_tokens=n_pred,
        layers=layers,
        mean_source=mean_source,
    )
    results = {
        name: _result(tallies[name], candidates[name], baselines, n_pred) for name in candidates
    }
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
        delta_ce_stderr=paired_stderr(tally.batch_deltas),
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
    )


def evaluate(
    model: HookedTransformer,
    replacements: Mapping[int, Replacement],
    tokens: Int[Tensor, "rows ctx"],
    **kwargs,
) -> tuple[CEBaselines, EvalResult]:
    """`evaluate_many` for one candidate: returns (baselines, result)."""
    report = evaluate_many(model, {"candidate": replacements}, tokens, **kwargs)
    return report.baselines, report.results["candidate"]


def mlp_output_means(
    model: HookedTransformer,
    tokens: Int[Tensor, "rows ctx"],
    layers: tuple[int, ...] | list[int],
    *,
    batch_size: int = 8,
    progress: bool = True,
) -> dict[int, Float[Tensor, " d_model"]]:
    """Mean output of `model.blocks[L].mlp` over every position of `tokens`, per layer
    (the mean-ablation vectors), accumulated in float64; stops after the last layer."""
    check_tokens(model, tokens)
    batch_size = check_batch_size(batch_size)
    layers = check_layers(model, layers)
    sums = {layer: torch.zeros(model.cfg.d_model, dtype=torch.float64) for layer in layers}
    device = model_device(model)
    with torch.no_grad():
        for batch in batches(tokens, batch_size, progress, "mean MLP outputs"):
            with capture_mlp_io(model, layers) as io:
                model(batch.to(device), stop_at_layer=layers[-1] + 1)
            for layer in layers:
                sums[layer] += io[layer][1].double().sum((0, 1)).cpu()
    return {l: (s / tokens.numel()).to(device, model_dtype(model)) for l, s in sums.items()}


