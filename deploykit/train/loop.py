"""One epoch of training and one pass of validation, as plain functions over a model, a loader and an optimizer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader


def amp_dtype(mode: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype for ``train.amp``: mixed precision on CUDA only (bf16 where supported), never on CPU."""
    if device.type != "cuda" or mode == "off":
        return None
    if mode == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if mode == "bf16" else torch.float16


def soft_targets(target: torch.Tensor, num_classes: int, smoothing: float) -> torch.Tensor:
    """Label-smoothed class probabilities; ``F.cross_entropy`` inside ``compute_loss`` accepts them as targets."""
    return F.one_hot(target, num_classes).float() * (1.0 - smoothing) + smoothing / num_classes


@dataclass
class StepContext:
    """What every optimizer step needs besides the batch."""

    model: nn.Module  # possibly DDP-wrapped: call it for the forward so gradients are synchronised
    core: nn.Module  # the ExitModel itself: its compute_loss
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    device: torch.device
    amp: torch.dtype | None
    total_steps: int
    label_smoothing: float = 0.0


def train_step(sc: StepContext, x: torch.Tensor, y: torch.Tensor, step: int) -> float:
    """Forward every exit, the method's own loss at ``progress = step / total_steps``, backward, update."""
    x, y = x.to(sc.device, non_blocking=True), y.to(sc.device, non_blocking=True)
    with torch.autocast(sc.device.type, dtype=sc.amp or torch.float32, enabled=sc.amp is not None):
        logits = sc.model(x)
    target = soft_targets(y, sc.core.num_classes, sc.label_smoothing) if sc.label_smoothing > 0 else y
    loss, _ = sc.core.compute_loss(logits, target, step / sc.total_steps)
    sc.optimizer.zero_grad(set_to_none=True)
    sc.scaler.scale(loss).backward()
    sc.scaler.step(sc.optimizer)
    sc.scaler.update()
    sc.scheduler.step()
    return float(loss.detach())


def train_epoch(
        sc: StepContext, loader: DataLoader, step: int, stop: int, bar: Any = None
) -> tuple[int, float, int]:
    """Train until the loader is exhausted or ``stop`` steps are done; returns ``(step, loss_sum, batches)``."""
    sc.model.train()
    loss_sum, batches = 0.0, 0
    for x, y in loader:
        loss = train_step(sc, x, y, step)
        step, loss_sum, batches = step + 1, loss_sum + loss, batches + 1
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}", lr=f"{sc.optimizer.param_groups[0]['lr']:.2e}")
        if step >= stop:
            break
    return step, loss_sum, batches


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device, amp: torch.dtype | None = None) -> list[float]:
    """Top-1 accuracy of every exit on ``loader`` (the ExitModel, not a DDP wrapper)."""
    model.eval()
    correct: torch.Tensor | None = None
    seen = 0
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            logits = model(x)
        hits = torch.stack([(lg.argmax(-1) == y).sum() for lg in logits]).cpu()
        correct = hits if correct is None else correct + hits
        seen += len(y)
    model.train()
    return [] if correct is None else [round(float(c) / seen, 5) for c in correct]
