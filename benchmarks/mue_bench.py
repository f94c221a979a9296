"""MuE benchmark on the SYNTHETIC shapes data: quality vs layers used (threshold sweep), and ORT wall-clock.

The thresholds come from ``deploykit calibrate`` (``deploykit.tune.mue_calibrate.calibrate_mue``): per task, a
sweep on the val split, the cheapest point within the quality target (default: 1.0 accuracy point for entailment,
3.0 BLEU-4 points for captioning), written into the engine. Every test figure here is the engine's **default**
behaviour after calibration (``MuEEngine`` with no thresholds given), beside full depth and fixed shallower depths.
Wall-clock: the same ORT runtime with the calibrated exits vs with exits disabled (full depth), batch 1 and batch
32, interleaved repeats after a warm-up, median of the paired ratios.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/mue_bench.py --run runs/mue-synthetic --engine engines/mue-synthetic
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from deploykit.data.vl import synthetic_vl
from deploykit.runtime.bleu import corpus_bleu
from deploykit.runtime.exit_rules import Thresholds
from deploykit.runtime.generation import MuEEngine
from deploykit.tune.bench import cpu_model
from deploykit.tune.mue_bench import summarize
from deploykit.tune.mue_calibrate import calibrate_mue

TARGET = {"entailment": (0.99, 0.40), "caption": (0.96, 0.30)}  # (quality ratio, layer reduction)
PAPER = {"entailment": "SNLI-VE test 88.5 vs 89.2 (99.2%) at -50% expected time (Table 1); 88.6 at -37%, "
                       "87.5 at -55% (Table 3)",
         "caption": "COCO CIDEr 137.0 vs 146.7 (93.4%), BLEU-4 41.6 vs 42.8 (97.2%) at -40.2% expected time "
                    "(Table 1); BLEU-4 42.0 at -28.9%, 41.0 at -45% (Table 3)"}


def data(eng: MuEEngine, split: str, task: str, n: int):
    rows = synthetic_vl(split, n=n, size=int(eng.manifest.preprocessing.input_size[-1]), tasks=(task,))
    return rows, eng.load_images([r.image for r in rows]), eng.encode_texts([r.text for r in rows])


def measure(eng, rows, imgs, ids, task, thr, bs=64, depth=None, kv_policy=None):
    res = eng.generate_ids(imgs, ids, task, thr, kv_policy=kv_policy, batch_size=bs, depth=depth)
    return summarize(res, rows, eng, corpus_bleu)


def timeit(eng, imgs, ids, task, bs, repeats):
    """Full depth and the calibrated default, interleaved (A, B, A, B, ...) so that slow swings in the load of a
    shared machine hit both; the speed-up is the median of the paired ratios (also: ratio of the minima)."""
    full = Thresholds.full_depth()
    for thr in (full, None):  # warm-up
        eng.generate_ids(imgs[:bs], ids[:bs], task, thr, batch_size=bs)
    tf, te = [], []
    for _ in range(repeats):
        for thr, acc in ((full, tf), (None, te)):
            t0 = time.perf_counter()
            eng.generate_ids(imgs, ids, task, thr, batch_size=bs)
            acc.append(time.perf_counter() - t0)
    return {"full_s": float(np.median(tf)), "exits_s": float(np.median(te)),
            "speedup": float(np.median([f / e for f, e in zip(tf, te)])), "full_min_s": min(tf),
            "exits_min_s": min(te), "speedup_of_minima": min(tf) / min(te), "repeats": repeats}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", default="runs/mue-synthetic")
    ap.add_argument("--engine", default="engines/mue-synthetic")
    ap.add_argument("--n-val", type=int, default=300)
    ap.add_argument("--n-test", type=int, default=500)
    ap.add_argument("--n-time", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--max-drop-entailment", type=float, default=None, help="accuracy points (default 1.0)")
    ap.add_argument("--max-drop-caption", type=float, default=None, help="BLEU-4 points (default 3.0)")
    ap.add_argument("--out", default="bench-out/mue")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if not (Path(a.engine) / "deploykit.json").exists():
        from deploykit.export.mue import export_mue

        export_mue(a.run, a.engine, n_check=a.n_test)
    drops = {k: v for k, v in (("entailment", a.max_drop_entailment), ("caption", a.max_drop_caption))
             if v is not None}
    cal = calibrate_mue(a.engine, max_drop=drops or None, n_val=a.n_val, n_test=a.n_test, threads=1,
                        json_out=out / "calibration.json")
    eng = MuEEngine.from_dir(a.engine, threads=1)  # re-opened: the calibrated thresholds are now its defaults
    report = {"data": "synthetic-vl (SYNTHETIC shapes scenes; not SNLI-VE / COCO)", "engine": a.engine,
              "parity": eng.meta.get("parity"), "cpu": cpu_model(), "calibration": str(out / "calibration.json"),
              "tasks": {}}
    for task in eng.tasks:
        c = cal["tasks"][task]
        key = "accuracy" if task == "entailment" else "bleu4"
        trows, timgs, tids = data(eng, "test", task, a.n_test)
        default = measure(eng, trows, timgs, tids, task, None)  # the engine's calibrated default
        full_t = measure(eng, trows, timgs, tids, task, Thresholds.full_depth())
        # entailment answers in one step, so the KV policy only matters for captions
        compute = default if task == "entailment" else measure(eng, trows, timgs, tids, task, None,
                                                                kv_policy="compute")
        fixed = {k: measure(eng, trows, timgs, tids, task, Thresholds.full_depth(), depth=k)
                 for k in range(1, eng.n_enc)}
        n = a.n_time
        timing = {}
        for bs, m in ((1, n), (32, 4 * n)):  # batch 32 on 4x the samples: runs long enough to time on a busy CPU
            timing[f"batch{bs}"] = timeit(eng, timgs[:m], tids[:m], task, bs, a.repeats) | {"samples": len(tids[:m])}
        ideal = 1 / default["layer_fraction"]
        report["tasks"][task] = {
            "metric": key, "objective": c["objective"], "val_full": c["val"]["full"], "val_chosen": c["val"]["chosen"],
            "points_searched": c["points_searched"], "pareto_val": c["pareto_val"],
            "chosen_thresholds": eng.thresholds[task].__dict__,
            "test_full": full_t, "test_exits": default, "test_exits_kv_compute": compute, "test_fixed_depth": fixed,
            "quality_ratio": default[key] / max(full_t[key], 1e-9), "layer_reduction": 1 - default["layer_fraction"],
            "timing": timing, "ideal_speedup": ideal, "paper": PAPER[task],
            "targets": {"quality_ratio_min": TARGET[task][0], "layer_reduction_min": TARGET[task][1],
                        "speedup_min": 0.8 * ideal}}
        print(task, json.dumps({k: v for k, v in report["tasks"][task].items() if k != "pareto_val"}, indent=1))
    eng.close()
    (out / "mue_bench.json").write_text(json.dumps(report, indent=1) + "\n")
    plot(report, {t: c["sweep_val"] for t, c in cal["tasks"].items()}, out / "mue_bench.png")
    print("wrote", out / "mue_bench.json", out / "mue_bench.png")


def plot(report: dict, sweeps: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(report["tasks"]), figsize=(6 * len(report["tasks"]), 4.2))
    for ax, (task, r) in zip(np.atleast_1d(axes), report["tasks"].items()):
        key = r["metric"]
        xs = [s["layer_fraction"] for s in sweeps[task]]
        ys = [s["quality"] for s in sweeps[task]]
        ax.scatter(xs, ys, s=10, alpha=0.4, label="threshold sweep (val)")
        fd = r["test_fixed_depth"]
        ax.plot([v["layer_fraction"] for v in fd.values()], [v[key] for v in fd.values()], "s--", c="gray",
                label="fixed depth k (test)")
        ax.scatter([1.0], [r["test_full"][key]], c="k", marker="*", s=120, label="full depth (test)")
        ax.scatter([r["test_exits"]["layer_fraction"]], [r["test_exits"][key]], c="r", marker="o", s=60,
                   label="calibrated engine default (test)")
        ax.set_xlabel("layer executions used / full depth")
        ax.set_ylabel(key)
        ax.set_title(f"MuE {task} (SYNTHETIC data)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
