"""MuE quality and wall-clock on the SYNTHETIC test split: ``bench_vl`` (``deploykit bench`` on a MuE engine)."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from deploykit.errors import ConfigError, DataError
from deploykit.manifest import Manifest, as_manifest
from deploykit.runtime.exit_rules import SampleResult, Thresholds, layer_fraction
from deploykit.runtime.generation import MuEEngine


def bench_vl(engine_dir: str | os.PathLike | Manifest, task: str | None = None, n: int = 200,
             batch_size: int | None = None, repeats: int = 3, threads: int | None = None,
             thresholds: dict[str, Any] | None = None, *, batch_sizes: list[int] | None = None, warmup: int = 1,
             data: str | None = None, compare: str | os.PathLike | Manifest | None = None,
             eager: Callable[..., list[SampleResult]] | None = None, json_out: str | os.PathLike | None = None,
             progress: bool = False) -> dict[str, Any]:
    """``deploykit bench`` for MuE engines: quality, layers used and wall-clock, full depth against exits.

    Every variant runs on the same test rows (``data``: the SYNTHETIC scenes by default, or ``jsonl:PATH``),
    interleaved repeat by repeat after ``warmup`` passes; times are min / median / max over ``repeats``. With
    ``compare`` (e.g. the INT8 copy from ``deploykit quantize``) that engine's full depth and exits (at its own,
    re-calibrated thresholds) join the same loop; ``eager`` (PyTorch's per-sample reference generation, from
    ``bench --checkpoint``) joins at the engine's thresholds, on the first batch size only.
    """
    from deploykit.tune.bench import cpu_model, loadavg
    from deploykit.tune.mue_calibrate import load_vl_split

    manifest = as_manifest(engine_dir)
    sizes = list(batch_sizes or [batch_size or 1])
    if min(sizes) < 1 or repeats < 1 or warmup < 0 or n < 1:
        raise ConfigError(f"batch sizes, --repeats and --samples must be >= 1 and --warmup >= 0; got batch sizes "
                          f"{sizes}, repeats {repeats}, warmup {warmup}, samples {n}")
    eng = MuEEngine(manifest, threads)
    other = MuEEngine(as_manifest(compare), threads) if compare is not None else None
    try:
        tasks = [task] if task else eng.tasks
        inputs = {}
        for t in tasks:
            eng.check_task(t)
            if other is not None:
                other.check_task(t)
            rows = load_vl_split(data, "test", t, n, int(manifest.preprocessing.input_size[-1]))
            if not rows:
                raise DataError(f"no {t} rows in the test split of {data or 'synthetic-vl'}")
            inputs[t] = (rows, eng.load_images([r.image for r in rows]), eng.encode_texts([r.text for r in rows]))
        runs = []
        for i, bs in enumerate(sizes):
            per_task = {}
            for t in tasks:
                rows, imgs, ids = inputs[t]
                thr = Thresholds(**thresholds[t]) if thresholds and t in thresholds else eng.thresholds[t]
                variants = _variants(eng, other, eager if i == 0 else None, imgs, ids, t, thr, bs)
                per_task[t] = _measure(variants, rows, eng, warmup, repeats)
            runs.append({"batch_size": bs, "tasks": per_task})
            if progress:
                print(f"batch {bs}: " + "; ".join(
                    f"{t} exits {v['exits']['ms']['median']:.0f} ms vs full {v['full']['ms']['median']:.0f} ms "
                    f"({v['speedup']:.2f}x)" for t, v in per_task.items()), flush=True)
    finally:
        eng.close()
        if other is not None:
            other.close()
    report: dict[str, Any] = {
        "engine": str(manifest.root), "data": f"{data} test split" if data else "synthetic-vl test split (SYNTHETIC)",
        "n": n, "batch_size": sizes[-1], "batch_sizes": sizes, "threads": threads, "warmup": warmup,
        "repeats": repeats, "cpu": cpu_model(), "loadavg_start": loadavg(), "runs": runs, "tasks": runs[-1]["tasks"],
        "precision": _precision(manifest)}
    if other is not None:
        report["compare"] = {"engine": str(other.manifest.root), "precision": _precision(other.manifest)}
    if json_out is not None:
        json_out = Path(json_out)
        json_out.parent.mkdir(parents=True, exist_ok=True)
        report["plot"] = str(json_out.with_suffix(".png"))
        plot_bench_vl(report, report["plot"])
        json_out.write_text(json.dumps(report, indent=2) + "\n")
    return report


def _variants(eng: MuEEngine, other: MuEEngine | None, eager: Callable[..., list[SampleResult]] | None,
              imgs: list[np.ndarray], ids: list[list[int]], task: str, thr: Thresholds, bs: int
              ) -> dict[str, Callable[[], list[SampleResult]]]:
    """The timed variants of one task and batch size: full depth / exits of this engine (and the compared one)."""
    full = Thresholds.full_depth()
    out = {"full": lambda: eng.generate_ids(imgs, ids, task, full, batch_size=bs),
           "exits": lambda: eng.generate_ids(imgs, ids, task, thr, batch_size=bs)}
    if other is not None:
        out["compare_full"] = lambda: other.generate_ids(imgs, ids, task, full, batch_size=bs)
        out["compare_exits"] = lambda: other.generate_ids(imgs, ids, task, batch_size=bs)
    if eager is not None:
        out["torch_exits"] = lambda: eager(imgs, ids, task, thr, eng.meta["kv_policy"])
    return out


def _precision(m: Manifest) -> str:
    return "int8-dynamic" if "quantization" in m.extra else "fp32"


def _measure(variants: dict[str, Callable[[], list[SampleResult]]], rows: list[Any], eng: MuEEngine, warmup: int,
             repeats: int) -> dict[str, Any]:
    """Warm up, then time every variant once per repeat (interleaved); quality and layers from the last pass."""
    from deploykit.runtime.bleu import corpus_bleu

    for _ in range(warmup):
        for fn in variants.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in variants}
    results: dict[str, list[SampleResult]] = {}
    for _ in range(repeats):
        for k, fn in variants.items():
            t0 = time.perf_counter()
            results[k] = fn()
            times[k].append(time.perf_counter() - t0)
    entry: dict[str, Any] = {}
    for k in variants:
        ms = 1000 * np.asarray(times[k])
        entry[k] = summarize(results[k], rows, eng, corpus_bleu) | {
            "seconds": float(np.median(times[k])),
            "ms": {"min": float(ms.min()), "median": float(np.median(ms)), "max": float(ms.max())}}
    entry["speedup"] = entry["full"]["seconds"] / entry["exits"]["seconds"]
    if "compare_exits" in entry:
        entry["exits_speedup_vs_compare"] = entry["compare_exits"]["seconds"] / entry["exits"]["seconds"]
    return entry


def plot_bench_vl(report: dict[str, Any], path: str | os.PathLike) -> None:
    """Bars of median ms per pass for each variant and task (largest batch size), quality annotated."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = report["tasks"]
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.6 * len(tasks), 3.8), dpi=120, squeeze=False)
    for ax, (t, e) in zip(axes[0], tasks.items()):
        names = [k for k in e if isinstance(e[k], dict) and "ms" in e[k]]
        vals = [e[k]["ms"]["median"] for k in names]
        bars = ax.bar(names, vals, color=[f"C{i}" for i in range(len(names))])
        metric = "accuracy" if "accuracy" in e["full"] else "bleu4"
        for b, k in zip(bars, names):
            ax.text(b.get_x() + b.get_width() / 2, b.get_height(),
                    f"{e[k][metric]:.3f}\n{100 * e[k]['layer_fraction']:.0f}% layers", ha="center", va="bottom",
                    fontsize=7)
        ax.set_title(f"{t} (batch {report['batch_size']}, n {report['n']}): {metric}, layers", fontsize=9)
        ax.set_ylabel("ms per pass (median)")
        ax.tick_params(axis="x", labelsize=7)
    fig.suptitle(f"deploykit bench (MuE): {report['engine']} — {report['data']}", fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


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
