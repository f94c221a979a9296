"""Backbones come from timm: creation, the ViT-family check, and loading pretrained weights without pickles."""

from __future__ import annotations

import difflib
import os
from typing import Any

import torch
from torch import nn

from deploykit.errors import BackboneError, UnknownNameError


def create_backbone(
        name: str,
        num_classes: int,
        pretrained: bool = False,
        checkpoint: str | os.PathLike | None = None,
        checkpoint_ema: bool | None = None,
        **kwargs: Any,
) -> nn.Module:
    """Build a timm ViT-family model, ready for ONNX export (``exportable=True`` turns off fused attention).

    Args:
        name: timm model name with an optional pretrained tag (``vit_small_patch16_224.augreg_in21k_ft_in1k``),
            or ``hf-hub:org/repo`` (its config.json read from the local Hugging Face cache).
        num_classes: classes of the downstream task (the backbone's head is re-sized to it).
        pretrained: load the pretrained weights of the name's tag from the local Hugging Face cache (downloaded when
            online); never used in tests.
        checkpoint: a local weights file (safetensors, a state dict, or a timm train.py checkpoint); takes
            precedence over ``pretrained``.
        checkpoint_ema: EMA weights of a timm checkpoint: ``None`` prefers them when present, ``True`` requires
            them, ``False`` loads the plain weights.
        **kwargs: architecture overrides passed to ``timm.create_model`` (``img_size``, ``depth``, ...).
    """
    import timm

    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    arch, extra = _resolve_name(name)
    try:
        model = timm.create_model(arch, pretrained=False, num_classes=num_classes, exportable=True,
                                  **{**extra, **kwargs})
    except TypeError as e:
        raise BackboneError(f"backbone {name!r} does not accept the settings {sorted(kwargs)}: {e}") from e
    check_vit_family(model, name)
    if checkpoint is not None:
        load_backbone_weights(model, checkpoint, ema=checkpoint_ema)
    elif pretrained:
        from deploykit.methods.timm_weights import pretrained_weights_file

        load_backbone_weights(model, pretrained_weights_file(dict(model.pretrained_cfg), name))
    return model


def _resolve_name(name: str) -> tuple[str, dict[str, Any]]:
    """The timm architecture (with tag) and extra ``create_model`` arguments for a backbone name."""
    import timm

    from deploykit.methods.timm_weights import hub_model_config, split_hub_name

    repo = split_hub_name(name)
    if repo is not None:
        import dataclasses

        from timm.models import PretrainedCfg

        cfg = hub_model_config(repo)
        known = {f.name for f in dataclasses.fields(PretrainedCfg)}
        pcfg = {k: v for k, v in (cfg.get("pretrained_cfg") or {}).items() if k in known}
        pcfg.update(hf_hub_id=repo, source=None)
        arch = cfg["architecture"]
        if not timm.is_model(arch):
            raise BackboneError(f"hf-hub:{repo} names architecture {arch!r}, which this timm version lacks")
        return arch, {**(cfg.get("model_args") or {}), "pretrained_cfg": pcfg}
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise UnknownNameError(f"unknown backbone {name!r}: timm has no such model.{hint}")
    return name, {}


def check_vit_family(model: nn.Module, name: str = "") -> None:
    """Refuse backbones whose structure deploykit can't split into stages (with the reason)."""
    from timm.models.vision_transformer import VisionTransformer

    if not isinstance(model, VisionTransformer):
        raise BackboneError(
            f"backbone {name or type(model).__name__!r} ({type(model).__name__}) is not ViT-family; deploykit splits "
            "timm VisionTransformer models (vit_*, deit_*, deit3_*, vit_*_reg*, ...) into stages — pick one of those"
        )
    for attr in ("patch_embed", "blocks", "norm", "_pos_embed", "forward_head"):
        if not hasattr(model, attr):
            raise BackboneError(
                f"backbone {name!r} has no attribute {attr!r}; this timm version's VisionTransformer differs from the "
                "one deploykit supports (timm>=1.0.15,<2)"
            )


def read_state_dict(path: str | os.PathLike, ema: bool | None = None) -> dict[str, torch.Tensor]:
    """Read a weights file without executing code (see :func:`deploykit.methods.timm_weights.read_checkpoint`)."""
    from deploykit.methods.timm_weights import read_checkpoint

    return read_checkpoint(path, ema=ema).state


def load_backbone_weights(model: nn.Module, path: str | os.PathLike, ema: bool | None = None) -> None:
    """Load pretrained backbone weights from a local file, dropping a classifier of another size.

    timm's ``checkpoint_filter_fn`` adapts foreign layouts (e.g. position embeddings of another grid size).
    """
    from timm.models.vision_transformer import checkpoint_filter_fn

    from deploykit.methods.timm_weights import read_checkpoint

    ckpt = read_checkpoint(path, ema=ema)
    state = ckpt.state
    try:
        state = checkpoint_filter_fn(state, model)
    except Exception as e:
        raise BackboneError(f"checkpoint {path} can't be adapted to this backbone: {e}") from e
    own = model.state_dict()
    head_keys = {k for k in own if k.startswith(("head.", "head_dist."))}
    for k in list(state):
        if k in head_keys and state[k].shape != own[k].shape:
            del state[k]  # classifier for another number of classes: keep the fresh one
    mismatched = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                  for k, v in state.items() if k in own and v.shape != own[k].shape]
    missing = sorted(set(own) - set(state) - head_keys)
    unexpected = sorted(set(state) - set(own))
    if mismatched or missing or unexpected:
        parts = []
        if mismatched:
            parts.append(f"shape mismatches {mismatched[:5]}")
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {missing[:3]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[:3]})")
        trained = f" (timm train.py recorded --model {ckpt.arch})" if ckpt.arch else ""
        raise BackboneError(
            f"checkpoint {path} does not fit backbone {type(model).__name__} "
            f"(depth {len(model.blocks)}, width {model.embed_dim}): {'; '.join(parts)}. "
            f"Pick the backbone name / settings the checkpoint was trained with{trained}"
        )
    model.load_state_dict(state, strict=False)


def backbone_data_config(model: nn.Module) -> dict[str, Any]:
    """The backbone's eval preprocessing from timm's data config (its pretrained cfg): size, crop, mean, std.

    Recorded in the run config and the manifest; :func:`deploykit.data.preprocess.preprocess_image` applies it the
    same way in training, evaluation, predict and serve.
    """
    from timm.data import resolve_data_config

    cfg = resolve_data_config({}, model=model)
    # the pretrained cfg keeps the original resolution when img_size was overridden; the patch embed knows the truth
    in_chans = int(cfg["input_size"][0])
    size = cfg["input_size"]
    if hasattr(model, "patch_embed"):
        size = [in_chans, *(int(v) for v in model.patch_embed.img_size)]
    return {
        "input_size": [int(v) for v in size],
        "mean": [float(v) for v in cfg["mean"]],
        "std": [float(v) for v in cfg["std"]],
        "interpolation": str(cfg.get("interpolation", "bicubic")),
        "crop_pct": float(cfg.get("crop_pct") or 0.875),
        "crop_mode": str(cfg.get("crop_mode") or "center"),
    }
