"""Drift watch demo: serve-local (a real server subprocess) on the digits engine, clean traffic, then corrupted.

The engine is copied and calibrated (``calibrate --max-drop 1.0 --confidence 0.9``, which stores the exit record),
then served with ``--drift-window W``. Traffic, in requests of ``--rows`` PNG images (the KServe BYTES input, so
the corruption happens to the image files, as it would in the field):

1. clean: the digits val + test images (never trained on), shuffled;
2. corrupted: the same images with Gaussian pixel noise (σ = ``--noise`` of the 0-255 range) and rotated by
   ``--rotate`` degrees.

After every request it reads ``deploykit_exit_drift`` from ``/metrics`` and scores the answers against the labels.
It reports the gauge's range in each phase, how many corrupted rows it took to cross ``--drift-threshold`` (the
target: within one window) and the accuracy in each phase. JSON + PNG.

    python benchmarks/drift_demo.py /tmp/e18 --out benchmarks/results/drift
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from guarantee_bench import machine  # noqa: E402


def digits_pool() -> tuple[np.ndarray, np.ndarray]:
    """8x8 uint8 digits of the val + test splits and their labels."""
    from deploykit.data.datasets import DigitsDataset

    ims, ys = [], []
    for split in ("val", "test"):
        ds = DigitsDataset(split, None)
        ims.append(ds.images)
        ys.append(ds.targets)
    return np.concatenate(ims), np.concatenate(ys)


def corrupt(img: np.ndarray, rng: np.random.Generator, noise: float, rotate: float) -> np.ndarray:
    from PIL import Image

    big = Image.fromarray(img, mode="L").resize((32, 32), Image.BILINEAR).rotate(rotate, fillcolor=0)
    a = np.asarray(big, dtype=np.float64) + rng.normal(0, noise * 255, (32, 32))
    return a.clip(0, 255).astype(np.uint8)


def png(img: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img, mode="L").save(buf, format="PNG")
    return buf.getvalue()


def post(url: str, body: dict[str, Any]) -> dict[str, Any]:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())


def gauge(base: str) -> float | None:
    with urllib.request.urlopen(base + "/metrics", timeout=30) as r:
        m = re.search(rb"^deploykit_exit_drift\{[^}]*\} ([0-9.e+-]+)$", r.read(), re.M)
    return None if m is None else float(m.group(1))


def plot(rep: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = rep["trace"]
    x = [p["rows_served"] for p in t]
    fig, ax = plt.subplots(figsize=(7.5, 4.2), dpi=120)
    ax.plot(x, [p["drift"] if p["drift"] is not None else np.nan for p in t], "-", c="C0",
            label="deploykit_exit_drift (TV distance)")
    ax.axhline(rep["drift_threshold"], ls="--", c="C3", lw=0.9, label=f"--drift-threshold {rep['drift_threshold']}")
    ax.axvspan(rep["clean_rows"], x[-1], color="C3", alpha=0.07, label="corrupted traffic")
    if rep["rows_to_cross"] is not None:
        ax.axvline(rep["clean_rows"] + rep["rows_to_cross"], c="C3", lw=0.8)
    ax.set_xlabel("rows served")
    ax.set_ylabel("exit drift")
    ax.set_ylim(0, 1)
    ax2 = ax.twinx()
    ax2.plot(x, [100 * p["rolling_accuracy"] for p in t], "-", c="C2", lw=0.9, label="accuracy (last window)")
    ax2.set_ylabel("accuracy (%)", color="C2")
    ax2.set_ylim(0, 101)
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, fontsize=7, loc="center left")
    ax.set_title(f"serve-local drift watch (window {rep['drift_window']} rows)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("engine")
    ap.add_argument("--drift-window", type=int, default=200)
    ap.add_argument("--drift-threshold", type=float, default=0.25)
    ap.add_argument("--rows", type=int, default=8, help="images per request")
    ap.add_argument("--clean-rows", type=int, default=600)
    ap.add_argument("--corrupt-rows", type=int, default=600)
    ap.add_argument("--noise", type=float, default=0.25, help="pixel noise σ as a fraction of 255")
    ap.add_argument("--rotate", type=float, default=30.0, help="degrees")
    ap.add_argument("--port", type=int, default=8765)
    ap.add_argument("--out", default="benchmarks/results/drift")
    a = ap.parse_args()
    load0 = list(os.getloadavg())
    work = Path(tempfile.mkdtemp(prefix="drift_demo_"))
    eng = work / "engine"
    shutil.copytree(a.engine, eng)
    dk = [sys.executable, "-m", "deploykit"]
    subprocess.run(dk + ["calibrate", str(eng), "--max-drop", "1.0", "--confidence", "0.9"], check=True)
    server = subprocess.Popen(dk + ["serve-local", str(eng), "--port", str(a.port), "--threads", "1",
                                    "--grpc-port", "0", "--drift-window", str(a.drift_window), "--drift-threshold",
                                    str(a.drift_threshold)], stderr=open(work / "server.log", "w"))
    base = f"http://127.0.0.1:{a.port}"
    try:
        for _ in range(300):
            try:
                urllib.request.urlopen(base + "/v2/health/ready", timeout=2)
                break
            except OSError:
                time.sleep(0.2)
        name = json.loads(urllib.request.urlopen(base + "/stats").read())["model"]
        ims, ys = digits_pool()
        rng = np.random.default_rng(0)
        trace, correct_hist = [], []
        served = 0
        for phase, total in (("clean", a.clean_rows), ("corrupted", a.corrupt_rows)):
            done = 0
            while done < total:
                idx = rng.integers(0, len(ys), a.rows)
                imgs = [ims[i] if phase == "clean" else corrupt(ims[i], rng, a.noise, a.rotate) for i in idx]
                body = {"inputs": [{"name": "image_bytes", "shape": [len(idx)], "datatype": "BYTES",
                                    "data": [base64.b64encode(png(im)).decode() for im in imgs]}]}
                out = post(f"{base}/v2/models/{name}/infer", body)
                labels = next(o["data"] for o in out["outputs"] if o["name"] == "label")
                correct_hist += [str(lbl) == str(ys[i]) for lbl, i in zip(labels, idx)]
                done += len(idx)
                served += len(idx)
                trace.append({"rows_served": served, "phase": phase, "drift": gauge(base),
                              "rolling_accuracy": float(np.mean(correct_hist[-a.drift_window:]))})
        stats = json.loads(urllib.request.urlopen(base + "/stats").read())
    finally:
        server.terminate()
        server.wait(timeout=60)
    log = (work / "server.log").read_text()
    clean = [p["drift"] for p in trace if p["phase"] == "clean" and p["drift"] is not None]
    bad = [p for p in trace if p["phase"] == "corrupted"]
    cross = next((p["rows_served"] - a.clean_rows for p in bad if p["drift"] is not None
                  and p["drift"] > a.drift_threshold), None)
    acc = {ph: float(np.mean(correct_hist[:a.clean_rows] if ph == "clean" else correct_hist[a.clean_rows:]))
           for ph in ("clean", "corrupted")}
    rep = {"engine": a.engine, "drift_window": a.drift_window, "drift_threshold": a.drift_threshold,
           "rows_per_request": a.rows, "clean_rows": a.clean_rows, "corrupt_rows": a.corrupt_rows,
           "corruption": {"pixel_noise_sigma_of_255": a.noise, "rotate_degrees": a.rotate},
           "drift_clean": {"min": min(clean), "median": float(np.median(clean)), "max": max(clean)},
           "drift_corrupted_after_one_window": [p["drift"] for p in bad
                                                if p["rows_served"] - a.clean_rows >= a.drift_window][:1],
           "rows_to_cross": cross, "crossed_within_one_window": cross is not None and cross <= a.drift_window,
           "accuracy": acc, "warning_logged": "exit drift" in log, "server_drift_state": stats["drift"],
           "machine": {**machine(), "load_avg_start": load0}, "trace": trace}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    plot(rep, out / "drift_demo.png")
    rep["plot"] = str(out / "drift_demo.png")
    (out / "drift_demo.json").write_text(json.dumps(rep, indent=1) + "\n")
    shutil.rmtree(work, ignore_errors=True)
    print(json.dumps({k: v for k, v in rep.items() if k not in ("trace", "server_drift_state")}, indent=1))


if __name__ == "__main__":
    main()
