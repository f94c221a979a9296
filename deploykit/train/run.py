"""``train()``: resolve the recipe and run directory, then train with checkpoints every epoch; resumable.

Resuming restores the weights, optimizer, scheduler, step and every rank's RNG state, and the data order depends
only on ``(seed, epoch)``, so a seeded run that is stopped and resumed ends with the same weights as one that was
not (with ``num_workers: 0``; worker processes re-seed their augmentation RNGs).
"""

from __future__ import annotations

import logging
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from deploykit.errors import CheckpointError, ConfigError
from deploykit.train import checkpoint as ckpt
from deploykit.train import distributed as D
from deploykit.train.build import build_model, make_loaders, make_optimizer, make_scheduler
from deploykit.train.loop import StepContext, amp_dtype, evaluate, train_epoch
from deploykit.train.recipe import Recipe, load_recipe, recipe_from_dict

log = logging.getLogger("deploykit.train")
RESUME_MAY_CHANGE = ("train.max_steps", "train.num_workers")


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and k != "kwargs":
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def resolve_run(
        recipe: Recipe | str | os.PathLike | dict | None,
        out: str | os.PathLike | None = None,
        resume: str | os.PathLike | None = None,
        overrides: dict[str, Any] | None = None,
        sets: list[str] | tuple[str, ...] | None = None,
) -> tuple[Recipe, Path, bool]:
    """Pick the recipe and run directory, and whether to resume (``--resume``, or ``--out`` holding a train state).

    Resuming with no recipe given reuses the run's own ``config.json``. A resumed run may only change the keys in
    ``RESUME_MAY_CHANGE``; anything else would silently train a different model.
    """
    if resume is not None and out is not None and Path(resume).resolve() != Path(out).resolve():
        raise ConfigError(f"--resume {resume} and --out {out} name different directories; give only one")
    run_dir = Path(resume or out) if (resume or out) else None
    if resume is not None and not (run_dir / ckpt.STATE_NAME).is_file():
        raise CheckpointError(f"can't resume {resume}: it has no {ckpt.STATE_NAME} (no epoch was checkpointed)")
    resuming = run_dir is not None and (run_dir / ckpt.STATE_NAME).is_file()
    if recipe is None and resuming:
        recipe = str(run_dir / ckpt.CONFIG_NAME)
    if not isinstance(recipe, Recipe) or overrides or sets:
        recipe = load_recipe(recipe.to_dict() if isinstance(recipe, Recipe) else recipe, overrides, sets)
    run_dir = run_dir or Path("runs") / recipe.name
    if resuming:
        saved = _flatten(recipe_from_dict(ckpt.read_config(run_dir)).to_dict())
        now = _flatten(recipe.to_dict())
        changed = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k) and k not in RESUME_MAY_CHANGE)
        if changed:
            diffs = ", ".join(f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in changed)
            raise ConfigError(f"can't resume {run_dir} with a different recipe ({diffs}); use a new --out instead")
    return recipe, run_dir, resuming


def seed_everything(seed: int, rank: int) -> None:
    """Same model init on every rank; per-rank augmentation streams."""
    torch.manual_seed(seed)
    random.seed(seed + rank)
    np.random.seed(seed + rank)


def train(
        recipe: Recipe | str | os.PathLike | dict | None = None,
        out: str | os.PathLike | None = None,
        resume: str | os.PathLike | None = None,
        overrides: dict[str, Any] | None = None,
        sets: list[str] | tuple[str, ...] | None = None,
) -> Path:
    """Train a recipe (under torchrun too) and return the run directory.

    Args:
        recipe: a :class:`Recipe`, a YAML / ``config.json`` path, a mapping, or ``None`` when resuming.
        out: run directory (default ``runs/<name>``); resumed when it already holds a train state.
        resume: run directory to continue from.
        overrides: dotted-key overrides (``{"train.epochs": 5}``; ``None`` values are skipped).
        sets: ``KEY=VALUE`` overrides, YAML-parsed.
    """
    recipe, run_dir, resuming = resolve_run(recipe, out, resume, overrides, sets)
    ctx = D.setup_distributed()
    try:
        _fit(recipe, run_dir, resuming, ctx)
    finally:
        D.cleanup_distributed(ctx)
    return run_dir


