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
        raise DataError(f"can't decode image {name}: {e}; send a PNG, JPEG, BMP, GIF, TIFF or WebP file") from e


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
