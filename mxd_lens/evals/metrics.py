"""The per-batch measurements of an evaluation, each written once.

Everything here is a small function of tensors already computed by the runner: the
next-token CE and KL of a batch of logits, the running statistics of unit
activations and the paired standard error. Architecture-specific figures (an MxD's
expert-collapse check) come from each module's own `metrics()`.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor


ROW_CHUNK = 2
"""Rows per log-softmax: bounds the [rows, ctx, vocab] temporaries to a few rows."""


class CleanNextToken(NamedTuple):
    """What the clean model's predictions contribute to every candidate's CE and KL."""

    probs: Float[Tensor, "rows ctx-1 vocab"]
    """p_clean of the predictions at positions 0..ctx-2."""
    neg_entropy: Float[Tensor, "rows ctx-1"]
    """sum_v p_clean log p_clean, per prediction."""
    ce: Float[Tensor, "rows ctx-1"]
    """Per-prediction CE of the clean model."""


def _logprobs(chunk: Float[Tensor, "rows ctx vocab"]) -> Float[Tensor, "rows ctx-1 vocab"]:
    """log softmax of the predictions at positions 0..ctx-2, in at least float32
    (a bf16 log-softmax over 49k classes loses the digits CE differences live in)."""
    return chunk[:, :-1].to(torch.promote_types(chunk.dtype, torch.float32)).log_softmax(-1)


def clean_next_token(logits: Float[Tensor, "rows ctx vocab"], tokens: Int[Tensor, "rows ctx"]) -> CleanNextToken:
    """Clean CE, probabilities and negative entropy, computed once per batch so that
    each candidate's KL costs a single multiply-add over the vocabulary."""
    rows, ctx, vocab = logits.shape
    probs = torch.empty(rows, ctx - 1, vocab, dtype=torch.promote_types(logits.dtype, torch.float32), device=logits.device)
    neg_entropy, ce = [], []
    for i, chunk in enumerate(logits.split(ROW_CHUNK)):
        r = slice(i * ROW_CHUNK, i * ROW_CHUNK + chunk.shape[0])
        logp = _logprobs(chunk)
        ce.append(-logp.gather(-1, tokens[r, 1:, None]).squeeze(-1))
        torch.exp(logp, out=probs[r])
        neg_entropy.append((probs[r] * logp).sum(-1))
    return CleanNextToken(probs, torch.cat(neg_entropy), torch.cat(ce))


def next_token_ce_kl(
    logits: Float[Tensor, "rows ctx vocab"],
    tokens: Int[Tensor, "rows ctx"],
    clean: CleanNextToken | None = None,
) -> tuple[Float[Tensor, "rows ctx-1"], Float[Tensor, "rows ctx-1"] | None]:
    """Per-prediction CE of tokens[:, 1:] and, given the clean predictions, per-prediction
    KL(clean || these) = sum p_clean log p_clean - sum p_clean log p. Row chunks keep the
    vocab-sized temporaries small."""
    ces, kls = [], []
    for i, chunk in enumerate(logits.split(ROW_CHUNK)):
        r = slice(i * ROW_CHUNK, i * ROW_CHUNK + chunk.shape[0])
        logp = _logprobs(chunk)
        ces.append(-logp.gather(-1, tokens[r, 1:, None]).squeeze(-1))
        if clean is not None:
            kls.append(clean.neg_entropy[r] - (clean.probs[r] * logp).sum(-1))
    return torch.cat(ces), (torch.cat(kls) if clean is not None else None)


def paired_stderr(batch_differences: Sequence[float]) -> float:
    """std (ddof=1) of paired differences / sqrt(n); NaN for fewer than 2 (the evaluator
    feeds it one difference per row: `row_differences`)."""
    n = len(batch_differences)
    if n < 2:
        return float("nan")
    mean = sum(batch_differences) / n
    var = sum((d - mean) ** 2 for d in batch_differences) / (n - 1)
    return math.sqrt(var / n)


def fraction_recovered(ce_zero: float, ce: float, ce_clean: float) -> float:
    """(ce_zero - ce) / (ce_zero - ce_clean); NaN when ablation does not change CE."""
    gap = ce_zero - ce_clean
    return (ce_zero - ce) / gap if gap != 0 else float("nan")


class UnitStats:
    """Running firing counts of one module's units, fed from its activation hook."""

    def __init__(self, n_units: int) -> None:
        self.n_units = n_units
        self.fires = torch.zeros(n_units, dtype=torch.float64)
        self.n_tokens = 0

    def update(self, acts: Float[Tensor, "... n_units"]) -> None:
        active = acts.detach().reshape(-1, acts.shape[-1]) != 0
        self.fires += active.sum(0).cpu().to(torch.float64)  # a bool sum counts in int64
        self.n_tokens += active.shape[0]

    @property
    def l0(self) -> float:
        """Mean number of non-zero units per token."""
        return float(self.fires.sum()) / self.n_tokens if self.n_tokens else float("nan")

    @property
    def n_dead(self) -> int:
        """Units that never fired."""
        return int((self.fires == 0).sum())

    @property
    def entropy(self) -> float:
        """Entropy (nats) of the firing frequencies normalised to a distribution."""
        total = self.fires.sum()
        if total == 0:
            return float("nan")
        p = self.fires[self.fires > 0] / total
        return float(-(p * p.log()).sum())

    @property
    def entropy_normalized(self) -> float:
        """entropy / log(n_units), in [0, 1]."""
        return self.entropy / math.log(self.n_units) if self.n_units > 1 else float("nan")


def row_differences(ce: Float[Tensor, "rows preds"], clean_ce: Float[Tensor, "rows preds"]) -> list[float]:
    """Per-row paired differences: each row's mean next-token CE minus the clean model's
    on the same predictions (float64). Rows are the independent units of an evaluation:
    the predictions within a row share a context, so per-prediction differences are
    correlated and their standard error would understate the uncertainty."""
    return (ce.double() - clean_ce.double()).mean(-1).tolist()


def ratio_interval(
    numerator_rows: Sequence[float],
    denominator_rows: Sequence[float],
    *,
    n_boot: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float, float]:
    """(ratio, low, high): mean(numerator_rows) / mean(denominator_rows) and its
    percentile bootstrap interval, resampling ROWS with replacement (the same rows for
    both, as the differences are paired on the same text). With equal-length rows the
    means of the per-row differences are the candidates' delta CE."""
    num = torch.as_tensor(list(numerator_rows), dtype=torch.float64)
    den = torch.as_tensor(list(denominator_rows), dtype=torch.float64)
    if num.shape != den.shape or num.numel() == 0:
        raise ValueError(
            f"ratio_interval needs per-row values of the same rows; got {num.numel()} and {den.numel()}"
        )
    if not 0 < level < 1:
        raise ValueError(f"level={level} must lie strictly between 0 and 1")
    ratio = float(num.mean() / den.mean())
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, num.numel(), (n_boot, num.numel()), generator=g)
    boot = num[idx].mean(-1) / den[idx].mean(-1)
    lo, hi = torch.quantile(boot, torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)).tolist()
    return ratio, lo, hi


def masked_energy(y: Float[Tensor, "rows ctx d"], mask: Bool[Tensor, "rows ctx"]) -> tuple[float, float]:
    """(sum ||y||^2 at the masked positions, sum ||y||^2 over all positions), float64."""
    sq = y.double().pow(2).sum(-1)
    return float(sq[mask].sum()), float(sq.sum())