def _run_config(recipe: Recipe, model: torch.nn.Module, labels: list[str]) -> dict[str, Any]:
    import timm

    from deploykit import __version__
    from deploykit.methods.backbone import backbone_data_config

    pre = backbone_data_config(model.backbone)
    if recipe.data.crop_pct is not None:  # the recipe's own crop replaces the backbone's eval crop
        if not 0 < recipe.data.crop_pct <= 1:
            raise ConfigError(f"data.crop_pct must be in (0, 1], got {recipe.data.crop_pct}")
        pre["crop_pct"] = float(recipe.data.crop_pct)
    return {
        **recipe.to_dict(), "labels": labels, "preprocessing": pre,
        "method_config": model.method_config(),
        "versions": {"deploykit": __version__, "torch": torch.__version__, "timm": timm.__version__},
    }


def _fit(recipe: Recipe, run_dir: Path, resuming: bool, ctx: D.DistContext) -> None:
    from tqdm import tqdm

    from deploykit.data import data_info

    t = recipe.train
    seed_everything(t.seed, ctx.rank)
    labels = data_info(recipe.data.spec).labels
    model = build_model(recipe, len(labels)).to(ctx.device)
    config = _run_config(recipe, model, labels)
    train_dl, val_dl = make_loaders(recipe, config["preprocessing"], ctx.world_size, ctx.rank)
    spe = len(train_dl)
    optimizer = make_optimizer(model, recipe)
    scheduler = make_scheduler(optimizer, recipe, spe)
    amp = amp_dtype(t.amp, ctx.device)
    scaler = torch.amp.GradScaler(ctx.device.type, enabled=amp == torch.float16)
    step, state = 0, None
    if resuming:
        state, step = ckpt.restore(run_dir, model, optimizer, scheduler, scaler)
        if ctx.is_main:
            ckpt.trim_metrics(run_dir, step)
    elif ctx.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / ckpt.METRICS_NAME).unlink(missing_ok=True)
    if ctx.is_main:
        ckpt.save_config(run_dir, config)
    wrapped = D.wrap_ddp(model, ctx, config["preprocessing"]["input_size"])
    if state is not None:  # last, so nothing set up above can shift the restored streams
        rngs = state["rng"]
        ckpt.set_rng_state(rngs[ctx.rank] if len(rngs) == ctx.world_size else rngs[0])
    total = t.epochs * spe
    stop = min(total, t.max_steps or total)
    sc = StepContext(wrapped, model, optimizer, scheduler, scaler, ctx.device, amp, total, t.label_smoothing)
    bar = tqdm(total=stop, initial=step, desc=recipe.name, disable=not (ctx.is_main and sys.stderr.isatty()))
    while step < stop:
        t0, epoch, done = time.time(), step // spe, step % spe
        train_dl.sampler.set_epoch(epoch)
        train_dl.sampler.skip = done * train_dl.batch_size
        step, loss_sum, batches = train_epoch(sc, train_dl, step, stop, bar)
        loss_sum, batches = D.all_reduce_sum([loss_sum, batches], ctx)
        _checkpoint(run_dir, model, sc, ctx, step, epoch, {
            "epoch": epoch + 1, "step": step, "lr": optimizer.param_groups[0]["lr"],
            "train_loss": round(loss_sum / max(batches, 1), 5), "partial": step % spe != 0, "time": 0.0,
        }, val_dl, t0)
    bar.close()
    D.check_same_weights(model, ctx)


def _checkpoint(
        run_dir: Path, model: torch.nn.Module, sc: StepContext, ctx: D.DistContext, step: int, epoch: int,
        row: dict[str, Any], val_dl: Any, t0: float,
) -> None:
    """Gather every rank's RNG state, then (rank 0) validate, write weights + train state, append metrics."""
    rngs = D.all_gather_objects(ckpt.rng_state(), ctx)
    if ctx.is_main:
        row["val_acc"] = evaluate(model, val_dl, ctx.device, sc.amp)
        ckpt.save_weights(run_dir, model)
        ckpt.save_train_state(run_dir, {
            "step": step, "epoch": epoch, "world_size": ctx.world_size, "rng": rngs,
            "optimizer": sc.optimizer.state_dict(), "scheduler": sc.scheduler.state_dict(),
            "scaler": sc.scaler.state_dict() if sc.scaler.is_enabled() else None,
        })
        row["time"] = round(time.time() - t0, 3)
        ckpt.append_metrics(run_dir, row)
        accs = " ".join(f"{a:.4f}" for a in row["val_acc"])
        log.info("epoch %d step %d loss %.4f val_acc [%s] (%.1fs)", row["epoch"], step, row["train_loss"], accs,
                 row["time"])
    D.barrier(ctx)
