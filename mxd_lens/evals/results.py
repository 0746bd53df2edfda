"""The small dataclasses an evaluation returns; `to_dict()` gives JSON-ready dicts."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from mxd_lens.atomic import jsonable as _jsonable  # NaN/inf -> None (e.g. a single batch's stderr)

if TYPE_CHECKING:
    from torch import Tensor


@dataclass
class CEBaselines:
    """Next-token cross-entropy of the unmodified model and of the MLP ablations that
    every candidate of one evaluation is measured against."""

    ce_clean: float
    """Mean next-token CE (nats) of the unmodified model."""
    ce_zero_ablation: float
    """Mean next-token CE with the output of every evaluated layer's MLP set to 0."""
    ce_mean_ablation: float
    """Mean next-token CE with every evaluated layer's MLP output replaced by its mean
    output vector (see `mean_source`)."""
    n_tokens: int
    """Number of next-token predictions averaged over: rows * (ctx - 1)."""
    layers: tuple[int, ...] = ()
    """The layers whose MLPs were ablated (the layers every candidate replaces)."""
    mean_source: str = "evaluation tokens"
    """Where the mean MLP outputs came from: 'given' (the `mean_outputs` argument) or
    'evaluation tokens' (their mean over the evaluated tokens themselves)."""
    exclude_special_tokens: bool = False
    """Whether positions holding special tokens were excluded: there every candidate and
    both ablations keep the clean MLP output, and NMSE and unit statistics skip them."""
    special_ids: list[int] = field(default_factory=list)
    """The token ids whose positions count as special (`model_io.special_token_ids`)."""
    n_rows: int = 0
    """Rows evaluated: the independent units of the standard errors."""
    excluded_positions: int = 0
    """Positions (of rows * ctx) holding a special token."""
    ce_zero_ablation_all_positions: float | None = None
    """Mean CE with the MLP output(s) zeroed at EVERY position, special ones included
    (None when the tokens hold no special position: then it is `ce_zero_ablation`)."""
    ce_zero_ablation_special_kept: float | None = None
    """Mean CE with the MLP output(s) zeroed everywhere except at special positions, which
    keep the clean output (None when the tokens hold no special position)."""
    excluded_ablation_share: float | None = None
    """Share of the zero-ablation effect (all positions) that sits at the special
    positions: (all - special_kept) / (all - ce_clean)."""
    excluded_energy_share: dict[int, float] = field(default_factory=dict)
    """Per layer: the share of the MLP's output energy sum ||y||^2 at special positions."""
    median_norm: dict[int, float] = field(default_factory=dict)
    """Per layer: the median ||y|| of the MLP output over the positions that are compared
    (all positions when nothing is excluded)."""
    excluded_norm_ratio: dict[int, float] = field(default_factory=dict)
    """Per layer: the mean ||y|| at special positions over `median_norm` (NaN without any)."""
    massive_factor: float = 20.0
    """A compared position is flagged as a massive activation when its ||y|| exceeds
    massive_factor * median_norm."""
    massive_positions: dict[int, int] = field(default_factory=dict)
    """Per layer: how many compared positions are massive activations (see `massive_factor`)."""
    max_norm_ratio: dict[int, float] = field(default_factory=dict)
    """Per layer: the largest ||y|| / median_norm over the compared positions."""
    massive_examples: dict[int, list[list[int]]] = field(default_factory=dict)
    """Per layer: up to 5 flagged positions as [row, position, token id]."""

    def to_dict(self) -> dict[str, Any]:
        """All fields, JSON-ready (non-finite floats become None)."""
        return _jsonable(dataclasses.asdict(self))


@dataclass
class EvalResult:
    """How faithfully one candidate (a set of replaced layers) stands in for the MLPs.

    Reconstruction and unit statistics (nmse, l0, dead_fraction, usage_entropy) are
    measured on the clean model's MLP inputs: each module sees exactly the input the
    original MLP saw, also when several layers are replaced. The CE and KL figures splice
    all of the candidate's layers in at once, so later modules then see inputs produced
    with the earlier replacements in place.
    """

    nmse: float
    """sum ||y_hat - y||^2 / sum ||y||^2 over all compared positions (special positions
    skipped when they are excluded), y the true output of
    `model.blocks[L].mlp` and y_hat the module's output on that MLP's true input; the
    mean over layers for several layers (every layer sees the same tokens, so this is
    the token-weighted mean)."""
    ce: float
    """Mean next-token CE (nats) with the candidate's modules spliced in via `attach`."""
    delta_ce: float
    """ce - ce_clean."""
    delta_ce_stderr: float
    """Standard error of delta_ce with ROWS as the independent units: the std (ddof=1) of
    the per-row paired differences (`row_delta_ce`) divided by sqrt(n_rows); NaN (None in
    JSON) with a single row. Predictions within a row share their context, so a
    per-prediction standard error would understate the uncertainty."""
    ce_recovered: float
    """(ce_zero_ablation - ce) / (ce_zero_ablation - ce_clean): 1 is perfect, 0 is no
    better than deleting the MLP(s)."""
    kl: float
    """KL(clean || spliced) of the next-token distributions, nats, mean per prediction."""
    l0: float
    """Mean number of non-zero unit activations per token (read at the activation hook)."""
    dead_fraction: float
    """Fraction of units (over all layers) that never fired on the evaluated tokens."""
    usage_entropy: float
    """Entropy (nats) of the units' firing frequencies normalised to a distribution;
    log(n_units) when every unit fires equally often. Mean over layers."""
    expert_cos: float | None
    """Mean |cosine| between flattened expert maps W_n = D diag(c_n) over pairs of a
    random sample of experts (`expert_cosine`): near 1 means the experts collapsed
    into one map. Mean over the MxD layers; None when the candidate has no MxD."""
    n_tokens: int
    """Number of next-token predictions the CE and KL figures average over."""
    usage_entropy_normalized: float = float("nan")
    """usage_entropy / log(n_units), in [0, 1] (mean over layers)."""
    nmse_per_layer: dict[int, float] = field(default_factory=dict)
    """NMSE of each replaced layer."""
    module_metrics: dict[str, float] = field(default_factory=dict)
    """The modules' own figures (`Replacement.metrics()`, e.g. an MxD's expert_cos), mean
    over the layers whose modules report them."""
    row_delta_ce: list[float] = field(default_factory=list, repr=False)
    """Per row: its mean CE with the candidate spliced in minus the clean model's (the
    paired differences behind `delta_ce_stderr` and `metrics.ratio_interval`)."""
    firing_rates: dict[int, Tensor] = field(default_factory=dict, repr=False)
    """Per replaced layer, the fraction of compared positions at which each unit fired
    ([n_units] float32; what sparsity.safetensors stores, so a run writes it from its
    evaluation rather than a second pass). Not in `to_dict`."""

    def to_dict(self) -> dict[str, Any]:
        """All fields but `firing_rates`, JSON-ready (non-finite floats become None, layer
        keys strings)."""
        return _jsonable({f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "firing_rates"})


@dataclass
class EvalReport:
    """The shared baselines and one `EvalResult` per candidate name."""

    baselines: CEBaselines
    """CE of the clean model and of the zero/mean-ablated MLPs, on the same tokens."""
    results: dict[str, EvalResult]
    """Candidate name -> its result, in the order the candidates were given."""

    def to_dict(self) -> dict[str, Any]:
        """{'baselines': {...}, 'results': {name: {...}}}, JSON-ready."""
        return {
            "baselines": self.baselines.to_dict(),
            "results": {name: r.to_dict() for name, r in self.results.items()},
        }
