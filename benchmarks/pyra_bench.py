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

Seed study (``--seeds 1 2 3 4``; only this part runs): for every seed, ToMe and PYRA at the low, high and front
(``FRONT``: all merging in stage 1) rates and the unmerged multi-exit model, retrained with ``train.seed=<seed>``
into ``<runs>/<name>-s<seed>`` (one at a time, missing runs only; seed 0 is the plain ``<runs>/<name>`` run, reused).
Writes ``<out>/pyra_seeds.json``: final-exit test / val accuracy per seed, mean and sample standard deviation,
paired PYRA - ToMe per seed (and its paired t). Writes ``<out>/pyra_stacking.json`` / ``.png``: per seed,
accuracy-vs-expected-FLOPs curves (one shared max-softmax threshold swept over ``STACK_THRESHOLDS``) for exits
alone, merging alone, PYRA + exits (and ToMe + exits), compared (1) at equal *test* accuracy: the fewest FLOPs each
needs to reach each of ``ACC_TARGETS``, and (2) by the validation rule of part 3 (picked by val FLOPs).

Writes ``<out>/pyra_bench.json`` and ``<out>/pyra_bench.png`` (default ``benchmarks/results/pyra/``). With
``--skip-speed`` (``--skip-digits``) the throughput (digits) results of the previous JSON there are kept, and
``speed_from`` (``digits_from``) says which command produced them.
"""

from __future__ import annotations

import argparse
import json
import math
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
# front-loaded: all merging in stage 1 (blocks 1-2, 17 -> 10 tokens, the same stage-1 cost as HIGH), none after.
# Most digits leave at the first exit, so a cascade's cost is mostly stage 1; later stages keep 10 tokens.
FRONT = [4, 3, 0, 0, 0, 0, 0, 0]
RUNS = {  # name -> (recipe, overrides)
    "unmerged": ("multiexit-digits.yaml", []),
    "tome-low": ("tome-digits.yaml", [f"method.schedule={LOW}"]),
    "pyra-low": ("pyra-digits.yaml", [f"method.schedule={LOW}"]),
    "tome-high": ("tome-digits.yaml", [f"method.schedule={HIGH}"]),
    "pyra-high": ("pyra-digits.yaml", [f"method.schedule={HIGH}"]),
    "tome-front": ("tome-digits.yaml", [f"method.schedule={FRONT}"]),
    "pyra-front": ("pyra-digits.yaml", [f"method.schedule={FRONT}"]),
}
BASE_RUNS = ("unmerged", "tome-low", "pyra-low", "tome-high", "pyra-high")  # the single-seed digits part


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
    for name in names or list(BASE_RUNS):
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
    from deploykit.tune.thresholds import simulate

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
    for name in BASE_RUNS:
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


SEED_RATES = ("low", "high", "front")
SEED_VARIANTS = tuple(f"{m}-{rate}" for rate in SEED_RATES for m in ("tome", "pyra"))
# thresholds for the equal-accuracy curves: one shared max-softmax threshold for every early exit
STACK_THRESHOLDS = [None] + sorted({round(float(t), 4) for t in np.r_[np.linspace(0.3, 0.99, 70), [0.995, 0.999]]})
ACC_TARGETS = [0.95, 0.955, 0.96, 0.965, 0.97, 0.975, 0.98, 0.985]
TECHNIQUES = {  # name -> (runs, early exits on?)
    "exits alone": (["unmerged"], True),
    "merging alone": (list(SEED_VARIANTS), False),
    "PYRA + exits": (["pyra-low", "pyra-high", "pyra-front"], True),
    "PYRA-low + exits": (["pyra-low"], True),
    "PYRA-high + exits": (["pyra-high"], True),
    "PYRA-front + exits": (["pyra-front"], True),
    "ToMe + exits": (["tome-low", "tome-high", "tome-front"], True),
}


def seeds_part(runs_dir: Path, seeds: list[int], tolerance: float) -> tuple[dict, dict]:
    """Over seeds (seed 0 = the plain runs): final-exit accuracy of ToMe vs PYRA per rate, and the stacking study.

    Trains missing runs one at a time: ToMe / PYRA at every rate in ``SEED_RATES`` and the unmerged multi-exit
    model, for every seed. Returns ``(accuracy report, stacking report)``.
    """
    from deploykit.train import load_run

    seeds = sorted(set([0, *seeds]))
    names = ["unmerged", *SEED_VARIANTS]
    for seed in seeds:  # one at a time; only missing (or stale) runs train
        ensure_runs(runs_dir, names, seed)
    pre = load_run(runs_dir / "tome-low")[1]["preprocessing"]
    x_val, y_val = split_arrays("val", pre)
    x_test, y_test = split_arrays("test", pre)
    evals: dict = {name: {} for name in names}
    costs: dict = {}
    for name in names:
        for seed in seeds:
            model, config = load_run(runs_dir / run_name(name, seed))
            if config["preprocessing"] != pre:
                raise SystemExit(f"{run_name(name, seed)} has other preprocessing than tome-low")
            if name not in costs:
                trunk, head, full = stage_flops(model)
                costs[name] = {"stage_flops": trunk, "exit_flops": head, "full_flops": full,
                               "merge_schedule": getattr(model, "merge_r", [0] * model.depth),
                               "stage_tokens": model.method_config().get("stage_tokens")}
            trunk, head = costs[name]["stage_flops"], costs[name]["exit_flops"]
            lv, lt = exit_logits(model, x_val), exit_logits(model, x_test)
            evals[name][seed] = {
                "run": str((runs_dir / run_name(name, seed)).relative_to(ROOT)) if runs_dir.is_relative_to(ROOT)
                else str(runs_dir / run_name(name, seed)),
                "train_seed": config["train"]["seed"], "schedule": config["method"].get("schedule"),
                "test_acc": float((lt[-1].argmax(1) == y_test).mean()),
                "test_correct": int((lt[-1].argmax(1) == y_test).sum()),
                "val_acc": float((lv[-1].argmax(1) == y_val).mean()),
                "exit_test_acc": [float((lg.argmax(1) == y_test).mean()) for lg in lt],
                "cascade": [{"val": cascade_point(lv, y_val, t, trunk, head),
                             "test": cascade_point(lt, y_test, t, trunk, head)} for t in STACK_THRESHOLDS],
            }
            print(f"{name:10s} seed {seed}: test {evals[name][seed]['test_acc']:.4f} "
                  f"val {evals[name][seed]['val_acc']:.4f}", flush=True)

    summary = {}
    for rate in SEED_RATES:
        t, p = evals[f"tome-{rate}"], evals[f"pyra-{rate}"]
        row: dict = {"schedule": costs[f"pyra-{rate}"]["merge_schedule"],
                     "full_flops": costs[f"pyra-{rate}"]["full_flops"]}
        for split in ("test", "val"):
            k = f"{split}_acc"
            diff = [p[s][k] - t[s][k] for s in seeds]
            row[split] = {"tome": _stats([t[s][k] for s in seeds]), "pyra": _stats([p[s][k] for s in seeds]),
                          "pyra_minus_tome_per_seed": dict(zip(seeds, diff)), "pyra_minus_tome": _stats(diff),
                          "paired_t": _paired_t(diff)}
        row["test"]["pyra_minus_tome_images_per_seed"] = {s: p[s]["test_correct"] - t[s]["test_correct"]
                                                          for s in seeds}
        row["pyra_ge_tome_mean_test"] = row["test"]["pyra"]["mean"] >= row["test"]["tome"]["mean"]
        summary[rate] = row
    brief = {n: {s: {k: v for k, v in e.items() if k != "cascade"} for s, e in evals[n].items()} for n in names}
    acc_report = {"seeds": seeds, "n_test": len(y_test), "n_val": len(y_val), "std": "sample standard deviation (n-1)",
                  "runs": {n: brief[n] for n in SEED_VARIANTS}, "unmerged": brief["unmerged"], "summary": summary}
    return acc_report, stacking_seeds(evals, costs, seeds, tolerance)


def _stats(v: list[float]) -> dict:
    return {"mean": statistics.fmean(v), "std": statistics.stdev(v) if len(v) > 1 else None}


def _paired_t(diff: list[float]) -> float | None:
    """Paired t statistic of per-seed differences (``len - 1`` degrees of freedom)."""
    if len(diff) < 2 or statistics.stdev(diff) == 0:
        return None
    return statistics.fmean(diff) / (statistics.stdev(diff) / len(diff) ** 0.5)


def technique_points(evals: dict, technique: str, seed: int) -> list[dict]:
    """Every operating point of a technique at one seed: (run, threshold, val / test accuracy and FLOPs)."""
    runs, exits = TECHNIQUES[technique]
    out = []
    for name in runs:
        for p in evals[name][seed]["cascade"]:
            if exits or p["test"]["threshold"] is None:
                out.append({"run": name, "threshold": p["test"]["threshold"], "val_acc": p["val"]["acc"],
                            "val_flops": p["val"]["flops"], "test_acc": p["test"]["acc"],
                            "test_flops": p["test"]["flops"], "exit_fractions": p["test"]["exit_fractions"]})
    return out


def cheapest(points: list[dict], split: str, target: float) -> dict | None:
    """The point with the fewest expected FLOPs on ``split`` whose ``split`` accuracy is at least ``target``."""
    ok = [p for p in points if p[f"{split}_acc"] >= target - 1e-12]
    return min(ok, key=lambda p: (p[f"{split}_flops"], -p[f"{split}_acc"])) if ok else None


def stacking_seeds(evals: dict, costs: dict, seeds: list[int], tolerance: float) -> dict:
    """Stacking over seeds, two ways.

    1. Equal *test* accuracy: for each target accuracy, the fewest expected FLOPs each technique needs to reach it
       on the test split (its accuracy-vs-FLOPs curve read at that accuracy; a read-out, not a selection rule).
    2. The validation rule: each technique's cheapest point (by val FLOPs) with val accuracy >= the unmerged
       model's val accuracy - ``tolerance``; its test accuracy and FLOPs are reported.
    "Both below either" means PYRA + exits needs fewer FLOPs than exits alone and than merging alone (a technique
    that can't reach the target counts as infinitely expensive).
    """
    unmerged_flops = costs["unmerged"]["full_flops"]
    equal: dict = {}
    for target in ACC_TARGETS:
        row: dict = {"per_seed": {}, "techniques": {}}
        for tech in TECHNIQUES:
            f = []
            for s in seeds:
                p = cheapest(technique_points(evals, tech, s), "test", target)
                row["per_seed"].setdefault(s, {})[tech] = p and {k: p[k] for k in ("run", "threshold", "test_acc",
                                                                                     "test_flops")}
                f.append(p["test_flops"] if p else None)
            got = [v for v in f if v is not None]
            row["techniques"][tech] = {"flops_per_seed": f, "reached": len(got),
                                       "flops": _stats(got) if len(got) == len(seeds) else None}
        wins = 0
        deltas: dict = {"PYRA + exits": [], "PYRA-low + exits": []}
        for s in seeds:
            per = {t: (v["test_flops"] if v else math.inf) for t, v in row["per_seed"][s].items()}
            wins += per["PYRA + exits"] < min(per["exits alone"], per["merging alone"])
            for tech, d in deltas.items():
                if math.isfinite(per[tech]) and math.isfinite(per["exits alone"]):
                    d.append(per[tech] - per["exits alone"])
        row["both_below_each_seeds"] = wins
        row["minus_exits_alone"] = {  # paired over the seeds where both reach the target
            tech: {"per_seed": d, **(_stats(d) if d else {}), "paired_t": _paired_t(d)} for tech, d in deltas.items()}
        equal[f"{target:.3f}"] = row
    val_rule: dict = {"per_seed": {}, "tolerance": tolerance}
    for s in seeds:
        target = evals["unmerged"][s]["val_acc"] - tolerance
        picks = {tech: cheapest(technique_points(evals, tech, s), "val", target) for tech in TECHNIQUES}
        per = {t: (p["test_flops"] if p else math.inf) for t, p in picks.items()}
        val_rule["per_seed"][s] = {"target_val_acc": target, "picks": picks,
                                   "both_below_each": per["PYRA + exits"] < min(per["exits alone"],
                                                                                per["merging alone"])}
    val_rule["summary"] = {
        tech: {k: _stats([val_rule["per_seed"][s]["picks"][tech][k] for s in seeds])
               for k in ("test_acc", "test_flops")}
        for tech in TECHNIQUES if all(val_rule["per_seed"][s]["picks"][tech] for s in seeds)}
    val_rule["both_below_each_seeds"] = sum(val_rule["per_seed"][s]["both_below_each"] for s in seeds)
    return {"seeds": seeds, "unmerged_flops": unmerged_flops, "thresholds": STACK_THRESHOLDS,
            "techniques": {t: {"runs": r, "early_exits": e} for t, (r, e) in TECHNIQUES.items()},
            "costs": costs, "equal_test_accuracy": equal, "val_rule": val_rule,
            "curves": {n: {s: [{"threshold": p["test"]["threshold"], "test_acc": p["test"]["acc"],
                                "test_flops": p["test"]["flops"], "val_acc": p["val"]["acc"]}
                               for p in evals[n][s]["cascade"]] for s in seeds} for n in evals}}


def plot_stacking(st: dict, path: Path) -> None:
    """Left: FLOPs each technique needs per test accuracy (mean over seeds; bars: std). Right: seed-0 curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    ax = axes[0]
    for i, tech in enumerate(("exits alone", "merging alone", "PYRA + exits", "PYRA-low + exits", "ToMe + exits")):
        xs, es, ys = [], [], []
        for target, row in st["equal_test_accuracy"].items():
            t = row["techniques"][tech]
            if t["flops"]:
                xs.append(t["flops"]["mean"] / 1e6)
                es.append((t["flops"]["std"] or 0) / 1e6)
                ys.append(float(target) * 100)
        ax.errorbar(xs, ys, xerr=es, fmt="o-", color=f"C{i}", label=tech, capsize=3, ms=4)
    ax.set_xlabel("expected MFLOPs / image to reach it (mean ± std over seeds; all seeds reach it)")
    ax.set_ylabel("digits test accuracy target (%)")
    ax.set_title(f"equal test accuracy, seeds {st['seeds']}")
    ax.legend(fontsize=7)
    ax = axes[1]
    for i, name in enumerate(("unmerged", "pyra-low", "pyra-high", "pyra-front", "tome-front")):
        pts = sorted((p["test_flops"] / 1e6, p["test_acc"] * 100) for p in st["curves"][name][st["seeds"][0]])
        ax.plot(*zip(*pts), "-", color=f"C{i}", lw=1, label=f"{name} (+ exits)")
    ax.set_xlim(5, 16)
    ax.set_ylim(93, 100)
    ax.set_xlabel("expected MFLOPs / image (one shared exit threshold, swept)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("seed 0: exit-cascade curves")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


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
                    help="seed study only: unmerged and ToMe/PYRA low/high/front also with these train seeds (seed 0 "
                         "= the plain runs); writes <out>/pyra_seeds.json and pyra_stacking.{json,png}, nothing else")
    args = ap.parse_args()

    from deploykit.tune.bench import cpu_model

    torch.set_num_threads(args.threads or len(os.sched_getaffinity(0)))
    args.out.mkdir(parents=True, exist_ok=True)
    report: dict = {"command": "python " + " ".join([str(Path(sys.argv[0]).relative_to(ROOT))
                                                     if Path(sys.argv[0]).is_absolute() else sys.argv[0],
                                                     *sys.argv[1:]]),
                    "cpu": cpu_model(), "cores": len(os.sched_getaffinity(0)), "torch": torch.__version__}
    if args.seeds is not None:
        acc, stack = seeds_part(args.runs, args.seeds, args.tolerance)
        (args.out / "pyra_seeds.json").write_text(json.dumps({**report, "digits_seeds": acc}, indent=1))
        (args.out / "pyra_stacking.json").write_text(json.dumps({**report, "stacking_seeds": stack}, indent=1))
        plot_stacking(stack, args.out / "pyra_stacking.png")
        print("wrote", *(args.out / f for f in ("pyra_seeds.json", "pyra_stacking.json", "pyra_stacking.png")))
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
