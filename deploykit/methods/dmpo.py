"""DMPO: decoupled multi-predictor optimisation (Luo et al., ICCV 2025, arXiv:2511.03245) — a reconstruction.

Only the paper's abstract is public. What it names is built here as documented in ``docs/dmpo.md``:

- a PEFT backbone (LoRA on the attention projections, folded at export; AdaptFormer adapters; or full tuning);
- a *bypass* on each early exit: a residual bottleneck adapter whose output feeds only that exit's predictor, so
  the trunk hands the unmodified tokens to the next stage;
- a *high-order statistics predictor* on each early exit, after Moment Probing (Gao et al., ICCV 2023,
  arXiv:2307.11342): a first-order linear branch on the cls (or pooled) token and a second-order branch on
  cross-covariances of neighbouring channel groups of the patch tokens, logits averaged;
- *two-phase loss weights*: before the switch point the weights grow with depth, after it they move toward the
  early exits; optional self-distillation from the last exit in phase 2.

The algorithm lives in small pure tensor functions (``cross_covariance``, ``phase_weights``); the modules only
hold parameters.
"""

from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from deploykit.errors import ConfigError
from deploykit.methods._registry import register_method
from deploykit.methods.base import ExitConfig, ExitModel
from deploykit.methods.heads import pool_tokens
from deploykit.methods.peft import (
    LORA_TARGETS,
    PEFT_MODES,
    Adapter,
    apply_adapters,
    apply_lora,
    merge_lora,
    set_trainable,
)

WEIGHT_SCHEDULES = ("linear_up", "uniform", "linear_down", "last")
PREDICTORS = ("moment", "linear")
CROSS_TYPES = ("near", "all")


# ---- pure functions --------------------------------------------------------------------------------------------
def schedule_weights(schedule: str | list[float], num_exits: int, setting: str = "weights") -> list[float]:
    """Per-exit loss weights from a schedule name (normalised to sum 1) or an explicit list (used as given).

    ``linear_up``: ``w_k ∝ k`` (deep exits first); ``uniform``: ``1/K``; ``linear_down``: ``w_k ∝ K - k + 1``;
    ``last``: only the last exit.
    """
    if isinstance(schedule, str):
        k = torch.arange(1, num_exits + 1, dtype=torch.float64)
        raw = {"linear_up": k, "uniform": torch.ones_like(k), "linear_down": num_exits - k + 1,
               "last": (k == num_exits).double()}.get(schedule)
        if raw is None:
            raise ConfigError(f"{setting} {schedule!r} is not a schedule; use one of {WEIGHT_SCHEDULES} or a list of "
                              f"{num_exits} numbers")
        return (raw / raw.sum()).tolist()
    weights = [float(w) for w in schedule]
    if len(weights) != num_exits:
        raise ConfigError(
            f"{setting} has {len(weights)} values {weights} but the model has {num_exits} exits; give {num_exits} "
            f"non-negative numbers (one per exit, shallow to deep) or a schedule name {WEIGHT_SCHEDULES}"
        )
    return weights


def phase_weights(progress: float, switch_point: float, phase1: list[float], phase2: list[float]) -> list[float]:
    """The loss weights at ``progress`` in [0, 1] of training: phase 1 before the switch point, phase 2 after."""
    return list(phase1 if progress < switch_point else phase2)


def neighbour_pairs(groups: int, cross: str) -> list[tuple[int, int]]:
    """Channel-group pairs whose cross-covariances are taken: neighbours ``(i, i+1)`` or every ``i < j``."""
    if cross == "near":
        return [(i, i + 1) for i in range(groups - 1)]
    return list(itertools.combinations(range(groups), 2))


