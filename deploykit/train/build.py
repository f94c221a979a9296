"""Turn a recipe into the objects a run needs: model, data loaders, optimizer and learning-rate schedule."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from deploykit.errors import ConfigError
from deploykit.train.recipe import Recipe


def build_model(recipe: Recipe, num_classes: int, for_loading: bool = False) -> nn.Module:
    """Backbone from timm, then the recipe's method on top of it.

    Args:
        recipe: the resolved recipe.
        num_classes: classes of the data source.
        for_loading: build with ``pretrained=False`` and no checkpoint, because the weights will be loaded next.
    """
    from deploykit.methods import create_backbone, create_method

    bb = recipe.backbone
    backbone = create_backbone(
        bb.name, num_classes,
        pretrained=bb.pretrained and not for_loading,
        checkpoint=None if for_loading else bb.checkpoint,
        checkpoint_ema=bb.checkpoint_ema,
        **bb.kwargs,
    )
    return create_method(recipe.method["name"], backbone, num_classes, **recipe.method_settings())


class ResumableSampler(DistributedSampler):
    """A seeded, per-epoch shuffle (this rank's shard) that can start part-way through an epoch.

    The order depends only on ``(seed, epoch)``, so a resumed run skips exactly the batches it already trained on.
    """

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int, seed: int):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.skip = 0

    def __iter__(self) -> Iterator[int]:
        return iter(list(super().__iter__())[self.skip:])

    def __len__(self) -> int:
        return super().__len__() - self.skip


def make_loaders(
        recipe: Recipe, preprocessing: dict[str, Any], world_size: int, rank: int
) -> tuple[DataLoader, DataLoader]:
    """Training loader (this rank's shard of a global batch) and validation loader (whole split)."""
    from deploykit.data import create_dataset

    t = recipe.train
    if t.batch_size % world_size:
        raise ConfigError(f"train.batch_size {t.batch_size} is global and must divide by the {world_size} processes")
    train_ds = create_dataset(recipe.data.spec, "train", preprocessing, augment=recipe.data.augment)
    val_ds = create_dataset(recipe.data.spec, "val", preprocessing)
    sampler = ResumableSampler(train_ds, world_size, rank, t.seed)
    per_rank = t.batch_size // world_size
    # own generators: creating an iterator then draws nothing from the global RNG, which resume restores
    train_dl = DataLoader(train_ds, batch_size=per_rank, sampler=sampler, num_workers=t.num_workers,
                          generator=torch.Generator().manual_seed(t.seed + rank))
    val_dl = DataLoader(val_ds, batch_size=max(per_rank, 128), shuffle=False, num_workers=t.num_workers,
                        generator=torch.Generator())
    return train_dl, val_dl


def make_optimizer(model: nn.Module, recipe: Recipe) -> torch.optim.Optimizer:
    """AdamW without weight decay on biases, norms, tokens and position embeddings (1-d or named as such)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.ndim <= 1 or name.endswith(("cls_token", "pos_embed", "reg_token", "dist_token"))
        (no_decay if skip else decay).append(p)
    groups = [{"params": decay, "weight_decay": recipe.train.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=recipe.train.lr)


class WarmupCosine:
    """Learning-rate factor per optimizer step: linear warm-up, then cosine decay to zero at ``total`` steps.

    A small class rather than a closure so the scheduler's state dict stays plain numbers.
    """

    def __init__(self, warmup: int, total: int):
        self.warmup = warmup
        self.total = max(total, 1)

    def __call__(self, step: int) -> float:
        """Factor on the base learning rate before optimizer step ``step``."""
        if step < self.warmup:
            return (step + 1) / (self.warmup + 1)
        span = max(self.total - self.warmup, 1)
        return 0.5 * (1.0 + math.cos(math.pi * min(step - self.warmup, span) / span))


def make_scheduler(
        optimizer: torch.optim.Optimizer, recipe: Recipe, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step warm-up + cosine over the planned ``epochs`` (``max_steps`` only stops early)."""
    t = recipe.train
    schedule = WarmupCosine(round(t.warmup_epochs * steps_per_epoch), t.epochs * steps_per_epoch)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
