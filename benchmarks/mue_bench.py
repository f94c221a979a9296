"""MuE benchmark on the SYNTHETIC shapes data: quality vs layers used (threshold sweep), and ORT wall-clock.

Thresholds are swept on the val split; for each task the cheapest point that keeps the target quality on val
(>= 99% of full-depth accuracy / >= 96% of full-depth BLEU-4) is then measured on the test split, beside full depth
and fixed shallower depths. Wall-clock: the same ORT runtime with exits vs with exits disabled (full depth), batch 1
and batch 32, median of repeats after a warm-up.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/mue_bench.py --run runs/mue-synthetic --engine engines/mue-synthetic
"""

from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import time
from pathlib import Path

import numpy as np

from deploykit.data.vl import synthetic_vl
from deploykit.methods.mue.metrics import corpus_bleu
from deploykit.methods.mue.reference import Thresholds
from deploykit.runtime.generation import MuEEngine, summarize

HI = [1.0, 0.99, 0.98, 0.97, 0.95, 0.9]  # trained layers' cosines sit around 0.9-0.99 after the first two layers
GRID = {"entailment": {"img": HI + [0.8], "txt": HI, "dec": HI + [0.8], "decay": [False]},
        "caption": {"img": HI, "txt": [1.0, 0.98, 0.95, 0.9], "dec": HI + [0.8], "decay": [True]}}
TARGET = {"entailment": (0.99, 0.40), "caption": (0.96, 0.30)}  # (quality ratio, layer reduction)
PAPER = {"entailment": "SNLI-VE test 88.5 vs 89.2 (99.2%) at -50% expected time (Table 1); 88.6 at -37%, "
                       "87.5 at -55% (Table 3)",
         "caption": "COCO CIDEr 137.0 vs 146.7 (93.4%), BLEU-4 41.6 vs 42.8 (97.2%) at -40.2% expected time "
                    "(Table 1); BLEU-4 42.0 at -28.9%, 41.0 at -45% (Table 3)"}


def data(eng: MuEEngine, split: str, task: str, n: int):
    rows = synthetic_vl(split, n=n, size=int(eng.manifest.preprocessing.input_size[-1]), tasks=(task,))
    return rows, eng.load_images([r.image for r in rows]), eng.encode_texts([r.text for r in rows])


def measure(eng, rows, imgs, ids, task, thr, bs=64, depth=None):
    res = eng.generate_ids(imgs, ids, task, thr, batch_size=bs, depth=depth)
    return summarize(res, rows, eng, corpus_bleu)


def timeit(eng, imgs, ids, task, thr, bs, repeats):
    eng.generate_ids(imgs[:bs], ids[:bs], task, thr, batch_size=bs)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        eng.generate_ids(imgs, ids, task, thr, batch_size=bs)
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", default="runs/mue-synthetic")
    ap.add_argument("--engine", default="engines/mue-synthetic")
    ap.add_argument("--n-val", type=int, default=200)
    ap.add_argument("--n-test", type=int, default=500)
    ap.add_argument("--n-time", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="bench-out/mue")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if not (Path(a.engine) / "deploykit.json").exists():
        from deploykit.export.mue import export_mue

        export_mue(a.run, a.engine, n_check=a.n_test)
    eng = MuEEngine.from_dir(a.engine, threads=1)
    report = {"data": "synthetic-vl (SYNTHETIC shapes scenes; not SNLI-VE / COCO)", "engine": a.engine,
              "parity": eng.meta.get("parity"), "cpu": cpu_model(), "tasks": {}}
    for task in eng.tasks:
        key = "accuracy" if task == "entailment" else "bleu4"
        vrows, vimgs, vids = data(eng, "val", task, a.n_val)
        full_v = measure(eng, vrows, vimgs, vids, task, Thresholds.full_depth())
        sweep = []
        g = GRID[task]
        for img, txt, dec, decay in itertools.product(g["img"], g["txt"], g["dec"], g["decay"]):
            thr = Thresholds(img, txt, dec, decay)
            sweep.append({"thr": thr.__dict__, **measure(eng, vrows, vimgs, vids, task, thr)})
        ok = [s for s in sweep if s[key] >= TARGET[task][0] * full_v[key]]
        best = min(ok, key=lambda s: s["layer_fraction"])
        trows, timgs, tids = data(eng, "test", task, a.n_test)
        thr = Thresholds(**best["thr"])
        full_t = measure(eng, trows, timgs, tids, task, Thresholds.full_depth())
        chosen = measure(eng, trows, timgs, tids, task, thr)
        # entailment answers in one step, so the KV policy only matters for captions
        compute = chosen if task == "entailment" else summarize(
            eng.generate_ids(timgs, tids, task, thr, kv_policy="compute", batch_size=64), trows, eng, corpus_bleu)
        fixed = {k: measure(eng, trows, timgs, tids, task, Thresholds.full_depth(), depth=k)
                 for k in range(1, eng.n_enc)}
        n = a.n_time
        timing = {}
        for bs in (1, 32):
            tf = timeit(eng, timgs[:n], tids[:n], task, Thresholds.full_depth(), bs, a.repeats)
            te = timeit(eng, timgs[:n], tids[:n], task, thr, bs, a.repeats)
            timing[f"batch{bs}"] = {"full_s": tf, "exits_s": te, "speedup": tf / te}
        ideal = 1 / chosen["layer_fraction"]
        report["tasks"][task] = {
            "metric": key, "val_full": full_v, "sweep": sweep, "chosen_thresholds": best["thr"],
            "test_full": full_t, "test_exits": chosen, "test_exits_kv_compute": compute, "test_fixed_depth": fixed,
            "quality_ratio": chosen[key] / max(full_t[key], 1e-9), "layer_reduction": 1 - chosen["layer_fraction"],
            "timing": timing, "ideal_speedup": ideal, "paper": PAPER[task],
            "targets": {"quality_ratio_min": TARGET[task][0], "layer_reduction_min": TARGET[task][1],
                        "speedup_min": 0.8 * ideal}}
        print(task, json.dumps({k: v for k, v in report["tasks"][task].items() if k != "sweep"}, indent=1))
    (out / "mue_bench.json").write_text(json.dumps(report, indent=1) + "\n")
    plot(report, out / "mue_bench.png")
    print("wrote", out / "mue_bench.json", out / "mue_bench.png")


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(report["tasks"]), figsize=(6 * len(report["tasks"]), 4.2))
    for ax, (task, r) in zip(np.atleast_1d(axes), report["tasks"].items()):
        key = r["metric"]
        xs = [s["layer_fraction"] for s in r["sweep"]]
        ys = [s[key] for s in r["sweep"]]
        ax.scatter(xs, ys, s=10, alpha=0.4, label="threshold sweep (val)")
        fd = r["test_fixed_depth"]
        ax.plot([v["layer_fraction"] for v in fd.values()], [v[key] for v in fd.values()], "s--", c="gray",
                label="fixed depth k (test)")
        ax.scatter([1.0], [r["test_full"][key]], c="k", marker="*", s=120, label="full depth (test)")
        ax.scatter([r["test_exits"]["layer_fraction"]], [r["test_exits"][key]], c="r", marker="o", s=60,
                   label="chosen thresholds (test)")
        ax.set_xlabel("layer executions used / full depth")
        ax.set_ylabel(key)
        ax.set_title(f"MuE {task} (SYNTHETIC data)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name"))
    except (OSError, StopIteration):
        return "unknown"


if __name__ == "__main__":
    main()
