"""``deploykit bench``: monolithic graph, chain with exits disabled, cascade and PyTorch eager, side by side.

All variants run in one process on the same inputs, interleaved repeat by repeat (so drift in machine load hits
them alike), after warm-up, with GPU runners synchronised before each timer stops; the figure per variant is the
median over repeats, reported with its min and max; a speed-up is the ratio of medians, with the min / median / max
of the per-repeat ratios (variants of one repeat run back to back) as its spread. The
report records the load average before and after and warns (``warnings``) when the machine was busy or a ratio is
beyond what the FLOPs allow (:mod:`deploykit.tune.timing`).
"""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from deploykit.errors import ConfigError
from deploykit.manifest import Manifest, as_manifest
from deploykit.runtime.cascade import Cascade, expected_flops_ratio
from deploykit.runtime.engines import open_cascade


def thresholds_for_fractions(scores: np.ndarray, fractions: list[float]) -> list[float | None]:
    """Thresholds that make ``fractions[k]`` of the rows exit at stage k, from quantiles of their scores.

    ``scores`` is ``[K, N]`` (every exit's score on the bench inputs). Stage k's threshold is set on the rows
    still running after stage k-1, so the realised distribution follows ``fractions`` up to ties.
    """
    k_stages, n = scores.shape
    if len(fractions) != k_stages:
        raise ConfigError(f"{len(fractions)} exit fractions for {k_stages} stages; give one per stage")
    f = np.asarray(fractions, dtype=np.float64)
    if (f < 0).any() or abs(f.sum() - 1.0) > 1e-6:
        raise ConfigError(f"exit fractions must be >= 0 and sum to 1, got {fractions} (sum {f.sum():.3f})")
    alive = np.ones(n, dtype=bool)
    thr: list[float | None] = []
    for k in range(k_stages - 1):
        want = int(round(f[k] * n))
        s = scores[k][alive]
        if want <= 0:
            thr.append(None)
            continue
        if want >= len(s):
            t = float(s.min())
        else:
            t = float(np.sort(s)[::-1][want - 1])
        thr.append(t)
        alive &= ~(scores[k] >= t)
    thr.append(None)
    return thr


