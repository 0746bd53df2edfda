"""Steering a model through the units of an attached replacement.

`steer(model, layer, {unit: value}, mode="add" | "clamp")` edits the unit activations
(after TopK) at every forward pass inside the context, `model.generate` included. For an
MxD, adding v to expert n adds v * c_n * (D^T z): a direction that depends on the input,
unlike a transcoder or SAE latent's fixed decoder row (Oldfield et al. 2025 steer with
+100 on one expert).

Evaluated steering (`evaluate_steering`): `steer_rows` steers each row of a batch by its
own unit, `steer_rows_random_direction` is the equal-norm control (a random direction
added to the MLP output with, at every position, the norm of the unit's own addition),
`greedy_generate` generates with a key-value cache under whatever hooks are active, and
`bootstrap_ci` gives intervals over units and prompts. One batch per prompt holds every
condition (unsteered, each unit, each equally strong random unit, each random direction).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator, Literal, Mapping, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens import HookedTransformer
from transformer_lens.hook_points import HookPoint

from mxd_lens.circuits.patching import check_indices, find_site
from mxd_lens.model_io import capture_mlp_io
from mxd_lens.validation import check_token_matrix

Mode = Literal["add", "clamp"]


@contextmanager
def steer(
    model: HookedTransformer,
    layer: int,
    units: Mapping[int, float],
    mode: Mode = "add",
) -> Iterator[HookedTransformer]:
    """Inside the context, add `units[n]` to unit n's activation ('add') or set it to
    `units[n]` ('clamp'), at every position, for the replacement attached at `layer`."""
    site = find_site(model, layer)
    if mode not in ("add", "clamp"):
        raise ValueError(f"mode={mode!r}; expected 'add' or 'clamp'")
    if not units:
        raise ValueError("units is empty; expected {unit index: value}")
    n_units = site.module.n_units
    keys = check_indices(list(units), n_units, "units", f"the {site.module.architecture} has n_units={n_units}")
    idx = torch.tensor(keys, dtype=torch.long)
    val = torch.tensor([float(v) for v in units.values()])

    def hook(acts: Tensor, hook: HookPoint) -> Tensor:
        i, v = idx.to(acts.device), val.to(acts.device, acts.dtype)
        acts = acts.clone()
        if mode == "add":
            acts[..., i] += v
        else:
            acts[..., i] = v
        return acts

    with model.hooks(fwd_hooks=[(site.acts_name, hook)]):
        yield model


def add_units(model: HookedTransformer, layer: int, units: Mapping[int, float]):
    """`steer(..., mode="add")`."""
    return steer(model, layer, units, "add")


def clamp_units(model: HookedTransformer, layer: int, units: Mapping[int, float]):
    """`steer(..., mode="clamp")`."""
    return steer(model, layer, units, "clamp")


__all__ = ["steer", "add_units", "clamp_units"]  # extended below


# --- per-row steering and its controls -----------------------------------------------------
# A batch whose rows are steered differently (row b by its own unit, or a control) lets one
# generation pass serve every condition of an evaluation.


def _row_units(units: Sequence[int | None], batch: int) -> None:
    if len(units) != batch:
        raise ValueError(f"{len(units)} row units for a batch of {batch} rows; expected one per row (None: unsteered)")


@contextmanager
def steer_rows(
    model: HookedTransformer, layer: int, units: Sequence[int | None], values: Sequence[float]
) -> Iterator[HookedTransformer]:
    """Inside the context, row b of every batch gets `values[b]` added to unit `units[b]`'s
    activation (after TopK) at every position; a row whose unit is None is left alone."""
    site = find_site(model, layer)
    if len(units) != len(values):
        raise ValueError(f"{len(units)} units but {len(values)} values; expected one value per row")
    given = [u for u in units if u is not None]
    if given:
        check_indices(given, site.module.n_units, "units", f"the {site.module.architecture} has n_units={site.module.n_units}")
    rows = [b for b, u in enumerate(units) if u is not None]
    cols = [units[b] for b in rows]
    vals = torch.tensor([float(values[b]) for b in rows])

    def hook(acts: Tensor, hook: HookPoint) -> Tensor:
        _row_units(units, acts.shape[0])
        acts = acts.clone()
        if rows:
            acts[rows, :, cols] += vals.to(acts.device, acts.dtype)[:, None]
        return acts

    with model.hooks(fwd_hooks=[(site.acts_name, hook)]):
        yield model


def random_unit_directions(n: int, d: int, seed: int = 0) -> Float[Tensor, "n d"]:
    """`n` random unit vectors of R^d (normalised Gaussians), seeded."""
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(n, d, generator=g)
    return r / r.norm(dim=1, keepdim=True)


@contextmanager
def steer_rows_random_direction(
    model: HookedTransformer,
    layer: int,
    units: Sequence[int | None],
    values: Sequence[float],
    directions: Float[Tensor, "batch d_out"],
) -> Iterator[HookedTransformer]:
    """The equal-norm control of `steer_rows`: row b's MLP output gets `directions[b]`
    (normalised) scaled, at every position, to the norm of what adding `values[b]` to unit
    `units[b]` would add there (for an MxD that norm depends on the input; for a latent
    it is |v| ||W_dec[n]||). The units themselves are left alone."""
    site = find_site(model, layer)
    module = site.module
    if len(units) != len(values) or directions.shape[0] != len(units):
        raise ValueError(
            f"{len(units)} units, {len(values)} values and {directions.shape[0]} directions; expected one of each per row"
        )
    if directions.shape[-1] != module.cfg.d_out:
        raise ValueError(f"directions have width {directions.shape[-1]}; the module's output has d_out={module.cfg.d_out}")
    given = [u for u in units if u is not None]
    if given:
        check_indices(given, module.n_units, "units", f"the {module.architecture} has n_units={module.n_units}")
    unit_dirs = directions / directions.norm(dim=-1, keepdim=True)
    seen: dict[str, Tensor] = {}

    def grab(x: Tensor, hook: HookPoint) -> None:
        seen["x"] = x.detach()

    def add(y: Tensor, hook: HookPoint) -> Tensor:
        x = seen.pop("x")
        _row_units(units, y.shape[0])
        y = y.clone()
        for b, (u, v) in enumerate(zip(units, values)):
            if u is None:
                continue
            xb = x[b].reshape(-1, x.shape[-1])
            delta = module.unit_contribution(xb, u, torch.full((xb.shape[0],), float(v), device=x.device))
            norm = delta.norm(dim=-1).reshape(y.shape[1:-1])
            y[b] += norm[..., None].to(y.dtype) * unit_dirs[b].to(y.device, y.dtype)
        return y

    with model.hooks(fwd_hooks=[(site.name("hook_in"), grab), (site.name("hook_out"), add)]):
        yield model


@torch.no_grad()
def greedy_generate(
    model: HookedTransformer, tokens: Int[Tensor, "batch pos"], n_new: int
) -> tuple[Int[Tensor, "batch n_new"], Float[Tensor, "batch n_new d_vocab"]]:
    """(greedy continuation, the next-token probabilities at each generated step) of equal-
    length prompts, with a key-value cache; the hooks active around the call apply to every
    pass (so steering acts on the prompt and on every generated token)."""
    from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache

    check_token_matrix(tokens, model.cfg.d_vocab)
    if n_new < 1:
        raise ValueError(f"n_new={n_new}; expected at least 1")
    device = model.cfg.device
    cache = TransformerLensKeyValueCache.init_cache(model.cfg, device, tokens.shape[0])
    logits = model(tokens.to(device), past_kv_cache=cache)[:, -1]
    out, probs = [], []
    for step in range(n_new):
        p = logits.float().softmax(-1)
        nxt = p.argmax(-1)
        out.append(nxt)
        probs.append(p)
        if step + 1 < n_new:
            logits = model(nxt[:, None], past_kv_cache=cache)[:, -1]
    return torch.stack(out, 1).cpu(), torch.stack(probs, 1).cpu()


NEUTRAL_PROMPTS: tuple[str, ...] = (
    "I think that",
    "The next day,",
    "Here is what happened:",
    "She said that",
    "In the morning",
    "It was a",
    "Let me tell you about",
    "The story begins with",
    "He looked at the",
    "Yesterday I",
    "We talked about",
    "My favourite thing is",
)
"""Prompts that point nowhere in particular: what steered generations start from."""


def bootstrap_ci(
    values: Float[Tensor, "units prompts"], n_boot: int = 2000, level: float = 0.95, seed: int = 0
) -> tuple[float, float, float]:
    """(mean, low, high): the mean of a [units, prompts] grid and a percentile interval from
    resampling units and prompts independently (both are samples: the claim is about units
    and prompts in general, not these)."""
    v = values.double()
    if v.ndim != 2 or v.numel() == 0:
        raise ValueError(f"values must be a non-empty [units, prompts] grid, got shape {tuple(v.shape)}")
    g = torch.Generator().manual_seed(seed)
    u = torch.randint(v.shape[0], (n_boot, v.shape[0]), generator=g)
    p = torch.randint(v.shape[1], (n_boot, v.shape[1]), generator=g)
    means = v[u[:, :, None], p[:, None, :]].mean((1, 2))  # [n_boot]: each resampled grid's mean
    lo, hi = torch.quantile(means, torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=means.dtype)).tolist()
    return float(v.mean()), lo, hi


@dataclass
class SteeringResult:
    """Steering effects of several units of one module (see `evaluate_steering`)."""

    units: list[int]
    """The steered units."""
    control_units: list[int]
    """The random unit steered in each unit's place (the equally strong control)."""
    values: list[float]
    """The constant added to each unit (strength x its peak activation on the corpus sample)."""
    control_values: list[float]
    """The constant added to each control unit (the same multiple of its own peak)."""
    target_tokens: list[list[int]]
    """Each unit's top-context tokens: the tokens at and after its peak activations."""
    hit_rate: dict[str, list[list[float]]]
    """Condition ('base', 'unit', 'random_unit', 'random_direction') -> [unit][prompt]:
    share of the generated tokens that are among the unit's top-context tokens."""
    prob_mass: dict[str, list[list[float]]]
    """Same, for the probability the model gives those tokens, averaged over the generated steps."""
    effects: dict[str, dict[str, float]]
    """Effect name -> {'mean', 'low', 'high'} (95% interval over units and prompts)."""
    direction_cosine: dict[str, float]
    """How the steering direction varies with the input: the mean pairwise cosine between
    a unit's output directions (`unit_contribution`) at the prompts' last tokens, averaged
    over units ('mean'), and its smallest unit average ('min'). 1 for a fixed decoder row."""
    examples: list[dict[str, str]] = field(default_factory=list)
    """A few generations per condition, for reading."""


