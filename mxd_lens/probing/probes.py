"""Sparse probing on mean-pooled unit activations (Oldfield et al. 2025; SAEBench).

For one binary task (train and test features, 0/1 labels):

1. rank the units by the difference of the class means on the training split
   (|mean over positives - mean over negatives|);
2. single-unit probes: for each of the `top_m` best-ranked units (the paper: 100), a
   one-feature logistic regression fit on the training split; the best test F1 among
   them (and that unit's test accuracy) is the task's "best single unit" figure, as the
   paper reports it. Choosing the best of `top_m` on the test split itself flatters every
   method (and most the ones with many units); `selected_f1` is the honest companion:
   the test F1 of the unit whose probe has the best *training* F1;
3. k-sparse probes (SAEBench): one logistic regression on the top-k ranked units
   together, for each k in `ks` (1, 2, 5, 20), scored on the test split.

A multi-class task becomes one balanced binary task per class, class c against an equal
number of texts drawn evenly from the other classes (SAEBench's one-vs-rest), and its F1
and accuracy are averaged over the classes.

Features are standardised with the training split's mean and standard deviation before
each fit (logistic regression's L2 penalty then treats every unit alike, whatever its
scale); a unit constant on the training split is left at zero.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "DEFAULT_KS",
    "BinaryResult",
    "TaskResult",
    "f1_score",
    "accuracy",
    "mean_diff_ranking",
    "one_vs_rest",
    "probe_binary",
    "probe_task",
]

DEFAULT_KS: tuple[int, ...] = (1, 2, 5, 20)
"""The k of SAEBench's k-sparse probes."""


def f1_score(y_true: Sequence[int] | np.ndarray, y_pred: Sequence[int] | np.ndarray) -> float:
    """Binary F1 of the positive class (label 1): 2 TP / (2 TP + FP + FN); 0 when there is
    no positive in either (scikit-learn's `zero_division=0`)."""
    t = np.asarray(y_true).astype(bool)
    p = np.asarray(y_pred).astype(bool)
    if t.shape != p.shape:
        raise ValueError(f"y_true has shape {t.shape} but y_pred has shape {p.shape}")
    tp = int((t & p).sum())
    denom = 2 * tp + int((~t & p).sum()) + int((t & ~p).sum())
    return 0.0 if denom == 0 else 2 * tp / denom


def accuracy(y_true: Sequence[int] | np.ndarray, y_pred: Sequence[int] | np.ndarray) -> float:
    """Share of equal labels."""
    t, p = np.asarray(y_true), np.asarray(y_pred)
    if t.shape != p.shape:
        raise ValueError(f"y_true has shape {t.shape} but y_pred has shape {p.shape}")
    return float((t == p).mean())


def mean_diff_ranking(x: Tensor | np.ndarray, y: Sequence[int] | np.ndarray) -> np.ndarray:
    """Unit indices sorted by |mean over y == 1 - mean over y == 0|, largest first (ties
    broken by index, so the order is reproducible)."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y).astype(bool)
    if not y.any() or y.all():
        raise ValueError("mean_diff_ranking needs both classes in y")
    diff = np.abs(x[y].mean(0) - x[~y].mean(0))
    return np.lexsort((np.arange(diff.size), -diff))


def _standardise(train: np.ndarray, test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mu = train.mean(0)
    sd = train.std(0)
    sd = np.where(sd > 0, sd, np.inf)  # a constant unit becomes 0 on both splits
    return (train - mu) / sd, (test - mu) / sd


def _fit_predict(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(predictions on the training split, on the test split) of a logistic regression."""
    from sklearn.linear_model import LogisticRegression

    x_train, x_test = _standardise(x_train, x_test)
    clf = LogisticRegression(max_iter=1000)
    clf.fit(x_train, y_train)
    return clf.predict(x_train), clf.predict(x_test)


@dataclass
class BinaryResult:
    """Probing figures of one binary task on the test split."""

    best_unit: int
    """The unit whose one-feature probe has the best test F1."""
    best_f1: float
    """That probe's test F1."""
    best_accuracy: float
    """That probe's test accuracy."""
    selected_unit: int
    """The unit whose one-feature probe has the best training F1 (ties: better ranked)."""
    selected_f1: float
    """That probe's test F1 (a single unit chosen without looking at the test split)."""
    selected_accuracy: float
    """That probe's test accuracy."""
    k_sparse: dict[int, dict[str, float]] = field(default_factory=dict)
    """k -> {'f1', 'accuracy'} of the probe on the top-k ranked units."""


