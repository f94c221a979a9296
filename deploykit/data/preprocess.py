"""Image preprocessing from the manifest's ``preprocessing`` block: the same code in training, predict and serve."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import numpy as np

from deploykit.errors import DataError


def preprocess_image(img: Any, pre: Any) -> np.ndarray:
    """PIL image -> normalised ``float32 [C, H, W]`` per the preprocessing spec (numpy and PIL only).

    Resize and crop follow timm's eval transform for the recorded ``crop_pct`` / ``crop_mode`` / interpolation
    (:func:`deploykit.data.transforms.resize_crop`); a spec without ``crop_mode`` (written before it was recorded)
    stretches the whole image, as those engines were trained.
    """
    from deploykit.data.transforms import resize_crop

    c, h, w = (int(v) for v in _get(pre, "input_size"))
    mean = np.asarray(_get(pre, "mean"), dtype=np.float32)
    std = np.asarray(_get(pre, "std"), dtype=np.float32)
    img = to_8bit(img).convert("RGB" if c == 3 else "L")
    img = resize_crop(img, h, w, crop_pct=float(_get(pre, "crop_pct", 1.0)),
                      crop_mode=str(_get(pre, "crop_mode", "squash")),
                      interpolation=str(_get(pre, "interpolation", "bicubic")), mean=tuple(mean.tolist()))
    arr = np.asarray(img, dtype=np.uint8).astype(np.float32) / np.float32(255.0)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    arr = arr.transpose(2, 0, 1)
    return np.ascontiguousarray((arr - mean[:, None, None]) / std[:, None, None], dtype=np.float32)


def to_8bit(img: Any) -> Any:
    """16-bit and float images (TIFF, PNG) as 8-bit grey; PIL's own conversion would clip them to white."""
    if img.mode not in ("I", "F") and not img.mode.startswith("I;16"):
        return img
    from PIL import Image

    arr = np.asarray(img, dtype=np.float64)
    top = 1.0 if img.mode == "F" and arr.size and arr.max() <= 1.0 else (255.0 if arr.size and arr.max() <= 255
                                                                         else 65535.0)
    return Image.fromarray(np.clip(np.round(arr * (255.0 / top)), 0, 255).astype(np.uint8), mode="L")


def load_image(source: str | os.PathLike | bytes) -> Any:
    """Open an image file or encoded bytes, with a clear error when it can't be decoded."""
    from PIL import Image, UnidentifiedImageError

    try:
        if isinstance(source, bytes | bytearray):
            img = Image.open(io.BytesIO(source))
        else:
            if not Path(source).exists():
                raise DataError(f"image {source} does not exist")
            img = Image.open(source)
        img.load()
        return img
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        name = "request bytes" if isinstance(source, bytes | bytearray) else str(source)
        raise DataError(f"can't decode image {name}: {e}; send a PNG, JPEG, BMP, GIF, TIFF or WebP file") from e


def _get(pre: Any, key: str, default: Any = None) -> Any:
    if isinstance(pre, dict):
        return pre.get(key, default) if default is not None else pre[key]
    return getattr(pre, key, default)
