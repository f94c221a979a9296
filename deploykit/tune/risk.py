"""Distribution-free risk control for exit thresholds: losses, p-values, upper confidence bounds, Learn-then-Test.

The statement ``calibrate --max-drop ε --confidence 1-δ`` makes is: *with probability at least 1 - δ over the draw
of the calibration sample, the expected loss on new data from the same distribution is at most ε* (Learn then Test,
Angelopoulos et al. 2021). Both losses are 0/1 per sample and bound the accuracy drop from above:

- ``consistency``: the cascade's prediction differs from the full-depth prediction (needs no labels);
- ``accuracy``: the full-depth prediction is right and the cascade's is wrong.

Each candidate threshold λ is a hypothesis ``H_λ: R(λ) > ε``; a valid p-value for it comes from the number of
losses on the n calibration samples. Candidates are tested in a fixed order, most conservative first (fixed-sequence
testing, as CALM does along its threshold path, Schuster et al. 2022): stop at the first one not rejected at level
δ. Every rejected hypothesis is certified at family-wise error δ without a multiplicity correction, because the order
was fixed before looking at the data. Nothing rejected -> no threshold is certified -> full depth.

Pure numpy + math: no graphs, no files.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

BOUNDS = ("binomial", "hb")
LOSSES = ("consistency", "accuracy")


# ---- losses ------------------------------------------------------------------------------------------------------
def consistency_loss(pred: np.ndarray, full_pred: np.ndarray) -> np.ndarray:
    """1 where the cascade's prediction differs from the full-depth prediction (``[..., N]`` vs ``[N]``)."""
    return (np.asarray(pred) != np.asarray(full_pred)).astype(np.int8)


def accuracy_loss(correct: np.ndarray, full_correct: np.ndarray) -> np.ndarray:
    """1 where full depth is right and the cascade is wrong (the accuracy drop is at most its mean)."""
    return (np.asarray(full_correct, bool) & ~np.asarray(correct, bool)).astype(np.int8)


# ---- p-values for H0: R > alpha, from k losses out of n ------------------------------------------------------------
def binom_cdf(k: int, n: int, p: float) -> float:
    """``P(Binomial(n, p) <= k)``, summed in log space (exact to float precision for any n)."""
    if k < 0:
        return 0.0
    if k >= n or p <= 0.0:
        return 1.0
    if p >= 1.0:
        return 0.0
    i = np.arange(k + 1, dtype=np.float64)
    lg = np.vectorize(math.lgamma)
    logs = (math.lgamma(n + 1) - lg(i + 1) - lg(n - i + 1) + i * math.log(p) + (n - i) * math.log1p(-p))
    return float(min(1.0, math.exp(np.logaddexp.reduce(logs))))


def binomial_pvalue(losses: int, n: int, alpha: float) -> float:
    """Exact p-value for 0/1 losses: under ``R > alpha`` the loss count dominates ``Binomial(n, alpha)``."""
    return binom_cdf(int(losses), int(n), float(alpha))


def _kl_bernoulli(a: float, b: float) -> float:
    out = 0.0
    if a > 0:
        out += a * math.log(a / b)
    if a < 1:
        out += (1 - a) * math.log((1 - a) / (1 - b))
    return out


def hoeffding_pvalue(risk: float, n: int, alpha: float) -> float:
    """Hoeffding's (KL form) p-value ``exp(-n h(min(r, a), a))`` for losses in [0, 1]."""
    if alpha <= 0:
        return 1.0
    if alpha >= 1:
        return 0.0
    return math.exp(-n * _kl_bernoulli(min(risk, alpha), alpha))


def bentkus_pvalue(risk: float, n: int, alpha: float) -> float:
    """Bentkus' p-value ``e * P(Binomial(n, a) <= ceil(n r))`` for losses in [0, 1]."""
    return min(1.0, math.e * binom_cdf(math.ceil(n * risk - 1e-9), n, alpha))


def hb_pvalue(risk: float, n: int, alpha: float) -> float:
    """Hoeffding–Bentkus: the smaller of the two (Bates et al. 2021); valid for any loss in [0, 1]."""
    return min(hoeffding_pvalue(risk, n, alpha), bentkus_pvalue(risk, n, alpha))


