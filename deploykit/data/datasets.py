"""Data sources: ``digits`` (scikit-learn's UCI handwritten digits) and ``imagefolder:PATH``.

Both yield ``(float32 [3, H, W], label)`` preprocessed exactly as the deployed model's manifest says, so training,
calibration and serving see the same pixels.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from deploykit.data.preprocess import load_image, preprocess_image
from deploykit.errors import DataError, UnknownNameError

SPLITS = ("train", "val", "test")
DIGITS_SPLIT_SEED = 0  # fixed: the same train/val/test split on every machine
IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


@dataclass
class DataInfo:
    """What a data source is: its class names."""

    labels: list[str]


def _split_indices(labels: np.ndarray, seed: int, fractions: tuple[float, float] = (0.6, 0.2)) -> dict[str, np.ndarray]:
    """Stratified, seeded train/val/test split (60/20/20 by default)."""
    rng = np.random.default_rng(seed)
    out: dict[str, list[int]] = {s: [] for s in SPLITS}
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        n_tr = int(round(len(idx) * fractions[0]))
        n_va = int(round(len(idx) * fractions[1]))
        out["train"] += idx[:n_tr].tolist()
        out["val"] += idx[n_tr:n_tr + n_va].tolist()
        out["test"] += idx[n_tr + n_va:].tolist()
    return {s: np.sort(np.asarray(v, dtype=np.int64)) for s, v in out.items()}


class DigitsDataset(Dataset):
    """UCI handwritten digits (8x8, 1,797 images) upscaled to the model's input size.

    ``augment`` shifts each digit by up to one of its native pixels, which is what handwriting varies by.
    """

    labels = [str(i) for i in range(10)]

    def __init__(self, split: str, preprocessing: Any, augment: bool = False):
        from sklearn.datasets import load_digits

        d = load_digits()
        idx = _split_indices(d.target, DIGITS_SPLIT_SEED)[split]
        self.images = (d.images[idx] * (255.0 / 16.0)).round().clip(0, 255).astype(np.uint8)
        self.targets = d.target[idx].astype(np.int64)
        self.pre = preprocessing
        self.augment = augment
        self._cache: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.targets)

    def image(self, i: int) -> Any:
        """The digit as a PIL image (8x8 grey), e.g. to write it to a file for ``predict``."""
        from PIL import Image

        return Image.fromarray(self.images[i], mode="L")

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        if self.augment:
            img = self.images[i]
            dy, dx = random.randint(-1, 1), random.randint(-1, 1)
            shifted = np.zeros_like(img)
            shifted[max(dy, 0):8 + min(dy, 0), max(dx, 0):8 + min(dx, 0)] = \
                img[max(-dy, 0):8 + min(-dy, 0), max(-dx, 0):8 + min(-dx, 0)]
            from PIL import Image

            arr = preprocess_image(Image.fromarray(shifted, mode="L"), self.pre)
        else:
            if i not in self._cache:
                self._cache[i] = preprocess_image(self.image(i), self.pre)
            arr = self._cache[i]
        return torch.from_numpy(arr), int(self.targets[i])


class ImageFolderDataset(Dataset):
    """``PATH/<class>/<image>`` (split 60/20/20 by a fixed seed) or ``PATH/{train,val,test}/<class>/<image>``."""

    def __init__(self, root: str, split: str, preprocessing: Any, augment: bool = False):
        base = Path(root)
        if not base.is_dir():
            raise DataError(f"image folder {root} does not exist; expected PATH/<class>/<images>")
        has_splits = (base / "train").is_dir()
        class_root = base / "train" if has_splits else base
        self.labels = sorted(p.name for p in class_root.iterdir() if p.is_dir())
        if not self.labels:
            raise DataError(f"no class folders in {class_root}; expected PATH/<class>/<images>")
        files: list[tuple[Path, int]] = []
        src = (base / split) if has_splits else base
        if has_splits and not src.is_dir():
            raise DataError(f"{base} has a train/ folder but no {split}/ folder")
        for c, name in enumerate(self.labels):
            d = src / name
            if d.is_dir():
                files += [(p, c) for p in sorted(d.rglob("*")) if p.suffix.lower() in IMAGE_EXTS]
        if not has_splits:
            idx = _split_indices(np.asarray([c for _, c in files]), seed=0)[split]
            files = [files[i] for i in idx]
        if not files:
            raise DataError(f"no images for split {split!r} in {src} (extensions {sorted(IMAGE_EXTS)})")
        self.files = files
        self.targets = np.asarray([c for _, c in files], dtype=np.int64)
        self.pre = preprocessing
        self.augment = augment

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path, c = self.files[i]
        img = load_image(path)
        if self.augment and random.random() < 0.5:
            from PIL import ImageOps

            img = ImageOps.mirror(img)
        return torch.from_numpy(preprocess_image(img, self.pre)), c


class UnlabelledFolderDataset(Dataset):
    """``PATH/<image>`` with no class folders (e.g. production images): val and test halves, label -1.

    Only label-free uses accept it (``calibrate --confidence ... --loss consistency``); there is no train split.
    """

    labels: list[str] = []

    def __init__(self, root: str, split: str, preprocessing: Any):
        if split not in ("val", "test"):
            raise DataError(f"{root} holds unlabelled images (no class folders): it has val and test halves but no "
                            f"{split!r} split; training needs PATH/<class>/<images>")
        files = sorted(p for p in Path(root).iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTS)
        order = np.random.default_rng(0).permutation(len(files))
        half = (len(files) + 1) // 2
        self.files = [files[i] for i in np.sort(order[:half] if split == "val" else order[half:])]
        if not self.files:
            raise DataError(f"no images for split {split!r} in {root} (extensions {sorted(IMAGE_EXTS)})")
        self.targets = np.full(len(self.files), -1, dtype=np.int64)
        self.pre = preprocessing

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return torch.from_numpy(preprocess_image(load_image(self.files[i]), self.pre)), -1


def is_unlabelled(spec: str) -> bool:
    """``imagefolder:PATH`` whose PATH holds image files and no sub-folders (no classes to learn labels from)."""
    if not spec.startswith("imagefolder:"):
        return False
    base = Path(spec.split(":", 1)[1])
    if not base.is_dir():
        return False
    entries = list(base.iterdir())
    return not any(p.is_dir() for p in entries) and any(p.suffix.lower() in IMAGE_EXTS for p in entries)


def create_dataset(spec: str, split: str, preprocessing: Any, augment: bool = False,
                   unlabelled_ok: bool = False) -> Dataset:
    """Build a data source from its spec string: ``digits`` or ``imagefolder:PATH``.

    ``unlabelled_ok``: also accept a flat folder of images without class folders (labels -1), for label-free uses.
    """
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; expected one of {SPLITS}")
    if spec == "digits":
        return DigitsDataset(split, preprocessing, augment)
    if is_unlabelled(spec):
        if not unlabelled_ok:
            raise DataError(f"{spec.split(':', 1)[1]} holds images but no class folders, so it has no labels; "
                            "only `calibrate --confidence ... --loss consistency` can use unlabelled images, "
                            "everything else needs PATH/<class>/<images>")
        return UnlabelledFolderDataset(spec.split(":", 1)[1], split, preprocessing)
    if spec.startswith("imagefolder:"):
        return ImageFolderDataset(spec.split(":", 1)[1], split, preprocessing, augment)
    raise UnknownNameError(f"unknown data source {spec!r}; expected 'digits' or 'imagefolder:PATH'")


def data_info(spec: str) -> DataInfo:
    """Class names of a data source, without preprocessing any image."""
    if spec == "digits":
        return DataInfo(labels=list(DigitsDataset.labels))
    if spec.startswith("imagefolder:"):
        base = Path(spec.split(":", 1)[1])
        root = base / "train" if (base / "train").is_dir() else base
        if not root.is_dir():
            raise DataError(f"image folder {base} does not exist; expected PATH/<class>/<images>")
        labels = sorted(p.name for p in root.iterdir() if p.is_dir())
        if not labels:
            raise DataError(f"no class folders in {root}")
        return DataInfo(labels=labels)
    raise UnknownNameError(f"unknown data source {spec!r}; expected 'digits' or 'imagefolder:PATH'")


def check_labels(labels: list[str], spec: str, what: str = "calibrate") -> None:
    """Refuse a data source whose classes differ from the model's (names and order), saying what to do."""
    have = data_info(spec).labels
    if have != list(labels):
        raise DataError(f"data {spec!r} has classes {have[:10]} but the model was exported with {list(labels)[:10]}; "
                        f"{what} on the data the model was trained for")


