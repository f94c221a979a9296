"""``deploykit calibrate``: pick exit thresholds on the validation split, evaluate them on the test split."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from deploykit.manifest import Manifest, as_manifest
from deploykit.runtime.cascade import Cascade, stage_costs
from deploykit.runtime.engines import open_cascade
from deploykit.runtime.exit_record import build_record
from deploykit.tune.thresholds import choose, first_exit, pareto_front, simulate, sweep

DEFAULT_MAX_DROP = 0.5


def _exit_outputs(cascade: Cascade, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    outs = cascade.run_all_exits(x)
    scores = np.stack([o["score"] for o in outs]).astype(np.float64)
    correct = np.stack([o["logits"].argmax(1) == y for o in outs])
    return scores, correct


def calibrate(
        engine_dir: str | os.PathLike | Manifest,
        data: str = "digits",
        max_drop: float | None = None,
        flops_budget: float | None = None,
        json_out: str | os.PathLike | None = None,
        plot_out: str | os.PathLike | None = None,
        backend: str = "ort-cpu",
        write: bool = True,
        levels: int | None = None,
        confidence: float | None = None,
        loss: str = "consistency",
        bound: str = "binomial",
) -> dict[str, Any]:
    """Choose thresholds, write them into the manifest, and report validation and test figures.

    Args:
        engine_dir: exported engine directory, or its loaded manifest (then it is not read again).
        data: data source (``digits`` or ``imagefolder:PATH``) with val and test splits.
        max_drop: allowed accuracy drop in points vs full depth on the validation split (default 0.5).
        flops_budget: alternatively, a FLOPs budget as a fraction of the full model; maximises accuracy within it.
        json_out: where to write the report (JSON); the plot goes next to it unless ``plot_out`` is given.
        plot_out: PNG of accuracy against FLOPs for the sweep.
        backend: runner backend.
        write: write the chosen thresholds and a calibration summary into the manifest.
        levels: candidate thresholds per exit (default: about 40k combinations in all).
        confidence: 1 - δ; turns on distribution-free risk control (``deploykit.tune.guarantee``): the drop on new
            data is <= ``max_drop`` with this probability. Without it, ``max_drop`` holds on val only.
        loss: with ``confidence``: ``consistency`` (disagreement with full depth; no labels needed) or ``accuracy``.
        bound: with ``confidence``: ``binomial`` (exact for 0/1 losses) or ``hb`` (Hoeffding-Bentkus).
    """
    from deploykit import progress as P
    from deploykit.data import check_labels, stack_split

    manifest = as_manifest(engine_dir)
    engine_dir = manifest.root
    if confidence is not None:  # distribution-free risk control: the drop holds on new data with prob. 1 - δ
        from deploykit.tune.guarantee import calibrate_guaranteed

        return calibrate_guaranteed(manifest, data, DEFAULT_MAX_DROP if max_drop is None else max_drop, confidence,
                                    loss=loss, bound=bound, flops_budget=flops_budget, json_out=json_out,
                                    plot_out=plot_out, backend=backend, write=write)
    if max_drop is None and flops_budget is None:
        max_drop = DEFAULT_MAX_DROP
    with open_cascade(manifest, backend=backend) as cascade, P.bar(5, "calibrate", unit="step") as bar:
        m = cascade.manifest
        check_labels(m.labels, data)
        pre = m.preprocessing.__dict__
        bar.set_postfix_str("preprocessing val + test")
        xv, yv = stack_split(data, "val", pre)
        xt, yt = stack_split(data, "test", pre)
        bar.update(1)
        bar.set_postfix_str("every exit on val")
        sv, cv = _exit_outputs(cascade, xv, yv)
        bar.update(1)
        bar.set_postfix_str("every exit on test")
        st, ct = _exit_outputs(cascade, xt, yt)
        bar.update(1)
        cum, full = stage_costs(m)
        bar.set_postfix_str("threshold sweep")
        sw = sweep(sv, cv, cum, full, levels=levels)
        full_val = float(cv[-1].mean())
        best = choose(sw, full_val, max_drop=max_drop, flops_budget=flops_budget)
        thr = [float(t) if np.isfinite(t) else None for t in sw.thresholds[best]] + [None]
        bar.update(1)
        bar.set_postfix_str("cascade on test")
        # the real cascade on the test split, with compaction (the simulation must agree with it)
        res = cascade.run(xt, thresholds=thr)
        bar.update(1)
    sim_acc, sim_flops, _ = simulate(st, ct, cum, full, np.asarray([np.inf if t is None else t for t in thr[:-1]]))
    fractions = np.bincount(res.exit_stage, minlength=m.num_stages) / len(yt)
    test_flops = float(np.dot(fractions, cum) / full)
    val_acc, val_flops, val_frac = simulate(sv, cv, cum, full, sw.thresholds[best])
    val_stage = first_exit(sv, sw.thresholds[best])
    front = pareto_front(sw.accuracy, sw.flops_ratio)
    curve = []
    for i in front:
        t_acc, t_flops, _ = simulate(st, ct, cum, full, sw.thresholds[i])
        curve.append({"flops_ratio": float(sw.flops_ratio[i]), "val_accuracy": float(sw.accuracy[i]),
                      "test_accuracy": t_acc, "test_flops_ratio": t_flops,
                      "thresholds": [float(t) if np.isfinite(t) else None for t in sw.thresholds[i]] + [None]})
    report: dict[str, Any] = {
        "engine_dir": str(engine_dir), "data": data, "backend": backend,
        "objective": {"max_drop_points": max_drop} if max_drop is not None else {"flops_budget": flops_budget},
        "thresholds": thr,
        "val": {"samples": int(len(yv)), "full_accuracy": full_val, "cascade_accuracy": val_acc,
                "flops_ratio": val_flops, "exit_fractions": val_frac.tolist()},
        "test": {"samples": int(len(yt)), "full_accuracy": float(ct[-1].mean()),
                 "cascade_accuracy": float((res.labels_idx == yt).mean()), "flops_ratio": test_flops,
                 "exit_fractions": fractions.tolist(), "per_exit_accuracy": ct.mean(axis=1).tolist(),
                 "simulated_cascade_accuracy": sim_acc, "simulated_flops_ratio": sim_flops},
        "combinations_searched": int(len(sw.accuracy)),
        "curve": curve,
        "exit_record": build_record(val_stage, sv[val_stage, np.arange(len(yv))], m.num_stages, thresholds=thr),
    }
    from deploykit.tune.report import write_report

    write_report(report, json_out, plot_out, lambda path: plot_calibration(report, sw, path))
    if write:
        m.exit_policy.thresholds = thr
        m.calibration = {k: report[k] for k in ("data", "objective", "val", "test", "curve", "exit_record")}
        m.calibration["calibrated_at"] = time.time()
        m.save()
    return report


def _zoom(report: dict[str, Any]) -> tuple[tuple[float, float], tuple[float, float]]:
    """Axes limits (FLOPs, accuracy %) around the Pareto region that matters: near full depth down to the choice."""
    c, v, t = report["curve"], report["val"], report["test"]
    drop = report["objective"].get("max_drop_points") or 1.0
    fulls = [100 * v["full_accuracy"], 100 * t["full_accuracy"]]
    y_lo = min(min(fulls) - 3 * max(drop, 0.5), 100 * v["cascade_accuracy"], 100 * t["cascade_accuracy"]) - 0.5
    y_hi = max(fulls + [100 * p["val_accuracy"] for p in c] + [100 * p["test_accuracy"] for p in c]) + 0.5
    xs = [p["flops_ratio"] for p in c if 100 * p["val_accuracy"] >= y_lo]
    xs += [p["test_flops_ratio"] for p in c if 100 * p["test_accuracy"] >= y_lo]
    x_lo = min(xs + [v["flops_ratio"], t["flops_ratio"], report["objective"].get("flops_budget") or 1.0])
    return (max(0.0, x_lo - 0.04), 1.02), (max(0.0, y_lo), min(100.5, y_hi))


def plot_calibration(report: dict[str, Any], sw: Any, path: str | os.PathLike) -> None:
    """Accuracy against FLOPs, zoomed on the Pareto region: both full-depth lines, the allowed drop, the choice.

    A reader sees why the point was chosen: the cheapest val point inside the shaded band (full depth on val minus
    the allowed drop), and where the same thresholds land on test against test's own full depth.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    (x_lo, x_hi), (y_lo, y_hi) = _zoom(report)
    v, t, c = report["val"], report["test"], report["curve"]
    fig, ax = plt.subplots(figsize=(9.6, 4.8), dpi=120)
    keep = (sw.flops_ratio >= x_lo) & (100 * sw.accuracy >= y_lo)
    ax.scatter(sw.flops_ratio[keep], 100 * sw.accuracy[keep], s=3, c="0.78", label="threshold combinations (val)")
    ax.plot([p["flops_ratio"] for p in c], [100 * p["val_accuracy"] for p in c], "-", c="C0", lw=1.4,
            label="Pareto front (val)")
    ax.plot([p["test_flops_ratio"] for p in c], [100 * p["test_accuracy"] for p in c], "-", c="C1", lw=1.2,
            label="same thresholds (test)")
    full_v, full_t = 100 * v["full_accuracy"], 100 * t["full_accuracy"]
    ax.axhline(full_v, ls="--", c="C0", lw=0.9, label=f"full depth (val) {full_v:.2f}%")
    ax.axhline(full_t, ls="--", c="C1", lw=0.9, label=f"full depth (test) {full_t:.2f}%")
    obj = report["objective"]
    if obj.get("max_drop_points") is not None:
        d = obj["max_drop_points"]
        ax.axhspan(full_v - d, full_v, color="C0", alpha=0.12, label=f"allowed drop on val ({d:g} points)")
    else:
        ax.axvspan(x_lo, obj["flops_budget"], color="C0", alpha=0.08, label=f"FLOPs budget {obj['flops_budget']:g}")
    ax.plot([v["flops_ratio"]], [100 * v["cascade_accuracy"]], "o", ms=8, mfc="none", c="C0", label="chosen (val)")
    ax.plot([t["flops_ratio"]], [100 * t["cascade_accuracy"]], "*", ms=14, c="C3",
            label=f"chosen (test): {100 * t['cascade_accuracy']:.2f}% at {100 * t['flops_ratio']:.1f}% FLOPs")
    ax.set_xlim(x_lo, x_hi)
    ax.set_ylim(y_lo, y_hi)
    ax.set_xlabel("expected FLOPs / full model FLOPs")
    ax.set_ylabel("accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7.5)
    fr = ", ".join(f"{f:.2f}" for f in t["exit_fractions"])
    ax.set_title(f"deploykit calibrate (zoomed on the Pareto region)\ntest exit fractions per stage: {fr}", fontsize=9)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
