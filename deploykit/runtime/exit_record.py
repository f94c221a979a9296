"""The calibration record of exit behaviour, and the distance the server's drift watch measures against it.

``calibrate`` stores, for the thresholds it chose, where validation rows exited and how confident they were when
they did: the joint distribution of *(exit stage, exit-score bin)*. Bins are per stage, at that stage's quantiles
of the validation exit scores (about equal mass, so no bin is empty by construction).

The drift distance is the **total-variation distance** between that joint distribution and the one of a window of
served rows: ``TV = 1/2 Σ_{stage, bin} |p_window - p_calibration|``. It is the largest difference, over any set of
(exit stage, score bin) outcomes, between the probability the live traffic gives it and the probability calibration
gave it: 0 = the same exit behaviour, 1 = no overlap at all. It moves when exit fractions move (harder inputs exit
later) and when confidence at an exit moves (rows exit at the same stage but with lower scores).

Pure numpy: calibrate (tune) writes the record, serve-local (serve) reads it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

DISTANCE = ("total-variation distance between the joint distributions of (exit stage, exit-score bin) in the "
            "window and in calibration: 0 = same exit behaviour, 1 = disjoint")
DEFAULT_BINS = 4


def build_record(exit_stage: np.ndarray, score: np.ndarray, num_stages: int, bins: int = DEFAULT_BINS,
                 thresholds: list[float | None] | None = None) -> dict[str, Any]:
    """Exit-stage fractions, per-stage score bin edges and the joint (stage, bin) probabilities of one split."""
    exit_stage = np.asarray(exit_stage, dtype=np.int64)
    score = np.asarray(score, dtype=np.float64)
    n = len(exit_stage)
    edges, probs, hist = [], [], []
    for k in range(num_stages):
        s = score[exit_stage == k]
        nb = int(min(bins, max(1, len(s) // 10)))  # at least ~10 rows per bin
        e = np.unique(np.quantile(s, np.linspace(0, 1, nb + 1)[1:-1])) if len(s) and nb > 1 else np.zeros(0)
        counts = np.bincount(np.searchsorted(e, s, side="right"), minlength=len(e) + 1)
        edges.append(e.tolist())
        probs.append((counts / max(n, 1)).tolist())
        hist.append(counts.tolist())
    return {"samples": int(n), "num_stages": int(num_stages),
            "exit_fractions": (np.bincount(exit_stage, minlength=num_stages)[:num_stages] / max(n, 1)).tolist(),
            "score_edges": edges, "score_counts": hist, "probs": probs,
            "thresholds": list(thresholds) if thresholds is not None else None, "distance": DISTANCE}


def joint_counts(record: dict[str, Any], exit_stage: np.ndarray, score: np.ndarray) -> list[np.ndarray]:
    """Counts of rows in each (stage, bin) cell of ``record``'s bins."""
    exit_stage = np.asarray(exit_stage, dtype=np.int64)
    score = np.asarray(score, dtype=np.float64)
    out = []
    for k, e in enumerate(record["score_edges"]):
        s = score[exit_stage == k]
        out.append(np.bincount(np.searchsorted(np.asarray(e, dtype=np.float64), s, side="right"),
                               minlength=len(e) + 1))
    return out


def tv_distance(record: dict[str, Any], counts: list[np.ndarray]) -> float:
    """Total-variation distance between ``record``'s joint probabilities and the distribution of ``counts``."""
    total = float(sum(c.sum() for c in counts))
    if total == 0:
        return 0.0
    return 0.5 * float(sum(np.abs(np.asarray(p, dtype=np.float64) - c / total).sum()
                           for p, c in zip(record["probs"], counts)))


def check_record(record: Any, num_stages: int) -> None:
    """Raise ``ValueError`` if ``record`` is not a usable exit record for a ``num_stages`` cascade."""
    try:
        ok = (int(record["num_stages"]) == num_stages and len(record["score_edges"]) == num_stages
              and all(len(p) == len(e) + 1 for p, e in zip(record["probs"], record["score_edges"]))
              and abs(sum(sum(p) for p in record["probs"]) - 1.0) < 1e-6)
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"malformed exit record ({e})") from e
    if not ok:
        raise ValueError(f"exit record does not describe a {num_stages}-stage cascade; re-run calibrate")
