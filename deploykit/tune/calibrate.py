"""``deploykit calibrate``: pick exit thresholds on the validation split, evaluate them on the test split."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from deploykit.runtime.cascade import Cascade, stage_costs
from deploykit.runtime.exit_record import build_record
from deploykit.tune.thresholds import choose, first_exit, pareto_front, simulate, sweep

DEFAULT_MAX_DROP = 0.5


def _exit_outputs(cascade: Cascade, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    outs = cascade.run_all_exits(x)
    scores = np.stack([o["score"] for o in outs]).astype(np.float64)
    correct = np.stack([o["logits"].argmax(1) == y for o in outs])
    return scores, correct


def calibrate(
        engine_dir: str | os.PathLike,
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
        engine_dir: exported engine directory.
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
    from deploykit.data import stack_split
    from deploykit.manifest import Manifest

    if Manifest.load(engine_dir).task.startswith("vl"):  # MuE: per-task, per-stream thresholds
        from deploykit.tune.mue_calibrate import calibrate_mue

        return calibrate_mue(engine_dir, data=None if data == "digits" else data, max_drop=max_drop,
                             layer_budget=flops_budget, json_out=json_out, plot_out=plot_out, write=write,
                             confidence=confidence, loss=loss, bound=bound)
    if confidence is not None:  # distribution-free risk control: the drop holds on new data with prob. 1 - δ
        from deploykit.tune.guarantee import calibrate_guaranteed

        return calibrate_guaranteed(engine_dir, data, DEFAULT_MAX_DROP if max_drop is None else max_drop, confidence,
                                    loss=loss, bound=bound, flops_budget=flops_budget, json_out=json_out,
                                    plot_out=plot_out, backend=backend, write=write)
    if max_drop is None and flops_budget is None:
        max_drop = DEFAULT_MAX_DROP
    with Cascade.from_dir(engine_dir, backend=backend) as cascade:
        m = cascade.manifest
        pre = m.preprocessing.__dict__
        xv, yv = stack_split(data, "val", pre)
        xt, yt = stack_split(data, "test", pre)
        _check_labels(m.labels, data)
        sv, cv = _exit_outputs(cascade, xv, yv)
        st, ct = _exit_outputs(cascade, xt, yt)
        cum, full = stage_costs(m)
        sw = sweep(sv, cv, cum, full, levels=levels)
        full_val = float(cv[-1].mean())
        best = choose(sw, full_val, max_drop=max_drop, flops_budget=flops_budget)
        thr = [float(t) if np.isfinite(t) else None for t in sw.thresholds[best]] + [None]
        # the real cascade on the test split, with compaction (the simulation must agree with it)
        res = cascade.run(xt, thresholds=thr)
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
    if json_out is not None:
        json_out = Path(json_out)
        plot_out = Path(plot_out) if plot_out else json_out.with_suffix(".png")
    if plot_out is not None:
        report["plot"] = str(plot_out)
        plot_calibration(report, sw, plot_out)
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(report, indent=2) + "\n")
    if write:
        m.exit_policy.thresholds = thr
        m.calibration = {k: report[k] for k in ("data", "objective", "val", "test", "curve", "exit_record")}
        m.calibration["calibrated_at"] = time.time()
        m.save()
    return report


def _check_labels(labels: list[str], data: str) -> None:
    from deploykit.data import data_info
    from deploykit.errors import DataError

    have = data_info(data).labels
    if have != labels:
        raise DataError(f"data {data!r} has classes {have[:10]} but the model was exported with {labels[:10]}; "
                        "calibrate on the data the model was trained for")


def plot_calibration(report: dict[str, Any], sw: Any, path: str | os.PathLike) -> None:
    """Accuracy against FLOPs: every combination (val), the Pareto curve on val and test, and the choice."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    ax.scatter(sw.flops_ratio, 100 * sw.accuracy, s=2, c="0.8", label="threshold combinations (val)")
    c = report["curve"]
    ax.plot([p["flops_ratio"] for p in c], [100 * p["val_accuracy"] for p in c], "-", c="C0", label="Pareto (val)")
    ax.plot([p["test_flops_ratio"] for p in c], [100 * p["test_accuracy"] for p in c], "-", c="C1",
            label="same thresholds (test)")
    t = report["test"]
    ax.axhline(100 * t["full_accuracy"], ls="--", c="C1", lw=0.8, label="full depth (test)")
    ax.plot([t["flops_ratio"]], [100 * t["cascade_accuracy"]], "*", ms=14, c="C3", label="chosen (test)")
    ax.set_xlabel("expected FLOPs / full model FLOPs")
    ax.set_ylabel("accuracy (%)")
    lo = min(100 * t["full_accuracy"] - 15, 100 * min(p["test_accuracy"] for p in c))
    ax.set_ylim(max(lo, 0), 100.5)
    ax.set_xlim(0, 1.05)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title("deploykit calibrate: accuracy vs FLOPs")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
