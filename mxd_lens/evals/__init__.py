"""Evaluation of replacement layers on held-out text: reconstruction (NMSE), next-token
CE with the layers spliced in against clean and ablated baselines, KL, sparsity, unit
usage and (for MxDs) an expert-collapse check.

    report = evaluate_many(model, {"mxd_k32": {12: mxd}, "tc_k32": {12: tc}}, tokens)
    report.baselines.ce_clean, report.results["mxd_k32"].delta_ce
"""

from mxd_lens.architectures.mxd import expert_cosine
from mxd_lens.evals.results import CEBaselines, EvalReport, EvalResult
from mxd_lens.evals.runner import evaluate, evaluate_many, mlp_output_means

__all__ = [
    "CEBaselines",
    "EvalResult",
    "EvalReport",
    "evaluate",
    "evaluate_many",
    "expert_cosine",
    "mlp_output_means",
]
