"""The cascade's exit step, written once: rows whose score reaches the threshold leave, the survivors go on.

Used by :class:`deploykit.runtime.cascade.Cascade`, serve-ray's ingress and the Triton BLS cascade model. That last
one runs in Triton's Python stub, where deploykit need not be installed: ``deploykit export-triton`` copies this
file beside the model's ``model.py``, so this module imports only numpy and the standard library (tested).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

Logits = np.ndarray | Callable[[np.ndarray, bool], np.ndarray]


def softmax(x: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float32."""
    z = x - x.max(axis=1, keepdims=True)
    e = np.exp(z, dtype=np.float32)
    return e / e.sum(axis=1, keepdims=True)


def exit_mask(score: np.ndarray, threshold: float | None, last: bool) -> np.ndarray:
    """Which rows leave at this stage: all at the last stage, none when the exit is off, else ``score >= t``."""
    if last:
        return np.ones(len(score), dtype=bool)
    if threshold is None:
        return np.zeros(len(score), dtype=bool)
    return score >= threshold


class ExitState:
    """Per-row results at their original positions, and the original positions of the rows still running.

    Args:
        n: rows entering the cascade.
        num_classes: width of the exit logits.
    """

    def __init__(self, n: int, num_classes: int) -> None:
        self.logits = np.empty((n, num_classes), dtype=np.float32)
        self.score = np.empty(n, dtype=np.float32)
        self.exit_stage = np.full(n, -1, dtype=np.int64)
        self.rows = np.arange(n)

    def step(self, stage: int, score: np.ndarray, threshold: float | None, last: bool, logits: Logits
             ) -> np.ndarray | None:
        """Apply one stage's exit; returns the survivors' indices in this stage's batch, or None when none survive.

        Args:
            stage: the stage's index (written as ``exit_stage``).
            score: ``[b]`` exit scores of the rows that ran this stage (host array).
            threshold: this stage's threshold (None: the exit is off).
            last: the last stage (every row leaves).
            logits: the stage's exit logits ``[b, K]``, or ``(exiting indices, all exit) -> [e, K]`` host logits,
                so a device runner gathers the exiting rows before copying them to the host.
        """
        score = np.asarray(score, dtype=np.float32).reshape(-1)
        done = exit_mask(score, threshold, last)
        if done.any():
            where = np.flatnonzero(done)
            out = self.rows[where]
            self.logits[out] = logits(where, bool(done.all())) if callable(logits) else np.asarray(logits)[where]
            self.score[out] = score[where]
            self.exit_stage[out] = stage
        if done.all():
            return None
        keep = np.flatnonzero(~done)
        if len(keep) < len(self.rows):
            self.rows = self.rows[keep]
        return keep

    def probs(self) -> np.ndarray:
        return softmax(self.logits)

    def nonfinite_rows(self) -> np.ndarray:
        """Rows whose exit logits or score are NaN or infinite (a broken graph): never to be answered as numbers."""
        return np.flatnonzero(~(np.isfinite(self.logits).all(axis=1) & np.isfinite(self.score)))
