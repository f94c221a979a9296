"""Does ``calibrate --confidence`` keep its promise? Random calibration/test splits of digits, pure numpy.

Runs every exit of an exported digits engine ONCE over the images the model never trained on (the digits val +
test splits, 717 images), then for each of ``--splits`` random calibration/test splits of that pool:

- the guaranteed thresholds (``calibrate --confidence 1-δ --max-drop ε``: Learn-then-Test along the shared-threshold
  path, the same functions ``deploykit.tune.guarantee`` uses), for ε in {0.5, 1.0} points, δ in {0.1, 0.05}, both
  losses;
- today's point estimate (``calibrate --max-drop ε``: the cheapest of the threshold grid within ε on the calibration
  split, ``deploykit.tune.thresholds``).

It reports, per setting, the fraction of splits whose **test** drop exceeds ε (accuracy drop, and the controlled
loss itself), which the guarantee says is at most δ up to the test split's own sampling noise, and the FLOPs ratio
on test (mean, min / median / max) of both procedures, side by side.

    deploykit train --recipe recipes/multiexit-digits.yaml --out /tmp/r18 && deploykit export /tmp/r18 -o /tmp/e18
    python benchmarks/guarantee_bench.py /tmp/e18 --splits 500 --out benchmarks/results/guarantee
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np

from deploykit.runtime.cascade import Cascade, stage_costs
from deploykit.tune import risk
from deploykit.tune.guarantee import exit_predictions, path_losses
from deploykit.tune.thresholds import choose, first_exit, sweep

EPSILONS = (0.5, 1.0)  # points
DELTAS = (0.1, 0.05)


def machine() -> dict[str, Any]:
    model = next((ln.split(":", 1)[1].strip() for ln in subprocess.run(["lscpu"], capture_output=True, text=True)
                  .stdout.splitlines() if ln.startswith("Model name")), "unknown")
    return {"cpu": model, "cores": os.cpu_count(), "load_avg": list(os.getloadavg())}


def pool(engine: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, float]:
    """Scores and predictions of every exit on val + test digits, labels, cumulative stage costs and full cost."""
    from deploykit.data import stack_split

    with Cascade.from_dir(engine) as c:
        pre = c.manifest.preprocessing.__dict__
        xs, ys = zip(*(stack_split("digits", s, pre) for s in ("val", "test")))
        x, y = np.concatenate(xs), np.concatenate(ys)
        scores, preds = exit_predictions(c, x)
        cum, full = stage_costs(c.manifest)
    return scores, preds, y, cum, full


def one_split(scores: np.ndarray, preds: np.ndarray, y: np.ndarray, cum: np.ndarray, full: float, cal: np.ndarray,
              test: np.ndarray, path: np.ndarray, levels: int | None) -> list[dict[str, Any]]:
    """Every setting's outcome on one split."""
    k = scores.shape[0]
    grid = np.repeat(path[:, None], k - 1, axis=1)
    st_c = first_exit(scores[:, cal], grid)
    pc, pt, yc, yt = preds[:, cal], preds[:, test], y[cal], y[test]
    full_t = float((pt[-1] == yt).mean())
    rows = []

    def outcome(thr: np.ndarray | None, loss: str) -> dict[str, float]:
        """Test figures, and the loss over the whole pool (the population the splits are drawn from)."""
        stage = np.full(len(y), k - 1) if thr is None else first_exit(scores, thr)
        stage_t = stage[test]
        lt = path_losses(stage_t[None], pt, yt, loss)[0]
        acc = float((pt[stage_t, np.arange(len(yt))] == yt).mean())
        return {"test_drop": 100 * (full_t - acc), "test_loss": 100 * float(lt.mean()),
                "pool_loss": 100 * float(path_losses(stage[None], preds, y, loss)[0].mean()),
                "test_flops": float(cum[stage_t].mean() / full)}

    for loss in risk.LOSSES:
        lc = path_losses(st_c, pc, yc, loss)
        for eps in EPSILONS:
            for delta in DELTAS:
                r = risk.learn_then_test(lc, eps / 100, delta)
                rows.append({"procedure": "guaranteed", "loss": loss, "epsilon": eps, "delta": delta,
                             "certified": r.last >= 0, **outcome(grid[r.last] if r.last >= 0 else None, loss)})
    correct_c = pc == yc
    sw = sweep(scores[:, cal], correct_c, cum, full, levels=levels)
    for eps in EPSILONS:
        best = choose(sw, float(correct_c[-1].mean()), max_drop=eps)
        for loss in risk.LOSSES:
            rows.append({"procedure": "point_estimate", "loss": loss, "epsilon": eps, "delta": None,
                         "certified": True, **outcome(sw.thresholds[best], loss)})
    return rows


