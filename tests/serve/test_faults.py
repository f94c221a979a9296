"""Overload (503), engine faults (500, server stays up) and SIGTERM drain (exit 0), over real HTTP."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from serve_helpers import ThreadServer, error, fp32_request, free_port, http, outputs, rows, wait_ready

from deploykit.errors import BackendError
from deploykit.serve.app import ServeConfig, create_app


class _Engine:
    """The real cascade with an injected fault: a row whose first value is 99 makes the engine raise, and an
    optional delay makes each batch slow (to fill the queue)."""

    def __init__(self, cascade: Any, delay_s: float = 0.0) -> None:
        self.cascade, self.manifest, self.delay_s = cascade, cascade.manifest, delay_s

    def run(self, x: np.ndarray, thresholds: Any = None) -> Any:
        time.sleep(self.delay_s)
        if (x[:, 0, 0, 0] == 99.0).any():
            raise BackendError("stage 1: injected engine failure")
        return self.cascade.run(x, thresholds)


def test_engine_error_fails_its_batch_and_server_stays_up(cascade):
    app = create_app(_Engine(cascade), ServeConfig(max_batch_size=8, max_queue_delay_ms=1))
    with ThreadServer(app) as s:
        url = s.url + "/v2/models/tiny/infer"
        bad = rows(2)
        bad[0, 0, 0, 0] = 99.0
        code, _, body = http(url, fp32_request(bad))
        assert code == 500 and "injected engine failure" in error(body) and "still up" in error(body)
        assert http(s.url + "/v2/health/live")[0] == 200
        code, _, body = http(url, fp32_request(rows(3)))
        assert code == 200 and outputs(body)["probabilities"].shape == (3, 10)
        text = http(s.url + "/metrics")[2].decode()
        assert 'deploykit_requests_total{code="500",model="tiny",outcome="error"} 1.0' in text


def test_full_queue_answers_503_with_retry_after(cascade):
    app = create_app(_Engine(cascade, delay_s=0.3), ServeConfig(max_batch_size=1, max_queue_delay_ms=0, max_queue=2))
    with ThreadServer(app) as s:
        url = s.url + "/v2/models/tiny/infer"
        with ThreadPoolExecutor(10) as ex:
            results = list(ex.map(lambda i: http(url, fp32_request(rows(1, seed=i))), range(10)))
        codes = sorted(c for c, _, _ in results)
        assert set(codes) == {200, 503} and len(codes) == 10, codes
        assert codes.count(200) >= 3  # one running + two queued at least
        for code, headers, body in results:
            if code == 503:
                assert headers["retry-after"] == "1" and "busy" in error(body)
        assert http(url, fp32_request(rows(1)))[0] == 200  # recovers once the burst is over


def test_sigterm_drains_in_flight_requests_and_exits_0(engine_dir):
    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-c", "from deploykit.cli import main; main()", "serve-local", str(engine_dir),
           "--port", str(port), "--max-batch-size", "64", "--max-queue-delay-ms", "1500", "--threads", "1",
           "--grpc-port", "0"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(url, proc, 60, poll_s=0.1)
        with ThreadPoolExecutor(5) as ex:
            futs = [ex.submit(http, url + "/v2/models/tiny/infer", fp32_request(rows(2, seed=i))) for i in range(5)]
            time.sleep(0.5)  # all five are waiting in the 1.5 s batching window
            proc.send_signal(signal.SIGTERM)
            results = [f.result() for f in futs]
        assert [c for c, _, _ in results] == [200] * 5
        assert proc.wait(timeout=30) == 0
        try:
            http(url + "/v2/health/live", timeout=1)
            raise AssertionError("server still accepts connections after SIGTERM")
        except OSError:
            pass
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


class _Concurrency:
    """The real cascade, slowed down, counting how many batches run at the same moment."""

    def __init__(self, cascade: Any, delay_s: float) -> None:
        import threading

        self.cascade, self.manifest, self.delay_s = cascade, cascade.manifest, delay_s
        self.lock, self.now, self.peak = threading.Lock(), 0, 0

    def run(self, x: np.ndarray, thresholds: Any = None) -> Any:
        with self.lock:
            self.now += 1
            self.peak = max(self.peak, self.now)
        try:
            time.sleep(self.delay_s)
            return self.cascade.run(x, thresholds)
        finally:
            with self.lock:
                self.now -= 1


def test_instances_run_batches_at_once_and_each_request_gets_its_rows(cascade):
    engine = _Concurrency(cascade, delay_s=0.2)
    app = create_app(engine, ServeConfig(max_batch_size=2, max_queue_delay_ms=1, instances=2))
    with ThreadServer(app) as s:
        url = s.url + "/v2/models/tiny/infer"
        xs = [rows(1, seed=i) for i in range(8)]
        with ThreadPoolExecutor(8) as ex:
            results = list(ex.map(lambda x: http(url, fp32_request(x)), xs))
    assert engine.peak == 2  # two inference threads, never more
    for x, (code, _, body) in zip(xs, results):
        assert code == 200
        np.testing.assert_allclose(outputs(body)["probabilities"], cascade.run(x).probs, atol=1e-6)


def test_instances_need_a_thread_safe_backend(engine_dir):
    import pytest

    from deploykit.errors import ConfigError
    from deploykit.serve import serve_local

    with pytest.raises(ConfigError, match="ort-cpu"):
        serve_local(engine_dir, backend="ort-cuda", instances=2)


class _Jitter:
    """The real cascade with a random per-batch delay, so with two instances batches finish out of order."""

    def __init__(self, cascade: Any) -> None:
        import random
        import threading

        self.cascade, self.manifest = cascade, cascade.manifest
        self.rng, self.lock = random.Random(0), threading.Lock()

    def run(self, x: np.ndarray, thresholds: Any = None) -> Any:
        with self.lock:
            delay = self.rng.choice([0.0, 0.0, 0.03, 0.08])
        time.sleep(delay)
        return self.cascade.run(x, thresholds)


def test_split_requests_with_two_instances_get_every_row_back_in_place(cascade):
    """Requests of 3..7 rows split over batches of 2, run on two threads that finish in random order: every row
    of every answer must equal the offline cascade's row at the same position."""
    app = create_app(_Jitter(cascade), ServeConfig(max_batch_size=2, max_queue_delay_ms=2, instances=2))
    xs = [rows(3 + i % 5, seed=100 + i) for i in range(36)]
    want = [cascade.run(x) for x in xs]
    with ThreadServer(app) as s:
        url = s.url + "/v2/models/tiny/infer"
        with ThreadPoolExecutor(12) as ex:
            results = list(ex.map(lambda x: http(url, fp32_request(x)), xs))
    for x, w, (code, _, body) in zip(xs, want, results):
        assert code == 200, body
        out = outputs(body)
        assert out["probabilities"].shape == (len(x), 10)
        np.testing.assert_allclose(out["probabilities"], w.probs, atol=1e-5)
        np.testing.assert_array_equal(out["exit_stage"], w.exit_stage)


