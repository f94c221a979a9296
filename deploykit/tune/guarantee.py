"""``deploykit calibrate --confidence 1-δ``: exit thresholds with a distribution-free guarantee on the drop.

Classification cascades. The path is one threshold shared by every early exit, from 1 (nothing exits) down to 0
(everything exits at the first stage), fixed before any data is seen (``risk.shared_threshold_path``). Along it,
Learn-then-Test with fixed-sequence testing (``risk.learn_then_test``) certifies each candidate whose loss p-value is
at most δ until the first that is not; the most aggressive certified candidate is chosen (or, with a FLOPs budget,
the certified candidate within the budget with the lowest calibration loss). If none is certified the cascade runs
at full depth (all exits off) and the report says so: never something weaker than the guarantee asked for.

The guarantee: with probability >= 1-δ over the calibration sample, the expected loss on new data from the same
distribution is <= ε; both losses bound the accuracy drop from above (see ``deploykit.tune.risk``).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from deploykit.errors import ConfigError
from deploykit.runtime.cascade import Cascade, stage_costs
from deploykit.runtime.exit_record import build_record
from deploykit.tune import risk
from deploykit.tune.thresholds import first_exit


def check_options(max_drop: float, confidence: float, loss: str, bound: str, flops_budget: float | None) -> None:
    """Refuse values the procedure can't honour, naming the flag."""
    if not 0 < confidence < 1:
        raise ConfigError(f"--confidence is 1 - δ, a probability strictly between 0 and 1 (e.g. 0.9); got {confidence}")
    if not 0 < max_drop < 100:
        raise ConfigError(f"--max-drop is in accuracy points, above 0 and below 100 (e.g. 1.0); got {max_drop}")
    if loss not in risk.LOSSES:
        raise ConfigError(f"--loss must be one of {risk.LOSSES}, got {loss!r}")
    if bound not in risk.BOUNDS:
        raise ConfigError(f"--bound must be one of {risk.BOUNDS}, got {bound!r}")
    if flops_budget is not None and not 0 < flops_budget <= 1.5:
        raise ConfigError(f"--flops-budget is a fraction of the full model's FLOPs, e.g. 0.6; got {flops_budget}")