def _pairwise_cosine(d: Float[Tensor, "n d"]) -> float:
    d = d / d.norm(dim=-1, keepdim=True).clamp_min(1e-30)
    c = d @ d.T
    n = d.shape[0]
    return float((c.sum() - c.diagonal().sum()) / (n * (n - 1)))


@torch.no_grad()
def evaluate_steering(
    model: HookedTransformer,
    layer: int,
    corpus_rows: Int[Tensor, "rows ctx"],
    n_units: int = 8,
    strength: float = 4.0,
    prompts: Sequence[str] = NEUTRAL_PROMPTS,
    n_new: int = 16,
    n_contexts: int = 20,
    min_frequency: float = 1e-3,
    max_frequency: float = 0.05,
    seed: int = 0,
    progress: bool = True,
) -> SteeringResult:
    """Steer `n_units` units of the replacement attached at `layer` (attach it with
    `use_error_term=True`, so that unsteered generation is the model's own) and score the
    generations from neutral prompts.

    Units are drawn (seeded) among those active on between `min_frequency` and
    `max_frequency` of the corpus sample's tokens (specific, not dead, not dense); each
    unit's target tokens are the tokens at and right after its `n_contexts` strongest
    activations (special positions excluded). Each unit n is steered by adding
    `strength` x its peak activation, after TopK; the controls are (1) a different random
    eligible unit steered by the same multiple of its own peak, and (2) a random direction
    added to the MLP output with, at every position, the norm of unit n's addition.
    Effects (generated-token hit rate on the unit's targets, minus unsteered): 'unit',
    'unit - random_unit', 'unit - random_direction', and the same for the probability
    mass ('mass: ...'), each with a 95% interval over units and prompts.
    """
    from mxd_lens.circuits.experts import collect_activations
    from mxd_lens.model_io import special_positions, special_token_ids

    site = find_site(model, layer)
    module = site.module
    if not prompts:
        raise ValueError("prompts is empty; expected some neutral prompts")
    if n_units < 2:
        raise ValueError(f"n_units={n_units}; the interval needs at least 2 units")
    acts = collect_activations(model, layer, corpus_rows, progress=progress)
    specials = special_token_ids(model)
    special = special_positions(acts.tokens, specials)
    # Frequencies over text positions only: the separator's attention-sink activations are
    # not what a unit is about (and a unit must fire on text at least once to have contexts).
    text = ~special
    fired = acts.indices[text][acts.values[text] > 0].long()
    freq = torch.bincount(fired, minlength=acts.n_units).float() / max(1, int(text.sum()))
    eligible = ((freq >= min_frequency) & (freq <= max_frequency) & (freq > 0)).nonzero().flatten()
    if eligible.numel() < 2 * n_units:
        raise ValueError(
            f"only {eligible.numel()} units fire on between {min_frequency} and {max_frequency} of the "
            f"{acts.tokens.numel()} corpus tokens; {2 * n_units} are needed ({n_units} units and as many "
            "controls): give more corpus rows, fewer units, or a wider frequency range"
        )
    g = torch.Generator().manual_seed(seed)
    drawn = eligible[torch.randperm(eligible.numel(), generator=g)[: 2 * n_units]].tolist()
    units, controls = drawn[:n_units], drawn[n_units:]

    def peak_and_targets(u: int) -> tuple[float, list[int]]:
        ctx = [c for c in acts.top_contexts(u, 4 * n_contexts) if not special[c.row, c.pos]][:n_contexts]
        row_len = acts.tokens.shape[1]
        toks = {int(acts.tokens[c.row, c.pos]) for c in ctx}
        toks |= {int(acts.tokens[c.row, c.pos + 1]) for c in ctx if c.pos + 1 < row_len}
        return (ctx[0].value if ctx else 0.0), sorted(t for t in toks if t not in specials)

    info = [peak_and_targets(u) for u in units]
    values = [strength * peak for peak, _ in info]
    targets = [t for _, t in info]
    control_values = [strength * peak_and_targets(c)[0] for c in controls]
    directions = random_unit_directions(n_units, module.cfg.d_out, seed + 1)

    conditions = ("base", "unit", "random_unit", "random_direction")
    hit = {c: torch.zeros(n_units, len(prompts)) for c in conditions}
    mass = {c: torch.zeros(n_units, len(prompts)) for c in conditions}
    cosines = torch.zeros(n_units)
    last_inputs = []
    examples: list[dict[str, str]] = []
    tok = model.tokenizer
    bar = range(len(prompts))
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(bar, desc="steering", unit="prompt")
    for p in bar:
        ids = [0, *tok(prompts[p], add_special_tokens=False)["input_ids"]]
        one = torch.tensor([ids])
        with capture_mlp_io(model, [layer]) as seen:
            model(one.to(model.cfg.device), stop_at_layer=layer + 1)
        last_inputs.append(seen[layer][0][0, -1])
        # rows: 1 unsteered, n_units by unit, n_units by control unit, n_units by direction
        n = n_units
        batch = one.expand(1 + 3 * n, -1)
        row_units = [None] + units + controls + [None] * n
        row_values = [0.0] + values + control_values + [0.0] * n
        dir_units = [None] * (1 + 2 * n) + units
        dir_values = [0.0] * (1 + 2 * n) + values
        dirs = torch.cat([torch.zeros(1 + 2 * n, module.cfg.d_out), directions])
        dirs[: 1 + 2 * n, 0] = 1.0  # unused rows: any unit vector (their norm is 0)
        with steer_rows(model, layer, row_units, row_values), steer_rows_random_direction(
            model, layer, dir_units, dir_values, dirs
        ):
            gen, probs = greedy_generate(model, batch, n_new)
        for i, t in enumerate(targets):
            t_ids = torch.tensor(t, dtype=torch.long)
            for cond, row in (("base", 0), ("unit", 1 + i), ("random_unit", 1 + n + i), ("random_direction", 1 + 2 * n + i)):
                hit[cond][i, p] = torch.isin(gen[row], t_ids).float().mean() if t else 0.0
                mass[cond][i, p] = probs[row][:, t_ids].sum(-1).mean() if t else 0.0
        if p < 2:
            examples.append({"prompt": prompts[p], **{c: tok.decode(gen[r]) for c, r in
                             (("base", 0), ("unit", 1), ("random_unit", 1 + n), ("random_direction", 1 + 2 * n))}})
    x_last = torch.stack(last_inputs)
    for i, u in enumerate(units):
        d = module.unit_contribution(x_last, u, torch.ones(x_last.shape[0], device=x_last.device)).float().cpu()
        cosines[i] = _pairwise_cosine(d) if d.shape[0] > 1 else 1.0
    effects = {}
    for name, table in (("hit", hit), ("mass", mass)):
        prefix = "" if name == "hit" else "mass: "
        unit_d = table["unit"] - table["base"]
        for label, diff in (
            ("unit", unit_d),
            ("unit - random_unit", unit_d - (table["random_unit"] - table["base"])),
            ("unit - random_direction", unit_d - (table["random_direction"] - table["base"])),
            ("random_unit", table["random_unit"] - table["base"]),
            ("random_direction", table["random_direction"] - table["base"]),
        ):
            m, lo, hi = bootstrap_ci(diff, seed=seed)
            effects[prefix + label] = {"mean": m, "low": lo, "high": hi}
    return SteeringResult(
        units=units,
        control_units=controls,
        values=values,
        control_values=control_values,
        target_tokens=targets,
        hit_rate={c: v.tolist() for c, v in hit.items()},
        prob_mass={c: v.tolist() for c, v in mass.items()},
        effects=effects,
        direction_cosine={"mean": float(cosines.mean()), "min": float(cosines.min())},
        examples=examples,
    )


__all__ += [
    "steer_rows",
    "steer_rows_random_direction",
    "random_unit_directions",
    "greedy_generate",
    "bootstrap_ci",
    "evaluate_steering",
    "SteeringResult",
    "NEUTRAL_PROMPTS",
]