def pvalue(losses: np.ndarray, alpha: float, bound: str = "binomial") -> float:
    """p-value of ``H0: E[loss] > alpha`` from one candidate's per-sample losses (``bound``: binomial or hb)."""
    losses = np.asarray(losses)
    n = int(losses.size)
    if n == 0:
        return 1.0
    if bound == "binomial":
        if not np.isin(losses, (0, 1)).all():
            raise ValueError("the binomial bound needs 0/1 losses; use the hb bound for losses in [0, 1]")
        return binomial_pvalue(int(losses.sum()), n, alpha)
    if bound == "hb":
        return hb_pvalue(float(losses.mean()), n, alpha)
    raise ValueError(f"unknown bound {bound!r}; expected one of {BOUNDS}")


def upper_bound(losses: np.ndarray, delta: float, bound: str = "binomial", tol: float = 1e-7) -> float:
    """Upper confidence bound on ``E[loss]`` at level ``1 - delta``: the least ``alpha`` with p-value <= delta."""
    losses = np.asarray(losses)
    if losses.size == 0:
        return 1.0
    lo, hi = float(losses.mean()), 1.0
    if pvalue(losses, lo, bound) <= delta:
        return lo
    while hi - lo > tol:  # p-values fall as alpha rises
        mid = 0.5 * (lo + hi)
        lo, hi = (lo, mid) if pvalue(losses, mid, bound) <= delta else (mid, hi)
    return hi


def min_samples(epsilon: float, delta: float) -> int:
    """Fewest calibration samples that can certify ``epsilon`` at all (zero losses, binomial bound)."""
    if not 0 < epsilon < 1:
        return 1
    return int(math.ceil(math.log(delta) / math.log1p(-epsilon)))


# ---- Learn then Test along an ordered path -------------------------------------------------------------------------
def fixed_sequence(pvalues: np.ndarray, delta: float) -> int:
    """Index of the last hypothesis rejected before the first p-value above ``delta`` (-1: none rejected)."""
    above = np.flatnonzero(np.asarray(pvalues) > delta)
    return (int(above[0]) if above.size else len(pvalues)) - 1


@dataclass
class LTTResult:
    """Fixed-sequence test along a path: which candidates are certified and the chosen (most aggressive) one."""

    pvalues: np.ndarray  # [M] one per path candidate, most conservative first
    risks: np.ndarray  # [M] empirical risk on the calibration sample
    last: int  # index of the last certified candidate; -1 = none certified (fall back to full depth)
    n: int

    @property
    def certified(self) -> np.ndarray:
        return np.arange(self.last + 1)


def learn_then_test(losses: np.ndarray, epsilon: float, delta: float, bound: str = "binomial",
                    stop_early: bool = True) -> LTTResult:
    """Fixed-sequence testing of ``H_j: R(path[j]) > epsilon`` over ``losses [M, N]`` (row j = candidate j).

    Rows must be ordered from most conservative to most aggressive, in an order fixed before seeing the data.
    ``stop_early`` skips p-values after the first non-rejection (they are reported as NaN).
    """
    if bound not in BOUNDS:
        raise ValueError(f"unknown bound {bound!r}; expected one of {BOUNDS}")
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    losses = np.asarray(losses)
    m, n = losses.shape
    risks = losses.mean(axis=1) if n else np.zeros(m)
    pv = np.full(m, np.nan)
    for j in range(m):
        pv[j] = pvalue(losses[j], epsilon, bound)
        if stop_early and pv[j] > delta:
            break
    return LTTResult(pv, risks, fixed_sequence(np.nan_to_num(pv, nan=1.0), delta), n)


def shared_threshold_path(points: int = 200) -> np.ndarray:
    """A fixed path of one threshold shared by every exit, for scores in [0, 1], from 1 (strict) down to 0.

    Fixed before any data is seen (a requirement of fixed-sequence testing): dense near 1, where confident exits
    live (``1 - 10^-6 .. 1 - 10^-0.5``), then linear down to 0.
    """
    near_one = 1.0 - np.logspace(-6, -0.5, points // 2)
    linear = np.linspace(0.0, 1.0, points - points // 2, endpoint=False)
    return np.unique(np.r_[1.0, near_one, linear])[::-1]
