"""The plain multi-exit baseline: linear exit heads after evenly spaced blocks, uniform loss weights.

Every other early-exit method is measured against this one.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from deploykit.methods._registry import register_method
from deploykit.methods.base import ExitConfig, ExitModel


@dataclass
class MultiExitConfig(ExitConfig):
    """Settings of the ``multiexit`` baseline (those of :class:`ExitConfig`)."""


@register_method("multiexit", MultiExitConfig, "linear exit heads, uniform loss weights (the baseline)")
def create_multiexit(backbone: nn.Module, num_classes: int, cfg: MultiExitConfig) -> ExitModel:
    """Plain multi-exit ViT."""
    return ExitModel(backbone, num_classes, cfg, method="multiexit")
