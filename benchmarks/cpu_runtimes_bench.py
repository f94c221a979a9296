"""Issue-16 benchmark: the cascade on ONNX Runtime and OpenVINO (FP32 / INT8) against the monolithic model on every
CPU runtime, side by side in one interleaved run, plus the digits accuracy check of the OpenVINO INT8 cascade.

Two parts, one JSON report and one PNG:

- ``vit_small_patch16_224`` (speed): untrained weights (pretrained=False), 4 stages, exit fractions fixed at
  0.4/0.3/0.2/0.1 (thresholds from score quantiles on the bench inputs, per cascade). Variants: PyTorch eager FP32;
  monolithic on ORT (deploykit's and default session options), ORT INT8 dynamic, OpenVINO FP32 and INT8 (NNCF);
  cascades on ORT FP32 / INT8 dynamic and OpenVINO FP32 / INT8 (NNCF), and optionally OpenVINO running the static
  QDQ graphs of ``deploykit quantize --mode static`` (``--with-qdq``). INT8 graphs are calibrated on digits images
  resized to 224 (real activations, stage by stage). Every variant is timed in one loop, round-robin, so load
  drifts hit all of them alike; min / median / max and the load average before and after are recorded.
- digits (accuracy): ``recipes/multiexit-digits.yaml`` trained (or ``--run``), exported, quantised with
  ``--mode openvino``, both calibrated on val (FP32 with ``--max-drop``, INT8 re-calibrated at the FP32 cascade's
  FLOPs budget); test accuracy of both, and the FP32 OpenVINO cascade's predictions against ONNX Runtime's.

    python benchmarks/cpu_runtimes_bench.py --out bench-out/cpu_runtimes [--run RUN_DIR] [--epochs N]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from deploykit.graphs.quantize import quantize
from deploykit.manifest import Manifest
from deploykit.runtime.cascade import Cascade, expected_flops_ratio
from deploykit.tune.bench import cpu_model, loadavg, thresholds_for_fractions

FRACTIONS = [0.4, 0.3, 0.2, 0.1]
RESULTS = Path(__file__).parent / "results"
DOC_IMG = Path(__file__).parent.parent / "docs" / "img"


# ---- engines -----------------------------------------------------------------------------------------------------
def vit_engines(out: Path, calib_samples: int, with_qdq: bool) -> tuple[Any, dict[str, Path]]:
    """ViT-S/16 (random weights) exported, and its INT8 copies (dynamic, NNCF, optionally static QDQ)."""
    import torch

    from deploykit.export import export_model
    from deploykit.methods import create_backbone, create_method
    from deploykit.methods.backbone import backbone_data_config

    torch.manual_seed(0)
    bb = create_backbone("vit_small_patch16_224", 1000)
    model = create_method("multiexit", bb, 1000).eval()
    dirs = {"fp32": out / "fp32"}
    if not (dirs["fp32"] / "deploykit.json").exists():
        export_model(model, dirs["fp32"], labels=[str(i) for i in range(1000)],
                     preprocessing=backbone_data_config(bb), name="vit_small_patch16_224")
    modes = ["dynamic", "openvino"] + (["static"] if with_qdq else [])
    for mode in modes:
        d = out / f"int8-{mode}"
        if not (d / "deploykit.json").exists():
            t0 = time.time()
            calib = None if mode == "dynamic" else _digits_images(dirs["fp32"], calib_samples)
            quantize(dirs["fp32"], d, mode=mode, calib_data=calib, calib_samples=calib_samples, batch_size=8)
            print(f"quantised ViT-S {mode} in {time.time() - t0:.0f} s", flush=True)
        dirs[mode] = d
    return model, dirs


def _digits_images(engine: Path, n: int) -> np.ndarray:
    """Real activations for the random-weight ViT (no training data of its own): digits train images at 224."""
    from deploykit.data import stack_split

    return stack_split("digits", "train", Manifest.load(engine).preprocessing.__dict__, limit=n)[0]


# ---- timing ------------------------------------------------------------------------------------------------------
def _cascade_variant(d: Path, backend: str, threads: int, pool: np.ndarray,
                     **kw: Any) -> tuple[Cascade, list[float | None]]:
    c = Cascade.from_dir(d, backend=backend, threads=threads, **kw)
    thr = thresholds_for_fractions(np.stack([o["score"] for o in c.run_all_exits(pool)]), FRACTIONS)
    return c, thr


def variants(model: Any, dirs: dict[str, Path], pool: np.ndarray, threads: int) -> tuple[dict[str, Any], list]:
    """name -> (kind, callable(batch)) and the objects to close."""
    import onnxruntime as ort
    import torch

    from deploykit.backends import create_runner

    torch.set_num_threads(threads)
    m = Manifest.load(dirs["fp32"])
    full = m.path_of(m.monolithic.file)
    closers: list[Any] = []

    def runner(path: Path, backend: str, **kw: Any) -> Callable[[np.ndarray], Any]:
        r = create_runner(path, backend, threads=threads, **kw).load()
        closers.append(r)
        return lambda x: r.run({"image": x})

    default = ort.InferenceSession(str(full), providers=["CPUExecutionProvider"])

    def eager(x: np.ndarray) -> Any:
        with torch.inference_mode():
            return model.forward_full(torch.from_numpy(x))

    out: dict[str, Any] = {
        "torch_eager_fp32": ("monolithic", eager, None),
        "ort_mono_fp32_deploykit_opts": ("monolithic", runner(full, "ort-cpu", spinning="off"), None),
        "ort_mono_fp32_default_opts": ("monolithic", lambda x: default.run(None, {"image": x}), None),
        "ort_mono_fp32_spin_in_run": ("monolithic", runner(full, "ort-cpu", spinning="in-run"), None),
        "ort_mono_int8_dynamic": ("monolithic", runner(_mono(dirs["dynamic"]), "ort-cpu"), None),
        "ov_mono_fp32": ("monolithic", runner(full, "openvino"), None),
        "ov_mono_int8_nncf": ("monolithic", runner(_mono(dirs["openvino"]), "openvino"), None),
    }
    cascades: dict[str, tuple[Path, str, dict[str, Any]]] = {
        "cascade_ort_fp32": (dirs["fp32"], "ort-cpu", {"spinning": "off"}),
        "cascade_ort_fp32_spin_in_run": (dirs["fp32"], "ort-cpu", {"spinning": "in-run"}),
        "cascade_ort_int8_dynamic": (dirs["dynamic"], "ort-cpu", {"spinning": "off"}),
        "cascade_ov_fp32": (dirs["fp32"], "openvino", {}),
        "cascade_ov_fp32_pinned": (dirs["fp32"], "openvino", {"pinning": True}),
        "cascade_ov_int8_nncf": (dirs["openvino"], "openvino", {}),
    }
    if "static" in dirs:
        cascades["cascade_ov_int8_static_qdq"] = (dirs["static"], "openvino", {})
    for name, (d, backend, kw) in cascades.items():
        c, thr = _cascade_variant(d, backend, threads, pool, **kw)
        closers.append(c)
        out[name] = ("cascade", lambda x, c=c, thr=thr: c.run(x, thresholds=thr), c)
        out[name + "_thresholds"] = thr
    return out, closers


def _mono(d: Path) -> Path:
    m = Manifest.load(d)
    return m.path_of(m.monolithic.file)


def time_round_robin(fns: dict[str, Callable[[], Any]], warmup: int, repeats: int) -> dict[str, list[float]]:
    """Seconds per pass of each variant, passes interleaved across variants (warm-up passes untimed)."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for i in range(repeats):
        order = list(fns) if i % 2 == 0 else list(reversed(fns))  # no variant always runs after the same one
        for k in order:
            t0 = time.perf_counter()
            fns[k]()
            samples[k].append(time.perf_counter() - t0)
    return samples


