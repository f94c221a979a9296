"""MuE exit rules as pure functions (torch or numpy arrays alike), so PyTorch, the export and the runtime agree.

They live on the runtime side (plain Python + duck-typed arrays, no torch import) so that ``runtime/generation.py``
needs only numpy and ONNX Runtime; ``deploykit.methods.mue`` imports them from here.

Reference (OFA ``feature/MuE``): one cosine over the whole flattened ``T x B x C`` tensor, one decision per forward
call. deploykit decides **per sample**: the cosine is taken over each row's own tokens (padding excluded), so a
sample's exit never depends on what else is in the batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any


def cosine_per_sample(new: Any, old: Any, mask: Any = None, eps: float = 1e-6) -> Any:
    """Cosine of each row's flattened tokens: sum_t <h_t, h'_t> / (||H||_F ||H'||_F); ``mask [B, T]`` drops pads.

    ``new`` / ``old`` are ``[B, T, D]`` (or ``[B, D]`` for one decoder token). Works on torch tensors and numpy.
    """
    if new.ndim == 2:
        new, old = new[:, None, :], old[:, None, :]
    if mask is not None:
        m = mask[:, :, None]
        new, old = new * m, old * m
    dot = (new * old).sum(-1).sum(-1)
    nn = (new * new).sum(-1).sum(-1)
    no = (old * old).sum(-1).sum(-1)
    return dot / ((nn * no) ** 0.5 + eps)


def exits(score: Any, threshold: float | None) -> Any:
    """Which rows stop: strictly above the threshold; ``None`` or >= 1.0 never exits (cosine <= 1)."""
    if threshold is None or threshold >= 1.0:
        return score > math.inf
    return score > threshold


def decoder_threshold(step: int, theta: float | None, max_len: int, decay: bool) -> float | None:
    """Threshold for generation step ``step`` (0-based).

    With ``decay`` (captioning, as ``models/sequence_generator.py`` of the reference): steps before (N+1)/3 run at
    full depth (1.0), later ones use 0.9*theta + 0.1*exp(-(step+1)/(N+1)), N = ``max_len``. Without it the static
    ``theta`` (the reference's single-step entailment decoder).
    """
    if theta is None:
        return None
    if not decay:
        return theta
    if step < (max_len + 1) / 3:
        return 1.0
    return 0.9 * theta + 0.1 * math.exp(-(step + 1) / (max_len + 1))


def layer_fraction(img_layers: float, txt_layers: float, dec_layers: list[int], n_enc: int, n_dec: int) -> float:
    """Layer executions used / full depth for one sample: (p + q + sum_s d_s) / (2 N_E + S N_D).

    Both encoder streams count (each runs the shared layers), and every generated token counts its decoder layers;
    the paper's "expected time" is a similar layer-count proxy (its exact stream weighting is not recoverable).
    """
    full = 2 * n_enc + len(dec_layers) * n_dec
    return (img_layers + txt_layers + sum(dec_layers)) / full


@dataclass
class Thresholds:
    """Exit thresholds of one task; ``None`` disables that exit (full depth)."""

    img: float | None = None
    txt: float | None = None
    dec: float | None = None
    decay: bool = False

    @classmethod
    def full_depth(cls) -> Thresholds:
        return cls()


@dataclass
class SampleResult:
    """Generated ids and the layers each part used."""

    tokens: list[int]
    img_layers: int
    txt_layers: int
    dec_layers: list[int] = field(default_factory=list)
