"""Exit heads and exit scores, as small modules and pure tensor functions.

Scores are computed inside each stage graph, so the runtime only compares a ``[B]`` vector with a threshold.
Every score is "higher = more confident", in [0, 1].
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

EXIT_SCORES = ("max_softmax", "entropy")


def pool_tokens(x: torch.Tensor, pool: str, num_prefix_tokens: int) -> torch.Tensor:
    """Pool ``[B, N, D]`` tokens the way the backbone does: the cls token, or the mean of the patch tokens."""
    if pool == "token" and num_prefix_tokens > 0:
        return x[:, 0]
    return x[:, num_prefix_tokens:].mean(dim=1)


def max_softmax_score(logits: torch.Tensor) -> torch.Tensor:
    """Max-softmax confidence, ``[B, C] -> [B]``."""
    return F.softmax(logits.float(), dim=-1).amax(dim=-1)


def entropy_score(logits: torch.Tensor) -> torch.Tensor:
    """Confidence from entropy, ``1 - H(p) / log(C)``: 1 for a one-hot prediction, 0 for uniform."""
    logp = F.log_softmax(logits.float(), dim=-1)
    ent = -(logp.exp() * logp).sum(dim=-1)
    return 1.0 - ent / math.log(logits.shape[-1])


def exit_score(logits: torch.Tensor, kind: str) -> torch.Tensor:
    """The named exit score of ``logits``."""
    if kind == "max_softmax":
        return max_softmax_score(logits)
    if kind == "entropy":
        return entropy_score(logits)
    raise ValueError(f"unknown exit score {kind!r}; expected one of {EXIT_SCORES}")


class LinearExitHead(nn.Module):
    """LayerNorm, pool, linear: the plain multi-exit baseline's head."""

    def __init__(self, dim: int, num_classes: int, pool: str, num_prefix_tokens: int):
        super().__init__()
        self.pool = pool
        self.num_prefix_tokens = num_prefix_tokens
        self.norm = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, num_classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.fc(pool_tokens(self.norm(tokens), self.pool, self.num_prefix_tokens))
