"""The model every method builds: a timm ViT split into stages, each ending in an exit head.

A stage maps a *state* (a tuple of tensors named by ``state_names``; the first stage maps the image) to the next
state. Plain ViTs hand on ``tokens [B, N, D]``; token-merging methods add ``sizes [B, N, 1]``. The exporter turns
``forward_stage`` + ``forward_exit`` of each stage into one graph, so everything a method changes must live in
those two methods (and ``run_block``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from deploykit.errors import BackboneError, ConfigError
from deploykit.methods.heads import EXIT_SCORES


@dataclass
class ExitConfig:
    """Settings every multi-exit method shares.

    Attributes:
        num_exits: number of stages (and exits) when ``exit_blocks`` is not given; evenly spaced.
        exit_blocks: stage k ends after ``exit_blocks[k]`` blocks (1..depth); the last must equal the depth.
        score: exit score computed in the graphs: ``max_softmax`` or ``entropy``.
    """

    num_exits: int = 4
    exit_blocks: list[int] | None = None
    score: str = "max_softmax"

    def validate(self) -> None:
        if self.num_exits < 1:
            raise ConfigError(f"num_exits must be >= 1, got {self.num_exits}")
        if self.score not in EXIT_SCORES:
            raise ConfigError(f"score must be one of {EXIT_SCORES}, got {self.score!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def resolve_exit_blocks(depth: int, num_exits: int, exit_blocks: list[int] | None) -> list[int]:
    """Block counts at which stages end, checked against the backbone's depth."""
    if exit_blocks is None:
        if num_exits > depth:
            raise BackboneError(f"{num_exits} exits asked for but the backbone has only {depth} blocks")
        return [round(depth * (k + 1) / num_exits) for k in range(num_exits)]
    blocks = [int(b) for b in exit_blocks]
    if any(b < 1 or b > depth for b in blocks):
        raise BackboneError(
            f"exit_blocks {blocks} reach past the backbone's depth: exits must sit after blocks 1..{depth}"
        )
    if sorted(set(blocks)) != blocks:
        raise ConfigError(f"exit_blocks must be strictly increasing, got {blocks}")
    if blocks[-1] != depth:
        blocks.append(depth)  # the backbone's own head is always the last exit
    return blocks


class ExitModel(nn.Module):
    """A ViT backbone cut into stages with an exit head after each one.

    Subclasses change the early heads (``make_exit_head``), the blocks (``run_block``), the state handed between
    stages (``state_names``) or the training loss (``compute_loss``). The last exit is the backbone's own head.
    """

    state_names: tuple[str, ...] = ("tokens",)

    def __init__(self, backbone: nn.Module, num_classes: int, cfg: ExitConfig, method: str):
        super().__init__()
        self.backbone = backbone
        self.cfg = cfg
        self.method = method
        self.num_classes = num_classes
        self.depth = len(backbone.blocks)
        self.embed_dim = int(backbone.embed_dim)
        self.num_prefix_tokens = int(getattr(backbone, "num_prefix_tokens", 1))
        self.pool = str(getattr(backbone, "global_pool", "token") or "token")
        self.exit_blocks = resolve_exit_blocks(self.depth, cfg.num_exits, cfg.exit_blocks)
        self.exit_heads = nn.ModuleList([self.make_exit_head(k) for k in range(self.num_stages - 1)])

    # ---- structure -----------------------------------------------------------------------------------------
    @property
    def num_stages(self) -> int:
        return len(self.exit_blocks)

    def stage_block_range(self, k: int) -> range:
        start = 0 if k == 0 else self.exit_blocks[k - 1]
        return range(start, self.exit_blocks[k])

    def make_exit_head(self, k: int) -> nn.Module:
        """Head of early exit ``k`` (the last exit uses the backbone's head)."""
        from deploykit.methods.heads import LinearExitHead

        return LinearExitHead(self.embed_dim, self.num_classes, self.pool, self.num_prefix_tokens)

    # ---- forward pieces (what the exporter traces) ---------------------------------------------------------
    def embed(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        b = self.backbone
        x = b.patch_embed(image)
        x = b._pos_embed(x)
        x = b.patch_drop(x)
        x = b.norm_pre(x)
        return (x,)

    def run_block(self, i: int, state: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        return (self.backbone.blocks[i](state[0]),) + tuple(state[1:])

    def forward_stage(self, k: int, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Run stage ``k``: the image (stage 0) or the previous stage's state in, this stage's state out."""
        state = self.embed(inputs[0]) if k == 0 else tuple(inputs)
        for i in self.stage_block_range(k):
            state = self.run_block(i, state)
        return state

    def forward_exit(self, k: int, *state: torch.Tensor) -> torch.Tensor:
        """Logits of exit ``k`` from the state at the end of stage ``k``."""
        if k == self.num_stages - 1:
            return self.forward_final_head(*state)
        return self.exit_heads[k](state[0])

    def forward_final_head(self, *state: torch.Tensor) -> torch.Tensor:
        b = self.backbone
        return b.forward_head(b.norm(state[0]))

    # ---- whole-model views ---------------------------------------------------------------------------------
    def forward(self, image: torch.Tensor) -> list[torch.Tensor]:
        """Logits of every exit (training and evaluation)."""
        state: tuple[torch.Tensor, ...] = (image,)
        logits = []
        for k in range(self.num_stages):
            state = self.forward_stage(k, *state)
            logits.append(self.forward_exit(k, *state))
        return logits

    def forward_full(self, image: torch.Tensor) -> torch.Tensor:
        """The plain monolithic model: every block, only the final head (what the cascade is measured against)."""
        state: tuple[torch.Tensor, ...] = (image,)
        for k in range(self.num_stages):
            state = self.forward_stage(k, *state)
        return self.forward_exit(self.num_stages - 1, *state)

    # ---- training ------------------------------------------------------------------------------------------
    def loss_weights(self, progress: float) -> list[float]:
        """Per-exit loss weights at ``progress`` in [0, 1] of training; uniform for the baseline."""
        return [1.0 / self.num_stages] * self.num_stages

    def compute_loss(
            self, logits: list[torch.Tensor], target: torch.Tensor, progress: float
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Weighted sum of per-exit cross-entropies; returns the loss and its parts for logging."""
        weights = self.loss_weights(progress)
        parts = [F.cross_entropy(lg.float(), target) for lg in logits]
        loss = sum(w * p for w, p in zip(weights, parts))
        return loss, {f"loss_exit{k}": float(p.detach()) for k, p in enumerate(parts)}

    def prepare_for_export(self) -> ExitModel:
        """Fold anything that can be folded (e.g. LoRA into weights) before export; a no-op here."""
        return self

    def method_config(self) -> dict[str, Any]:
        """Method name and settings, for the run config and the manifest."""
        return {"name": self.method, "config": self.cfg.to_dict() if hasattr(self.cfg, "to_dict") else asdict(self.cfg),
                "exit_blocks": list(self.exit_blocks)}
