"""Drift watch: the exit record's distance (pure), and a real server whose gauge rises on corrupted digits."""

from __future__ import annotations

import json
import logging
import re
import shutil
import subprocess

import numpy as np
import pytest
from click.testing import CliRunner
from serve_helpers import ThreadServer, fp32_request, http

from deploykit.runtime.exit_record import build_record, joint_counts, tv_distance
from deploykit.serve.drift import DriftWatch


def test_tv_distance_meaning():
    rng = np.random.default_rng(0)
    stage = rng.integers(0, 3, 4000)
    score = rng.random(4000)
    rec = build_record(stage, score, 3)
    assert sum(sum(p) for p in rec["probs"]) == pytest.approx(1.0)
    assert tv_distance(rec, joint_counts(rec, stage, score)) == pytest.approx(0.0, abs=1e-12)
    # same stages, every score in the lowest bin: moves all mass out of the upper bins
    low = tv_distance(rec, joint_counts(rec, stage, np.zeros(4000)))
    assert 0.5 < low < 1
    # all rows at a stage calibration never used: disjoint, distance 1
    rec2 = build_record(np.zeros(100, int), rng.random(100), 3)
    assert tv_distance(rec2, joint_counts(rec2, np.full(50, 2), rng.random(50))) == pytest.approx(1.0)


def test_drift_watch_window_and_alarm(caplog):
    rng = np.random.default_rng(1)
    rec = build_record(rng.integers(0, 2, 1000), rng.random(1000), 2)
    w = DriftWatch(rec, window=200, threshold=0.3)
    assert w.observe(np.zeros(100, int), rng.random(100)) is None  # window still filling
    with caplog.at_level(logging.WARNING, logger="deploykit.serve"):
        d = w.observe(np.ones(200, int), np.zeros(200))  # everything at stage 1, lowest bin
    assert d > 0.3 and w.alarm and w.crossings == 1 and "exit drift" in caplog.text
    d = w.observe(rng.integers(0, 2, 200), rng.random(200))
    assert d < 0.3 and not w.alarm and w.state()["rows_in_window"] == 200


@pytest.fixture(scope="module")
def calibrated_engine(trained_engine, tmp_path_factory):
    """The trained tiny digits engine, calibrated (point estimate), so its manifest has an exit record."""
    from deploykit.tune.calibrate import calibrate

    dst = tmp_path_factory.mktemp("drift") / "engine"
    shutil.copytree(trained_engine, dst)
    calibrate(dst, data="digits", max_drop=1.0)
    return dst


def _gauge(url: str) -> float | None:
    _, _, body = http(url + "/metrics")
    m = re.search(rb'^deploykit_exit_drift\{model="[^"]+"\} ([0-9.e+-]+)$', body, re.M)
    return None if m is None else float(m.group(1))


def test_drift_gauge_rises_with_corrupted_inputs(calibrated_engine, caplog, tmp_path):
    from deploykit.data import stack_split
    from deploykit.runtime.cascade import Cascade
    from deploykit.serve.app import ServeConfig, create_app

    with Cascade.from_dir(calibrated_engine, threads=1) as cascade:
        x, y = stack_split("digits", "test", cascade.manifest.preprocessing.__dict__)
        # a dead camera: flat grey frames with sensor noise (the tiny test model is too weak to notice milder
        # corruptions; benchmarks/drift_demo.py shows noisy, rotated digits on the real digits engine)
        bad = np.full_like(x, x.mean()) + np.random.default_rng(0).normal(0, 0.1, x.shape).astype(np.float32)
        app = create_app(cascade, ServeConfig(max_batch_size=16, max_queue_delay_ms=1, drift_window=150,
                                              drift_threshold=0.25))
        with ThreadServer(app) as s:
            name = cascade.manifest.name
            for lo in range(0, 160, 16):
                assert http(f"{s.url}/v2/models/{name}/infer", fp32_request(x[lo:lo + 16]))[0] == 200
            clean = _gauge(s.url)
            st = json.loads(http(s.url + "/stats")[2])["drift"]
            assert clean is not None and clean < 0.25 and st["alarm"] is False and st["distance"] == clean
            # requests with their own thresholds don't count
            http(f"{s.url}/v2/models/{name}/infer", fp32_request(bad[:16], exit_threshold=0.0))
            assert json.loads(http(s.url + "/stats")[2])["drift"]["rows_seen"] == 160
            with caplog.at_level(logging.WARNING, logger="deploykit.serve"):
                for lo in range(0, 160, 16):
                    assert http(f"{s.url}/v2/models/{name}/infer", fp32_request(bad[lo:lo + 16]))[0] == 200
            drifted = _gauge(s.url)
            st = json.loads(http(s.url + "/stats")[2])["drift"]
            assert drifted > 0.25 > clean and st["alarm"] is True and st["crossings"] == 1
            assert "exit drift" in caplog.text
            assert "deploykit_exit_drift_threshold" in http(s.url + "/metrics")[2].decode()
            assert b'id="drift"' in http(s.url + "/")[2]
            chrome = shutil.which("chromium") or shutil.which("chromium-browser")
            if chrome:  # the page's live panel shows the mark (headless Chromium, as tests/serve/test_page.py)
                dom = subprocess.run([chrome, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                                      "--disable-background-networking", "--disable-dev-shm-usage",
                                      f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=4000",
                                      "--dump-dom", s.url + "/"], capture_output=True, text=True, timeout=90)
                assert 'data-drift="alarm"' in dom.stdout and '<span class="alarm">DRIFT</span>' in dom.stdout


def test_serve_local_refuses_drift_flags_without_a_record(engine_dir):
    from deploykit.cli import main

    r = CliRunner().invoke(main, ["serve-local", str(engine_dir), "--drift-window", "100", "--port", "1"])
    assert r.exit_code != 0 and "--drift-window" in r.output and "calibrate" in r.output
    r = CliRunner().invoke(main, ["serve-local", str(engine_dir), "--drift-threshold", "2"])
    assert r.exit_code != 0 and "--drift-threshold" in r.output
