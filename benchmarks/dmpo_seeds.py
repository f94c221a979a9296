"""DMPO against the multi-exit baseline on digits over several training seeds.

The single-seed comparison in ``dmpo_bench.py`` is decided by 1-4 test images, so this script trains the default
``dmpo`` and ``multiexit`` recipes (default, evenly spaced exits) with ``train.seed`` = each of ``--seeds``, one run
after another, then exports and calibrates each at 30 / 40 / 60 % of the full model's FLOPs exactly as
``dmpo_bench.py`` does (same ``train_and_export`` / ``measure``). It reports per-seed test accuracy and realised
FLOPs, mean and sample standard deviation per method, and the paired difference DMPO - baseline per seed.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/dmpo_seeds.py --seeds 0 1 2 \\
        --reuse /tmp/dmpo_bench_work_v2 --work /tmp/dmpo_seeds_work

``--reuse DIR`` takes a finished run from a ``dmpo_bench.py`` work dir (``DIR/runs/{dmpo,multiexit}``) for seed 0
when its ``config.json`` has the current recipe's ``method`` / ``backbone`` / ``data`` / ``train`` blocks; it is
still re-exported and re-measured here. Writes ``dmpo_seeds.json`` into ``--out`` (rewritten after every run).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dmpo_bench import BUDGETS, VARIANTS, check_fair, cpu_model, measure, train_and_export  # noqa: E402

METHODS = ("multiexit", "dmpo")


def _norm(v: Any) -> Any:
    """Numbers (and numeric strings such as YAML's ``1.5e-3``) as floats, so a recipe and a config.json compare."""
    if isinstance(v, dict):
        return {k: _norm(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_norm(x) for x in v]
    if isinstance(v, bool) or v is None:
        return v
    if isinstance(v, int | float):
        return float(v)
    if isinstance(v, str):
        try:
            return float(v)
        except ValueError:
            return v
    return v


def reusable(run_dir: Path, recipe: str, seed: int) -> bool:
    """True if ``run_dir`` is a finished run of ``recipe`` (with ``train.seed = seed``), block for block."""
    from deploykit.train.recipe import read_recipe_file

    if not (run_dir / "model.safetensors").exists() or not (run_dir / "config.json").exists():
        return False
    want = read_recipe_file(recipe)
    want.setdefault("train", {})["seed"] = seed
    have = json.loads((run_dir / "config.json").read_text())
    return all(_norm(want.get(k)) == _norm({kk: have.get(k, {}).get(kk) for kk in want.get(k, {})})
               for k in ("method", "backbone", "data", "train"))


def summarise(per_seed: dict[str, dict[str, Any]], seeds: list[int]) -> dict[str, Any]:
    """Mean / sample sd per method and budget, and the paired DMPO - baseline difference per seed."""
    def ms(xs: list[float]) -> dict[str, float]:
        return {"mean": statistics.fmean(xs), "sd": statistics.stdev(xs) if len(xs) > 1 else 0.0, "n": len(xs)}

    done = [s for s in seeds if all(str(s) in per_seed[m] for m in METHODS)]
    out: dict[str, Any] = {"seeds_paired": done, "methods": {}, "paired_diff_dmpo_minus_multiexit": {}}
    for m in METHODS:
        have = [s for s in seeds if str(s) in per_seed[m]]
        r = {"full_test_accuracy": ms([per_seed[m][str(s)]["full_test_accuracy"] for s in have])} if have else {}
        for b in BUDGETS:
            if have:
                r[str(b)] = {"test_accuracy": ms([per_seed[m][str(s)]["budgets"][str(b)]["test_accuracy"]
                                                  for s in have]),
                             "test_flops_ratio": ms([per_seed[m][str(s)]["budgets"][str(b)]["test_flops_ratio"]
                                                     for s in have])}
        out["methods"][m] = r
    d = {str(s): per_seed["dmpo"][str(s)]["full_test_accuracy"] - per_seed["multiexit"][str(s)]["full_test_accuracy"]
         for s in done}
    out["paired_diff_dmpo_minus_multiexit"]["full"] = {"per_seed": d, **(ms(list(d.values())) if d else {})}
    for b in BUDGETS:
        d = {str(s): per_seed["dmpo"][str(s)]["budgets"][str(b)]["test_accuracy"]
             - per_seed["multiexit"][str(s)]["budgets"][str(b)]["test_accuracy"] for s in done}
        out["paired_diff_dmpo_minus_multiexit"][str(b)] = {"per_seed": d, **(ms(list(d.values())) if d else {})}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="benchmarks/results/dmpo")
    ap.add_argument("--work", default="/tmp/dmpo_seeds_work")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--reuse", default=None, help="dmpo_bench.py work dir whose seed-0 runs may be reused")
    args = ap.parse_args()
    check_fair()
    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    per_seed: dict[str, dict[str, Any]] = {m: {} for m in METHODS}
    reused: dict[str, str] = {}
    for seed in args.seeds:
        for m in METHODS:
            recipe, overrides = VARIANTS[m]
            name = f"{m}-seed{seed}"
            run_dir = work / "runs" / name
            src = Path(args.reuse) / "runs" / m if args.reuse and seed == 0 else None
            if src is not None and not (run_dir / "model.safetensors").exists() and reusable(src, recipe, seed):
                shutil.copytree(src, run_dir, dirs_exist_ok=True)
                reused[name] = str(src)
            t0 = time.time()
            engine = train_and_export(name, recipe, {**overrides, "train.seed": seed}, work, skip_train=True)
            r = measure(name, engine, work)
            secs = run_dir / "train_seconds.txt"
            r["train_seconds"] = float(secs.read_text()) if secs.exists() else None
            r["seed"] = seed
            per_seed[m][str(seed)] = r
            print(f"{name}: full {r['full_test_accuracy']:.4f} " + " ".join(
                f"@{b}: {r['budgets'][str(b)]['test_accuracy']:.4f} ({r['budgets'][str(b)]['test_flops_ratio']:.3f})"
                for b in BUDGETS) + f"  [{time.time() - t0:.0f}s]", flush=True)
            report = {
                "command": "OMP_NUM_THREADS=1 .venv/bin/python " + " ".join(sys.argv),
                "machine": {"cpu": cpu_model(), "torch_threads": torch.get_num_threads()},
                "budgets": list(BUDGETS), "seeds": args.seeds, "reused_runs": reused,
                "note": "test split has 360 images (1 image = 0.28 points); sd is the sample sd over seeds",
                "summary": summarise(per_seed, args.seeds),
                "results": {m: {s: {k: v for k, v in r.items() if k != "curve"} for s, r in per_seed[m].items()}
                            for m in METHODS},
            }
            (out / "dmpo_seeds.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report["summary"], indent=2))


if __name__ == "__main__":
    main()
