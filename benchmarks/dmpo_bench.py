"""DMPO against the plain multi-exit baseline on digits: test accuracy at the same FLOPs budgets.

Trains ``recipes/multiexit-digits.yaml``, ``recipes/dmpo-digits.yaml`` and three DMPO ablations (no bypass, no
high-order predictor, uniform loss weights), exports each to ONNX, calibrates thresholds on the validation split
at 30 / 40 / 60 % of the full model's FLOPs (``deploykit.tune.calibrate``) and reports the test split. It also
checks that the exported DMPO cascade predicts exactly what the PyTorch model predicts on the whole test split.

The ablations are the DMPO recipe with one ``method.*`` override each, so they always share its backbone, data and
schedule; the script refuses to run if the DMPO and baseline recipes differ in ``backbone`` / ``data`` / ``train``.
A secondary comparison, ``multiexit-fine`` / ``dmpo-fine``, moves both methods' exits to blocks 1/2/4/8 instead
of the evenly spaced 2/4/6/8 (same override for both), so a 30 % budget is not forced onto the first exit.
``dmpo-distill`` is one untuned try of DMPO's optional self-distillation (weight 1, temperature 2).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/dmpo_bench.py --out benchmarks/results/dmpo

Writes ``dmpo_bench.json`` and ``dmpo_bench.png`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from deploykit.tune.bench import cpu_model

BUDGETS = (0.3, 0.4, 0.6)
BASELINE_RECIPE, DMPO_RECIPE = "recipes/multiexit-digits.yaml", "recipes/dmpo-digits.yaml"
FINE_EXITS = {"method.exit_blocks": [1, 2, 4, 8]}
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "multiexit": (BASELINE_RECIPE, {}),
    "dmpo": (DMPO_RECIPE, {}),
    "dmpo-no-bypass": (DMPO_RECIPE, {"method.bypass": False}),
    "dmpo-linear-predictor": (DMPO_RECIPE, {"method.predictor": "linear"}),
    "dmpo-uniform-weights": (DMPO_RECIPE, {"method.phase1_weights": "uniform", "method.phase2_weights": "uniform"}),
    # secondary comparison: finer exit placement, the same for both methods
    "multiexit-fine": (BASELINE_RECIPE, FINE_EXITS),
    "dmpo-fine": (DMPO_RECIPE, FINE_EXITS),
    # one untuned try of DMPO's optional self-distillation from the last exit in phase 2
    "dmpo-distill": (DMPO_RECIPE, {"method.distill_weight": 1.0, "method.distill_temperature": 2.0}),
}


def check_fair(baseline: str = BASELINE_RECIPE, dmpo: str = DMPO_RECIPE) -> None:
    """Refuse to compare recipes whose backbone, data or training schedule differ."""
    import yaml

    a, b = (yaml.safe_load(Path(r).read_text()) for r in (baseline, dmpo))
    diff = [k for k in ("backbone", "data", "train") if a.get(k) != b.get(k)]
    if diff:
        raise SystemExit(f"{dmpo} and {baseline} differ in {diff}: copy the baseline's blocks so the two compare "
                         f"fairly (same backbone, data and schedule)")


def train_and_export(name: str, recipe: str, overrides: dict[str, Any], work: Path, skip_train: bool) -> Path:
    """Train (unless a finished run is there and ``skip_train``) and export one variant; returns the engine dir."""
    from deploykit.export import export_run
    from deploykit.train import train

    run_dir, engine_dir = work / "runs" / name, work / "engines" / name
    if not (skip_train and (run_dir / "model.safetensors").exists()):
        t0 = time.time()
        train(recipe, out=run_dir, overrides={"name": name, **overrides})
        (run_dir / "train_seconds.txt").write_text(f"{time.time() - t0:.1f}\n")
    export_run(run_dir, engine_dir, check=True)
    return engine_dir


def cascade_parity(run_dir: Path, engine_dir: Path, thresholds: list[float | None]) -> dict[str, Any]:
    """Exported cascade (ONNX Runtime, with batch compaction) vs the PyTorch model on the whole test split."""
    from deploykit.data import stack_split
    from deploykit.methods.heads import exit_score
    from deploykit.runtime.cascade import Cascade
    from deploykit.train import load_run

    model, config = load_run(run_dir)
    x, _ = stack_split("digits", "test", config["preprocessing"])
    with torch.no_grad():
        logits = model(torch.from_numpy(x))
    score_kind = getattr(model.cfg, "score", "max_softmax")
    scores = torch.stack([exit_score(lg, score_kind) for lg in logits]).numpy()
    thr = np.asarray([np.inf if t is None else t for t in thresholds[:-1]])
    hit = scores[:-1] >= thr[:, None]
    stage = np.where(hit.any(0), hit.argmax(0), len(logits) - 1)
    torch_pred = torch.stack([lg.argmax(1) for lg in logits]).numpy()[stage, np.arange(len(x))]
    with Cascade.from_dir(engine_dir) as cascade:
        res = cascade.run(x, thresholds=thresholds)
    onnx_pred = res.logits.argmax(1)
    return {"samples": int(len(x)), "prediction_mismatches": int((onnx_pred != torch_pred).sum()),
            "exit_stage_mismatches": int((res.exit_stage != stage).sum())}


def measure(name: str, engine_dir: Path, work: Path) -> dict[str, Any]:
    """Calibrate at every budget and collect the test figures and the accuracy-FLOPs curve."""
    from deploykit.manifest import Manifest
    from deploykit.tune.calibrate import calibrate

    m = Manifest.load(engine_dir)
    out: dict[str, Any] = {
        "stage_flops": [s.flops for s in m.stages], "exit_head_flops": [s.exit_flops for s in m.stages],
        "full_flops": m.monolithic.flops if m.monolithic else None,
        "method_config": m.method, "exit_blocks": (m.method or {}).get("exit_blocks"), "budgets": {},
    }
    for b in BUDGETS:
        rep = calibrate(engine_dir, data="digits", flops_budget=b, json_out=work / "calibration" / f"{name}-{b}.json",
                        write=False)
        t = rep["test"]
        out["full_test_accuracy"] = t["full_accuracy"]
        out["full_val_accuracy"] = rep["val"]["full_accuracy"]
        out["per_exit_test_accuracy"] = t["per_exit_accuracy"]
        out["curve"] = [(c["test_flops_ratio"], c["test_accuracy"]) for c in rep["curve"]]
        out["budgets"][str(b)] = {"test_accuracy": t["cascade_accuracy"], "test_flops_ratio": t["flops_ratio"],
                                  "val_accuracy": rep["val"]["cascade_accuracy"],
                                  "val_flops_ratio": rep["val"]["flops_ratio"],
                                  "exit_fractions": t["exit_fractions"], "thresholds": rep["thresholds"]}
    return out


def plot(results: dict[str, Any], path: Path) -> None:
    """Test accuracy against FLOPs: calibrated budgets (markers) over each model's test Pareto curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    styles = {"multiexit": ("tab:gray", "o", 2.0, "-"), "dmpo": ("tab:red", "s", 2.0, "-"),
              "multiexit-fine": ("tab:gray", "o", 1.2, "-."), "dmpo-fine": ("tab:red", "s", 1.2, "-.")}
    for name, r in results.items():
        color, marker, lw, ls = styles.get(name, (None, ".", 0.8, "-"))
        xs = [100 * r["budgets"][str(b)]["test_flops_ratio"] for b in BUDGETS]
        ys = [100 * r["budgets"][str(b)]["test_accuracy"] for b in BUDGETS]
        exits = "/".join(str(e) for e in r.get("exit_blocks") or [])
        line = ax.plot(xs, ys, marker=marker, lw=lw, ls=ls, color=color,
                       label=f"{name}, exits {exits} (calibrated at 30/40/60%)")[0]
        cx, cy = zip(*r["curve"]) if r["curve"] else ((), ())
        ax.plot([100 * v for v in cx], [100 * v for v in cy], lw=0.6, ls=":", color=line.get_color())
        ax.axhline(100 * r["full_test_accuracy"], lw=0.5, ls="--", color=line.get_color())
    ax.set_xlabel("FLOPs, % of the full model (test split)")
    ax.set_ylabel("test accuracy, %")
    ax.set_title("digits: DMPO vs multi-exit baseline\n(dashed: full depth; dotted: test Pareto curve)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    """Train, export, calibrate and compare every variant."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="benchmarks/results/dmpo")
    ap.add_argument("--work", default=None, help="runs / engines / calibration dir (default: OUT/work)")
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS))
    ap.add_argument("--skip-train", action="store_true", help="reuse finished runs in the work dir")
    args = ap.parse_args()
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        ap.error(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    check_fair()
    out = Path(args.out)
    work = Path(args.work) if args.work else out / "work"
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {}
    parity: dict[str, Any] = {}
    for name in args.variants:
        recipe, overrides = VARIANTS[name]
        t0 = time.time()
        engine = train_and_export(name, recipe, overrides, work, args.skip_train)
        results[name] = measure(name, engine, work)
        secs = work / "runs" / name / "train_seconds.txt"
        results[name]["train_seconds"] = float(secs.read_text()) if secs.exists() else None
        if name.startswith("dmpo"):
            parity[name] = {str(b): cascade_parity(work / "runs" / name, engine, results[name]["budgets"][str(b)]
                                                   ["thresholds"]) for b in BUDGETS}
        print(f"{name}: full {results[name]['full_test_accuracy']:.4f} " + " ".join(
            f"@{b}: {results[name]['budgets'][str(b)]['test_accuracy']:.4f}"
            f" ({results[name]['budgets'][str(b)]['test_flops_ratio']:.3f})" for b in BUDGETS)
            + f"  [{time.time() - t0:.0f}s]", flush=True)
    report = {
        "command": "OMP_NUM_THREADS=1 .venv/bin/python " + " ".join(sys.argv),
        "machine": {"cpu": cpu_model(), "torch_threads": torch.get_num_threads()},
        "budgets": list(BUDGETS), "results": results, "parity": parity,
    }
    (out / "dmpo_bench.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(results, out / "dmpo_bench.png")
    print(f"wrote {out / 'dmpo_bench.json'} and {out / 'dmpo_bench.png'}")


if __name__ == "__main__":
    main()
