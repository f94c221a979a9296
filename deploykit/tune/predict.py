"""``deploykit predict``: image files and directories in, one result per image (label, confidence, exit stage) out.

A file that can't be read or decoded becomes an ``{"image", "error"}`` result and the others go on.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from deploykit.data.preprocess import load_image, preprocess_image
from deploykit.errors import DataError
from deploykit.manifest import Manifest, as_manifest
from deploykit.runtime.engines import open_cascade


def expand_images(paths: list[str | os.PathLike]) -> list[Path]:
    """Files as given, directories as their image files (listed extensions, recursive, sorted)."""
    from deploykit.data.datasets import IMAGE_EXTS

    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_EXTS)
            if not found:
                raise DataError(f"no images in directory {p} (extensions {', '.join(sorted(IMAGE_EXTS))})")
            out += found
        else:
            out.append(p)
    return out


def predict(
        engine_dir: str | os.PathLike | Manifest,
        images: list[str | os.PathLike],
        backend: str = "ort-cpu",
        thresholds: list[float | None] | None = None,
        batch_size: int = 32,
) -> list[dict[str, Any]]:
    """Classify image files and directories with the cascade: one result per image (see :func:`iter_predict`)."""
    return list(iter_predict(engine_dir, images, backend, thresholds, batch_size))


def iter_predict(
        engine_dir: str | os.PathLike | Manifest,
        images: list[str | os.PathLike],
        backend: str = "ort-cpu",
        thresholds: list[float | None] | None = None,
        batch_size: int = 32,
) -> Iterator[dict[str, Any]]:
    """Yield one result per image, batch by batch; a file that can't be read yields ``{"image", "error"}``.

    Directories are expanded to their image files. (Vision-language engines answer through their family:
    ``deploykit.families.family_for_manifest(m).predict``.)
    """
    manifest = as_manifest(engine_dir)
    files = expand_images(images)
    with open_cascade(manifest, backend=backend) as cascade:
        m = cascade.manifest
        for lo in range(0, len(files), batch_size):
            chunk, arrays, errors = files[lo:lo + batch_size], [], {}
            for i, p in enumerate(chunk):
                try:
                    arrays.append(preprocess_image(load_image(p), m.preprocessing))
                except DataError as e:
                    errors[i] = str(e)
            res = cascade.run(np.stack(arrays), thresholds=thresholds) if arrays else None
            j = 0
            for i, p in enumerate(chunk):
                if i in errors:
                    yield {"image": str(p), "error": errors[i]}
                    continue
                c = int(res.labels_idx[j])
                yield {"image": str(p), "label": m.labels[c], "class_index": c,
                       "confidence": float(res.probs[j, c]), "score": float(res.score[j]),
                       "exit_stage": int(res.exit_stage[j])}
                j += 1
