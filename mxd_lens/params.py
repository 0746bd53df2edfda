"""Parameter counts and the paper's parameter matching of MxDs against transcoders.

The counts are checked in the tests against `sum(p.numel())` of real modules, so they
cannot drift from the modules they describe.
"""

from __future__ import annotations


def transcoder_n_params(d_in: int, d_out: int, d_sae: int, skip: bool = False) -> int:
    """W_enc, b_enc, W_dec, b_dec (+ W_skip): I*W + W + W*O + O (+ I*O)."""
    return d_in * d_sae + d_sae + d_sae * d_out + d_out + (d_in * d_out if skip else 0)


def mxd_n_params(d_in: int, d_out: int, d_hidden: int, n_experts: int, glu: bool = False) -> int:
    """E, b_E (+ E_glu), D, b: the dense branch; G, b_G, C: (I + 1 + O) per expert."""
    dense = d_in * d_hidden * (2 if glu else 1) + d_hidden + d_hidden * d_out + d_out
    return dense + n_experts * (d_in + 1 + d_out)


def match_n_experts(d_in: int, d_out: int, d_hidden: int, transcoder_width: int, glu: bool = False) -> int:
    """The largest number of experts whose MxD has no more parameters than a
    TopKTranscoder of width `transcoder_width` (the paper's fair comparison).

    GPT-2 sizes (768, 768, 3072) with width 32*768 give 21,504 experts.
    """
    for name, value in (("d_in", d_in), ("d_out", d_out), ("d_hidden", d_hidden), ("transcoder_width", transcoder_width)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r} must be a positive integer")
    budget = transcoder_n_params(d_in, d_out, transcoder_width)
    dense = mxd_n_params(d_in, d_out, d_hidden, 0, glu)
    n = (budget - dense) // (d_in + 1 + d_out)
    if n < 1:
        raise ValueError(
            f"a transcoder of width {transcoder_width} has {budget:,} parameters, but an MxD with "
            f"d_hidden={d_hidden}{' (gated)' if glu else ''} needs {dense + d_in + 1 + d_out:,} for a "
            "single expert; use a wider transcoder or a smaller d_hidden"
        )
    return n
