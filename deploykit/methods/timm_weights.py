"""Weights the way timm users have them: train.py checkpoints, EMA copies, DDP prefixes, hub caches.

timm's ``train.py`` writes ``model_best.pth.tar`` / ``checkpoint-*.pth.tar`` as a dict with ``state_dict``,
``state_dict_ema`` (with ``--model-ema``), ``optimizer``, ``epoch`` and ``args`` (an ``argparse.Namespace``).
Everything is read with ``torch.load(weights_only=True)``; only ``argparse.Namespace`` is added to the allowed
globals (as timm's own ``load_state_dict`` does), so reading a checkpoint still never executes code.
Pretrained tags and ``hf-hub:`` names are resolved from the local Hugging Face cache, so an offline machine works
when the files are there and says what to do when they are not.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from deploykit.errors import BackboneError, CheckpointError

HF_PREFIX = "hf-hub:"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
_STATE_KEYS = ("state_dict", "model", "model_state_dict")
_EMA_KEYS = ("state_dict_ema", "model_ema")


@dataclass
class CheckpointWeights:
    """A state dict read from a file, and where in the file it came from (for messages and the run log)."""

    state: dict[str, torch.Tensor]
    source: str  # "state_dict_ema", "state_dict", ... or "" for a bare state dict
    arch: str | None = None  # the model name timm's train.py recorded (``args.model``), when present


def _torch_load(path: Path) -> Any:
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(path, map_location="cpu", weights_only=True)


def _strip_wrappers(state: dict[str, Any]) -> dict[str, Any]:
    """Drop DDP (``module.``) and torch.compile (``_orig_mod.``) prefixes, in either order (timm's clean_state_dict)."""
    from timm.models import clean_state_dict

    return clean_state_dict(state)


def _pick_state(obj: dict[str, Any], ema: bool | None, path: Path) -> tuple[dict[str, Any], str]:
    """The state dict to use: EMA when present and ``ema`` is not False (required when True), else the weights."""
    ema_key = next((k for k in _EMA_KEYS if isinstance(obj.get(k), dict)), None)
    if ema is True and ema_key is None:
        raise CheckpointError(f"checkpoint {path} has no EMA weights (no {' / '.join(_EMA_KEYS)} entry); drop "
                              "backbone.checkpoint_ema=true (--use-ema) to load its plain weights")
    if ema_key is not None and ema is not False:
        return obj[ema_key], ema_key
    key = next((k for k in _STATE_KEYS if isinstance(obj.get(k), dict)), None)
    return (obj[key], key) if key else (obj, "")


def read_checkpoint(path: str | os.PathLike, ema: bool | None = None) -> CheckpointWeights:
    """Read a weights file without executing code: safetensors, a bare state dict, or a timm train.py checkpoint.

    Args:
        path: ``.safetensors``, ``.pth`` / ``.pth.tar`` / ``.bin``.
        ema: ``None`` prefers EMA weights when the file has them (timm's ``use_ema=True``); ``True`` requires them;
            ``False`` loads the plain weights.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; give a .safetensors, .pth or .pth.tar file")
    try:
        if path.name.endswith(".safetensors"):
            from safetensors.torch import load_file

            obj: Any = load_file(str(path))
        else:
            obj = _torch_load(path)
    except Exception as e:  # corrupt files and disallowed globals raise many different types
        raise CheckpointError(_load_error(path, e)) from e
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(obj).__name__}, not a state dict or a dict with "
                              "'state_dict'; save model.state_dict() (or use timm's train.py checkpoints)")
    args = obj.get("args")
    arch = getattr(args, "model", None) if isinstance(args, argparse.Namespace) else None
    state, source = _pick_state(obj, ema, path)
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"checkpoint {path} entry {source or 'top level'!r} is not a state dict of tensors "
                              f"(e.g. {bad[:3]})")
    return CheckpointWeights(state=_strip_wrappers(state), source=source, arch=arch)


def _load_error(path: Path, e: Exception) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    if "weights_only" in str(e) or "Unsupported global" in str(e):
        names = ""
        try:
            names = ", ".join(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
        except Exception:  # noqa: BLE001 - only improves the message
            pass
        return (f"checkpoint {path} needs Python objects that loading without executing code refuses"
                f"{f' ({names})' if names else ''}; save model.state_dict() with torch.save, or as safetensors")
    return f"can't read checkpoint {path} ({type(e).__name__}: {text[:200]}); is the file complete?"


# ---- pretrained weights from the local Hugging Face cache --------------------------------------------------------
def split_hub_name(name: str) -> str | None:
    """``hf-hub:org/repo`` -> ``org/repo``; ``None`` for plain timm names."""
    return name[len(HF_PREFIX):] if name.startswith(HF_PREFIX) else None


def _cached(repo: str, filename: str) -> str | None:
    from huggingface_hub import try_to_load_from_cache

    hit = try_to_load_from_cache(repo, filename)
    return hit if isinstance(hit, str) else None


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")


def _fetch(repo: str, filename: str, what: str) -> str:
    """A hub file from the cache, else downloaded (unless offline), else a one-line error saying what to do."""
    hit = _cached(repo, filename)
    if hit:
        return hit
    cache = os.environ.get("HF_HUB_CACHE") or os.environ.get("HF_HOME") or "~/.cache/huggingface"
    advice = (f"{what} ({repo}/{filename}) is not in the local Hugging Face cache ({cache}); on a machine with "
              f"network run `hf download {repo}` and copy the cache here, or give a local file with "
              "--initial-checkpoint FILE")
    if _offline():
        raise BackboneError(advice + " (HF_HUB_OFFLINE is set)")
    try:
        from huggingface_hub import hf_hub_download

        return hf_hub_download(repo, filename)
    except Exception as e:  # connection, auth and missing-file errors differ by version
        raise BackboneError(f"{advice} (download failed: {type(e).__name__})") from e


def hub_model_config(repo: str) -> dict[str, Any]:
    """An ``hf-hub:`` model's ``config.json`` (architecture, model_args, pretrained_cfg) from the cache."""
    path = _fetch(repo, "config.json", f"the config of hf-hub:{repo}")
    try:
        cfg = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise BackboneError(f"hf-hub:{repo} config.json at {path} can't be read ({e})") from e
    if not isinstance(cfg, dict) or not isinstance(cfg.get("architecture"), str):
        raise BackboneError(f"hf-hub:{repo} config.json has no 'architecture'; is it a timm model repository?")
    return cfg


def pretrained_weights_file(pretrained_cfg: dict[str, Any], name: str) -> str:
    """Local path of a timm model's pretrained weights (its ``hf_hub_id``), from the cache or downloaded."""
    repo = pretrained_cfg.get("hf_hub_id")
    if not repo:
        raise BackboneError(f"backbone {name!r} has no Hugging Face hub weights in timm's registry; give a local "
                            "file with --initial-checkpoint FILE")
    files = [pretrained_cfg["hf_hub_filename"]] if pretrained_cfg.get("hf_hub_filename") else list(WEIGHT_FILES)
    for f in files:
        hit = _cached(repo, f)
        if hit:
            return hit
    first: BackboneError | None = None
    for f in files:  # none cached: download the preferred file, else the next
        try:
            return _fetch(repo, f, f"pretrained weights of {name}")
        except BackboneError as e:
            first = first or e
            if _offline():
                break
    assert first is not None
    raise first