def stack_split(spec: str, split: str, preprocessing: Any, limit: int | None = None,
                unlabelled_ok: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """A whole split as ``(float32 [N, C, H, W], int64 [N])`` arrays (labels -1 if unlabelled), for calibration."""
    ds = create_dataset(spec, split, preprocessing, unlabelled_ok=unlabelled_ok)
    n = len(ds) if limit is None else min(limit, len(ds))
    xs, ys = zip(*(ds[i] for i in range(n)))
    return np.stack([x.numpy() for x in xs]), np.asarray(ys, dtype=np.int64)


def write_samples(spec: str, split: str, n: int, out_dir: str | Path) -> list[Path]:
    """Write the first ``n`` images of a split as PNG files named ``<index>_label<label>.png`` (for ``predict``)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pre = {"input_size": [3, 8, 8], "mean": [0, 0, 0], "std": [1, 1, 1]}
    ds = create_dataset(spec, split, pre)
    paths = []
    for i in range(min(n, len(ds))):
        if isinstance(ds, DigitsDataset):
            img, label = ds.image(i), ds.labels[int(ds.targets[i])]
        else:
            path, c = ds.files[i]  # type: ignore[attr-defined]
            img, label = load_image(path), ds.labels[c]  # type: ignore[attr-defined]
        p = out / f"{i:04d}_label{label}.png"
        img.save(p)
        paths.append(p)
    return paths
