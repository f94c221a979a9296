"""The modules that become graphs: one per stage (trunk + exit head + score) and the monolithic model."""

from __future__ import annotations

import torch
from torch import nn

from deploykit.methods.base import ExitModel
from deploykit.methods.heads import exit_score


class StageGraph(nn.Module):
    """Stage ``k`` as exported: state in, (state out..., logits, score) out; the last stage hands on nothing."""

    def __init__(self, model: ExitModel, k: int, score: str):
        super().__init__()
        self.model = model
        self.k = k
        self.score = score
        self.last = k == model.num_stages - 1

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        state = self.model.forward_stage(self.k, *inputs)
        logits = self.model.forward_exit(self.k, *state)
        score = exit_score(logits, self.score)
        return (logits, score) if self.last else (*state, logits, score)


class TrunkGraph(nn.Module):
    """Stage ``k`` without its exit head, for counting the trunk's FLOPs apart from the head's."""

    def __init__(self, model: ExitModel, k: int):
        super().__init__()
        self.model = model
        self.k = k

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.model.forward_stage(self.k, *inputs)


class ExitHeadGraph(nn.Module):
    """Exit head ``k`` alone (state in, logits out), for FLOPs."""

    def __init__(self, model: ExitModel, k: int):
        super().__init__()
        self.model = model
        self.k = k

    def forward(self, *state: torch.Tensor) -> torch.Tensor:
        return self.model.forward_exit(self.k, *state)


class FullGraph(nn.Module):
    """The plain monolithic model: every block and only the final head."""

    def __init__(self, model: ExitModel):
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.model.forward_full(image)


def count_flops(module: nn.Module, *inputs: torch.Tensor) -> int:
    """FLOPs of one forward pass at the given inputs (``torch.utils.flop_counter``; a multiply-add is 2 FLOPs)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        module(*inputs)
    return int(counter.get_total_flops())


def stage_flops(model: ExitModel, input_size: list[int] | tuple[int, ...]) -> tuple[list[int], list[int], int]:
    """Per-stage trunk FLOPs, per-stage exit-head FLOPs and the monolithic model's FLOPs, at batch 1."""
    x = torch.zeros(1, *input_size)
    trunk, head, state = [], [], (x,)
    for k in range(model.num_stages):
        trunk.append(count_flops(TrunkGraph(model, k), *state))
        with torch.no_grad():
            state = model.forward_stage(k, *state)
        head.append(count_flops(ExitHeadGraph(model, k), *state))
    return trunk, head, count_flops(FullGraph(model), x)