VL_GRID = [None, 0.999, 0.995, 0.99, 0.98, 0.95, 0.9, 0.8, 0.6]


def vl_pool(engine: str, n_learn: int, n_pool: int, bs: int = 64) -> dict[str, Any]:
    """MuE entailment: the path learnt on ``n_learn`` val rows (as ``calibrate --confidence`` does on half of val),
    then every path candidate's answer and layer fraction on ``n_pool`` test rows, run once with the runtime."""
    from deploykit.manifest import Manifest
    from deploykit.runtime.exit_rules import Thresholds, layer_fraction
    from deploykit.runtime.generation import MuEEngine
    from deploykit.tune import mue_calibrate as mc

    size = int(Manifest.load(engine).preprocessing.input_size[-1])
    eng = MuEEngine.from_dir(engine, 1)
    try:
        policy = eng.meta["kv_policy"]
        learn = mc.load_vl_split(None, "val", "entailment", n_learn, size)
        cache = mc._Cache(eng, eng.load_images([r.image for r in learn]), eng.encode_texts([r.text for r in learn]),
                          bs)
        points = mc._sweep_entailment(eng, cache, learn, {"img": VL_GRID, "txt": VL_GRID, "dec": VL_GRID})
        path = [p for p in reversed(mc.pareto(points)) if p["layer_fraction"] < 1.0]
        pool = mc.load_vl_split(None, "test", "entailment", n_pool, size)
        imgs, ids = eng.load_images([r.image for r in pool]), eng.encode_texts([r.text for r in pool])

        def run(thr: Thresholds) -> tuple[np.ndarray, np.ndarray]:
            res = eng.generate_ids(imgs, ids, "entailment", thr, policy, bs)
            return (np.asarray([eng.vocab.decode(r.tokens) for r in res]),
                    np.asarray([layer_fraction(r.img_layers, r.txt_layers, r.dec_layers, eng.n_enc, eng.n_dec)
                                for r in res]))

        full, _ = run(Thresholds.full_depth())
        outs = [run(Thresholds(**p["thresholds"])) for p in path]
    finally:
        eng.close()
    return {"answers": np.stack([o[0] for o in outs]), "layers": np.stack([o[1] for o in outs]), "full": full,
            "target": np.asarray([r.target for r in pool]), "path": [p["thresholds"] for p in path],
            "learn_rows": len(learn), "sweep_points": len(points)}


