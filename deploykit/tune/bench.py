"""``deploykit bench``: monolithic graph, chain with exits disabled, cascade and PyTorch eager, side by side.

All variants run in one process on the same inputs, interleaved repeat by repeat (so drift in machine load hits
them alike), after warm-up; the figure per variant is the median over repeats. Speed-ups are ratios of these.
"""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from deploykit.errors import ConfigError
from deploykit.runtime.cascade import Cascade, expected_flops_ratio


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


def _median_ms(times: list[float]) -> float:
    return float(np.median(times) * 1000.0)


def _time_interleaved(variants: dict[str, Callable[[], Any]], warmup: int, repeats: int) -> dict[str, float]:
    for _ in range(warmup):
        for fn in variants.values():
            fn()
    samples: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            t0 = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - t0)
    return {k: _median_ms(v) for k, v in samples.items()}


def bench(
        engine_dir: str | os.PathLike,
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
        engine_dir: exported engine directory.
        batch_sizes: batch sizes to measure.
        exit_fractions: fix the exit distribution (e.g. ``[0.4, 0.3, 0.2, 0.1]``): thresholds are set from quantiles
            of the scores on the bench inputs, so speed can be measured on untrained weights. Default: the
            manifest's calibrated thresholds.
        checkpoint: a training run directory; adds PyTorch eager (full model) to the comparison.
        data: take inputs from this data source's test split (default: seeded random normal inputs).
        json_out: report path (JSON); the plot goes next to it unless ``plot_out`` is given.
        plot_out: PNG of the per-variant times and speed-ups.
        backend: runner backend for the graphs.
        samples: inputs per timed pass (rounded up to a multiple of the batch size).
        warmup: untimed passes per variant before timing.
        repeats: timed passes per variant (the median is reported).
        threads: intra-op threads (default: the cores this process may use).
        progress: print a line per batch size.
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
    from deploykit.manifest import Manifest

    if Manifest.load(engine_dir).task.startswith("vl") and runtimes is not False:
        raise ConfigError("--runtimes compares classification cascades with their monolithic graph; this is a VL "
                          "engine — drop --runtimes")
    if Manifest.load(engine_dir).task.startswith("vl"):
        from deploykit.runtime.generation import bench_vl

        report = bench_vl(engine_dir, n=samples, batch_size=max(batch_sizes), repeats=repeats, threads=threads)
        if json_out is not None:
            Path(json_out).parent.mkdir(parents=True, exist_ok=True)
            Path(json_out).write_text(json.dumps(report, indent=2) + "\n")
        return report
    threads = threads or default_threads()
    runner_kwargs = {"threads": threads} if backend.startswith("ort") or backend in CPU_BACKENDS else {}
    cascade = Cascade.from_dir(engine_dir, backend=backend, **runner_kwargs)
    m = cascade.manifest
    if m.monolithic is None:
        raise ConfigError(f"{engine_dir} has no monolithic graph to compare with; re-export the model")
    mono = create_runner(m.path_of(m.monolithic.file), backend, **runner_kwargs)
    if torch_model is None and checkpoint:
        torch_model = _load_torch(checkpoint, threads)
    elif torch_model is not None:
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
    rts = None
    if runtimes is not False:
        from deploykit.tune.monolithic import MonolithicRuntimes

        rts = MonolithicRuntimes(m, pool, threads, None if runtimes is True else runtimes)
    runs = []
    for bs in batch_sizes:
        if bs < 1:
            raise ConfigError(f"batch sizes must be >= 1, got {bs}")
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
        t = _time_interleaved(variants, warmup, repeats)
        per_batch = {k: v / len(batches) for k, v in t.items()}
        ideal = 1.0 / expected_flops_ratio(m, fractions)
        speedup = per_batch["monolithic"] / per_batch["cascade"]
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
        }
        if cmp is not None:
            run["compare"] = _compare_run(cmp, batches, per_batch, bs)
        if rts is not None:
            run["runtimes"] = rts.summarize(per_batch)
        runs.append(run)
        if progress:
            print(f"batch {bs}: monolithic {run['monolithic_ms']:.2f} ms, chain {run['chain_noexit_ms']:.2f} ms, "
                  f"cascade {run['cascade_ms']:.2f} ms, speed-up {speedup:.2f}x of ideal {ideal:.2f}x", flush=True)
    cascade.close()
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
        "warmup": warmup, "repeats": repeats, "cpu": cpu_model(), "loadavg_start": loadavg(),
        "versions": m.provenance.get("onnxruntime"), "runs": runs,
    }
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


def _load_torch(checkpoint: str | os.PathLike, threads: int) -> Any:
    import torch

    from deploykit.train import load_run

    torch.set_num_threads(threads)
    model, _ = load_run(checkpoint)
    return model.eval()


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
    """Bars of ms per batch for each variant, one group per batch size, with speed-ups annotated."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = report["runs"]
    names = ["torch", "monolithic", "chain_noexit", "cascade"]
    names = [n for n in names if any(r.get(f"{n}_ms") for r in runs)]
    fig, axes = plt.subplots(1, len(runs), figsize=(4.2 * len(runs), 3.8), dpi=120, squeeze=False)
    for ax, r in zip(axes[0], runs):
        vals = [r[f"{n}_ms"] for n in names]
        bars = ax.bar(names, vals, color=["C7", "C0", "C2", "C3"][-len(names):])
        for b, v in zip(bars, vals):
            ax.text(b.get_x() + b.get_width() / 2, v, f"{r['monolithic_ms'] / v:.2f}x", ha="center", va="bottom",
                    fontsize=8)
        ax.set_title(f"batch {r['batch_size']}: speed-up {r['speedup']:.2f}x (ideal {r['ideal_speedup']:.2f}x)",
                     fontsize=9)
        ax.set_ylabel("ms per batch (median)")
        ax.tick_params(axis="x", labelsize=8)
    fig.suptitle(f"{report['model']} on {report['backend']} — labels: speed relative to monolithic", fontsize=9)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
