"""Replica sizing from calibrated exit fractions and stage costs (shared by export-triton and a Ray front-end).

Stage k sees the rows that did not exit before it, so its load is ``reach_k * (flops_k + exit_flops_k)`` with
``reach_k = 1 - sum_{j<k} q_j``; replicas (or Triton instances) are split in proportion, at least one each.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def stage_loads(manifest: Any) -> np.ndarray:
    """Relative work per stage (sums to 1) at the calibrated exit fractions (uniform reach when uncalibrated)."""
    q = ((manifest.calibration or {}).get("test") or {}).get("exit_fractions")
    k = manifest.num_stages
    reach = np.ones(k) if q is None else np.clip(1.0 - np.r_[0.0, np.cumsum(q)[:-1]], 0.0, 1.0)
    cost = np.asarray([max(s.flops + s.exit_flops, 1) for s in manifest.stages], dtype=np.float64)
    load = reach * cost
    return load / load.sum()


def replica_split(manifest: Any, total: int) -> list[int]:
    """``total`` replicas over the stages in proportion to :func:`stage_loads`, at least one per stage."""
    load = stage_loads(manifest)
    n = np.maximum(1, np.floor(load * total + 0.5)).astype(int)
    return [int(v) for v in n]