def cross_covariance(x: torch.Tensor, pairs: list[tuple[int, int]]) -> torch.Tensor:
    """Cross-covariances of channel groups over tokens: ``[B, N, G, d] -> [B, P, d, d]``, rows L2-normalised.

    ``C_ij = (1/N) (X_i - mean)^T (X_j - mean)``; the row normalisation (as Moment Probing) keeps the scale of the
    second-order branch independent of the token count and the feature magnitude.
    """
    x = x - x.mean(dim=1, keepdim=True)
    a = x[:, :, [i for i, _ in pairs]].permute(0, 2, 3, 1)  # [B, P, d, N]
    b = x[:, :, [j for _, j in pairs]].permute(0, 2, 1, 3)  # [B, P, N, d]
    cov = (a @ b) / x.shape[1]
    return F.normalize(cov, dim=-1)


# ---- exit modules ----------------------------------------------------------------------------------------------
class MomentPredictor(nn.Module):
    """Moment-Probing-style head: first-order linear on the pooled token + second-order on cross-covariances.

    Sized to the backbone width: patch tokens are projected to ``proj_dim`` channels in ``groups`` groups of
    ``d = proj_dim / groups``; the ``P`` covariance maps ``[d, d]`` are shrunk by ``conv_layers`` stride-2 3x3
    convolutions (none for small ``d``) and classified by one linear layer.
    """

    def __init__(
            self,
            dim: int,
            num_classes: int,
            pool: str,
            num_prefix_tokens: int,
            proj_dim: int,
            groups: int,
            cross: str = "near",
            conv_layers: int | None = None,
    ):
        super().__init__()
        self.pool = pool
        self.num_prefix_tokens = num_prefix_tokens
        self.groups = groups
        self.pairs = neighbour_pairs(groups, cross)
        d = proj_dim // groups
        self.first = nn.Linear(dim, num_classes)
        self.proj = nn.Linear(dim, proj_dim)
        self.group_norm = nn.LayerNorm(d)
        if conv_layers is None:
            conv_layers = 2 if d >= 64 else 1 if d >= 32 else 0
        p, convs, side = len(self.pairs), [], d
        for i in range(conv_layers):
            convs.append(nn.Conv2d(p, p, kernel_size=3, stride=2, bias=False))
            if i < conv_layers - 1:
                convs.append(nn.GELU())
            side = (side - 3) // 2 + 1
        self.downsample = nn.Sequential(*convs)
        self.second = nn.Linear(p * side * side, num_classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Average of the first- and second-order logits."""
        first = self.first(pool_tokens(tokens, self.pool, self.num_prefix_tokens))
        patches = self.proj(tokens[:, self.num_prefix_tokens:])
        groups = self.group_norm(patches.unflatten(-1, (self.groups, -1)))  # [B, N, G, d]
        cov = self.downsample(cross_covariance(groups, self.pairs))
        return (first + self.second(cov.flatten(1))) / 2


class LinearPredictor(nn.Module):
    """Linear classifier on the pooled token (the ablation without the high-order branch)."""

    def __init__(self, dim: int, num_classes: int, pool: str, num_prefix_tokens: int):
        super().__init__()
        self.pool = pool
        self.num_prefix_tokens = num_prefix_tokens
        self.fc = nn.Linear(dim, num_classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits of the pooled token."""
        return self.fc(pool_tokens(tokens, self.pool, self.num_prefix_tokens))


class DMPOExitHead(nn.Module):
    """Early exit: bypass (residual bottleneck; only this exit sees its output), LayerNorm, predictor."""

    def __init__(self, bypass: nn.Module, predictor: nn.Module, dim: int, stop_grad: bool = False):
        super().__init__()
        self.bypass = bypass
        self.norm = nn.LayerNorm(dim)
        self.predictor = predictor
        self.stop_grad = stop_grad

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits of this exit; the trunk's ``tokens`` are left unmodified."""
        if self.stop_grad:
            tokens = tokens.detach()
        return self.predictor(self.norm(self.bypass(tokens)))


# ---- config and model ------------------------------------------------------------------------------------------
@dataclass
class DMPOConfig(ExitConfig):
    """Settings of ``dmpo`` (plus those of :class:`ExitConfig`).

    Attributes:
        peft: which backbone parts train: ``lora`` (LoRA factors only; folded at export), ``adapter``
            (AdaptFormer adapters only) or ``full`` (every weight; for backbones trained from scratch).
            Exit heads, the bypasses and the classifier always train.
        lora_rank: LoRA rank. lora_alpha: LoRA scale numerator (update scaled by alpha / rank).
        lora_targets: attention projections that get LoRA: ``qkv`` and / or ``proj``.
        lora_blocks: block indices that get LoRA (``None``: all); also where adapters go.
        adapter_dim: AdaptFormer bottleneck width. adapter_scale: its output scale.
        bypass: put the bypass module on early exits. bypass_dim: its bottleneck width (``None``: width / 4,
            clamped to 8..64). bypass_stop_grad: block the early exits' gradients into the trunk.
        predictor: early-exit predictor, ``moment`` (high-order) or ``linear`` (ablation).
        predictor_proj_dim: channels of the second-order branch (``None``: the backbone width, at most 512).
        predictor_groups: channel groups of the second-order branch. predictor_cross: ``near`` (neighbouring
            groups) or ``all`` pairs. predictor_conv_layers: stride-2 convs on the covariances (``None``: by size).
        switch_point: fraction of training in (0, 1) where phase 2 starts.
        phase1_weights / phase2_weights: per-exit loss weights, a schedule name (``linear_up``, ``uniform``,
            ``linear_down``, ``last``) or one number per exit.
        distill_weight: weight of self-distillation from the last exit to the early ones in phase 2 (0: off).
        distill_temperature: softmax temperature of that distillation.
    """

    peft: str = "lora"
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_targets: list[str] = field(default_factory=lambda: ["qkv"])
    lora_blocks: list[int] | None = None
    adapter_dim: int = 64
    adapter_scale: float = 0.1
    bypass: bool = True
    bypass_dim: int | None = None
    bypass_stop_grad: bool = False
    predictor: str = "moment"
    predictor_proj_dim: int | None = None
    predictor_groups: int = 4
    predictor_cross: str = "near"
    predictor_conv_layers: int | None = None
    switch_point: float = 0.5
    phase1_weights: str | list[float] = "linear_up"
    phase2_weights: str | list[float] = "uniform"
    distill_weight: float = 0.0
    distill_temperature: float = 1.0

    def validate(self) -> None:
        """Check every setting that can be checked without the backbone (the rest is checked in the model)."""
        super().validate()
        _one_of("peft", self.peft, PEFT_MODES)
        _one_of("predictor", self.predictor, PREDICTORS)
        _one_of("predictor_cross", self.predictor_cross, CROSS_TYPES)
        for t in self.lora_targets:
            _one_of("lora_targets entry", t, LORA_TARGETS)
        if not 0.0 < float(self.switch_point) < 1.0:
            raise ConfigError(
                f"switch_point must be a fraction of training strictly between 0 and 1 (e.g. 0.5), got "
                f"{self.switch_point}; for a single phase give both phases the same weights"
            )
        for name in ("phase1_weights", "phase2_weights"):
            w = getattr(self, name)
            if isinstance(w, str):
                _one_of(name, w, WEIGHT_SCHEDULES)
            elif not w or any(float(v) < 0 for v in w) or sum(float(v) for v in w) <= 0:
                raise ConfigError(f"{name} must be non-negative with a positive sum, got {w}")
        for name in ("lora_rank", "adapter_dim", "predictor_groups"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.predictor_cross == "near" and self.predictor_groups < 2:
            raise ConfigError(f"predictor_groups must be >= 2 to pair neighbouring groups, got {self.predictor_groups}")
        if self.distill_weight < 0 or self.distill_temperature <= 0:
            raise ConfigError(f"distill_weight must be >= 0 and distill_temperature > 0, got "
                              f"{self.distill_weight} / {self.distill_temperature}")


def _one_of(setting: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{setting} must be one of {allowed}, got {value!r}")


class DMPOModel(ExitModel):
    """Multi-exit ViT with bypass + high-order predictors on the early exits and two-phase loss weights."""

    cfg: DMPOConfig

    def __init__(self, backbone: nn.Module, num_classes: int, cfg: DMPOConfig):
        super().__init__(backbone, num_classes, cfg, method="dmpo")
        k = self.num_stages
        self.phase1 = schedule_weights(cfg.phase1_weights, k, f"phase1_weights (exits after blocks {self.exit_blocks})")
        self.phase2 = schedule_weights(cfg.phase2_weights, k, f"phase2_weights (exits after blocks {self.exit_blocks})")
        if cfg.peft == "lora":
            apply_lora(self.backbone, cfg.lora_targets, cfg.lora_rank, cfg.lora_alpha, cfg.lora_blocks)
        elif cfg.peft == "adapter":
            apply_adapters(self.backbone, cfg.adapter_dim, cfg.adapter_scale, cfg.lora_blocks)
        head_prefixes = [f"backbone.{n}." for n in ("head", "head_dist", "fc_norm")]
        set_trainable(self, cfg.peft, always_train=["exit_heads.", *head_prefixes])

    def make_exit_head(self, k: int) -> nn.Module:
        """Bypass + predictor for early exit ``k``, sized to the backbone width."""
        cfg: DMPOConfig = self.cfg  # type: ignore[assignment]
        dim = self.embed_dim
        bypass: nn.Module = nn.Identity()
        if cfg.bypass:
            width = cfg.bypass_dim or min(64, max(8, dim // 4))
            bypass = Adapter(dim, width, scale=1.0, act=nn.GELU, norm=True, residual=True)
        if cfg.predictor == "moment":
            proj = cfg.predictor_proj_dim or min(512, dim)
            if proj % cfg.predictor_groups:
                raise ConfigError(
                    f"predictor_proj_dim {proj} (backbone width {dim}) is not divisible by predictor_groups "
                    f"{cfg.predictor_groups}; pick groups dividing {proj} (e.g. 4) or set predictor_proj_dim"
                )
            predictor: nn.Module = MomentPredictor(dim, self.num_classes, self.pool, self.num_prefix_tokens, proj,
                                                   cfg.predictor_groups, cfg.predictor_cross, cfg.predictor_conv_layers)
        else:
            predictor = LinearPredictor(dim, self.num_classes, self.pool, self.num_prefix_tokens)
        return DMPOExitHead(bypass, predictor, dim, cfg.bypass_stop_grad)

    def loss_weights(self, progress: float) -> list[float]:
        """Phase-1 weights before the switch point, phase-2 weights after it."""
        return phase_weights(progress, self.cfg.switch_point, self.phase1, self.phase2)  # type: ignore[attr-defined]

    def compute_loss(
            self, logits: list[torch.Tensor], target: torch.Tensor, progress: float
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Weighted cross-entropies, plus self-distillation from the last exit in phase 2 when enabled."""
        loss, parts = super().compute_loss(logits, target, progress)
        cfg: DMPOConfig = self.cfg  # type: ignore[assignment]
        if cfg.distill_weight > 0 and progress >= cfg.switch_point and len(logits) > 1:
            t = cfg.distill_temperature
            teacher = F.log_softmax(logits[-1].detach().float() / t, dim=-1)
            kd = sum(F.kl_div(F.log_softmax(lg.float() / t, dim=-1), teacher, log_target=True, reduction="batchmean")
                     for lg in logits[:-1]) * (t * t) / (len(logits) - 1)
            loss = loss + cfg.distill_weight * kd
            parts["loss_distill"] = float(kd.detach())
        parts["phase"] = 1.0 if progress < cfg.switch_point else 2.0
        return loss, parts

    def prepare_for_export(self) -> ExitModel:
        """A copy with LoRA folded into the weights (adapters and exit modules stay; they can't be folded)."""
        return merge_lora(copy.deepcopy(self)).eval()


@register_method("dmpo", DMPOConfig, "bypass + high-order predictors on early exits, two-phase loss weights, PEFT")
def create_dmpo(backbone: nn.Module, num_classes: int, cfg: DMPOConfig) -> ExitModel:
    """DMPO (reconstructed) on a timm ViT."""
    return DMPOModel(backbone, num_classes, cfg)
