"""Issue-8 benchmark: FP32 against INT8 (dynamic and static) cascades on ONNX Runtime CPU.

Two parts, written to one JSON report and one PNG:

- digits (accuracy): the ``recipes/multiexit-digits.yaml`` model (trained here, or ``--run RUN_DIR``) exported,
  quantised both ways, and every engine calibrated on the val split: FP32 with ``max_drop``, INT8 re-calibrated at
  the FP32 cascade's FLOPs budget. Test accuracy, exit fractions, FLOPs ratio, agreement with FP32 predictions,
  the INT8 cascade run with the stale FP32 thresholds, and speed at the calibrated thresholds.
- ``vit_small_patch16_224`` (speed): untrained weights, 4 stages, exit fractions fixed at 0.4/0.3/0.2/0.1; PyTorch
  eager, FP32 monolithic / cascade and INT8 monolithic / cascade timed side by side (``bench(..., compare=...)``).

    python benchmarks/int8_bench.py --out bench-out/int8 [--run runs/multiexit-digits] [--epochs N]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from deploykit.export import export_model, export_run
from deploykit.graphs.quantize import quantize
from deploykit.manifest import Manifest
from deploykit.runtime.cascade import Cascade
from deploykit.tune.bench import bench, cpu_model, loadavg
from deploykit.tune.calibrate import calibrate

MODES = ("dynamic", "static")
FRACTIONS = [0.4, 0.3, 0.2, 0.1]


def _engines(fp32: Path, out: Path, calib_samples: int, calib_data: str = "digits") -> dict[str, Path]:
    dirs = {"fp32": fp32}
    for mode in MODES:
        d = out / f"int8-{mode}"
        if not (d / "deploykit.json").exists():
            quantize(fp32, d, mode=mode, calib_data=calib_data, calib_samples=calib_samples)
        dirs[mode] = d
    return dirs


def digits_part(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """Accuracy and agreement after re-calibration, at the FP32 cascade's FLOPs budget."""
    from deploykit.data import stack_split

    run = Path(args.run) if args.run else None
    if run is None:
        from deploykit.train import train

        run = out / "run"
        if not (run / "model.safetensors").exists():
            overrides = {"train.epochs": args.epochs} if args.epochs else {}
            run = Path(train("recipes/multiexit-digits.yaml", out=run, overrides=overrides))
    fp32 = out / "fp32"
    if not (fp32 / "deploykit.json").exists():
        export_run(run, fp32)
    dirs = _engines(fp32, out, args.calib_samples)
    ref = calibrate(fp32, max_drop=args.max_drop, json_out=out / "calib-fp32.json")
    budget = ref["val"]["flops_ratio"]
    x, y = stack_split("digits", "test", Manifest.load(fp32).preprocessing.__dict__)
    with Cascade.from_dir(fp32) as c:
        ref_pred = c.run(x).labels_idx
        ref_full = c.run_all_exits(x)[-1]["logits"].argmax(1)
    result: dict[str, Any] = {"run": str(run), "max_drop": args.max_drop, "flops_budget": budget,
                              "fp32": _summary(ref), "int8": {}}
    for mode in MODES:
        d = dirs[mode]
        with Cascade.from_dir(d) as c:  # the trap: FP32 thresholds on INT8 scores
            stale = c.run(x, thresholds=ref["thresholds"])
        rep = calibrate(d, flops_budget=budget, json_out=out / f"calib-int8-{mode}.json")
        with Cascade.from_dir(d) as c:
            pred = c.run(x).labels_idx
            full = c.run_all_exits(x)[-1]["logits"].argmax(1)
        result["int8"][mode] = {
            **_summary(rep),
            "accuracy_drop_points_vs_fp32": 100 * (ref["test"]["cascade_accuracy"] - rep["test"]["cascade_accuracy"]),
            "cascade_agreement_with_fp32": float((pred == ref_pred).mean()),
            "full_depth_agreement_with_fp32": float((full == ref_full).mean()),
            "stale_fp32_thresholds": {"test_accuracy": float((stale.labels_idx == y).mean()),
                                      "exit_fractions": (np.bincount(stale.exit_stage, minlength=4) / len(y)).tolist()},
        }
    result["speed"] = {}
    for mode in MODES:
        r = bench(dirs[mode], batch_sizes=[1, 32], data="digits", samples=args.samples, repeats=args.repeats,
                  warmup=1, compare=fp32)
        result["speed"][mode] = _speed(r)
    return result


def _summary(rep: dict[str, Any]) -> dict[str, Any]:
    t = rep["test"]
    return {"thresholds": rep["thresholds"], "test_accuracy": t["cascade_accuracy"],
            "full_depth_accuracy": t["full_accuracy"], "flops_ratio": t["flops_ratio"],
            "exit_fractions": t["exit_fractions"], "val_flops_ratio": rep["val"]["flops_ratio"]}


