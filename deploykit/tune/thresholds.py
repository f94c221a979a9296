"""Choosing exit thresholds: pure numpy functions over every exit's scores and correctness on a held-out split.

A threshold vector is simulated exactly (each row exits at the first stage whose score reaches its threshold), so
a sweep over candidate thresholds gives the whole accuracy-FLOPs curve without re-running any graph.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from deploykit.errors import ConfigError


@dataclass
class Sweep:
    """Every threshold combination tried, with its accuracy and expected FLOPs ratio."""

    thresholds: np.ndarray  # [M, K-1] (inf = exit disabled)
    accuracy: np.ndarray  # [M]
    flops_ratio: np.ndarray  # [M]


def first_exit(scores: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Stage at which each row exits: ``scores [K, N]`` (last row unused), ``thresholds [..., K-1]`` -> ``[..., N]``."""
    early = scores[:-1]
    k = early.shape[0]
    if k == 0:
        return np.zeros(thresholds.shape[:-1] + (scores.shape[1],), dtype=np.int64)
    hit = early >= thresholds[..., :, None]  # [..., K-1, N]
    return np.where(hit.any(axis=-2), hit.argmax(axis=-2), k)


def simulate(scores: np.ndarray, correct: np.ndarray, cum_cost: np.ndarray, full_cost: float,
             thresholds: np.ndarray) -> tuple[float, float, np.ndarray]:
    """Accuracy, FLOPs ratio and exit fractions of one threshold vector (``None``/inf entries disable an exit)."""
    thr = np.asarray([np.inf if t is None else t for t in thresholds], dtype=np.float64)[: scores.shape[0] - 1]
    stage = first_exit(scores, thr)
    n = scores.shape[1]
    acc = float(correct[stage, np.arange(n)].mean())
    flops = float(cum_cost[stage].mean() / full_cost)
    fractions = np.bincount(stage, minlength=scores.shape[0]) / n
    return acc, flops, fractions


def candidate_thresholds(scores: np.ndarray, levels: int) -> list[np.ndarray]:
    """Per early exit: its scores' quantiles (so every candidate moves some rows) plus inf (exit disabled)."""
    q = np.linspace(0.0, 1.0, levels)
    return [np.unique(np.r_[np.quantile(s, q), np.inf]) for s in scores[:-1]]


def sweep(scores: np.ndarray, correct: np.ndarray, cum_cost: np.ndarray, full_cost: float,
          levels: int | None = None, chunk: int = 4096) -> Sweep:
    """Evaluate a grid of threshold combinations (quantile candidates per early exit)."""
    k_early = scores.shape[0] - 1
    if levels is None:  # keep the grid near 40k combinations whatever the number of exits
        levels = max(4, int(round(40000 ** (1.0 / max(k_early, 1)))) - 1)
    cands = candidate_thresholds(scores, levels)
    combos = np.asarray(list(itertools.product(*cands)), dtype=np.float64).reshape(-1, k_early)
    n = scores.shape[1]
    acc = np.empty(len(combos))
    flops = np.empty(len(combos))
    cols = np.arange(n)
    for lo in range(0, len(combos), chunk):
        stage = first_exit(scores, combos[lo:lo + chunk])  # [m, N]
        acc[lo:lo + chunk] = correct[stage, cols].mean(axis=1)
        flops[lo:lo + chunk] = cum_cost[stage].mean(axis=1) / full_cost
    return Sweep(combos, acc, flops)


def pareto_front(acc: np.ndarray, flops: np.ndarray) -> np.ndarray:
    """Indices of combinations no other beats on both accuracy and FLOPs, sorted by FLOPs."""
    order = np.lexsort((-acc, flops))
    front, best = [], -np.inf
    for i in order:
        if acc[i] > best:
            front.append(i)
            best = acc[i]
    return np.asarray(front, dtype=np.int64)


def choose(sw: Sweep, full_accuracy: float, max_drop: float | None = None,
           flops_budget: float | None = None) -> int:
    """Index of the chosen combination.

    ``max_drop`` (accuracy points): least FLOPs whose accuracy is within the drop of full depth.
    ``flops_budget`` (fraction of full FLOPs): best accuracy within the budget.
    Ties go to the more accurate, then the cheaper combination.
    """
    if (max_drop is None) == (flops_budget is None):
        raise ConfigError("give exactly one of --max-drop (accuracy points) or --flops-budget (fraction of full FLOPs)")
    if max_drop is not None:
        if max_drop < 0:
            raise ConfigError(f"--max-drop must be >= 0 accuracy points, got {max_drop}")
        ok = np.flatnonzero(sw.accuracy >= full_accuracy - max_drop / 100.0 - 1e-12)
        return int(ok[np.lexsort((-sw.accuracy[ok], sw.flops_ratio[ok]))[0]])
    assert flops_budget is not None
    if not 0 < flops_budget <= 1.5:
        raise ConfigError(f"--flops-budget is a fraction of the full model's FLOPs, e.g. 0.6; got {flops_budget}")
    ok = np.flatnonzero(sw.flops_ratio <= flops_budget + 1e-12)
    if len(ok) == 0:
        cheapest = float(sw.flops_ratio.min())
        raise ConfigError(f"no thresholds reach a FLOPs budget of {flops_budget:.2f}; the cheapest possible is "
                          f"{cheapest:.3f} (everything exits at the first stage)")
    return int(ok[np.lexsort((sw.flops_ratio[ok], -sw.accuracy[ok]))[0]])
