"""The monolithic model on every installed CPU runtime: the strongest thing a user could run instead of the cascade.

``deploykit bench --runtimes`` times these next to the cascade, interleaved in one loop, and reports the cascade's
speed relative to the fastest of them (not only to PyTorch eager or to the monolithic graph on the same backend).

INT8 variants are built here from the FP32 monolithic graph for speed only: ORT dynamic INT8 needs no data; the
OpenVINO INT8 one is NNCF post-training quantisation calibrated on the bench inputs (INT8 kernels cost the same
whatever the ranges are; accuracy of INT8 is measured by ``deploykit calibrate`` on a quantised engine directory).
"""

from __future__ import annotations

import importlib.util
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from deploykit.errors import ConfigError
from deploykit.manifest import Manifest

RUNTIMES = ("ort_fp32_default", "ort_fp32_deploykit", "ort_int8_dynamic", "openvino_fp32", "openvino_int8")
CALIB_ROWS = 32  # bench inputs the OpenVINO INT8 monolithic graph is calibrated on


def installed_runtimes() -> list[str]:
    """The monolithic variants this environment can run (OpenVINO ones need ``deploykit[openvino]``)."""
    names = ["ort_fp32_default", "ort_fp32_deploykit", "ort_int8_dynamic"]
    if importlib.util.find_spec("openvino") is not None:
        names.append("openvino_fp32")
        if importlib.util.find_spec("nncf") is not None:
            names.append("openvino_int8")
    return names


def fp32_monolithic(m: Manifest) -> tuple[Manifest, Path]:
    """The FP32 monolithic graph of an engine directory, or of the FP32 directory a quantised one came from."""
    src = m
    if "quantization" in m.extra:
        source = Path(str(m.extra["quantization"].get("source", "")))
        if not (source / "deploykit.json").exists():
            raise ConfigError(f"--runtimes needs the FP32 monolithic graph; {m.root} is quantised and its source "
                              f"{source} is gone — bench the FP32 engine directory instead")
        src = Manifest.load(source)
    if src.monolithic is None:
        raise ConfigError(f"{src.root} has no monolithic graph to compare with; re-export the model")
    return src, src.path_of(src.monolithic.file)


class MonolithicRuntimes:
    """Runners of the monolithic graph on each installed CPU runtime (``names`` picks a subset)."""

    def __init__(self, m: Manifest, pool: np.ndarray, threads: int, names: list[str] | None = None):
        avail = installed_runtimes()
        missing = [n for n in (names or []) if n not in avail]
        if missing:
            raise ConfigError(f"--runtimes: {missing} can't run here (installed: {', '.join(avail)}); the OpenVINO "
                              "ones need `pip install 'deploykit[openvino]'`")
        self.names = list(names or avail)
        self.src, self.path = fp32_monolithic(m)
        self.threads = threads
        self._tmp = tempfile.TemporaryDirectory(prefix="deploykit-runtimes-")
        self.runs: dict[str, Callable[[np.ndarray], Any]] = {}
        self._closers: list[Callable[[], None]] = []
        for name in self.names:
            self.runs[name] = getattr(self, f"_{name}")(pool)

    # ---- one builder per runtime ----------------------------------------------------------------------------
    def _ort_fp32_default(self, pool: np.ndarray) -> Callable[[np.ndarray], Any]:
        import onnxruntime as ort

        s = ort.InferenceSession(str(self.path), providers=["CPUExecutionProvider"])
        return lambda x: s.run(None, {"image": x})

    def _ort_fp32_deploykit(self, pool: np.ndarray) -> Callable[[np.ndarray], Any]:
        return self._runner(self.path, "ort-cpu")

    def _ort_int8_dynamic(self, pool: np.ndarray) -> Callable[[np.ndarray], Any]:
        from deploykit.graphs.quantize import QuantSettings, quantize_graph
        from deploykit.manifest_sections import graph_entries

        dst = Path(self._tmp.name) / "full-int8-dynamic.onnx"
        entry = next(e for e in graph_entries(self.src) if e.file == self.src.monolithic.file)
        quantize_graph(self.path, dst, entry, QuantSettings("dynamic"), None)
        return self._runner(dst, "ort-cpu")

    def _openvino_fp32(self, pool: np.ndarray) -> Callable[[np.ndarray], Any]:
        return self._runner(self.path, "openvino")

    def _openvino_int8(self, pool: np.ndarray) -> Callable[[np.ndarray], Any]:
        from deploykit.graphs.ov_quantize import quantize_graph_ov

        rows = pool[:CALIB_ROWS]
        feeds = [{"image": np.ascontiguousarray(rows[i:i + 8])} for i in range(0, len(rows), 8)]
        info = quantize_graph_ov(self.path, Path(self._tmp.name), self.src.monolithic, feeds, len(rows))
        return self._runner(Path(self._tmp.name) / info["file"], "openvino")

    def _runner(self, path: Path, backend: str) -> Callable[[np.ndarray], Any]:
        from deploykit.backends import create_runner

        r = create_runner(path, backend, threads=self.threads).load()
        self._closers.append(r.close)
        return lambda x: r.run({"image": x})

    # ---- bench hooks ------------------------------------------------------------------------------------------
    def variants(self, batches: list[np.ndarray]) -> dict[str, Callable[[], Any]]:
        """One timed callable per runtime over the bench's batches (keys ``mono_<runtime>``)."""
        return {f"mono_{n}": (lambda fn=fn, bb=batches: [fn(b) for b in bb]) for n, fn in self.runs.items()}

    def summarize(self, per_batch: dict[str, float], cascade_key: str = "cascade") -> dict[str, Any]:
        """Milliseconds per batch of each runtime, the fastest one, and the cascade's speed-up over it."""
        ms = {n: per_batch[f"mono_{n}"] for n in self.runs}
        fastest = min(ms, key=ms.__getitem__)
        out = {"monolithic_ms": ms, "fastest": fastest, "fastest_ms": ms[fastest],
               "cascade_vs_fastest": ms[fastest] / per_batch[cascade_key]}
        if "compare_cascade" in per_batch:  # bench --compare: the second engine's cascade against the same bar
            out["compare_cascade_vs_fastest"] = ms[fastest] / per_batch["compare_cascade"]
        return out

    def close(self) -> None:
        for c in self._closers:
            c()
        self.runs.clear()
        self._tmp.cleanup()


def runtime_names(spec: str | None) -> list[str] | None:
    """``--runtimes`` value: ``all`` (or empty) -> every installed runtime, else a comma-separated subset."""
    if spec is None or spec.strip() in ("", "all"):
        return None
    names = [s.strip() for s in spec.split(",") if s.strip()]
    bad = [n for n in names if n not in RUNTIMES]
    if bad:
        raise ConfigError(f"--runtimes: unknown {bad}; expected 'all' or some of {', '.join(RUNTIMES)}")
    return names


__all__ = ["RUNTIMES", "MonolithicRuntimes", "fp32_monolithic", "installed_runtimes", "runtime_names"]
