"""PYRA / ToMe benchmark: digits accuracy against FLOPs, merged-graph throughput on ONNX Runtime CPU, and stacking.

    python benchmarks/pyra_bench.py                       # everything (trains missing digits runs first)
    OMP_NUM_THREADS=1 python benchmarks/pyra_bench.py --skip-speed --threads 1   # digits accuracy + stacking only

1. Accuracy on the digits test split for unmerged / ToMe / PYRA at a low and a high merge rate (runs trained from
   recipes/{multiexit,tome,pyra}-digits.yaml, same backbone / data / train settings).
2. Throughput of exported monolithic graphs (``vit_small_patch16_224``, ``vit_base_patch16_224``, 224 px, untrained
   weights) at batch 1 and 32 on ONNX Runtime CPU (``OrtRunner``), merged against unmerged, next to the FLOPs
   ratio (``torch.utils.flop_counter``). Repeats are interleaved over the graphs; medians reported.
3. Stacking: expected FLOPs of early-exit cascades on an unmerged backbone (exits alone), merged single-exit models
   (merging alone) and exit cascades on a PYRA backbone (both), at the same accuracy: each picks its cheapest
   operating point whose *validation* accuracy is within ``--tolerance`` of the unmerged model's; test accuracy and
   FLOPs are reported. The chosen PYRA cascade is then exported and run through the ORT ``Cascade`` (stages with
   different token counts), with the parity report and the near-tie count.

All five digits runs share recipes/multiexit-digits.yaml's backbone, data and train blocks (checked); a run in
``--runs`` trained with another recipe (e.g. an older schedule) is moved aside to ``<name>.staleN`` and retrained.

Seed study (``--seeds 1 2``; only this part runs): ToMe and PYRA at the low and high rate retrained with
``train.seed=<seed>`` into ``<runs>/<name>-s<seed>`` (one at a time, missing runs only; seed 0 is the plain
``<runs>/<name>`` run above, reused), final-exit test and val accuracy per seed evaluated as in part 1, mean and
sample standard deviation, paired PYRA - ToMe per seed. Writes ``<out>/pyra_seeds.json``.

Writes ``<out>/pyra_bench.json`` and ``<out>/pyra_bench.png`` (default ``benchmarks/results/pyra/``). With
``--skip-speed`` (``--skip-digits``) the throughput (digits) results of the previous JSON there are kept, and
``speed_from`` (``digits_from``) says which command produced them.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
LOW = [1] * 8
HIGH = [4, 3, 2, 2, 1, 1, 1, 1]
RUNS = {  # name -> (recipe, overrides)
    "unmerged": ("multiexit-digits.yaml", []),
    "tome-low": ("tome-digits.yaml", [f"method.schedule={LOW}"]),
    "pyra-low": ("pyra-digits.yaml", [f"method.schedule={LOW}"]),
    "tome-high": ("tome-digits.yaml", [f"method.schedule={HIGH}"]),
    "pyra-high": ("pyra-digits.yaml", [f"method.schedule={HIGH}"]),
}


# ---- digits: accuracy, FLOPs, cascades ----------------------------------------------------------------------------
SHARED_BLOCKS = ("backbone", "data", "train")  # must be identical across the variants: only the method differs


def seed_sets(seed: int) -> list[str]:
    """Extra overrides for a seed: none for seed 0 (the recipes' own seed, the plain runs), else train.seed."""
    return [] if seed == 0 else [f"train.seed={seed}"]


def run_name(name: str, seed: int = 0) -> str:
    return name if seed == 0 else f"{name}-s{seed}"


def variant_recipe(name: str, seed: int = 0) -> dict:
    """The full recipe a variant trains with (recipe file + its overrides), as a plain mapping."""
    from deploykit.train.recipe import load_recipe

    recipe, sets = RUNS[name]
    return load_recipe(ROOT / "recipes" / recipe, sets=sets + seed_sets(seed)).to_dict()


def check_fair() -> None:
    """Every variant must use the unmerged baseline's backbone, data and train blocks (fair comparison)."""
    base = variant_recipe("unmerged")
    for name in RUNS:
        d = variant_recipe(name)
        diff = [b for b in SHARED_BLOCKS if d[b] != base[b]]
        if diff:
            raise SystemExit(f"{name} ({RUNS[name][0]}) differs from {RUNS['unmerged'][0]} in {diff}; copy the "
                             "baseline's blocks so the variants differ only in the method block")


def ensure_runs(runs_dir: Path, names: list[str] | None = None, seed: int = 0) -> None:
    """Train missing runs; a run trained with another recipe (e.g. an older schedule) is moved aside and retrained."""
    from deploykit.train.checkpoint import read_config
    from deploykit.train.recipe import recipe_from_dict

    check_fair()
    for name in names or list(RUNS):
        recipe, sets = RUNS[name]
        sets = sets + seed_sets(seed)
        rname = run_name(name, seed)
        run = runs_dir / rname
        if (run / "model.safetensors").is_file():
            if recipe_from_dict(read_config(run)).to_dict() == variant_recipe(name, seed):
                continue
            stale = next(p for i in range(1000) if not (p := runs_dir / f"{rname}.stale{i}").exists())
            print(f"{run} was trained with another recipe; moving it to {stale} and retraining", flush=True)
            run.rename(stale)
        cmd = [sys.executable, "-m", "deploykit", "train", "-r", str(ROOT / "recipes" / recipe), "-o",
               str(run)] + [a for s in sets for a in ("--set", s)]
        print("training:", " ".join(cmd), flush=True)
        t0 = time.time()
        subprocess.run(cmd, check=True)
        print(f"trained {rname} in {time.time() - t0:.0f} s", flush=True)


def split_arrays(split: str, pre: dict) -> tuple[torch.Tensor, np.ndarray]:
    from deploykit.data import stack_split

    x, y = stack_split("digits", split, pre)
    return torch.from_numpy(x), y


def stage_flops(model) -> tuple[list[int], list[int], int]:
    """Trunk and exit-head FLOPs per stage and the monolithic FLOPs, batch 1, as the exporter counts them."""
    from deploykit.export.graphs import stage_flops as exporter_stage_flops

    return exporter_stage_flops(model, [3, *model.backbone.patch_embed.img_size])


def exit_logits(model, x: torch.Tensor) -> list[np.ndarray]:
    with torch.no_grad():
        return [lg.numpy() for lg in model(x)]


def cascade_point(logits: list[np.ndarray], y: np.ndarray, thr: float | None, trunk: list[int],
                  head: list[int]) -> dict:
    """Accuracy and expected FLOPs when every early exit fires at max-softmax >= thr (None: no early exit)."""
    from deploykit.runtime.cascade import softmax
    from deploykit.runtime.thresholds import simulate

    scores = np.stack([softmax(lg).max(1) for lg in logits])
    correct = np.stack([lg.argmax(1) == y for lg in logits])
    cum = np.cumsum([c + h for c, h in zip(trunk, head)], dtype=np.float64)
    acc, flops, q = simulate(scores, correct, cum, 1.0, [thr] * (len(logits) - 1))
    return {"threshold": thr, "acc": acc, "flops": flops, "exit_fractions": q.round(4).tolist()}


THRESHOLDS = [None] + [round(float(t), 4) for t in np.concatenate([np.linspace(0.5, 0.95, 10),
                                                                    [0.97, 0.98, 0.99, 0.995, 0.999]])]


def digits_part(runs_dir: Path, tolerance: float, work: Path) -> dict:
    from deploykit.train import load_run

    models, out = {}, {"runs": {}}
    for name in RUNS:
        model, config = load_run(runs_dir / name)
        models[name] = (model, config)
    pre = models["unmerged"][1]["preprocessing"]
    x_val, y_val = split_arrays("val", pre)
    x_test, y_test = split_arrays("test", pre)
    for name, (model, config) in models.items():
        trunk, head, full = stage_flops(model)
        lv, lt = exit_logits(model, x_val), exit_logits(model, x_test)
        curve = [{"val": cascade_point(lv, y_val, t, trunk, head), "test": cascade_point(lt, y_test, t, trunk, head)}
                 for t in THRESHOLDS]
        out["runs"][name] = {
            "method": config["method"], "merge_schedule": getattr(model, "merge_r", [0] * model.depth),
            "stage_tokens": model.method_config().get("stage_tokens"),
            "exit_test_acc": [float((lg.argmax(1) == y_test).mean()) for lg in lt],
            "exit_val_acc": [float((lg.argmax(1) == y_val).mean()) for lg in lv],
            "full_flops": full, "stage_flops": trunk, "exit_flops": head, "cascade": curve,
        }
        print(f"{name:10s} test acc per exit {out['runs'][name]['exit_test_acc']} full MFLOPs {full / 1e6:.2f}",
              flush=True)
    r = out["runs"]
    out["accuracy_table"] = {
        rate: {m: {"test_acc": r[f"{m}-{rate}"]["exit_test_acc"][-1], "full_flops": r[f"{m}-{rate}"]["full_flops"]}
               for m in ("tome", "pyra")} for rate in ("low", "high")}
    for rate in ("low", "high"):
        t = out["accuracy_table"][rate]
        t["pyra_ge_tome"] = t["pyra"]["test_acc"] >= t["tome"]["test_acc"]
    out["accuracy_table"]["unmerged"] = {"test_acc": r["unmerged"]["exit_test_acc"][-1],
                                         "full_flops": r["unmerged"]["full_flops"]}
    out["stacking"] = stacking(r, tolerance)
    out["engine"] = engine_check(models[out["stacking"]["stacked_run"]][0], models["unmerged"][1], x_test, y_test,
                                 out["stacking"]["both"]["threshold"], work)
    return out


SEED_VARIANTS = ("tome-low", "pyra-low", "tome-high", "pyra-high")


def seeds_part(runs_dir: Path, seeds: list[int]) -> dict:
    """Final-exit test/val accuracy of ToMe and PYRA at both rates over seeds (seed 0 = the plain runs)."""
    from deploykit.train import load_run

    seeds = sorted(set([0, *seeds]))
    for seed in seeds:  # one at a time; only missing (or stale) runs train
        ensure_runs(runs_dir, list(SEED_VARIANTS), seed)
    pre = load_run(runs_dir / "tome-low")[1]["preprocessing"]
    x_val, y_val = split_arrays("val", pre)
    x_test, y_test = split_arrays("test", pre)
    runs: dict = {name: {} for name in SEED_VARIANTS}
    for name in SEED_VARIANTS:
        for seed in seeds:
            model, config = load_run(runs_dir / run_name(name, seed))
            if config["preprocessing"] != pre:
                raise SystemExit(f"{run_name(name, seed)} has other preprocessing than tome-low")
            lv, lt = exit_logits(model, x_val), exit_logits(model, x_test)
            runs[name][seed] = {
                "run": str((runs_dir / run_name(name, seed)).relative_to(ROOT)) if runs_dir.is_relative_to(ROOT)
                else str(runs_dir / run_name(name, seed)),
                "train_seed": config["train"]["seed"], "schedule": config["method"].get("schedule"),
                "test_acc": float((lt[-1].argmax(1) == y_test).mean()),
                "test_correct": int((lt[-1].argmax(1) == y_test).sum()),
                "val_acc": float((lv[-1].argmax(1) == y_val).mean()),
            }
            print(f"{name:10s} seed {seed}: test {runs[name][seed]['test_acc']:.4f} "
                  f"val {runs[name][seed]['val_acc']:.4f}", flush=True)

    def stats(v: list[float]) -> dict:
        return {"mean": statistics.fmean(v), "std": statistics.stdev(v) if len(v) > 1 else None}

    summary = {}
    for rate in ("low", "high"):
        t, p = runs[f"tome-{rate}"], runs[f"pyra-{rate}"]
        row: dict = {}
        for split in ("test", "val"):
            k = f"{split}_acc"
            diff = [p[s][k] - t[s][k] for s in seeds]
            row[split] = {"tome": stats([t[s][k] for s in seeds]), "pyra": stats([p[s][k] for s in seeds]),
                          "pyra_minus_tome_per_seed": dict(zip(seeds, diff)), "pyra_minus_tome": stats(diff)}
        row["test"]["pyra_minus_tome_images_per_seed"] = {s: p[s]["test_correct"] - t[s]["test_correct"]
                                                          for s in seeds}
        row["pyra_ge_tome_mean_test"] = row["test"]["pyra"]["mean"] >= row["test"]["tome"]["mean"]
        summary[rate] = row
    return {"seeds": seeds, "n_test": len(y_test), "n_val": len(y_val), "std": "sample standard deviation (n-1)",
            "runs": runs, "summary": summary}


def stacking(r: dict, tolerance: float) -> dict:
    """Cheapest operating point per technique with validation accuracy >= unmerged - tolerance."""
    target = r["unmerged"]["cascade"][0]["val"]["acc"] - tolerance

    def best(points: list[tuple[str, dict]]) -> dict:
        ok = [(n, p) for n, p in points if p["val"]["acc"] >= target]
        if not ok:
            return {"run": None, "note": "no operating point reaches the target accuracy"}
        n, p = min(ok, key=lambda np_: np_[1]["test"]["flops"])
        return {"run": n, "threshold": p["val"]["threshold"], "val_acc": p["val"]["acc"],
                "test_acc": p["test"]["acc"], "flops": p["test"]["flops"],
                "exit_fractions": p["test"]["exit_fractions"]}

    full = r["unmerged"]["full_flops"]
    out = {
        "target_val_acc": target, "tolerance": tolerance, "unmerged_flops": full,
        "exits_alone": best([("unmerged", p) for p in r["unmerged"]["cascade"]]),
        "merging_alone": best([(n, r[n]["cascade"][0]) for n in ("tome-low", "pyra-low", "tome-high", "pyra-high")]),
        "both": best([(n, p) for n in ("pyra-low", "pyra-high") for p in r[n]["cascade"]]),
    }
    out["stacked_run"] = out["both"]["run"] or "pyra-high"
    if out["both"].get("threshold") is None:
        out["both"]["threshold"] = None
    fl = {k: out[k].get("flops") for k in ("exits_alone", "merging_alone", "both")}
    out["both_below_each"] = None not in fl.values() and fl["both"] < min(fl["exits_alone"], fl["merging_alone"])
    return out


def engine_check(model, config: dict, x: torch.Tensor, y: np.ndarray, thr: float | None, work: Path) -> dict:
    """Export the stacked model, check parity on real digits, run the ORT cascade at the chosen threshold."""
    from deploykit.export import export_model
    from deploykit.runtime.cascade import Cascade

    eng = work / "pyra-stacked"
    report: dict = {"near_ties": model.count_near_ties(x, eps=1e-4)}
    try:
        m = export_model(model, eng, labels=config["labels"], preprocessing=config["preprocessing"],
                         parity_inputs=x.numpy())
        report["parity"] = m.provenance.get("parity")
        report["stage_token_shapes"] = [[t.shape for t in s.inputs] for s in m.stages]
    except Exception as e:  # report, don't hide: parity may flag near-tied rows
        report["export_error"] = f"{type(e).__name__}: {e}"
        return report
    with Cascade.from_dir(eng, threads=1) as cas:
        thresholds = [thr] * (m.num_stages - 1) + [None] if thr is not None else None
        res = cas.run(x.numpy(), thresholds)
    report["ort_cascade"] = {"threshold": thr, "test_acc": float((res.labels_idx == y).mean()),
                             "stage_batch_sizes": res.stage_batch_sizes}
    return report


# ---- throughput ----------------------------------------------------------------------------------------------------
def speed_part(models: list[str], batches: list[int], repeats: int, work: Path, threads: int | None,
               with_tome: bool) -> dict:
    from deploykit.backends.ort import OrtRunner
    from deploykit.export.graphs import FullGraph, count_flops
    from deploykit.export.onnx_io import export_graph
    from deploykit.methods import create_backbone, create_method

    out = {}
    for name in models:
        variants = {"unmerged": ("multiexit", 0), "tome-low": ("tome", "low"), "pyra-low": ("pyra", "low"),
                    "tome-high": ("tome", "high"), "pyra-high": ("pyra", "high")}
        if not with_tome:  # ToMe's graph is PYRA's minus a few tiny ops per layer
            variants = {k: v for k, v in variants.items() if not k.startswith("tome")}
        graphs, flops, res = {}, {}, {}
        for v, (method, sched) in variants.items():
            torch.manual_seed(0)
            bb = create_backbone(name, 10)
            kw = {"num_exits": 1} if method == "multiexit" else {"num_exits": 1, "schedule": sched}
            model = create_method(method, bb, 10, **kw).eval()
            if method == "pyra":
                with torch.no_grad():
                    for p in model.pyra:
                        if hasattr(p, "w_d"):
                            p.w_d.normal_(0, 0.02)
            graph = FullGraph(model.prepare_for_export())
            flops[v] = count_flops(graph, torch.zeros(1, 3, 224, 224))
            path = work / f"{name}-{v}.onnx"
            t0 = time.time()
            export_graph(graph, (torch.zeros(2, 3, 224, 224),), path, ["image"], ["logits"])
            print(f"exported {path.name} ({time.time() - t0:.0f}s), GFLOPs {flops[v] / 1e9:.2f}", flush=True)
            graphs[v] = path
        for b in batches:
            x = np.random.default_rng(0).standard_normal((b, 3, 224, 224), dtype=np.float32)
            runners = {v: OrtRunner(p, threads=threads) for v, p in graphs.items()}
            times: dict[str, list[float]] = {v: [] for v in graphs}
            for rn in runners.values():  # warm-up
                rn.run({"image": x})
            for _ in range(repeats):  # interleaved, so load from other processes hits every graph alike
                for v, rn in runners.items():
                    t0 = time.perf_counter()
                    rn.run({"image": x})
                    times[v].append(time.perf_counter() - t0)
            for rn in runners.values():
                rn.close()
            med = {v: statistics.median(t) for v, t in times.items()}
            res[b] = {v: {"median_s": med[v], "images_per_s": b / med[v],
                          "speedup": med["unmerged"] / med[v], "flops_ratio": flops["unmerged"] / flops[v],
                          "efficiency": (med["unmerged"] / med[v]) / (flops["unmerged"] / flops[v])}
                      for v in graphs}
            print(name, "batch", b, {v: f"{r['speedup']:.2f}x/{r['flops_ratio']:.2f}x" for v, r in res[b].items()},
                  flush=True)
        out[name] = {"flops": flops, "batches": res}
    return out


# ---- report ----------------------------------------------------------------------------------------------------------
def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    ax = axes[0]
    d = report.get("digits")
    if d:
        styles = {"unmerged": "k", "tome-low": "C0", "pyra-low": "C1", "tome-high": "C2", "pyra-high": "C3"}
        for name, run in d["runs"].items():
            pts = sorted((p["test"]["flops"] / 1e6, p["test"]["acc"]) for p in run["cascade"])
            ax.plot(*zip(*pts), "-", color=styles[name], alpha=0.6, lw=1)
            ax.plot(run["full_flops"] / 1e6, run["exit_test_acc"][-1], "o", color=styles[name], label=name)
        for key, mk in (("exits_alone", "s"), ("merging_alone", "^"), ("both", "*")):
            p = d["stacking"][key]
            if p.get("run"):
                ax.plot(p["flops"] / 1e6, p["test_acc"], mk, ms=12, mfc="none", mec="m", label=f"chosen: {key}")
        ax.set_xlabel("expected MFLOPs / image (lines: exit cascades, dots: full model)")
        ax.set_ylabel("digits test accuracy")
        ax.set_title("digits: accuracy vs FLOPs")
        ax.legend(fontsize=7)
    ax = axes[1]
    s = report.get("speed")
    if s:
        labels, gains, ratios = [], [], []
        for name, m in s.items():
            for b, res in m["batches"].items():
                for v, r in res.items():
                    if v != "unmerged":
                        labels.append(f"{name.split('_patch')[0].replace('vit_', '')} {v} b{b}")
                        gains.append(r["speedup"])
                        ratios.append(r["flops_ratio"])
        idx = np.arange(len(labels))
        ax.bar(idx - 0.2, gains, 0.4, label="measured throughput gain")
        ax.bar(idx + 0.2, ratios, 0.4, label="FLOPs reduction")
        ax.set_xticks(idx, labels, rotation=70, fontsize=7)
        ax.set_ylabel("x vs unmerged graph")
        ax.set_title("ONNX Runtime CPU, 224 px" + (" (from an earlier run; see speed_from)" if report.get("speed_from")
                                                  else ""))
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=Path, default=ROOT / "runs" / "pyra-bench")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "pyra")
    ap.add_argument("--models", nargs="+", default=["vit_small_patch16_224", "vit_base_patch16_224"])
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 32])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="ORT intra-op threads (default: usable cores)")
    ap.add_argument("--tolerance", type=float, default=0.01, help="accuracy drop allowed vs unmerged (fraction)")
    ap.add_argument("--with-tome-speed", action="store_true", help="also time ToMe graphs (PYRA's minus ~1%% ops)")
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--skip-digits", action="store_true")
    ap.add_argument("--seeds", nargs="+", type=int, default=None,
                    help="seed study only: ToMe/PYRA low/high also with these train seeds (seed 0 = the plain runs); "
                         "writes <out>/pyra_seeds.json and nothing else")
    args = ap.parse_args()

    from deploykit.runtime.bench import cpu_model

    torch.set_num_threads(args.threads or len(os.sched_getaffinity(0)))
    args.out.mkdir(parents=True, exist_ok=True)
    report: dict = {"command": "python " + " ".join([str(Path(sys.argv[0]).relative_to(ROOT))
                                                     if Path(sys.argv[0]).is_absolute() else sys.argv[0],
                                                     *sys.argv[1:]]),
                    "cpu": cpu_model(), "cores": len(os.sched_getaffinity(0)), "torch": torch.__version__}
    if args.seeds is not None:
        report["digits_seeds"] = seeds_part(args.runs, args.seeds)
        (args.out / "pyra_seeds.json").write_text(json.dumps(report, indent=1))
        print("wrote", args.out / "pyra_seeds.json")
        return
    prev_path = args.out / "pyra_bench.json"
    prev = json.loads(prev_path.read_text()) if prev_path.is_file() else {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if args.skip_digits and "digits" in prev:  # keep the last digits results, and say where they came from
            report["digits"] = prev["digits"]
            report["digits_from"] = prev.get("digits_from") or {"command": prev.get("command"), "cpu": prev.get("cpu")}
        if not args.skip_digits:
            ensure_runs(args.runs)
            report["digits"] = digits_part(args.runs, args.tolerance, work)
        if not args.skip_speed:
            report["speed"] = speed_part(args.models, args.batches, args.repeats, work, args.threads,
                                         args.with_tome_speed)
        elif "speed" in prev:  # keep the last throughput measurement (and say where it came from)
            report["speed"] = prev["speed"]
            report["speed_from"] = prev.get("speed_from") or {"command": prev.get("command"), "cpu": prev.get("cpu")}
    (args.out / "pyra_bench.json").write_text(json.dumps(report, indent=1))
    plot(report, args.out / "pyra_bench.png")
    print("wrote", args.out / "pyra_bench.json", args.out / "pyra_bench.png")


if __name__ == "__main__":
    main()
