"""Image preprocessing from the manifest's ``preprocessing`` block: the same code in training, predict and serve."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import numpy as np

from deploykit.errors import DataError

_INTERP = {"bicubic": 3, "bilinear": 2, "nearest": 0, "lanczos": 1, "box": 4, "hamming": 5}


def _pil_interp(name: str) -> int:
    return _INTERP.get(name, 3)


def preprocess_image(img: Any, pre: Any) -> np.ndarray:
    """PIL image -> normalised ``float32 [3, H, W]`` per the preprocessing spec.

    The whole image is resized to the input size (``crop_pct`` 1.0) or resized then center-cropped
    (``crop_pct`` < 1, timm's eval transform).
    """
    c, h, w = (int(v) for v in _get(pre, "input_size"))
    img = img.convert("RGB" if c == 3 else "L")
    crop_pct = float(_get(pre, "crop_pct", 1.0))
    interp = _pil_interp(str(_get(pre, "interpolation", "bicubic")))
    if crop_pct < 1.0:
        scale_h, scale_w = int(h / crop_pct), int(w / crop_pct)
        iw, ih = img.size
        r = max(scale_h / ih, scale_w / iw)
        img = img.resize((max(w, round(iw * r)), max(h, round(ih * r))), interp)
        left, top = (img.size[0] - w) // 2, (img.size[1] - h) // 2
        img = img.crop((left, top, left + w, top + h))
    else:
        img = img.resize((w, h), interp)
    arr = np.asarray(img, dtype=np.float32) / 255.0
    if arr.ndim == 2:
        arr = arr[:, :, None]
    arr = arr.transpose(2, 0, 1)
    mean = np.asarray(_get(pre, "mean"), dtype=np.float32)[:, None, None]
    std = np.asarray(_get(pre, "std"), dtype=np.float32)[:, None, None]
    return np.ascontiguousarray((arr - mean) / std, dtype=np.float32)


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
        raise DataError(f"can't decode image {name}: {e}; send a PNG, JPEG, BMP, GIF or WebP file") from e


def _get(pre: Any, key: str, default: Any = None) -> Any:
    if isinstance(pre, dict):
        return pre.get(key, default) if default is not None else pre[key]
    return getattr(pre, key, default)
