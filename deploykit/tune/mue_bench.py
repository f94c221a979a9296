"""MuE quality and wall-clock on the SYNTHETIC test split: ``bench_vl`` (``deploykit bench`` on a MuE engine)."""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np

from deploykit.runtime.exit_rules import SampleResult, Thresholds, layer_fraction
from deploykit.runtime.generation import MuEEngine


def bench_vl(engine_dir: str | os.PathLike, task: str | None = None, n: int = 200, batch_size: int = 1,
             repeats: int = 3, threads: int | None = None, thresholds: dict[str, Any] | None = None
             ) -> dict[str, Any]:
    """``deploykit bench`` for MuE engines, on the SYNTHETIC test split.

    Quality and layers used with the engine's thresholds vs full depth, and the wall-clock of both (median of
    ``repeats``, after a warm-up).
    """
    from deploykit.data.vl import synthetic_vl
    from deploykit.runtime.bleu import corpus_bleu

    eng = MuEEngine.from_dir(engine_dir, threads)
    tasks = [task] if task else eng.tasks
    report: dict[str, Any] = {"engine": str(engine_dir), "data": "synthetic-vl test split (SYNTHETIC)",
                              "batch_size": batch_size, "n": n, "tasks": {}}
    for t in tasks:
        eng.check_task(t)
        rows = synthetic_vl("test", n=n, size=int(eng.manifest.preprocessing.input_size[-1]), tasks=(t,))
        imgs = eng.load_images([r.image for r in rows])
        ids = eng.encode_texts([r.text for r in rows])
        thr = Thresholds(**thresholds[t]) if thresholds and t in thresholds else eng.thresholds[t]
        entry = {}
        for name, th in (("full", Thresholds.full_depth()), ("exits", thr)):
            eng.generate_ids(imgs[:batch_size], ids[:batch_size], t, th, batch_size=batch_size)  # warm-up
            times, res = [], []
            for _ in range(repeats):
                t0 = time.perf_counter()
                res = eng.generate_ids(imgs, ids, t, th, batch_size=batch_size)
                times.append(time.perf_counter() - t0)
            entry[name] = summarize(res, rows, eng, corpus_bleu) | {"seconds": float(np.median(times))}
        entry["speedup"] = entry["full"]["seconds"] / entry["exits"]["seconds"]
        report["tasks"][t] = entry
    eng.close()
    return report


def summarize(res: list[SampleResult], rows: list[Any], eng: MuEEngine, bleu: Any) -> dict[str, Any]:
    """Quality (accuracy or BLEU-4) and mean layers used for generated results against their examples."""
    texts = [eng.vocab.decode(r.tokens) for r in res]
    task = rows[0].task
    q = (float(np.mean([t == r.target for t, r in zip(texts, rows)])) if task == "entailment"
         else bleu(texts, [[r.target] for r in rows]))
    frac = [layer_fraction(r.img_layers, r.txt_layers, r.dec_layers, eng.n_enc, eng.n_dec) for r in res]
    return {"accuracy" if task == "entailment" else "bleu4": q, "layer_fraction": float(np.mean(frac)),
            "image_layers": float(np.mean([r.img_layers for r in res])),
            "text_layers": float(np.mean([r.txt_layers for r in res])),
            "decoder_layers_per_token": float(np.mean([np.mean(r.dec_layers) for r in res]))}