def probe_binary(
    x_train: Tensor | np.ndarray,
    y_train: Sequence[int] | np.ndarray,
    x_test: Tensor | np.ndarray,
    y_test: Sequence[int] | np.ndarray,
    top_m: int = 100,
    ks: Sequence[int] = DEFAULT_KS,
) -> BinaryResult:
    """Single-unit probes on the `top_m` best-ranked units and k-sparse probes (see the
    module docstring) for one binary task."""
    x_train = np.asarray(x_train, dtype=np.float64)
    x_test = np.asarray(x_test, dtype=np.float64)
    y_train = np.asarray(y_train).astype(int)
    y_test = np.asarray(y_test).astype(int)
    if x_train.ndim != 2 or x_test.ndim != 2 or x_train.shape[1] != x_test.shape[1]:
        raise ValueError(f"x_train {x_train.shape} and x_test {x_test.shape} must be [texts, units] of one width")
    if len(y_train) != len(x_train) or len(y_test) != len(x_test):
        raise ValueError(f"{len(y_train)} / {len(y_test)} labels for {len(x_train)} / {len(x_test)} texts")
    if top_m < 1:
        raise ValueError(f"top_m={top_m}; expected at least 1")
    bad = [k for k in ks if not 1 <= k]
    if bad:
        raise ValueError(f"ks {bad}; expected positive integers")
    order = mean_diff_ranking(x_train, y_train)
    best = (-1.0, -1.0, -1)
    selected = (-1.0, -1.0, -1.0, -1)  # (train F1, test F1, test accuracy, unit)
    for unit in order[: min(top_m, order.size)]:
        fit, pred = _fit_predict(x_train[:, [unit]], y_train, x_test[:, [unit]])
        f1 = f1_score(y_test, pred)
        if f1 > best[0]:
            best = (f1, accuracy(y_test, pred), int(unit))
        train_f1 = f1_score(y_train, fit)
        if train_f1 > selected[0]:
            selected = (train_f1, f1, accuracy(y_test, pred), int(unit))
    result = BinaryResult(best_unit=best[2], best_f1=best[0], best_accuracy=best[1], selected_unit=selected[3],
                          selected_f1=selected[1], selected_accuracy=selected[2])
    for k in ks:
        units = order[: min(k, order.size)]
        _, pred = _fit_predict(x_train[:, units], y_train, x_test[:, units])
        result.k_sparse[int(k)] = {"f1": f1_score(y_test, pred), "accuracy": accuracy(y_test, pred)}
    return result


def one_vs_rest(labels: Sequence[int], positive: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(indices, 0/1 labels) of a balanced binary task: every text of class `positive`
    and as many others, drawn as evenly as possible from each other class (seeded)."""
    labels = np.asarray(labels)
    pos = np.flatnonzero(labels == positive)
    others = [c for c in np.unique(labels) if c != positive]
    if pos.size == 0 or not others:
        raise ValueError(f"class {positive} needs texts of its own and of another class")
    rng = np.random.default_rng([seed, int(positive)])
    pools = {c: list(rng.permutation(np.flatnonzero(labels == c))) for c in others}
    neg: list[int] = []
    while len(neg) < pos.size and any(pools.values()):
        for c in others:  # round robin: as even a draw as the class sizes allow
            if pools[c] and len(neg) < pos.size:
                neg.append(pools[c].pop())
    idx = np.concatenate([pos, np.asarray(neg, dtype=int)])
    return idx, np.concatenate([np.ones(pos.size, int), np.zeros(len(neg), int)])


@dataclass
class TaskResult:
    """Probing figures of one task (averaged over its one-vs-rest binary tasks)."""

    task: str
    """Task name."""
    method: str
    """The feature source (module folder name, 'mlp_neurons', 'random')."""
    n_units: int
    """Number of units the source has."""
    best_f1: float
    """Best single-unit test F1, averaged over the classes."""
    best_accuracy: float
    """Test accuracy of those units, averaged over the classes."""
    selected_f1: float
    """Test F1 of the single unit chosen on the training split, averaged over the classes."""
    selected_accuracy: float
    """Its test accuracy, averaged over the classes."""
    k_sparse: dict[int, dict[str, float]]
    """k -> {'f1', 'accuracy'} averaged over the classes."""
    per_class: dict[str, dict]
    """Class -> its BinaryResult as a dict."""

    def to_dict(self) -> dict:
        d = asdict(self)
        d["k_sparse"] = {str(k): v for k, v in self.k_sparse.items()}
        for v in d["per_class"].values():
            v["k_sparse"] = {str(k): s for k, s in v["k_sparse"].items()}
        return d


def probe_task(
    task: str,
    method: str,
    classes: Sequence[str],
    x_train: Tensor,
    y_train: Sequence[int],
    x_test: Tensor,
    y_test: Sequence[int],
    top_m: int = 100,
    ks: Sequence[int] = DEFAULT_KS,
    seed: int = 0,
) -> TaskResult:
    """Probe a task of `len(classes)` classes: one balanced binary task per class when
    there are more than two, the task itself when there are two."""
    x_train = torch.as_tensor(x_train).double().numpy()
    x_test = torch.as_tensor(x_test).double().numpy()
    y_train = np.asarray(y_train)
    y_test = np.asarray(y_test)
    positives = [1] if len(classes) == 2 else list(range(len(classes)))
    per_class: dict[str, BinaryResult] = {}
    for c in positives:
        if len(classes) == 2:
            tr, ytr = np.arange(len(y_train)), (y_train == 1).astype(int)
            te, yte = np.arange(len(y_test)), (y_test == 1).astype(int)
        else:
            tr, ytr = one_vs_rest(y_train, c, seed)
            te, yte = one_vs_rest(y_test, c, seed + 1)
        per_class[classes[c]] = probe_binary(x_train[tr], ytr, x_test[te], yte, top_m, ks)
    results = list(per_class.values())
    k_sparse = {
        int(k): {m: float(np.mean([r.k_sparse[int(k)][m] for r in results])) for m in ("f1", "accuracy")} for k in ks
    }
    return TaskResult(
        task=task,
        method=method,
        n_units=int(x_train.shape[1]),
        best_f1=float(np.mean([r.best_f1 for r in results])),
        best_accuracy=float(np.mean([r.best_accuracy for r in results])),
        selected_f1=float(np.mean([r.selected_f1 for r in results])),
        selected_accuracy=float(np.mean([r.selected_accuracy for r in results])),
        k_sparse=k_sparse,
        per_class={name: asdict(r) for name, r in per_class.items()},
    )