def bench(
        engine_dir: str | os.PathLike | Manifest,
        batch_sizes: list[int] | tuple[int, ...] = (1, 32),
        exit_fractions: list[float] | None = None,
        checkpoint: str | os.PathLike | None = None,
        data: str | None = None,
        json_out: str | os.PathLike | None = None,
        plot_out: str | os.PathLike | None = None,
        backend: str = "ort-cpu",
        samples: int = 64,
        warmup: int = 2,
        repeats: int = 5,
        threads: int | None = None,
        progress: bool = False,
        torch_model: Any = None,
        ort_default_reference: bool = False,
        compare: str | os.PathLike | None = None,
        runtimes: list[str] | None | bool = False,
) -> dict[str, Any]:
    """Measure the cascade against the monolithic graph, the exit-less chain and (optionally) PyTorch eager.

    Args:
        engine_dir: exported engine directory, or its loaded manifest.
        batch_sizes: batch sizes to measure.
        exit_fractions: fix the exit distribution (e.g. ``[0.4, 0.3, 0.2, 0.1]``): thresholds are set from quantiles
            of the scores on the bench inputs, so speed can be measured on untrained weights. Default: the
            manifest's calibrated thresholds.
        checkpoint: a training run directory: recorded in the report; pass its model as ``torch_model`` (the CLI
            loads it through the run's family, so this module never imports training code).
        data: take inputs from this data source's test split (default: seeded random normal inputs).
        json_out: report path (JSON); the plot goes next to it unless ``plot_out`` is given.
        plot_out: PNG of the per-variant times and speed-ups.
        backend: runner backend for the graphs.
        samples: inputs per timed pass (rounded up to a multiple of the batch size).
        warmup: untimed passes per variant before timing.
        repeats: timed passes per variant (the median is reported).
        threads: intra-op threads (default: the cores this process may use).
        progress: draw a progress bar on stderr (when it is a terminal).
        torch_model: an in-memory ``ExitModel`` for the PyTorch eager variant (instead of ``checkpoint``).
        ort_default_reference: also time the monolithic graph in a session with ONNX Runtime's default options,
            to show the tuned session options don't flatter the chain.
        compare: a second engine directory of the same model (e.g. its INT8 copy from ``deploykit quantize``):
            its monolithic graph and cascade are timed in the same interleaved loop, at the same exit fractions
            when ``exit_fractions`` is given (else at its own manifest thresholds); figures go to ``run["compare"]``.
        runtimes: also time the FP32 monolithic graph on every installed CPU runtime (``True`` / ``None``: all of
            :data:`deploykit.tune.monolithic.RUNTIMES` installed here; a list: those), in the same loop; figures
            and the cascade's speed-up over the fastest go to ``run["runtimes"]``.
    """
    from deploykit.backends import CPU_BACKENDS, create_runner
    from deploykit.backends.ort import default_threads

    manifest = as_manifest(engine_dir)
    engine_dir = manifest.root
    from deploykit import progress as P
    from deploykit.tune import timing as T

    threads = threads or default_threads()
    load_start, others_before = loadavg(), T.idle_share()
    runner_kwargs = {"threads": threads} if backend.startswith("ort") or backend in CPU_BACKENDS else {}
    cascade = open_cascade(manifest, backend=backend, **runner_kwargs)
    m = cascade.manifest
    if m.monolithic is None:
        raise ConfigError(f"{engine_dir} has no monolithic graph to compare with; re-export the model")
    mono = create_runner(m.path_of(m.monolithic.file), backend, **runner_kwargs)
    if torch_model is None and checkpoint:
        raise ConfigError("checkpoint needs its model: pass torch_model (the CLI loads it through the run's family)")
    if torch_model is not None:
        import torch

        torch.set_num_threads(threads)
        torch_model = torch_model.eval()
    mono_default = _default_session(m.path_of(m.monolithic.file)) if ort_default_reference else None
    n_pool = max(samples, max(batch_sizes))
    pool = _inputs(m, data, n_pool)
    all_scores = np.stack([o["score"] for o in cascade.run_all_exits(pool)])
    if exit_fractions is not None:
        thr = thresholds_for_fractions(all_scores, list(exit_fractions))
        thr_source = "quantiles of bench-input scores for the requested exit fractions"
    else:
        thr = m.thresholds()
        thr_source = "manifest (calibrated)" if m.calibration else "manifest (uncalibrated: exits disabled)"
    no_exit = [None] * m.num_stages
    cmp = _compare_setup(compare, backend, runner_kwargs, pool, exit_fractions) if compare else None
    runs, warnings = [], []
    if any(bs < 1 for bs in batch_sizes):
        raise ConfigError(f"--batch-sizes must be >= 1, got {list(batch_sizes)}")
    runners = [*cascade.runners, mono, *([cmp["mono"], *cmp["cascade"].runners] if cmp else [])]

    def sync() -> None:
        for r in runners:
            r.sync()

    pbar = P.bar(len(batch_sizes) * (warmup + repeats), "bench", show=None if progress else False, unit="round")
    rts = None
    if runtimes is not False:
        from deploykit.tune.monolithic import MonolithicRuntimes

        rts = MonolithicRuntimes(m, pool, threads, None if runtimes is True else runtimes)
    during = T.cpu_snapshot()
    for bs in batch_sizes:
        n = int(np.ceil(n_pool / bs) * bs)
        xs = np.concatenate([pool] * int(np.ceil(n / len(pool))))[:n]
        batches = [np.ascontiguousarray(xs[i:i + bs]) for i in range(0, n, bs)]
        stages_seen = [cascade.run(b, thresholds=thr).exit_stage for b in batches]
        fractions = np.bincount(np.concatenate(stages_seen), minlength=m.num_stages) / n
        variants: dict[str, Callable[[], Any]] = {
            "monolithic": lambda bb=batches: [mono.run({"image": b}) for b in bb],
            "chain_noexit": lambda bb=batches: [cascade.run(b, thresholds=no_exit) for b in bb],
            "cascade": lambda bb=batches: [cascade.run(b, thresholds=thr) for b in bb],
        }
        if torch_model is not None:
            variants["torch"] = _torch_variant(torch_model, batches)
        if mono_default is not None:
            variants["monolithic_ort_default"] = lambda bb=batches: [mono_default.run(None, {"image": b}) for b in bb]
        if cmp is not None:
            variants["compare_monolithic"] = lambda bb=batches: [cmp["mono"].run({"image": b}) for b in bb]
            variants["compare_cascade"] = lambda bb=batches: [cmp["cascade"].run(b, thresholds=cmp["thr"]) for b in bb]
        if rts is not None:
            variants.update(rts.variants(batches))
        pbar.set_postfix_str(f"batch {bs}")
        samples_s = T.time_interleaved(variants, warmup, repeats, sync=sync, tick=lambda: pbar.update(1))
        spreads = {k: T.spread(v, 1000.0 / len(batches)) for k, v in samples_s.items()}
        per_batch = {k: v["median"] for k, v in spreads.items()}
        ideal = 1.0 / expected_flops_ratio(m, fractions)
        speedups = T.ratio_spread(samples_s["monolithic"], samples_s["cascade"])  # per repeat, side by side
        speedup = per_batch["monolithic"] / per_batch["cascade"]  # of the medians, as the times are reported
        warnings += T.ratio_warnings(bs, ideal, speedups, spreads["monolithic"], spreads["chain_noexit"])
        run = {
            "batch_size": bs, "batches_per_pass": len(batches),
            "monolithic_ms": per_batch["monolithic"], "chain_noexit_ms": per_batch["chain_noexit"],
            "cascade_ms": per_batch["cascade"], "torch_ms": per_batch.get("torch"),
            "ideal_speedup": ideal, "speedup": speedup, "efficiency": speedup / ideal,
            "chain_overhead": per_batch["chain_noexit"] / per_batch["monolithic"],
            "speedup_vs_torch": (per_batch["torch"] / per_batch["cascade"]) if "torch" in per_batch else None,
            "monolithic_vs_torch": (per_batch["torch"] / per_batch["monolithic"]) if "torch" in per_batch else None,
            "exit_fractions": fractions.tolist(),
            "throughput_cascade_per_s": bs / (per_batch["cascade"] / 1000.0),
            "monolithic_ort_default_ms": per_batch.get("monolithic_ort_default"),
            "spread_ms": spreads, "speedup_spread": speedups,
            "chain_overhead_spread": T.ratio_spread(samples_s["chain_noexit"], samples_s["monolithic"]),
        }
        if cmp is not None:
            run["compare"] = _compare_run(cmp, batches, per_batch, bs)
        if rts is not None:
            run["runtimes"] = rts.summarize(per_batch)
        runs.append(run)
    pbar.close()
    cascade.close()
    others_during = T.others_share(during, T.cpu_snapshot())
    mono.close()
    if rts is not None:
        rts.close()
    if cmp is not None:
        cmp["cascade"].close()
        cmp["mono"].close()
    report = {
        "engine_dir": str(engine_dir), "model": m.name, "backbone": m.backbone.get("name"), "backend": backend,
        "threads": threads, "stages": m.num_stages, "input_shape": m.input_spec.shape,
        "thresholds": thr, "thresholds_from": thr_source, "requested_exit_fractions": exit_fractions,
        "inputs": f"{data} test split" if data else "seeded random normal", "samples_per_pass": n_pool,
        "warmup": warmup, "repeats": repeats, "cpu": cpu_model(), "cores": T.cores(),
        "loadavg_start": load_start, "loadavg_end": loadavg(),
        "other_cpu_share_before": others_before, "other_cpu_share_during": others_during,
        "versions": m.provenance.get("onnxruntime"), "runs": runs,
    }
    report["warnings"] = T.load_warnings(load_start, report["loadavg_end"], threads, others_before,
                                         others_during) + warnings
    if cmp is not None:
        report["compare"] = {"engine_dir": str(compare), "thresholds": cmp["thr"], "precision": cmp["precision"]}
        report["precision"] = m.stages[0].precision
    if json_out is not None:
        json_out = Path(json_out)
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(report, indent=2) + "\n")
        plot_out = plot_out or json_out.with_suffix(".png")
    if plot_out is not None:
        plot_bench(report, plot_out)
        report["plot"] = str(plot_out)
    return report


