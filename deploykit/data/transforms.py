"""timm's eval transform (resize, centre crop by ``crop_pct``, interpolation) with PIL alone, for run time.

A pretrained timm model expects ``timm.data.create_transform(**resolve_data_config(model=...))``: resize so the
shorter side is ``floor(size / crop_pct)``, crop the centre ``size`` pixels, then scale and normalise. These functions
reproduce torchvision's arithmetic (sizes, rounding of the crop offsets, padding) on PIL images, so serving needs
neither torch nor torchvision and still feeds the model the pixels it was trained and evaluated on.
"""

from __future__ import annotations

import math
from typing import Any

from deploykit.errors import DataError

# PIL resampling filters by timm's interpolation names (timm.data.transforms.str_to_interp_mode)
INTERPOLATIONS = {"nearest": 0, "lanczos": 1, "bilinear": 2, "bicubic": 3, "box": 4, "hamming": 5}
CROP_MODES = ("center", "squash", "border")


def pil_filter(name: str) -> int:
    """PIL resampling filter for a timm interpolation name; unknown names are refused, never guessed."""
    try:
        return INTERPOLATIONS[name]
    except KeyError:
        raise DataError(f"unknown interpolation {name!r} in the preprocessing; expected one of "
                        f"{sorted(INTERPOLATIONS)}") from None


def _scale_size(h: int, w: int, crop_pct: float) -> tuple[int, int]:
    return math.floor(h / crop_pct), math.floor(w / crop_pct)


def _keep_ratio_size(ih: int, iw: int, sh: int, sw: int, longest: float) -> tuple[int, int]:
    """As timm's ResizeKeepRatio: one ratio for both edges (shortest edge fits at ``longest`` 0, longest at 1)."""
    rh, rw = ih / sh, iw / sw
    ratio = max(rh, rw) * longest + min(rh, rw) * (1.0 - longest)
    return round(ih / ratio), round(iw / ratio)


def _shorter_side_size(ih: int, iw: int, size: int) -> tuple[int, int]:
    """As torchvision's ``Resize(int)``: the shorter edge becomes ``size``, the longer keeps the aspect (truncated)."""
    short, long = (ih, iw) if ih <= iw else (iw, ih)
    new_long = int(size * long / short)
    return (size, new_long) if ih <= iw else (new_long, size)


def center_crop(img: Any, h: int, w: int, fill: tuple[int, ...] | int = 0) -> Any:
    """As torchvision's ``CenterCrop`` (pads with ``fill`` when the image is smaller, then crops the centre)."""
    iw, ih = img.size
    if ih < h or iw < w:
        from PIL import Image

        pw, ph = max(w, iw), max(h, ih)
        canvas = Image.new(img.mode, (pw, ph), fill)
        canvas.paste(img, ((pw - iw) // 2, (ph - ih) // 2))
        img, (iw, ih) = canvas, (pw, ph)
    top, left = int(round((ih - h) / 2.0)), int(round((iw - w) / 2.0))
    return img.crop((left, top, left + w, top + h))


def resize_crop(img: Any, h: int, w: int, crop_pct: float = 1.0, crop_mode: str = "squash",
                interpolation: str = "bicubic", mean: tuple[float, ...] = (0.0, 0.0, 0.0)) -> Any:
    """Resize then crop a PIL image to ``(h, w)`` as timm's ``transforms_imagenet_eval`` does.

    ``crop_mode``: ``center`` keeps the aspect ratio and crops (timm's default); ``squash`` scales each edge
    separately (with ``crop_pct`` 1.0: the whole image stretched, deploykit's behaviour before it recorded a crop
    mode); ``border`` fits the longest edge and pads with the mean colour.
    """
    if not 0 < crop_pct <= 4:
        raise DataError(f"preprocessing crop_pct {crop_pct} is out of range (0, 4]")
    if crop_mode not in CROP_MODES:
        raise DataError(f"unknown crop_mode {crop_mode!r} in the preprocessing; expected one of {CROP_MODES}")
    flt = pil_filter(interpolation)
    sh, sw = _scale_size(h, w, crop_pct)
    iw, ih = img.size
    if crop_mode == "squash":
        size = (sh, sw)
    elif crop_mode == "border":
        size = _keep_ratio_size(ih, iw, sh, sw, longest=1.0)
    elif sh == sw:
        size = _shorter_side_size(ih, iw, sh)
    else:
        size = _keep_ratio_size(ih, iw, sh, sw, longest=0.0)
    if size != (ih, iw):
        img = img.resize((size[1], size[0]), flt)
    fill: tuple[int, ...] | int = 0
    if crop_mode == "border":
        fill = tuple(round(255 * v) for v in mean) if img.mode == "RGB" else round(255 * mean[0])
    return center_crop(img, h, w, fill)
