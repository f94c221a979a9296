"""Token-merging methods: ``tome`` (ToMe + LoRA, the baseline) and ``pyra`` (ToMe + PYRA re-activation + LoRA).

ToMe: Bolya et al., ICLR 2023 (arXiv:2210.09461). PYRA: Xiong et al., ECCV 2024 (arXiv:2403.09192). The merging
itself is in :mod:`deploykit.methods.merge`; this module holds the schedule, the per-layer PYRA parameters and the
model. The timm backbone is not patched: :meth:`MergeModel.run_block` runs each timm block's own submodules in
ToMe's order (attention with ``+log(size)`` → residual → merge → MLP), after checking they are the standard ones.

The state handed between stages is ``(tokens [B, N_k, D], sizes [B, N_k, 1])``; ``N_k`` is fixed by the schedule,
so every stage graph has static token shapes. Exits compose: early heads are linear (size-aware pooling) or DMPO's
bypass + high-order heads (``exits: dmpo``), so merging and early exiting stack in one cascade.
"""

from __future__ import annotations

import copy
import math
import types
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from deploykit.errors import BackboneError, CheckpointError, ConfigError
from deploykit.methods import merge as M
from deploykit.methods._registry import register_method
from deploykit.methods.base import ExitConfig, ExitModel
from deploykit.methods.heads import LinearExitHead, pool_tokens

# Per-layer merge counts of the PYRA paper (its ``get_merging_schedule``), at 224 px / patch 16.
PAPER_SCHEDULES: dict[str, list[int]] = {
    "vit_b_low": [16] * 11 + [10],
    "vit_b_high": [40, 34, 30, 24, 18, 14, 10, 8, 4, 4, 3, 3],
    "vit_l_low": [8] * 23 + [6],
    "vit_l_high": [20, 19, 18, 17, 15, 13, 13, 12, 10, 9, 8, 6, 6, 4, 4, 4, 3, 3, 2, 2, 1, 1, 1, 1],
    "deit_b_low": [16] * 6 + [10] * 6,
    "deit_b_high": [40, 34, 30, 24, 18, 14, 10, 8, 4, 4, 3, 3],
}
# (depth, tokens, prefix tokens) -> family, for the ``low`` / ``high`` shorthands
_FAMILIES = {(12, 197, 1): "vit_b", (24, 197, 1): "vit_l", (12, 198, 2): "deit_b"}
PEFT_CHOICES = ("full", "lora")
EXIT_KINDS = ("linear", "dmpo")