def exit_predictions(cascade: Cascade, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every exit's score and predicted class, ``[K, N]`` each."""
    outs = cascade.run_all_exits(x)
    return (np.stack([o["score"] for o in outs]).astype(np.float64),
            np.stack([o["logits"].argmax(1) for o in outs]))


def path_losses(stage: np.ndarray, preds: np.ndarray, labels: np.ndarray | None, loss: str) -> np.ndarray:
    """Per-candidate, per-sample 0/1 loss ``[M, N]`` for exit stages ``stage [M, N]``."""
    pred = preds[stage, np.arange(preds.shape[1])]
    if loss == "consistency":
        return risk.consistency_loss(pred, preds[-1])
    assert labels is not None
    return risk.accuracy_loss(pred == labels, preds[-1] == labels)


def select(ltt: risk.LTTResult, flops: np.ndarray, flops_budget: float | None) -> tuple[int, str | None]:
    """Chosen path index (-1 = full depth) and, when the guarantee can't be met, why."""
    if ltt.last < 0:
        return -1, "no threshold meets the guarantee"
    if flops_budget is None:
        return ltt.last, None
    ok = [int(j) for j in ltt.certified if flops[j] <= flops_budget + 1e-12]
    if not ok:
        return -1, (f"no certified threshold fits the FLOPs budget {flops_budget:.2f}; the cheapest certified one "
                    f"needs {flops[ltt.last]:.3f}")
    return int(min(ok, key=lambda j: (ltt.risks[j], flops[j]))), None


def calibrate_guaranteed(engine_dir: str | os.PathLike | Any, data: str, max_drop: float, confidence: float,
                         loss: str = "consistency", bound: str = "binomial", flops_budget: float | None = None,
                         json_out: str | os.PathLike | None = None, plot_out: str | os.PathLike | None = None,
                         backend: str = "ort-cpu", write: bool = True) -> dict[str, Any]:
    """Risk-controlled thresholds on the val split, checked on the test split; see the module docstring."""
    from deploykit.data import check_labels, is_unlabelled, stack_split
    from deploykit.manifest import as_manifest
    from deploykit.runtime.engines import open_cascade

    check_options(max_drop, confidence, loss, bound, flops_budget)
    unlabelled = is_unlabelled(data)
    if unlabelled and loss == "accuracy":
        raise ConfigError(f"--loss accuracy needs labels, but {data} has no class folders; use --loss consistency "
                          "(agreement with full depth, no labels needed)")
    eps, delta = max_drop / 100.0, 1.0 - confidence
    with open_cascade(as_manifest(engine_dir), backend=backend) as cascade:
        m = cascade.manifest
        pre = m.preprocessing.__dict__
        if not unlabelled:
            check_labels(m.labels, data)
        xv, yv = stack_split(data, "val", pre, unlabelled_ok=True)
        xt, yt = stack_split(data, "test", pre, unlabelled_ok=True)
        sv, pv = exit_predictions(cascade, xv)
        st, pt = exit_predictions(cascade, xt)
        path = risk.shared_threshold_path()
        grid = np.repeat(path[:, None], m.num_stages - 1, axis=1)
        stage_v = first_exit(sv, grid)  # [M, N]
        losses_v = path_losses(stage_v, pv, None if unlabelled else yv, loss)
        ltt = risk.learn_then_test(losses_v, eps, delta, bound, stop_early=False)
        cum, full = stage_costs(m)
        flops_v = cum[stage_v].mean(axis=1) / full
        j, why = select(ltt, flops_v, flops_budget)
        thr: list[float | None] = [float(path[j])] * (m.num_stages - 1) + [None] if j >= 0 else [None] * m.num_stages
        res = cascade.run(xt, thresholds=thr)  # the real cascade on test, with compaction
    n_last = m.num_stages - 1
    sel_v = stage_v[j] if j >= 0 else np.full(len(xv), n_last)
    chosen_losses = path_losses(sel_v[None], pv, None if unlabelled else yv, loss)[0]
    test_losses = path_losses(res.exit_stage[None], pt, None if unlabelled else yt, loss)[0]
    statement = (f"with probability >= {confidence:g} over the calibration sample, the {loss} loss on new data from "
                 f"the same distribution is <= {max_drop:g} points (so is the accuracy drop)")
    guarantee = {
        "statement": statement, "certified": j >= 0, "loss": loss, "bound": bound, "delta": delta,
        "epsilon": eps, "calibration_samples": int(len(xv)),
        "path": f"one threshold shared by every early exit, {len(path)} candidates from 1 down to 0, fixed in advance",
        "candidates_certified": int(ltt.last + 1), "chosen_index": int(j),
        "empirical_risk": float(chosen_losses.mean()),
        "p_value": float(ltt.pvalues[j]) if j >= 0 else None,
        "upper_bound": risk.upper_bound(chosen_losses, delta, bound),
        "min_samples_for_epsilon": risk.min_samples(eps, delta),
    }
    if why is not None:
        guarantee["message"] = (f"{why} (ε = {max_drop:g} points, δ = {delta:g}, {loss} loss, {bound} bound, "
                                f"{len(xv)} calibration samples; at least {guarantee['min_samples_for_epsilon']} "
                                "are needed even with zero losses): falling back to full depth (all exits off)")
    labelled = not unlabelled
    val = {"samples": int(len(xv)), "flops_ratio": float(cum[sel_v].mean() / full),
           "exit_fractions": (np.bincount(sel_v, minlength=m.num_stages) / len(xv)).tolist(),
           "loss": float(chosen_losses.mean())}
    test = {"samples": int(len(xt)), "flops_ratio": float(cum[res.exit_stage].mean() / full),
            "exit_fractions": (np.bincount(res.exit_stage, minlength=m.num_stages) / len(xt)).tolist(),
            "loss": float(test_losses.mean()),
            "agreement_with_full_depth": float((res.labels_idx == pt[-1]).mean())}
    if labelled:
        val.update(full_accuracy=float((pv[-1] == yv).mean()),
                   cascade_accuracy=float((pv[sel_v, np.arange(len(yv))] == yv).mean()))
        test.update(full_accuracy=float((pt[-1] == yt).mean()), cascade_accuracy=float((res.labels_idx == yt).mean()),
                    per_exit_accuracy=(pt == yt).mean(axis=1).tolist())
    curve = _curve(path, stage_v, flops_v, ltt, pv, yv if labelled else None, st, pt, yt if labelled else None,
                   cum, full, j)
    objective: dict[str, Any] = {"max_drop_points": max_drop, "confidence": confidence, "delta": delta, "loss": loss,
                                 "bound": bound}
    if flops_budget is not None:
        objective["flops_budget"] = flops_budget
    report: dict[str, Any] = {
        "engine_dir": str(getattr(engine_dir, "root", engine_dir)), "data": data, "backend": backend,
        "labelled": labelled,
        "objective": objective, "guarantee": guarantee, "thresholds": thr, "val": val, "test": test,
        "curve": curve,
        "exit_record": build_record(sel_v, sv[sel_v, np.arange(len(xv))], m.num_stages, thresholds=thr),
    }
    from deploykit.tune.report import write_report

    write_report(report, json_out, plot_out, lambda path: plot_guarantee(report, path))
    if write:
        m.exit_policy.thresholds = thr
        m.calibration = {k: report[k] for k in ("data", "objective", "guarantee", "val", "test", "curve",
                                                  "exit_record")}
        m.calibration["calibrated_at"] = time.time()
        m.save()
    return report


def describe(report: dict[str, Any]) -> tuple[str, str | None]:
    """What the CLI prints (stdout) and, when the guarantee could not be met, the warning for stderr."""
    t, g = report["test"], report["guarantee"]
    acc = (f"full {100 * t['full_accuracy']:.2f}%, cascade {100 * t['cascade_accuracy']:.2f}%"
           if "full_accuracy" in t else f"agreement with full depth {100 * t['agreement_with_full_depth']:.2f}%")
    text = (f"thresholds {['-' if v is None else round(v, 4) for v in report['thresholds']]}; test: {acc} at "
            f"{100 * t['flops_ratio']:.1f}% of full FLOPs, exits {[round(f, 3) for f in t['exit_fractions']]}\n"
            f"guarantee: {g['statement']}")
    text += (f"; val {g['loss']} loss {100 * g['empirical_risk']:.2f}%, upper bound {100 * g['upper_bound']:.2f}%"
             if g["certified"] else " -- not met, exits off")
    return text, g.get("message")


def _curve(path: np.ndarray, stage_v: np.ndarray, flops_v: np.ndarray, ltt: risk.LTTResult, pv: np.ndarray,
           yv: np.ndarray | None, st: np.ndarray, pt: np.ndarray, yt: np.ndarray | None, cum: np.ndarray,
           full: float, chosen: int) -> list[dict[str, Any]]:
    """The path as calibrated: one point per distinct val exit pattern (for the plot and load-adaptive serving).

    The chosen candidate stands for its pattern, so the manifest's thresholds are a curve point (the adaptive
    ladder's home).
    """
    grid = np.repeat(path[:, None], st.shape[0] - 1, axis=1)
    stage_t = first_exit(st, grid)
    first: dict[bytes, int] = {}
    for j in range(len(path)):
        first.setdefault(stage_v[j].tobytes(), j)
    if chosen >= 0:
        first[stage_v[chosen].tobytes()] = chosen
    out = []
    for j in sorted(first.values()):
        p: dict[str, Any] = {"threshold": float(path[j]), "flops_ratio": float(flops_v[j]),
                             "val_loss": float(ltt.risks[j]), "p_value": float(ltt.pvalues[j]),
                             "certified": bool(j <= ltt.last),
                             "test_flops_ratio": float(cum[stage_t[j]].mean() / full),
                             "test_agreement": float((pt[stage_t[j], np.arange(pt.shape[1])] == pt[-1]).mean()),
                             "thresholds": [float(path[j])] * (st.shape[0] - 1) + [None]}
        if yv is not None and yt is not None:
            p["val_accuracy"] = float((pv[stage_v[j], np.arange(len(yv))] == yv).mean())
            p["test_accuracy"] = float((pt[stage_t[j], np.arange(len(yt))] == yt).mean())
        out.append(p)
    return out


def plot_guarantee(report: dict[str, Any], path: str | os.PathLike) -> None:
    """Calibration loss along the path against FLOPs, ε, the certified part, and the chosen point on test."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c, g = report["curve"], report["guarantee"]
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    fl = [p["flops_ratio"] for p in c]
    ax.plot(fl, [100 * p["val_loss"] for p in c], "-", c="C0", label=f"{g['loss']} loss on val (calibration)")
    ax.plot([p["test_flops_ratio"] for p in c], [100 * (1 - p["test_agreement"]) for p in c], "-", c="C1", lw=0.8,
            label="disagreement with full depth (test)")
    cert = [p for p in c if p["certified"]]
    if cert:
        ax.plot([p["flops_ratio"] for p in cert], [100 * p["val_loss"] for p in cert], "o", ms=3, c="C2",
                label=f"certified at δ = {g['delta']:g}")
    ax.axhline(100 * g["epsilon"], ls="--", c="C3", lw=0.8, label=f"ε = {100 * g['epsilon']:g} points")
    t = report["test"]
    ax.plot([t["flops_ratio"]], [100 * t["loss"]], "*", ms=14, c="C3", label="chosen (test loss)")
    ax.set_xlabel("expected FLOPs / full model FLOPs")
    ax.set_ylabel("loss (% of samples)")
    ax.set_ylim(0, max(4 * 100 * g["epsilon"], 1.0))
    ax.set_xlim(0, 1.05)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right", fontsize=7)
    ax.set_title("deploykit calibrate --confidence: shared-threshold path")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