def _speed(r: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for run in r["runs"]:
        c = run["compare"]
        rows.append({"batch_size": run["batch_size"], "int8_cascade_ms": run["cascade_ms"],
                     "fp32_cascade_ms": c["cascade_ms"], "int8_monolithic_ms": run["monolithic_ms"],
                     "fp32_monolithic_ms": c["monolithic_ms"], "torch_ms": run["torch_ms"],
                     "int8_cascade_vs_fp32_cascade": c["cascade_speedup_vs_compare"],
                     "int8_mono_vs_fp32_mono": c["monolithic_speedup_vs_compare"],
                     "int8_cascade_vs_torch": run["speedup_vs_torch"],
                     "fp32_cascade_vs_torch": (run["torch_ms"] / c["cascade_ms"]) if run["torch_ms"] else None,
                     "int8_exit_fractions": run["exit_fractions"], "fp32_exit_fractions": c["exit_fractions"],
                     "int8_throughput_per_s": run["throughput_cascade_per_s"],
                     "fp32_throughput_per_s": c["throughput_cascade_per_s"]})
    return rows


def vit_part(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """Speed on ViT-S/16 at fixed exit fractions, INT8 against FP32 and PyTorch eager."""
    import torch

    from deploykit.methods import create_backbone, create_method
    from deploykit.methods.backbone import backbone_data_config

    torch.manual_seed(0)
    bb = create_backbone("vit_small_patch16_224", 1000)
    model = create_method("multiexit", bb, 1000).eval()
    fp32 = out / "fp32"
    if not (fp32 / "deploykit.json").exists():
        export_model(model, fp32, labels=[str(i) for i in range(1000)], preprocessing=backbone_data_config(bb),
                     name="vit_small_patch16_224")
    # untrained weights: calibrate on real images (digits, resized to 224 by the manifest's preprocessing)
    dirs = _engines(fp32, out, args.vit_calib_samples)
    res: dict[str, Any] = {"loadavg_before": loadavg()}
    for mode in MODES:
        r = bench(dirs[mode], batch_sizes=[1, 32], exit_fractions=FRACTIONS, torch_model=model,
                  samples=args.vit_samples, repeats=args.repeats, warmup=1, compare=fp32, progress=True)
        res[mode] = _speed(r)
        res[f"{mode}_loadavg_after"] = loadavg()
    return res


def plot(report: dict[str, Any], path: Path) -> None:
    """Left: digits test accuracy and FLOPs per engine. Right: ViT-S ms per batch per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), dpi=120)
    d = report.get("digits")
    if d:
        names = ["fp32", *[f"int8-{m}" for m in MODES]]
        rows = [d["fp32"], *[d["int8"][m] for m in MODES]]
        ax = axes[0]
        ax.bar(names, [100 * r["test_accuracy"] for r in rows], color=["C0", "C1", "C2"])
        for i, r in enumerate(rows):
            ax.text(i, 100 * r["test_accuracy"], f"{100 * r['test_accuracy']:.2f}%\n{100 * r['flops_ratio']:.0f}% "
                    "FLOPs", ha="center", va="bottom", fontsize=8)
        ax.set_ylim(min(100 * r["test_accuracy"] for r in rows) - 5, 101)
        ax.set_ylabel("digits test accuracy, re-calibrated cascade (%)")
    v = report.get("vit")
    if v:
        ax = axes[1]
        labels, vals = [], []
        for bs_i, bs in enumerate((1, 32)):
            row = v["dynamic"][bs_i]
            for key, lab in (("torch_ms", "torch"), ("fp32_monolithic_ms", "fp32 mono"),
                             ("fp32_cascade_ms", "fp32 casc"), ("int8_cascade_ms", "dyn casc")):
                labels.append(f"b{bs} {lab}")
                vals.append(row[key] / bs)
            labels.append(f"b{bs} static casc")
            vals.append(v["static"][bs_i]["int8_cascade_ms"] / bs)
        ax.barh(labels, vals, color="C0")
        ax.set_xlabel("ms per image (median); exits 0.4/0.3/0.2/0.1")
        ax.tick_params(axis="y", labelsize=7)
    fig.suptitle(f"deploykit INT8 vs FP32 on ORT CPU ({report['cpu']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="bench-out/int8")
    ap.add_argument("--run", help="Existing multiexit-digits run directory (default: train the recipe).")
    ap.add_argument("--epochs", type=int, help="Override the recipe's epochs when training here.")
    ap.add_argument("--max-drop", type=float, default=0.5)
    ap.add_argument("--calib-samples", type=int, default=256)
    ap.add_argument("--vit-calib-samples", type=int, default=64)
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--vit-samples", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--skip-digits", action="store_true")
    ap.add_argument("--skip-vit", action="store_true")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    flags = [f"--{k.replace('_', '-')}" + ("" if v is True else f" {v}") for k, v in vars(args).items()
             if v not in (None, False)]
    report: dict[str, Any] = {"command": "python benchmarks/int8_bench.py " + " ".join(flags),
        "cpu": cpu_model(), "loadavg_start": loadavg(), "started": time.time()}
    path = out / "int8_bench.json"
    if path.exists():  # keep the other part's figures when re-running one part
        old = json.loads(path.read_text())
        report.update({k: old[k] for k in ("digits", "vit") if k in old})
    if not args.skip_digits:
        report["digits"] = digits_part(args, out / "digits")
        path.write_text(json.dumps(report, indent=2) + "\n")
    if not args.skip_vit:
        report["vit"] = vit_part(args, out / "vit")
    report["loadavg_end"] = loadavg()
    path.write_text(json.dumps(report, indent=2) + "\n")
    plot(report, out / "int8_bench.png")
    print(json.dumps({k: report[k] for k in ("digits", "vit") if k in report}, indent=2))


if __name__ == "__main__":
    main()