def vl_split(v: dict[str, Any], cal: np.ndarray, test: np.ndarray) -> list[dict[str, Any]]:
    """One split of the VL pool: guaranteed (fixed sequence along the learnt path) vs today's point estimate
    (the cheapest path candidate within ε of full depth on the calibration rows)."""
    ans, lay, full, tgt = v["answers"], v["layers"], v["full"], v["target"]
    right, full_right = ans == tgt, full == tgt
    losses = {"consistency": risk.consistency_loss(ans, full), "accuracy": risk.accuracy_loss(right, full_right)}
    rows = []

    def outcome(j: int, loss: str) -> dict[str, float]:
        lj = losses[loss][j] if j >= 0 else np.zeros(len(full), np.int8)
        acc_t = right[j, test].mean() if j >= 0 else full_right[test].mean()
        return {"test_drop": 100 * float(full_right[test].mean() - acc_t), "test_loss": 100 * float(lj[test].mean()),
                "pool_loss": 100 * float(lj.mean()), "test_flops": float(lay[j, test].mean()) if j >= 0 else 1.0}

    for loss in risk.LOSSES:
        for eps in EPSILONS:
            for delta in DELTAS:
                r = risk.learn_then_test(losses[loss][:, cal], eps / 100, delta)
                rows.append({"procedure": "guaranteed", "loss": loss, "epsilon": eps, "delta": delta,
                             "certified": r.last >= 0, **outcome(r.last, loss)})
    cal_acc, cal_full = right[:, cal].mean(axis=1), full_right[cal].mean()
    for eps in EPSILONS:
        ok = np.flatnonzero(cal_acc >= cal_full - eps / 100 - 1e-12)
        j = int(ok[np.argmin(lay[ok][:, cal].mean(axis=1))]) if len(ok) else -1
        for loss in risk.LOSSES:
            rows.append({"procedure": "point_estimate", "loss": loss, "epsilon": eps, "delta": None,
                         "certified": True, **outcome(j, loss)})
    return rows


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    keys = sorted({(r["procedure"], r["loss"], r["epsilon"], r["delta"]) for r in rows},
                  key=lambda t: (t[0], t[1], t[2], -(t[3] or 0)))
    out = []
    for proc, loss, eps, delta in keys:
        sel = [r for r in rows if (r["procedure"], r["loss"], r["epsilon"], r["delta"]) == (proc, loss, eps, delta)]
        drop = np.array([r["test_drop"] for r in sel])
        lossv = np.array([r["test_loss"] for r in sel])
        poolv = np.array([r["pool_loss"] for r in sel])
        fl = np.array([r["test_flops"] for r in sel])
        out.append({"procedure": proc, "loss": loss, "epsilon_points": eps, "delta": delta, "splits": len(sel),
                    "violation_rate_accuracy_drop": float((drop > eps + 1e-9).mean()),
                    "violation_rate_loss": float((lossv > eps + 1e-9).mean()),
                    "violation_rate_pool_loss": float((poolv > eps + 1e-9).mean()),
                    "certified_rate": float(np.mean([r["certified"] for r in sel])),
                    "test_drop_points": {"mean": float(drop.mean()), "max": float(drop.max())},
                    "flops_ratio": {"mean": float(fl.mean()), "min": float(fl.min()),
                                    "median": float(np.median(fl)), "max": float(fl.max())}})
    return out


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfgs = report["configs"]
    fig, axes = plt.subplots(len(cfgs), 2, figsize=(12, 3.6 * len(cfgs)), dpi=110, squeeze=False)
    for (ax1, ax2), cfg in zip(axes, cfgs):
        s = cfg["summary"]
        g = [r for r in s if r["procedure"] == "guaranteed"]
        labels = [f"{r['loss'][:4]} ε={r['epsilon_points']:g} δ={r['delta']:g}" for r in g]
        xs = np.arange(len(g))
        pe = {(r["loss"], r["epsilon_points"]): r for r in s if r["procedure"] == "point_estimate"}
        ax1.bar(xs - 0.3, [r["violation_rate_pool_loss"] for r in g], 0.2, label="guaranteed: pool loss > ε",
                color="C2")
        ax1.bar(xs - 0.1, [r["violation_rate_accuracy_drop"] for r in g], 0.2, label="guaranteed: test drop > ε")
        ax1.bar(xs + 0.1, [pe[(r["loss"], r["epsilon_points"])]["violation_rate_pool_loss"] for r in g], 0.2,
                label="point estimate (today): pool loss > ε", color="C1", alpha=0.7)
        ax1.bar(xs + 0.3, [pe[(r["loss"], r["epsilon_points"])]["violation_rate_accuracy_drop"] for r in g], 0.2,
                label="point estimate (today): test drop > ε", color="C3", alpha=0.6)
        ax1.scatter(xs - 0.2, [r["delta"] for r in g], marker="_", s=500, c="k", zorder=3, label="δ")
        ax1.set_xticks(xs, labels, rotation=30, ha="right", fontsize=7)
        ax1.set_ylabel("fraction of splits")
        ax1.set_title(f"{cfg.get('family', 'digits')}: violations, {cfg['n_cal']} cal / {cfg['n_test']} test, "
                      f"{cfg['splits']} splits", fontsize=9)
        ax1.legend(fontsize=7)
        ax2.bar(xs - 0.2, [r["flops_ratio"]["mean"] for r in g], 0.4, label="guaranteed")
        ax2.bar(xs + 0.2, [pe[(r["loss"], r["epsilon_points"])]["flops_ratio"]["mean"] for r in g], 0.4,
                color="C3", alpha=0.6, label="point estimate (today)")
        ax2.set_xticks(xs, labels, rotation=30, ha="right", fontsize=7)
        ax2.set_ylabel("test layer fraction (mean)" if cfg.get("family") == "vl-entailment"
                       else "test FLOPs / full model (mean)")
        ax2.set_ylim(0, 1.1)
        ax2.set_title("what the guarantee costs", fontsize=9)
        ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("engine", nargs="?", help="exported digits engine (omit with --vl-engine for the VL part only)")
    ap.add_argument("--splits", type=int, default=500)
    ap.add_argument("--cal-fractions", default="0.5,0.8", help="calibration share of the 717-image pool")
    ap.add_argument("--levels", type=int, default=None, help="point-estimate grid per exit (default: calibrate's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="benchmarks/results/guarantee")
    ap.add_argument("--vl-engine", help="also a MuE entailment engine on the synthetic VL set")
    ap.add_argument("--vl-learn", type=int, default=300, help="val rows the VL path is learnt on")
    ap.add_argument("--vl-pool", type=int, default=1000, help="test rows split into calibration / test")
    ap.add_argument("--name", default="guarantee_bench", help="file name stem of the JSON and PNG")
    a = ap.parse_args()
    if not a.engine and not a.vl_engine:
        ap.error("give a digits engine and/or --vl-engine")
    t0 = time.perf_counter()
    report: dict[str, Any] = {"engine": a.engine, "machine": machine(), "configs": []}
    if a.engine:
        scores, preds, y, cum, full = pool(a.engine)
        n = len(y)
        path = risk.shared_threshold_path()
        report.update({"pool": "digits val + test (never trained on)", "pool_size": n,
                       "full_depth_accuracy_pool": float((preds[-1] == y).mean()),
                       "per_exit_accuracy_pool": (preds == y).mean(axis=1).tolist()})
    for frac in (float(f) for f in a.cal_fractions.split(",") if a.engine):
        rng = np.random.default_rng(a.seed)
        n_cal = int(round(frac * n))
        rows = []
        for _ in range(a.splits):
            perm = rng.permutation(n)
            rows += one_split(scores, preds, y, cum, full, perm[:n_cal], perm[n_cal:], path, a.levels)
        report["configs"].append({"cal_fraction": frac, "n_cal": n_cal, "n_test": n - n_cal, "splits": a.splits,
                                  "min_samples": {f"eps{e}_delta{d}": risk.min_samples(e / 100, d)
                                                  for e in EPSILONS for d in DELTAS},
                                  "summary": summarise(rows)})
    if a.vl_engine:
        v = vl_pool(a.vl_engine, a.vl_learn, a.vl_pool)
        m = len(v["full"])
        report["vl"] = {"engine": a.vl_engine, "task": "entailment", "data": "synthetic-vl (SYNTHETIC scenes)",
                        "learn_rows": v["learn_rows"], "pool_size": m, "path_candidates": len(v["path"]),
                        "sweep_points": v["sweep_points"],
                        "full_depth_accuracy_pool": float((v["full"] == v["target"]).mean()),
                        "flops": "layer executions used / full depth (MuE's layer_fraction)"}
        rng = np.random.default_rng(a.seed)
        rows = []
        for _ in range(a.splits):
            perm = rng.permutation(m)
            rows += vl_split(v, perm[: m // 2], perm[m // 2:])
        report["configs"].append({"family": "vl-entailment", "cal_fraction": 0.5, "n_cal": m // 2,
                                  "n_test": m - m // 2, "splits": a.splits, "summary": summarise(rows)})
    report["seconds"] = round(time.perf_counter() - t0, 1)
    report["machine"]["load_avg_end"] = list(os.getloadavg())
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    plot(report, out / f"{a.name}.png")
    report["plot"] = str(out / f"{a.name}.png")
    (out / f"{a.name}.json").write_text(json.dumps(report, indent=1) + "\n")
    for cfg in report["configs"]:
        print(f"--- {cfg.get('family', 'digits')}: {cfg['n_cal']} cal / {cfg['n_test']} test, {cfg['splits']} splits")
        for r in cfg["summary"]:
            print(f"{r['procedure']:15s} {r['loss']:11s} eps {r['epsilon_points']:.1f} delta {r['delta']!s:5s} "
                  f"viol(drop) {r['violation_rate_accuracy_drop']:.3f} viol(loss) {r['violation_rate_loss']:.3f} "
                  f"viol(pool) {r['violation_rate_pool_loss']:.3f} "
                  f"certified {r['certified_rate']:.2f} flops {r['flops_ratio']['mean']:.3f}")


if __name__ == "__main__":
    main()
