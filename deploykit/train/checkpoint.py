"""The run directory: ``config.json``, ``model.safetensors``, ``train_state.pt``, ``metrics.jsonl``.

Weights are safetensors and the resume state is plain tensors and numbers, loadable with ``weights_only=True``,
so reading a run never executes code. Files are written to a temporary name and renamed, so a run killed mid-write
keeps its previous checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from deploykit.errors import CheckpointError, DeployKitError

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
STATE_NAME = "train_state.pt"
METRICS_NAME = "metrics.jsonl"


def atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` then rename onto ``path`` (same directory, so the rename is atomic)."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(str(tmp))
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def save_config(run_dir: Path, config: dict[str, Any]) -> None:
    """Write the resolved run config as JSON."""
    atomic_write(run_dir / CONFIG_NAME, lambda p: Path(p).write_text(json.dumps(config, indent=2) + "\n"))


def save_weights(run_dir: Path, model: nn.Module) -> None:
    """Write the model's state dict as safetensors."""
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_write(run_dir / WEIGHTS_NAME, lambda p: save_file(state, p, metadata={"format": "pt"}))


def save_train_state(run_dir: Path, state: dict[str, Any]) -> None:
    """Write the resume state (optimizer, scheduler, step, epoch, RNG states)."""
    atomic_write(run_dir / STATE_NAME, lambda p: torch.save(state, p))


def load_train_state(run_dir: Path) -> dict[str, Any]:
    """Read ``train_state.pt`` with ``weights_only=True``."""
    path = Path(run_dir) / STATE_NAME
    if not path.is_file():
        raise CheckpointError(f"{run_dir} has no {STATE_NAME}; only a run written by `deploykit train` can resume")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt files raise many different types
        raise CheckpointError(
            f"can't read {path} ({type(e).__name__}: {e}); start the run again without --resume"
        ) from e


_STATE_KEYS = ("step", "optimizer", "scheduler", "rng")


def load_weights(run_dir: Path) -> dict[str, Any]:
    """``model.safetensors`` as a state dict, with a one-line error when it is missing, truncated or corrupt."""
    from safetensors.torch import load_file

    path = Path(run_dir) / WEIGHTS_NAME
    if not path.is_file():
        raise CheckpointError(f"{run_dir} has no {WEIGHTS_NAME}; the run did not finish its first checkpoint — "
                              "start it again without --resume")
    try:
        return load_file(str(path))
    except Exception as e:  # SafetensorError, OSError, ...: a truncated file raises several kinds
        raise CheckpointError(f"can't read {path} ({type(e).__name__}: {e}); the file is corrupt or truncated — "
                              "start the run again without --resume") from e


def restore(run_dir: Path, model: nn.Module, optimizer: Any, scheduler: Any, scaler: Any) -> tuple[dict, int]:
    """Load weights and resume state into the training objects; returns ``(state, step)``.

    Raises:
        CheckpointError: a file is missing, truncated, lacks keys or doesn't fit the model / optimizer.
    """
    state = load_train_state(run_dir)
    missing = [k for k in _STATE_KEYS if k not in state] if isinstance(state, dict) else list(_STATE_KEYS)
    if missing:
        raise CheckpointError(f"{Path(run_dir) / STATE_NAME} lacks {missing}; it was not written by `deploykit "
                              "train` — start the run again without --resume")
    weights = load_weights(run_dir)
    try:
        model.load_state_dict(weights, strict=True)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        step = int(state["step"])
    except DeployKitError:
        raise
    except (RuntimeError, KeyError, ValueError, TypeError, IndexError) as e:
        raise CheckpointError(f"{run_dir} can't be resumed ({type(e).__name__}: {str(e)[:300]}); the checkpoint "
                              "doesn't fit this recipe — start the run again without --resume") from e
    return state, step


def rng_state() -> dict[str, Any]:
    """This process's RNG states as tensors / plain Python values (so ``weights_only`` loading accepts them)."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    try:
        _set_rng_state(state)
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as e:
        raise CheckpointError(f"the RNG state in {STATE_NAME} is malformed ({type(e).__name__}: {e}); start the run "
                              "again without --resume") from e


def _set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def append_metrics(run_dir: Path, row: dict[str, Any]) -> None:
    """Append one epoch's metrics as a JSON line."""
    with open(run_dir / METRICS_NAME, "a") as f:
        f.write(json.dumps(row) + "\n")


def trim_metrics(run_dir: Path, max_step: int) -> None:
    """Drop metric rows written after the checkpoint we resume from (a crash between the two writes)."""
    path = run_dir / METRICS_NAME
    if path.is_file():
        rows, bad = [], 0
        for ln in path.read_text(errors="replace").splitlines():
            try:
                keep = ln.strip() and int(json.loads(ln)["step"]) <= max_step
            except (ValueError, KeyError, TypeError):  # a torn or corrupt line: the log loses it, the run goes on
                bad += 1
                continue
            if keep:
                rows.append(ln)
        if bad:
            logging.getLogger("deploykit.train").warning("%s: dropped %d corrupt line(s)", path, bad)
        path.write_text("".join(r + "\n" for r in rows))


def read_config(run_dir: str | os.PathLike) -> dict[str, Any]:
    """Read a run's ``config.json`` with a clear error when the run or the file is missing or broken."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"run directory {run_dir} does not exist; train one with `deploykit train`")
    path = run_dir / CONFIG_NAME
    if not path.is_file():
        raise CheckpointError(f"{run_dir} has no {CONFIG_NAME}; is it a run directory written by `deploykit train`?")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); the run is corrupt, train it again") from e
    if not isinstance(config, dict) or not {"method", "backbone", "labels"} <= set(config):
        raise CheckpointError(f"{path} lacks the method / backbone / labels entries a run config has")
    labels = config["labels"]
    if not isinstance(labels, list) or not labels or not all(isinstance(v, str | int) for v in labels):
        raise CheckpointError(f"{path}: labels must be a non-empty list of class names, found {str(labels)[:80]}; "
                              "the run is corrupt, train it again")
    return config


def load_run(run_dir: str | os.PathLike) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a trained model from its run directory: ``(model.eval(), config)``.

    The backbone is built with ``pretrained=False`` (all weights come from ``model.safetensors``) and the method
    with the settings recorded in the config; the state dict must match exactly.
    """
    from deploykit.train.build import build_model
    from deploykit.train.recipe import recipe_from_dict

    config = read_config(run_dir)
    try:
        recipe = recipe_from_dict(config)
    except DeployKitError as e:
        raise CheckpointError(f"{Path(run_dir) / CONFIG_NAME} does not hold a valid recipe: {e}") from e
    model = build_model(recipe, num_classes=len(config["labels"]), for_loading=True)
    path = Path(run_dir) / WEIGHTS_NAME
    state = load_weights(Path(run_dir))
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    bad_shapes = [f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                  for k, v in state.items() if k in own and v.shape != own[k].shape]
    if missing or unexpected or bad_shapes:
        sched = "merge_schedule"  # token-merging models: another schedule changes shapes; say that, not "shapes"
        if sched in state and sched in own and state[sched].tolist() != own[sched].tolist():
            model.load_state_dict(state, strict=True)  # raises the method's schedule-mismatch CheckpointError
        raise CheckpointError(
            f"{path} does not match the model described by {CONFIG_NAME}: missing {missing[:5]} "
            f"({len(missing)}), unexpected {unexpected[:5]} ({len(unexpected)}), shapes {bad_shapes[:5]}. "
            "Were the weights or the config replaced by another run's?"
        )
    model.load_state_dict(state, strict=True)
    return model.eval(), config