def vit_part(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    from deploykit.backends.ort import default_threads
    from deploykit.data import stack_split

    threads = args.threads or default_threads()
    model, dirs = vit_engines(out / "vit", args.calib_samples, args.with_qdq)
    m = Manifest.load(dirs["fp32"])
    pool_n = max(args.b1_images, 32)
    pool, _ = stack_split("digits", "test", m.preprocessing.__dict__, limit=pool_n)
    pool = np.ascontiguousarray(pool, dtype=np.float32)
    vs, closers = variants(model, dirs, pool, threads)
    thresholds = {k[:-len("_thresholds")]: v for k, v in vs.items() if k.endswith("_thresholds")}
    vs = {k: v for k, v in vs.items() if not k.endswith("_thresholds")}
    res: dict[str, Any] = {"threads": threads, "thresholds": thresholds, "runs": []}
    for bs, repeats, n_img in ((1, args.repeats_b1, args.b1_images), (32, args.repeats_b32, 32)):
        batches = [pool[i:i + bs] for i in range(0, n_img, bs)]
        fns = {k: (lambda fn=fn, bb=batches: [fn(b) for b in bb]) for k, (_, fn, _) in vs.items()}
        before = loadavg()
        t0 = time.time()
        samples = time_round_robin(fns, args.warmup, repeats)
        row: dict[str, Any] = {"batch_size": bs, "images_per_pass": n_img, "repeats": repeats,
                               "loadavg_before": before, "loadavg_after": loadavg(),
                               "seconds": round(time.time() - t0, 1), "ms_per_batch": {}, "exit_fractions": {}}
        for k, s in samples.items():
            ms = [1000 * v / len(batches) for v in s]
            row["ms_per_batch"][k] = {"min": min(ms), "median": float(np.median(ms)), "max": max(ms)}
        for k, (kind, _, c) in vs.items():
            if kind == "cascade":
                seen = np.concatenate([c.run(b, thresholds=thresholds[k]).exit_stage for b in batches])
                row["exit_fractions"][k] = (np.bincount(seen, minlength=m.num_stages) / len(seen)).tolist()
        res["runs"].append(_ratios(row, m))
        print(json.dumps({"batch_size": bs, "median_ms": {k: round(v["median"], 1)
                                                          for k, v in row["ms_per_batch"].items()}}), flush=True)
    for c in closers:
        c.close()
    return res


def _ratios(row: dict[str, Any], m: Manifest) -> dict[str, Any]:
    """Speed-ups vs eager and vs the fastest monolithic runtime; FP32 OpenVINO / ORT cascade efficiency."""
    med = {k: v["median"] for k, v in row["ms_per_batch"].items()}
    monos = {k: v for k, v in med.items() if not k.startswith("cascade")}
    fastest = min(monos, key=monos.__getitem__)
    row["fastest_monolithic"] = fastest
    row["vs_torch_eager"] = {k: med["torch_eager_fp32"] / v for k, v in med.items()}
    row["vs_fastest_monolithic"] = {k: monos[fastest] / v for k, v in med.items()}
    same = {"cascade_ort_fp32": "ort_mono_fp32_deploykit_opts", "cascade_ov_fp32": "ov_mono_fp32",
            "cascade_ort_int8_dynamic": "ort_mono_int8_dynamic", "cascade_ov_int8_nncf": "ov_mono_int8_nncf"}
    row["efficiency"] = {}
    for casc, mono in same.items():
        ideal = 1.0 / expected_flops_ratio(m, np.asarray(row["exit_fractions"][casc]))
        row["efficiency"][casc] = {"speedup_vs_same_runtime_monolithic": med[mono] / med[casc], "ideal": ideal,
                                   "efficiency": med[mono] / med[casc] / ideal}
    return row


# ---- digits accuracy ---------------------------------------------------------------------------------------------
def digits_part(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    from deploykit.data import stack_split
    from deploykit.export import export_run
    from deploykit.tune.calibrate import calibrate

    run = Path(args.run) if args.run else out / "digits-run"
    if not (run / "model.safetensors").exists():
        from deploykit.train import train

        overrides = {"train.epochs": args.epochs} if args.epochs else {}
        run = Path(train("recipes/multiexit-digits.yaml", out=run, overrides=overrides))
    fp32, ov8 = out / "digits-fp32", out / "digits-int8-openvino"
    if not (fp32 / "deploykit.json").exists():
        export_run(run, fp32)
    if not (ov8 / "deploykit.json").exists():
        quantize(fp32, ov8, mode="openvino", calib_samples=args.digits_calib_samples)
    ref = calibrate(fp32, max_drop=args.max_drop, json_out=out / "digits-calib-fp32.json")
    rep = calibrate(ov8, flops_budget=ref["val"]["flops_ratio"], backend="openvino",
                    json_out=out / "digits-calib-int8-openvino.json")
    x, y = stack_split("digits", "test", Manifest.load(fp32).preprocessing.__dict__)
    with Cascade.from_dir(fp32) as a, Cascade.from_dir(fp32, backend="openvino") as b:
        pa, pb = a.run(x), b.run(x)
        full_a, full_b = a.run_all_exits(x), b.run_all_exits(x)
    with Cascade.from_dir(ov8, backend="openvino") as c:
        pc = c.run(x)
    return {
        "run": str(run), "test_images": len(y), "max_drop": args.max_drop,
        "fp32_ort": {"cascade_accuracy": ref["test"]["cascade_accuracy"], "flops_ratio": ref["test"]["flops_ratio"],
                     "full_accuracy": ref["test"]["full_accuracy"], "thresholds": ref["thresholds"]},
        "int8_openvino": {"cascade_accuracy": rep["test"]["cascade_accuracy"],
                          "flops_ratio": rep["test"]["flops_ratio"], "full_accuracy": rep["test"]["full_accuracy"],
                          "thresholds": rep["thresholds"],
                          "accuracy_measured_here": float((pc.labels_idx == y).mean())},
        "int8_drop_points": 100 * (ref["test"]["cascade_accuracy"] - rep["test"]["cascade_accuracy"]),
        "fp32_openvino_vs_ort": {
            "cascade_predictions_identical": bool((pa.labels_idx == pb.labels_idx).all()),
            "exit_stages_identical": bool((pa.exit_stage == pb.exit_stage).all()),
            "max_abs_logit_diff": float(max(np.abs(u["logits"] - v["logits"]).max()
                                            for u, v in zip(full_a, full_b))),
        },
    }


# ---- report ------------------------------------------------------------------------------------------------------
def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = report["vit"]["runs"]
    fig, axes = plt.subplots(1, len(runs), figsize=(6.5 * len(runs), 5), dpi=110, squeeze=False)
    for ax, r in zip(axes[0], runs):
        names = list(r["ms_per_batch"])
        med = [r["ms_per_batch"][n]["median"] for n in names]
        lo = [m - r["ms_per_batch"][n]["min"] for n, m in zip(names, med)]
        hi = [r["ms_per_batch"][n]["max"] - m for n, m in zip(names, med)]
        colors = ["C3" if n.startswith("cascade") else "C0" for n in names]
        ax.barh(names, med, xerr=[lo, hi], color=colors, capsize=2)
        for i, n in enumerate(names):  # the label starts past the error bar, so the two never overlap
            ax.text(med[i] + hi[i], i, f"  {r['vs_torch_eager'][n]:.2f}x eager", va="center", fontsize=7)
        ax.set_xlim(0, max(m + h for m, h in zip(med, hi)) * 1.3)
        ax.set_title(f"batch {r['batch_size']} (load {r['loadavg_before'][0]}→{r['loadavg_after'][0]})", fontsize=9)
        ax.set_xlabel("ms per batch, median (bars: min–max)")
        ax.tick_params(axis="y", labelsize=7)
        ax.invert_yaxis()
    fig.suptitle(f"ViT-S/16, exits 0.4/0.3/0.2/0.1, {report['cpu']}, {report['vit']['threads']} threads "
                 f"({report.get('note', 'load not recorded')})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def table(report: dict[str, Any]) -> str:
    """The docs/results.md table: ms per batch (median, min–max) at each batch size and the ratios at the largest."""
    runs = report["vit"]["runs"]
    last = runs[-1]
    head = ("| variant | " + " | ".join(f"batch {r['batch_size']} ms (min–max)" for r in runs)
            + f" | vs eager (b{last['batch_size']}) | vs fastest monolithic (b{last['batch_size']}) |")
    lines = [head, "|" + "---|" * (len(runs) + 3)]
    for name in last["ms_per_batch"]:
        cells = []
        for r in runs:
            v = r["ms_per_batch"][name]
            cells.append(f"{v['median']:.1f} ({v['min']:.0f}–{v['max']:.0f})")
        lines.append(f"| {name} | " + " | ".join(cells)
                     + f" | {last['vs_torch_eager'][name]:.2f}× | {last['vs_fastest_monolithic'][name]:.2f}× |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench-out/cpu_runtimes")
    ap.add_argument("--run", help="Existing multiexit-digits run directory (default: train the recipe).")
    ap.add_argument("--epochs", type=int, help="Override the digits recipe's epochs when training here.")
    ap.add_argument("--max-drop", type=float, default=0.5)
    ap.add_argument("--digits-calib-samples", type=int, default=256)
    ap.add_argument("--calib-samples", type=int, default=32, help="ViT-S INT8 calibration images.")
    ap.add_argument("--b1-images", type=int, default=10, help="Images per batch-1 pass (10: exits 4/3/2/1).")
    ap.add_argument("--repeats-b1", type=int, default=5)
    ap.add_argument("--repeats-b32", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int)
    ap.add_argument("--with-qdq", action="store_true", help="Also OpenVINO on the static QDQ graphs.")
    ap.add_argument("--skip-digits", action="store_true")
    ap.add_argument("--skip-vit", action="store_true")
    ap.add_argument("--name", default="cpu_runtimes_bench")
    ap.add_argument("--table", metavar="JSON", help="Print the markdown table of a written report and exit.")
    args = ap.parse_args()
    if args.table:
        print(table(json.loads(Path(args.table).read_text())))
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import onnxruntime
    import openvino
    import torch

    report: dict[str, Any] = {
        "command": "python benchmarks/cpu_runtimes_bench.py " + " ".join(
            f"--{k.replace('_', '-')}" + ("" if v is True else f" {v}") for k, v in vars(args).items()
            if v not in (None, False)),
        "cpu": cpu_model(), "loadavg_start": loadavg(),
        "versions": {"onnxruntime": onnxruntime.__version__, "openvino": openvino.__version__,
                     "torch": torch.__version__},
    }
    if not args.skip_digits:
        report["digits"] = digits_part(args, out)
        print(json.dumps(report["digits"], indent=1), flush=True)
    if not args.skip_vit:
        report["vit"] = vit_part(args, out)
    report["loadavg_end"] = loadavg()
    busiest = max(report["loadavg_start"][0], report["loadavg_end"][0])
    report["note"] = (f"contended: 1-min load average up to {busiest:.1f} on {os.cpu_count()} cores"
                      if busiest > (os.cpu_count() or 1) else f"quiet: 1-min load average at most {busiest:.1f}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(report, indent=2) + "\n")
    if "vit" in report:
        DOC_IMG.mkdir(parents=True, exist_ok=True)
        for p in (RESULTS / f"{args.name}.png", DOC_IMG / f"{args.name}.png"):
            plot(report, p)
    print(f"wrote {RESULTS / (args.name + '.json')}")


if __name__ == "__main__":
    main()