def _inputs(m: Any, data: str | None, n: int) -> np.ndarray:
    if data:
        from deploykit.data import stack_split

        x, _ = stack_split(data, "test", m.preprocessing.__dict__, limit=n)
        return x
    shape = [int(v) for v in m.input_spec.shape[1:]]
    return np.random.default_rng(0).standard_normal((n, *shape), dtype=np.float32)


def _compare_setup(compare: str | os.PathLike, backend: str, runner_kwargs: dict[str, Any], pool: np.ndarray,
                   exit_fractions: list[float] | None) -> dict[str, Any]:
    """Cascade, monolithic runner and thresholds of the engine directory to compare with (``--compare``)."""
    from deploykit.backends import create_runner

    cascade = Cascade.from_dir(compare, backend=backend, **runner_kwargs)
    cm = cascade.manifest
    if cm.monolithic is None:
        raise ConfigError(f"{compare} has no monolithic graph to compare with; re-export the model")
    if exit_fractions is not None:
        thr = thresholds_for_fractions(np.stack([o["score"] for o in cascade.run_all_exits(pool)]),
                                       list(exit_fractions))
    else:
        thr = cm.thresholds()
    return {"cascade": cascade, "mono": create_runner(cm.path_of(cm.monolithic.file), backend, **runner_kwargs),
            "thr": thr, "precision": cm.stages[0].precision}


