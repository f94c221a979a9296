"""Image preprocessing from the manifest's ``preprocessing`` block: the same code in training, predict and serve."""

from __future__ import annotations

import io
import os
import struct
import warnings
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


MAX_IMAGE_PIXELS = 4096 * 4096  # 16.8 MP (a 48 MP phone JPEG fits via draft); decoded RGB at most ~50 MB


def load_image(source: str | os.PathLike | bytes, max_pixels: int | None = MAX_IMAGE_PIXELS,
               draft_size: tuple[int, int] | None = None) -> Any:
    """Open an image file or encoded bytes, with a clear error when it can't be decoded.

    The pixel budget is checked from the header, before anything is decoded, so a small file that claims a huge
    image (a decompression bomb) costs nothing. ``draft_size`` (width, height) lets a JPEG over the budget decode
    at a reduced scale that still covers it (``Image.draft``), so large photos are served; images within the
    budget decode exactly as in ``predict``.
    """
    from PIL import Image

    name = "request bytes" if isinstance(source, bytes | bytearray) else str(source)
    if not isinstance(source, bytes | bytearray) and not Path(source).is_file():
        raise DataError(f"image {source} does not exist or is not a file")
    try:
        with warnings.catch_warnings():  # the budget below is the check; PIL's global one only warns or raises
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(source) if isinstance(source, bytes | bytearray) else source)
            if draft_size is not None and img.format == "JPEG" and _over(img.size, max_pixels):
                img.draft("RGB", draft_size)  # decode at 1/2, 1/4 or 1/8 scale, still covering draft_size
            w, h = img.size
            if _over((w, h), max_pixels):
                raise DataError(f"image {name} is {w} x {h} = {w * h} pixels, over the pixel budget of {max_pixels}; "
                                "resize it before sending (the model sees a small fixed size anyway)")
            img.load()
        return img
    except DataError:
        raise
    except Image.DecompressionBombError as e:
        raise DataError(f"image {name} is over the pixel budget, refused as a decompression bomb ({e}); resize it "
                        "before sending") from e
    except (OSError, SyntaxError, ValueError, TypeError, IndexError, struct.error, EOFError, MemoryError) as e:
        # PIL's decoders raise all of these on malformed files; none of them is a server fault
        raise DataError(f"can't decode image {name}: {e}; send a PNG, JPEG, BMP, GIF or WebP file") from e


def _over(size: tuple[int, int], max_pixels: int | None) -> bool:
    return max_pixels is not None and size[0] * size[1] > max_pixels


def decode_image(data: bytes, pre: Any, max_pixels: int | None = MAX_IMAGE_PIXELS) -> np.ndarray:
    """Encoded image bytes (untrusted) -> model input ``float32 [C, H, W]``, within a pixel budget.

    Raises:
        DataError: undecodable, over ``max_pixels``, or not convertible to the model's input.
    """
    c, h, w = (int(v) for v in _get(pre, "input_size"))
    img = load_image(data, max_pixels=max_pixels, draft_size=(w, h))
    try:
        return preprocess_image(img, pre)
    except (OSError, ValueError, TypeError) as e:
        raise DataError(f"can't convert the image ({img.mode}, {img.size}) to the model's input: {e}") from e


def _get(pre: Any, key: str, default: Any = None) -> Any:
    if isinstance(pre, dict):
        return pre.get(key, default) if default is not None else pre[key]
    return getattr(pre, key, default)
