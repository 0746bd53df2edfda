"""Learning curves: held-out NMSE and delta CE of every module against training tokens.

`fit(..., on_step=LearningCurves(...))` measures the modules at log-spaced optimizer
steps on a fixed small held-out set (`mxd_lens.evals.HeldoutProbe`: its clean pass is
run once), exactly as `evaluate_many` would measure a checkpoint taken at that step on
the same rows. The curves show the budget dependence: whether, and where, the methods'
curves cross.
"""

from __future__ import annotations

import math
import time
from typing import Any, Mapping

from mxd_lens.architectures.base import Replacement


def curve_steps(total_steps: int, n_points: int) -> list[int]:
    """`n_points` log-spaced optimizer steps in 1..total_steps (fewer when they collide),
    the last step included; empty for n_points == 0."""
    if n_points <= 0 or total_steps <= 0:
        return []
    if n_points == 1:
        return [total_steps]
    ratio = math.log(total_steps) / (n_points - 1)
    steps = sorted({max(1, min(total_steps, round(math.exp(i * ratio)))) for i in range(n_points)})
    if steps[-1] != total_steps:
        steps.append(total_steps)
    return steps


class LearningCurves:
    """An `on_step` callback for `mxd_lens.training.fit` recording, at `steps`, each
    module's figures on `probe` (a `HeldoutProbe` of the modules' layer).

    `names` maps fit's module names to the names the curves are stored under (the run's
    module folders); modules not in it are not measured."""

    KEYS = ("nmse", "delta_ce", "delta_ce_stderr", "ce_recovered", "l0", "dead_fraction")

    def __init__(self, probe: Any, layer: int, names: Mapping[str, str], steps: list[int], batch_size: int) -> None:
        self.probe = probe
        self.layer = layer
        self.names = dict(names)
        self.steps = set(steps)
        self.batch_size = batch_size
        self.points: dict[str, list[dict[str, Any]]] = {name: [] for name in self.names.values()}
        self.seconds = 0.0
        """Time spent measuring (inside the training's time)."""

    def __call__(self, step: int, modules: Mapping[str, Replacement]) -> None:
        if step not in self.steps:
            return
        t = time.perf_counter()
        candidates = {self.names[n]: {self.layer: m} for n, m in modules.items() if n in self.names}
        for name, r in self.probe.measure(candidates).items():
            self.points[name].append(
                {"step": step, "tokens": step * self.batch_size, **{k: getattr(r, k) for k in self.KEYS}}
            )
        self.seconds += time.perf_counter() - t

    def to_dict(self) -> dict[str, Any]:
        """{'layer', 'eval_tokens' (predictions), 'ce_clean', 'ce_zero_ablation', 'modules':
        {name: [points]}, 'crossings': [...]}, JSON-ready."""
        b = self.probe.baselines
        return {
            "layer": self.layer,
            "eval_tokens": b.n_tokens,
            "ce_clean": b.ce_clean,
            "ce_zero_ablation": b.ce_zero_ablation,
            "modules": self.points,
            "crossings": crossings(self.points),
        }


def crossings(points: Mapping[str, list[dict[str, Any]]], key: str = "delta_ce") -> list[dict[str, Any]]:
    """Where two modules of the same K swap order in `key` between consecutive points:
    [{'a', 'b', 'key', 'between_tokens': [t0, t1], 'leader_after', 'clear'}] (names
    '<method>_k<K>'). `clear`: at both points the two differ by more than the larger of
    their stderrs (`key`_stderr), so the swap is not just noise on the small curve set."""
    from mxd_lens import registry

    by_k: dict[int, list[str]] = {}
    for name in points:
        try:
            _, k = registry.parse_module_folder_name(name)
        except ValueError:
            continue
        by_k.setdefault(k, []).append(name)
    out = []
    for names in by_k.values():
        for i, a in enumerate(names):
            for b in names[i + 1:]:
                pa, pb = points[a], points[b]
                for (a0, b0), (a1, b1) in zip(zip(pa, pb), zip(pa[1:], pb[1:])):
                    if None in (a0[key], b0[key], a1[key], b1[key]):
                        continue
                    if (a0[key] - b0[key]) * (a1[key] - b1[key]) < 0:
                        clear = all(
                            abs(p[key] - q[key]) > max(p.get(f"{key}_stderr") or 0.0, q.get(f"{key}_stderr") or 0.0)
                            for p, q in ((a0, b0), (a1, b1))
                        )
                        out.append({"a": a, "b": b, "key": key, "between_tokens": [a0["tokens"], a1["tokens"]],
                                    "leader_after": a if a1[key] < b1[key] else b, "clear": clear})
    return out


__all__ = ["LearningCurves", "crossings", "curve_steps"]