def _compare_run(cmp: dict[str, Any], batches: list[np.ndarray], per_batch: dict[str, float],
                 bs: int) -> dict[str, Any]:
    """The compared engine's figures for one batch size, and this engine's cascade speed relative to it."""
    seen = np.concatenate([cmp["cascade"].run(b, thresholds=cmp["thr"]).exit_stage for b in batches])
    k = cmp["cascade"].manifest.num_stages
    return {"monolithic_ms": per_batch["compare_monolithic"], "cascade_ms": per_batch["compare_cascade"],
            "exit_fractions": (np.bincount(seen, minlength=k) / len(seen)).tolist(),
            "throughput_cascade_per_s": bs / (per_batch["compare_cascade"] / 1000.0),
            "cascade_speedup_vs_compare": per_batch["compare_cascade"] / per_batch["cascade"],
            "monolithic_speedup_vs_compare": per_batch["compare_monolithic"] / per_batch["monolithic"]}


def _default_session(path: Any) -> Any:
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _torch_variant(model: Any, batches: list[np.ndarray]) -> Callable[[], Any]:
    import torch

    tensors = [torch.from_numpy(b) for b in batches]

    def run() -> Any:
        with torch.inference_mode():
            return [model.forward_full(t) for t in tensors]

    return run


def cpu_model() -> str:
    """``lscpu``'s model name (what docs/results.md cites)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def loadavg() -> list[float] | None:
    """The 1/5/15-minute load averages, recorded in every benchmark report (shared cores skew timings)."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def plot_bench(report: dict[str, Any], path: str | os.PathLike) -> None:
    """Bars of ms per batch (median, whiskers min..max over repeats) per variant, one panel per batch size.

    Each panel's title gives the realised speed-up with its spread, the ideal from FLOPs and the exit fractions that
    produced them; a busy machine is said in the figure title.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = report["runs"]
    names = ["torch", "monolithic", "chain_noexit", "cascade"]
    names = [n for n in names if any(r.get(f"{n}_ms") for r in runs)]
    colors = {"torch": "C7", "monolithic": "C0", "chain_noexit": "C2", "cascade": "C3"}
    fig, axes = plt.subplots(1, len(runs), figsize=(4.6 * len(runs), 4.0), dpi=120, squeeze=False)
    for ax, r in zip(axes[0], runs):
        med = [r[f"{n}_ms"] for n in names]
        sp = r.get("spread_ms", {})
        lo = [m - sp.get(n, {}).get("min", m) for n, m in zip(names, med)]
        hi = [sp.get(n, {}).get("max", m) - m for n, m in zip(names, med)]
        bars = ax.bar(names, med, yerr=[lo, hi], capsize=4, color=[colors[n] for n in names],
                      error_kw={"elinewidth": 1, "ecolor": "black"})
        for b, v, h in zip(bars, med, hi):
            ax.text(b.get_x() + b.get_width() / 2, v + h, f"{r['monolithic_ms'] / v:.2f}x", ha="center",
                    va="bottom", fontsize=8)
        s = r.get("speedup_spread")
        rng = f" [{s['min']:.2f}-{s['max']:.2f}]" if s else ""
        fr = ", ".join(f"{f:.2f}" for f in r["exit_fractions"])
        ax.set_title(f"batch {r['batch_size']}: speed-up {r['speedup']:.2f}x, per repeat{rng} (ideal "
                     f"{r['ideal_speedup']:.2f}x)"
                     f"\nexit fractions per stage: {fr}", fontsize=8.5)
        ax.set_ylabel("ms per batch (median, whiskers min-max)")
        ax.set_ylim(0, max(m + h for m, h in zip(med, hi)) * 1.15)
        ax.tick_params(axis="x", labelsize=8)
    load = report.get("loadavg_start") or ["?"]
    busy = " — BUSY MACHINE, see warnings" if report.get("warnings") else ""
    fig.suptitle(f"{report['model']} on {report['backend']}, {report['repeats']} repeats, load {load[0]} on "
                 f"{report.get('cores', '?')} cores{busy}; labels: speed relative to monolithic", fontsize=9)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
