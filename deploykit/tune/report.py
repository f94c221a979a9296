"""One-line summaries of command reports (the full report goes to the ``--json`` path, not the terminal)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any


def write_report(report: dict[str, Any], json_out: str | os.PathLike | None, plot_out: str | os.PathLike | None,
                 plot: Callable[[Path], None], indent: int = 2) -> None:
    """Write a calibration report: the plot, then the JSON (the rule every calibrate variant follows).

    The plot goes beside ``--json`` unless ``plot_out`` places it elsewhere; its path is recorded in the report.
    """
    if json_out is not None and plot_out is None:
        plot_out = Path(json_out).with_suffix(".png")
    if plot_out is not None:
        report["plot"] = str(plot_out)
        plot(Path(plot_out))
    if json_out is not None:
        Path(json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(json_out).write_text(json.dumps(report, indent=indent) + "\n")


def _where(json_out: str | os.PathLike | None, report: dict[str, Any]) -> str:
    if json_out is None:
        return "; full report: pass --json PATH"
    plot = f" + {report['plot']}" if report.get("plot") else ""
    return f"; report {json_out}{plot}"


def bench_summary(report: dict[str, Any], json_out: str | os.PathLike | None = None) -> str:
    """``batch 1: cascade 1.2 ms vs monolithic 2.5 ms, speed-up 2.08x [1.9-2.2] of ideal 2.4x; batch 32: ...``."""
    if "runs" not in report:  # MuE engines: per task, full depth vs exits
        parts = [f"{t}: speed-up {e['speedup']:.2f}x ({e['full']['seconds']:.3f} s -> {e['exits']['seconds']:.3f} s)"
                 for t, e in report.get("tasks", {}).items()]
        return "; ".join(parts) + _where(json_out, report)
    parts = []
    for r in report["runs"]:
        s = r.get("speedup_spread") or {"min": r["speedup"], "max": r["speedup"]}
        parts.append(f"batch {r['batch_size']}: cascade {r['cascade_ms']:.3g} ms vs monolithic {r['monolithic_ms']:.3g}"
                     f" ms, speed-up {r['speedup']:.2f}x (per repeat {s['min']:.2f}-{s['max']:.2f}) of ideal "
                     f"{r['ideal_speedup']:.2f}x")
    load = report.get("loadavg_start")
    busy = f" (BUSY: {len(report['warnings'])} warning(s))" if report.get("warnings") else ""
    tail = f"; load {load[0]} on {report.get('cores', '?')} cores{busy}" if load else busy
    return "; ".join(parts) + tail + _where(json_out, report)


def mue_calibration_summary(report: dict[str, Any], json_out: str | os.PathLike | None = None) -> str:
    """``entailment: test accuracy 0.83 vs full 0.84 (98.8%) at -41.0% layers; caption: ...``."""
    parts = []
    for task, v in report["tasks"].items():
        t = v["test"]
        parts.append(f"{task}: test {v.get('metric', 'quality')} {t['chosen']['quality']:.3f} vs full "
                     f"{t['full']['quality']:.3f} ({100 * t['quality_ratio']:.1f}%) at "
                     f"-{100 * t['layer_reduction']:.1f}% layers")
    return "calibrated " + "; ".join(parts) + _where(json_out, report)


def mue_bench_summary(report: dict[str, Any], json_out: str | os.PathLike | None = None) -> str:
    """``batch 8 entailment: exits 120 ms vs full 180 ms (1.50x) at 0.62 of the layers; ...``."""
    parts = [f"batch {r['batch_size']} {t}: exits {v['exits']['ms']['median']:.0f} ms vs full "
             f"{v['full']['ms']['median']:.0f} ms ({v['speedup']:.2f}x) at {v['exits']['layer_fraction']:.2f} of the "
             "layers" for r in report["runs"] for t, v in r["tasks"].items()]
    return "; ".join(parts) + _where(json_out, report)


def lint_summary(report: dict[str, Any], json_out: str | os.PathLike | None = None) -> str:
    """A one-line verdict of a TensorRT lint report for ``--json`` runs."""
    ok = report.get("ok")
    return ("lint passed" if ok else "lint FAILED") + (f"; report {json_out}" if json_out else "")
