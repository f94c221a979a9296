"""``deploykit predict``: images in, one result per image (label, confidence, exit stage) out."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from deploykit.data.preprocess import load_image, preprocess_image
from deploykit.manifest import Manifest, as_manifest
from deploykit.runtime.engines import open_cascade


def predict(
        engine_dir: str | os.PathLike | Manifest,
        images: list[str | os.PathLike],
        backend: str = "ort-cpu",
        thresholds: list[float | None] | None = None,
        batch_size: int = 32,
) -> list[dict[str, Any]]:
    """Classify image files with the cascade; every image is decoded first, so a bad file fails before any work.

    (Vision-language engines answer through their family: ``deploykit.families.family_for_manifest(m).predict``.)
    """
    manifest = as_manifest(engine_dir)
    with open_cascade(manifest, backend=backend) as cascade:
        m = cascade.manifest
        arrays = [preprocess_image(load_image(p), m.preprocessing) for p in images]
        results: list[dict[str, Any]] = []
        for lo in range(0, len(arrays), batch_size):
            res = cascade.run(np.stack(arrays[lo:lo + batch_size]), thresholds=thresholds)
            for i, p in enumerate(images[lo:lo + batch_size]):
                c = int(res.labels_idx[i])
                results.append({"image": str(p), "label": m.labels[c], "class_index": c,
                                "confidence": float(res.probs[i, c]), "score": float(res.score[i]),
                                "exit_stage": int(res.exit_stage[i])})
    return results
