"""Evaluation of replacement layers on held-out text: reconstruction (NMSE), next-token
CE with the layers spliced in against clean and ablated baselines, KL, sparsity, unit
usage and (for MxDs) an expert-collapse check.

    report = evaluate_many(model, {"mxd_k32": {12: mxd}, "tc_k32": {12: tc}}, tokens)
    report.baselines.ce_clean, report.results["mxd_k32"].delta_ce

Positions holding special tokens keep the clean MLP output by default (for every
candidate and both ablations) and are left out of NMSE and unit statistics; the
baselines say how much of the MLP's output energy and ablation effect sit there and flag
massive activations that remain. Standard errors take rows as the independent units.
"""

from mxd_lens.architectures.mxd import expert_cosine
from mxd_lens.evals.results import CEBaselines, EvalReport, EvalResult
from mxd_lens.evals.runner import HeldoutProbe, ablation_baselines, evaluate, evaluate_many, keep_clean_outputs, mlp_output_means

__all__ = [
    "CEBaselines",
    "EvalResult",
    "EvalReport",
    "HeldoutProbe",
    "ablation_baselines",
    "evaluate",
    "evaluate_many",
    "expert_cosine",
    "keep_clean_outputs",
    "mlp_output_means",
]