# ---- schedule ----------------------------------------------------------------------------------------------------
def resolve_schedule(schedule: int | list[int] | str, depth: int, num_tokens: int, num_prefix: int) -> list[int]:
    """Per-layer merge counts, checked against the backbone.

    Args:
        schedule: a constant ``r`` for every layer, a list with one ``r`` per layer, a paper schedule name
            (``vit_b_low`` ...), or ``low`` / ``high`` (the paper's schedule for this backbone; ``low`` falls back
            to ToMe's constant ``r = (N - prefix) // depth``, trimmed where a late layer can't merge that many).
        depth: blocks of the backbone.
        num_tokens: tokens entering the first block (patches + prefix tokens).
        num_prefix: protected prefix tokens (cls, distillation, registers).

    Raises:
        ConfigError: a wrong length, a negative ``r``, an unknown name, or a layer asked to merge more tokens than
            it can (at most half of its non-prefix tokens).
    """
    where = f"backbone with {depth} blocks, {num_tokens} tokens ({num_prefix} protected)"
    if isinstance(schedule, str):
        name = schedule
        if name in ("low", "high"):
            family = _FAMILIES.get((depth, num_tokens, num_prefix))
            if family is None:
                if name == "high":
                    raise ConfigError(
                        f"schedule 'high' is only defined for ViT-B/16, ViT-L/16 and DeiT-B/16 at 224 px; this is a "
                        f"{where}: give a constant r or a list of {depth} merge counts"
                    )
                return _trimmed_constant(max(num_tokens - num_prefix, 0) // depth, depth, num_tokens, num_prefix)
            name = f"{family}_{name}"
        if name not in PAPER_SCHEDULES:
            raise ConfigError(
                f"unknown merge schedule {schedule!r}; use a constant r, a list of {depth} merge counts, 'low', "
                f"'high', or one of {sorted(PAPER_SCHEDULES)}"
            )
        r_list = list(PAPER_SCHEDULES[name])
    elif isinstance(schedule, bool) or not isinstance(schedule, int | list | tuple):
        raise ConfigError(f"schedule must be an int, a list of ints or a name, got {schedule!r}")
    elif isinstance(schedule, int):
        r_list = [schedule] * depth
    else:
        r_list = list(schedule)
    if any(isinstance(r, bool) or not isinstance(r, int) or r < 0 for r in r_list):
        raise ConfigError(f"merge counts must be non-negative ints, got {r_list}")
    if len(r_list) != depth:
        raise ConfigError(
            f"merge schedule {schedule!r} has {len(r_list)} entries but the {where} needs one per block ({depth}); "
            "give a list of that length (0 where a block merges nothing)"
        )
    n = num_tokens
    for i, r in enumerate(r_list):
        cap = M.max_merge(n, num_prefix)
        if r > cap:
            raise ConfigError(
                f"merge schedule {r_list} asks block {i} to merge {r} tokens, but block {i} has only {n} tokens "
                f"({num_prefix} protected), so it can merge at most {cap}; lower r at block {i} (a {where})"
            )
        n -= r
    return r_list


def _trimmed_constant(r: int, depth: int, num_tokens: int, num_prefix: int) -> list[int]:
    out, n = [], num_tokens
    for _ in range(depth):
        out.append(min(r, M.max_merge(n, num_prefix)))
        n -= out[-1]
    return out


def token_counts(schedule: list[int], num_tokens: int) -> list[int]:
    """Tokens entering each block, then the count after the last block (``len(schedule) + 1`` values)."""
    counts = [num_tokens]
    for r in schedule:
        counts.append(counts[-1] - r)
    return counts


# ---- modules -----------------------------------------------------------------------------------------------------
class PyraReactivation(nn.Module):
    """PYRA's per-layer parameters: ``W_r [r, 1]`` (U(-1, 1)), ``W_D [1, D]`` (zeros) and a LayerNorm.

    ``W_D`` starts at zero so a fresh PYRA layer computes exactly what plain ToMe does.
    """

    def __init__(self, r: int, dim: int):
        super().__init__()
        self.w_r = nn.Parameter(torch.empty(r, 1))
        self.w_d = nn.Parameter(torch.zeros(1, dim))
        self.norm = nn.LayerNorm(dim, eps=1e-5)
        nn.init.kaiming_uniform_(self.w_r, a=math.sqrt(5))  # fan_in 1 -> U(-1, 1), as the reference

    def forward(self, src: torch.Tensor, partner: torch.Tensor) -> torch.Tensor:
        """Re-activated src tokens (see :func:`deploykit.methods.merge.pyra_reactivate`)."""
        return M.pyra_reactivate(src, partner, self.w_r, self.w_d, self.norm)


class MergedExitHead(LinearExitHead):
    """LayerNorm, pool, linear; average pooling is size-weighted, so merged tokens count for what they hold."""

    def forward(self, tokens: torch.Tensor, sizes: torch.Tensor | None = None) -> torch.Tensor:
        """Logits from the stage's tokens (and their sizes)."""
        x = self.norm(tokens)
        if sizes is None or (self.pool == "token" and self.num_prefix_tokens > 0):
            return self.fc(pool_tokens(x, self.pool, self.num_prefix_tokens))
        p = self.num_prefix_tokens
        return self.fc(M.size_weighted_mean(x[:, p:], sizes[:, p:]))


def merge_attention(
        attn: nn.Module, x: torch.Tensor, bias: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run a timm ``Attention`` (its non-fused path) with an additive logit bias; also returns the merge metric.

    The metric is the keys averaged over heads (``[B, N, head_dim]``), as ToMe; with LoRA on ``qkv`` it includes
    the LoRA update.
    """
    b, n, _ = x.shape
    gate = attn.gate(x).sigmoid() if getattr(attn, "gate", None) is not None else None
    qkv = attn.qkv(x).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    logits = (q * attn.scale) @ k.transpose(-2, -1)
    if bias is not None:
        logits = logits + bias
    out = attn.attn_drop(logits.softmax(dim=-1)) @ v
    out = attn.norm(out.transpose(1, 2).reshape(b, n, attn.attn_dim))
    if gate is not None:
        out = out * gate
    return attn.proj_drop(attn.proj(out)), k.mean(dim=1)


def check_mergeable(backbone: nn.Module) -> None:
    """Refuse backbones whose blocks aren't timm's standard ``Block`` / ``Attention`` (their order is re-run here)."""
    from timm.models.vision_transformer import Attention, Block

    for i, blk in enumerate(backbone.blocks):
        attn = getattr(blk, "attn", None)
        if type(blk).forward is not Block.forward or type(attn).forward is not Attention.forward:
            raise BackboneError(
                f"block {i} is {type(blk).__name__} with {type(attn).__name__}; token merging re-runs timm's "
                "standard Block / Attention (timm>=1.0.15,<2) and can't merge inside other block types — use a "
                "vit_* / deit_* backbone with standard blocks"
            )
    if getattr(backbone, "dynamic_img_size", False):
        raise BackboneError("token merging needs a fixed input size (static token counts); set dynamic_img_size=False")
    if not isinstance(getattr(backbone, "patch_drop", nn.Identity()), nn.Identity):
        raise BackboneError("token merging needs patch_drop_rate=0: dropped patches would change the token counts")
    pool = str(getattr(backbone, "global_pool", "token") or "")
    if pool not in ("token", "avg"):
        raise BackboneError(
            f"backbone pools with {pool!r}; token merging supports 'token' (cls) and 'avg' (size-weighted) pooling"
        )


# ---- config --------------------------------------------------------------------------------------------------------
@dataclass
class MergeConfig(ExitConfig):
    """Settings of ``tome`` and ``pyra`` (plus those of :class:`ExitConfig`).

    Attributes:
        schedule: tokens merged per block: a constant r, a list (one per block), ``low`` / ``high`` (the paper's
            schedules for ViT-B/16, ViT-L/16, DeiT-B/16) or a name from ``PAPER_SCHEDULES``.
        prop_attn: proportional attention (``+log(size)`` on the logits) after the first merge, in training and
            inference, as the PYRA code does.
        peft: ``full`` trains every weight (from-scratch backbones); ``lora`` freezes the backbone and trains LoRA
            on ``qkv`` (folded at export), PYRA's parameters, the exit heads and the classifier.
        lora_rank: LoRA rank. lora_alpha: update scale numerator (``None``: equal to the rank, i.e. no scaling, as
            the PYRA code).
        exits: early-exit heads, ``linear`` (size-aware linear heads) or ``dmpo`` (DMPO's bypass + high-order
            predictors and two-phase loss weights).
        dmpo: DMPO head / loss-weight settings when ``exits: dmpo`` (``bypass``, ``predictor``, ``switch_point``,
            ``phase1_weights`` ...; see ``dmpo``'s settings). PEFT settings come from this method, not from here.
    """

    schedule: int | list[int] | str = "low"
    prop_attn: bool = True
    peft: str = "full"
    lora_rank: int = 4
    lora_alpha: float | None = None
    exits: str = "linear"
    dmpo: dict | None = None

    def validate(self) -> None:
        """Check what can be checked without the backbone (the schedule is checked against it in the model)."""
        super().validate()
        if self.peft not in PEFT_CHOICES:
            raise ConfigError(f"peft must be one of {PEFT_CHOICES} for token merging, got {self.peft!r}")
        if self.exits not in EXIT_KINDS:
            raise ConfigError(f"exits must be one of {EXIT_KINDS}, got {self.exits!r}")
        if int(self.lora_rank) < 1:
            raise ConfigError(f"lora_rank must be >= 1, got {self.lora_rank}")
        if self.dmpo is not None and self.exits != "dmpo":
            raise ConfigError("dmpo settings given but exits is not 'dmpo'; set exits: dmpo or drop the dmpo block")
        if self.exits == "dmpo":
            self.dmpo_config()

    def dmpo_config(self) -> Any:
        """The DMPO config for the exits (validated by DMPO itself)."""
        from deploykit.methods.dmpo import DMPOConfig

        settings = dict(self.dmpo or {})
        bad = sorted(k for k in settings if k.startswith(("peft", "lora", "adapter")) or k in
                     ("num_exits", "exit_blocks", "score"))
        if bad:
            raise ConfigError(f"dmpo settings {bad} belong to the merging method itself; set them at the top level")
        if float(settings.get("distill_weight", 0.0)) > 0:
            raise ConfigError("dmpo.distill_weight is not supported on a merging backbone yet; leave it at 0")
        try:
            cfg = DMPOConfig(num_exits=self.num_exits, exit_blocks=self.exit_blocks, score=self.score, **settings)
        except TypeError as e:
            raise ConfigError(f"bad dmpo exit setting: {e}") from e
        cfg.validate()
        return cfg


# ---- model ---------------------------------------------------------------------------------------------------------
class MergeModel(ExitModel):
    """A multi-exit ViT whose blocks merge tokens by a fixed schedule (ToMe), optionally with PYRA re-activation."""

    state_names = ("tokens", "sizes")
    cfg: MergeConfig

    def __init__(self, backbone: nn.Module, num_classes: int, cfg: MergeConfig, method: str, reactivate: bool):
        check_mergeable(backbone)
        prefix = int(getattr(backbone, "num_prefix_tokens", 1))
        n0 = int(backbone.patch_embed.num_patches) + prefix
        schedule = resolve_schedule(cfg.schedule, len(backbone.blocks), n0, prefix)
        super().__init__(backbone, num_classes, cfg, method)
        self.merge_r = schedule
        self.tokens_in = token_counts(schedule, n0)
        self.register_buffer("merge_schedule", torch.tensor(schedule, dtype=torch.int64))
        self.pyra = nn.ModuleList(
            [PyraReactivation(r, self.embed_dim) if reactivate and r > 0 else nn.Identity() for r in schedule]
        )
        self.reactivate = reactivate
        self._tie_probe: list[torch.Tensor] | None = None
        self._tie_eps = 1e-4
        self.dmpo_weights = None
        if cfg.exits == "dmpo":
            from deploykit.methods.dmpo import schedule_weights

            d = cfg.dmpo_config()
            where = f"dmpo.phase{{}}_weights (exits after blocks {self.exit_blocks})"
            self.dmpo_weights = (d.switch_point, schedule_weights(d.phase1_weights, self.num_stages, where.format(1)),
                                 schedule_weights(d.phase2_weights, self.num_stages, where.format(2)))
        if cfg.peft == "lora":
            from deploykit.methods.peft import apply_lora, set_trainable

            apply_lora(self.backbone, ("qkv",), cfg.lora_rank, float(cfg.lora_alpha or cfg.lora_rank))
            heads = [f"backbone.{n}." for n in ("head", "head_dist", "fc_norm")]
            set_trainable(self, "lora", always_train=["exit_heads.", "pyra.", *heads])

    # ---- heads -------------------------------------------------------------------------------------------------
    def make_exit_head(self, k: int) -> nn.Module:
        """Size-aware linear head, or DMPO's head (built by DMPO's own code, so the two stay the same)."""
        if self.cfg.exits == "dmpo":
            from deploykit.methods.dmpo import DMPOModel

            view = types.SimpleNamespace(cfg=self.cfg.dmpo_config(), embed_dim=self.embed_dim,
                                         num_classes=self.num_classes, pool=self.pool,
                                         num_prefix_tokens=self.num_prefix_tokens)
            return DMPOModel.make_exit_head(view, k)  # type: ignore[arg-type]
        return MergedExitHead(self.embed_dim, self.num_classes, self.pool, self.num_prefix_tokens)

    def forward_exit(self, k: int, *state: torch.Tensor) -> torch.Tensor:
        """Logits of exit ``k`` from ``(tokens, sizes)``."""
        if k == self.num_stages - 1:
            return self.forward_final_head(*state)
        head = self.exit_heads[k]
        return head(state[0], state[1]) if isinstance(head, MergedExitHead) else head(state[0])

    def forward_final_head(self, *state: torch.Tensor) -> torch.Tensor:
        """The backbone's own head; average pooling becomes size-weighted once tokens have merged."""
        b = self.backbone
        x = b.norm(state[0])
        if self.pool == "token" or sum(self.merge_r) == 0:
            return b.forward_head(x)
        p = self.num_prefix_tokens
        x = M.size_weighted_mean(x[:, p:], state[1][:, p:])
        return b.head(b.head_drop(b.fc_norm(x)))

    # ---- blocks ------------------------------------------------------------------------------------------------
    def embed(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Patch + position embedding, and sizes of one for every token."""
        x = super().embed(image)[0]
        return x, torch.ones_like(x[..., :1])

    def run_block(self, i: int, state: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        """Attention (``+log(size)`` once anything merged) → residual → merge ``r_i`` tokens → MLP."""
        x, size = state
        blk = self.backbone.blocks[i]
        r = self.merge_r[i]
        bias = M.proportional_bias(size) if self.cfg.prop_attn and sum(self.merge_r[:i]) > 0 else None
        out, metric = merge_attention(blk.attn, blk.norm1(x), bias)
        x = x + blk.drop_path1(blk.ls1(out))
        if r > 0:
            p = self.num_prefix_tokens
            if self._tie_probe is not None:
                self._tie_probe.append(M.near_tie_rows(metric, r, p, self._tie_eps))
            match = M.bipartite_soft_matching(metric, r, p)
            x, size = M.merge_wavg(x, size, match, p, self.pyra[i] if self.reactivate else None)
        x = x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))
        return x, size

    # ---- parity support ------------------------------------------------------------------------------------------
    def near_tie_rows(self, k: int, *inputs: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
        """Rows of a batch whose merge decisions in stage ``k`` hinge on a score gap below ``eps`` (``[B]`` bool).

        Such rows may legitimately merge differently in another runtime (float noise flips a near-tie), so
        parity checks count and report them rather than treating them as export bugs.
        """
        self._tie_probe, self._tie_eps = [], eps
        try:
            with torch.no_grad():
                self.forward_stage(k, *inputs)
            rows = torch.zeros(inputs[0].shape[0], dtype=torch.bool)
            for t in self._tie_probe:
                rows |= t
            return rows
        finally:
            self._tie_probe = None

    def count_near_ties(self, images: torch.Tensor, eps: float = 1e-4) -> dict[str, Any]:
        """Near-tied rows per stage and overall for a batch of images (a report, not a pass/fail)."""
        state: tuple[torch.Tensor, ...] = (images,)
        per_stage, any_rows = [], torch.zeros(images.shape[0], dtype=torch.bool)
        for k in range(self.num_stages):
            rows = self.near_tie_rows(k, *state, eps=eps)
            per_stage.append(int(rows.sum()))
            any_rows |= rows
            with torch.no_grad():
                state = self.forward_stage(k, *state)
        return {"eps": eps, "rows": int(images.shape[0]), "near_tied_rows": int(any_rows.sum()),
                "per_stage": per_stage}

    # ---- training / export / checkpoints -----------------------------------------------------------------------
    def loss_weights(self, progress: float) -> list[float]:
        """Uniform, or DMPO's two-phase weights with DMPO exits."""
        if self.dmpo_weights is None:
            return super().loss_weights(progress)
        switch, phase1, phase2 = self.dmpo_weights
        return list(phase1 if progress < switch else phase2)

    def prepare_for_export(self) -> ExitModel:
        """A copy with LoRA folded into ``qkv`` (PYRA's weights are input-dependent and stay in the graph)."""
        from deploykit.methods.peft import merge_lora

        return merge_lora(copy.deepcopy(self)).eval()

    def method_config(self) -> dict[str, Any]:
        """Settings plus the resolved schedule and the token count at the end of each stage."""
        out = super().method_config()
        out["merge_schedule"] = list(self.merge_r)
        out["stage_tokens"] = [self.tokens_in[self.exit_blocks[k]] for k in range(self.num_stages)]
        return out

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        """Load weights, first checking they were trained with this model's merge schedule."""
        key = "merge_schedule"
        if key in state_dict:
            theirs = [int(v) for v in state_dict[key].tolist()]
            if theirs != self.merge_r:
                raise CheckpointError(
                    f"checkpoint was trained with merge schedule {theirs}, but this model uses {self.merge_r}; "
                    f"build the model with schedule={theirs} (PYRA's W_r is sized by the schedule, and ToMe's "
                    "accuracy depends on it)"
                )
        elif strict:
            raise CheckpointError(
                f"checkpoint has no {key!r}: it was not trained with token merging, so it can't be loaded into a "
                f"{self.method} model; load it as the backbone's weights (backbone.checkpoint) instead"
            )
        return super().load_state_dict(state_dict, strict=strict, assign=assign)


@register_method("tome", MergeConfig, "ToMe token merging (fixed schedule, static shapes) + LoRA, with exits")
def create_tome(backbone: nn.Module, num_classes: int, cfg: MergeConfig) -> ExitModel:
    """Plain ToMe bipartite merging on a timm ViT (the baseline PYRA is measured against)."""
    return MergeModel(backbone, num_classes, cfg, method="tome", reactivate=False)


@register_method("pyra", MergeConfig, "ToMe merging + PYRA re-activation of merged tokens + LoRA, with exits")
def create_pyra(backbone: nn.Module, num_classes: int, cfg: MergeConfig) -> ExitModel:
    """PYRA: ToMe merging whose merged tokens are re-activated by parallel yielding adaptive weights."""
    return MergeModel(backbone, num_classes, cfg, method="pyra", reactivate=True)