def test_engine_nan_is_a_json_500_never_a_bare_nan_token(engine_dir, tmp_path):
    """Weights poisoned to NaN (hash re-recorded, so only the output check can catch it)."""
    import json
    import shutil

    import onnx
    from onnx import numpy_helper

    from deploykit.manifest import file_sha256
    from deploykit.runtime.cascade import Cascade

    eng = tmp_path / "engine"
    shutil.copytree(engine_dir, eng)
    path = eng / "stage0.onnx"
    model = onnx.load(str(path))
    for init in model.graph.initializer:
        arr = numpy_helper.to_array(init)
        if arr.dtype == np.float32 and arr.ndim == 2:
            init.CopyFrom(numpy_helper.from_array(np.full_like(arr, np.nan), init.name))
    onnx.save(model, str(path))
    m = json.loads((eng / "deploykit.json").read_text())
    m["stages"][0]["sha256"] = file_sha256(path)
    (eng / "deploykit.json").write_text(json.dumps(m))
    with Cascade.from_dir(eng, threads=1) as c, ThreadServer(create_app(c, ServeConfig(max_queue_delay_ms=1))) as s:
        code, headers, body = http(s.url + "/v2/models/tiny/infer", fp32_request(rows(2)))
    assert code == 500 and headers["content-type"] == "application/json"
    assert b"NaN" not in body.replace(b"NaN or infinite", b"")  # no bare NaN token; the body parses as JSON
    assert "NaN or infinite" in error(body)
