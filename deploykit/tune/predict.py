"""``deploykit predict``: images in, one result per image (label, confidence, exit stage) out."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from deploykit.data.preprocess import load_image, preprocess_image
from deploykit.runtime.cascade import Cascade


def predict(
        engine_dir: str | os.PathLike,
        images: list[str | os.PathLike],
        backend: str = "ort-cpu",
        thresholds: list[float | None] | None = None,
        batch_size: int = 32,
        texts: list[str] | None = None,
        task: str | None = None,
) -> list[dict[str, Any]]:
    """Classify image files with the cascade; every image is decoded first, so a bad file fails before any work.

    MuE (vision-language) engines answer instead: ``task`` ``entailment`` (one hypothesis in ``texts`` per image)
    or ``caption``.
    """
    from deploykit.manifest import Manifest

    manifest = Manifest.load(engine_dir)
    if manifest.task.startswith("vl"):
        from deploykit.runtime.generation import predict_vl

        if thresholds is not None:
            from deploykit.errors import ConfigError

            raise ConfigError("--thresholds lists one threshold per cascade stage; MuE engines have per-task "
                              "thresholds for the image stream, text stream and decoder: run `deploykit "
                              f"calibrate {engine_dir}` to set them (stored in the manifest's extra.mue.thresholds)")

        return predict_vl(engine_dir, list(images), texts, task or ("entailment" if texts else "caption"))
    if texts or task:
        from deploykit.errors import ConfigError

        raise ConfigError("--text / --task apply to vision-language (MuE) engines; this is a classifier")
    with Cascade.from_dir(engine_dir, backend=backend) as cascade:
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
