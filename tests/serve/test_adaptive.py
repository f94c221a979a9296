"""Load-adaptive exits: the controller's rule, and a real server on 127.0.0.1 under an artificial overload."""

from __future__ import annotations

import json
import shutil
import threading
import time
from typing import Any

import numpy as np
import pytest
from serve_helpers import ThreadServer, fp32_request, http, rows

from deploykit.errors import ConfigError
from deploykit.manifest import Manifest
from deploykit.serve.adaptive import AdaptiveController, build_ladder
from deploykit.serve.app import ServeConfig, create_app

CURVE = [  # a synthetic calibrated curve for the untrained tiny model (scores ~0.1-0.2)
    {"flops_ratio": 1.0, "test_accuracy": 0.95, "thresholds": [None, None, None, None]},
    {"flops_ratio": 0.8, "test_accuracy": 0.94, "thresholds": [None, 0.0, None, None]},
    {"flops_ratio": 0.78, "test_accuracy": 0.935, "thresholds": [None, 0.05, 0.0, None]},
    {"flops_ratio": 0.55, "test_accuracy": 0.92, "thresholds": [0.15, 0.0, None, None]},
    {"flops_ratio": 0.3, "test_accuracy": 0.85, "thresholds": [0.0, None, None, None]},
]


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_ladder_starts_at_home_and_skips_points_too_close():
    ladder = build_ladder(CURVE, [None, None, None, None])
    assert [p.flops_ratio for p in ladder] == [1.0, 0.8, 0.55, 0.3]
    assert ladder[0].expected_accuracy == 0.95 and ladder[-1].thresholds == (0.0, None, None, None)
    with pytest.raises(ConfigError, match="calibrate"):
        build_ladder([], [None] * 4)


def test_controller_steps_down_under_load_and_back_with_hysteresis():
    clock = Clock()
    c = AdaptiveController(build_ladder(CURVE, [None] * 4), slo_s=0.1, clock=clock)
    for _ in range(20):  # latency at 0.9 x SLO: above high (0.6) -> one step per dwell
        clock.t += 0.1
        c.observe(0.09)
        c.tick()
    assert c.current().level == 3 and c.changes == {"down": 3, "up": 0}
    t0 = clock.t
    for _ in range(25):  # inside the band: predicted 0.05 * 0.55 / 0.3 > low * SLO -> stays
        clock.t += 0.1
        c.observe(0.05)
        c.tick()
    assert c.current().level == 3
    for _ in range(40):
        clock.t += 0.1
        c.tick()
    assert clock.t - t0 > 6 and c.current().level < 3  # once the window emptied, load is gone: it climbs back ...
    for _ in range(100):
        clock.t += 0.1
        c.tick()
    assert c.current().level == 0 and c.changes["up"] == 3  # ... to home, never above
    clock.t += 1
    c.tick(oldest_wait_s=0.08)  # a queued request waiting 0.8 x SLO is enough to step down at once
    assert c.current().level == 1


def test_predicted_queueing_jumps_several_rungs_before_any_latency_is_seen():
    clock = Clock()
    c = AdaptiveController(build_ladder(CURVE, [None] * 4), slo_s=0.1, clock=clock)  # bound: 0.5 x SLO = 50 ms
    assert c.service_rate() is None and c.predicted_wait(1000) == 0.0  # nothing measured: the rule waits
    c.observe_batch(32, 0.032)  # home: 1000 rows/s
    clock.t += 0.05
    assert c.tick(queued_rows=40).level == 0  # 40 ms predicted: inside the bound
    assert c.predicted_wait(100, 1) == pytest.approx(0.08) and c.predicted_wait(100, 3) == pytest.approx(0.03)
    clock.t += 0.05
    # 100 queued rows = 100 ms at home; rung 1 (0.8 FLOPs) 80 ms, rung 2 55 ms, rung 3 30 ms -> straight to 3
    assert c.tick(queued_rows=100).level == 3 and c.changes == {"down": 1, "up": 0}


def test_predicted_step_waits_for_a_batch_at_the_new_rung_then_corrects_the_guess():
    clock = Clock()
    c = AdaptiveController(build_ladder(CURVE, [None] * 4), slo_s=0.1, clock=clock)
    c.observe_batch(32, 0.032, level=0)
    clock.t += 0.05
    assert c.tick(queued_rows=60).level == 1  # 60 ms at home, 48 ms predicted at rung 1 (scaled by FLOPs)
    clock.t += 0.05
    assert c.tick(queued_rows=80).level == 1  # 64 ms, but still the same guess: no second move yet
    c.observe_batch(32, 0.04, level=1)  # rung 1 measured slower than FLOPs predicted: 800 rows/s
    clock.t += 0.05
    # 100 ms at rung 1; rung 2 scaled from rung 1's measurement: 69 ms; rung 3: 37.5 ms
    assert c.tick(queued_rows=80).level == 3 and c.changes["down"] == 2
    for _ in range(40):  # latency and queue both calm, but the queue would be too long for rung 2: stays
        clock.t += 0.1
        c.observe_batch(32, 0.01, level=3)  # 3200 rows/s here, so ~1750 predicted at rung 2: 34 ms > 0.3 x SLO
        c.tick(queued_rows=60)
    assert c.current().level == 3 and c.changes["up"] == 0
    for _ in range(25):  # queue gone: climbs back, one rung per hold
        clock.t += 0.1
        c.observe_batch(32, 0.01, level=c.current().level)
        c.tick(queued_rows=0)
    assert c.current().level == 2 and c.changes["up"] == 1


class _SlowEngine:
    """The real cascade, slowed by 4 ms per row per stage it runs (so earlier exits really shed load)."""

    def __init__(self, cascade: Any) -> None:
        self.cascade, self.manifest = cascade, cascade.manifest

    def run(self, x: np.ndarray, thresholds: Any = None) -> Any:
        r = self.cascade.run(x, thresholds)
        time.sleep(0.004 * sum(r.stage_batch_sizes))
        return r


@pytest.fixture(scope="module")
def calibrated_cascade(engine_dir, tmp_path_factory) -> Any:
    from deploykit.runtime.cascade import Cascade

    d = tmp_path_factory.mktemp("adaptive") / "tiny"
    shutil.copytree(engine_dir, d)
    m = Manifest.load(d)
    m.calibration = {"curve": CURVE, "test": {"full_accuracy": 0.95}}
    m.save()
    c = Cascade.from_dir(d, threads=1)
    yield c
    c.close()


def _gauge(text: str, name: str) -> float:
    line = next(ln for ln in text.splitlines() if ln.startswith(name + "{"))
    return float(line.rsplit(" ", 1)[1])


def test_overload_moves_operating_point_down_and_back(calibrated_cascade):
    cfg = ServeConfig(max_batch_size=4, max_queue_delay_ms=1, max_queue=256, latency_slo_ms=100)
    app = create_app(_SlowEngine(calibrated_cascade), cfg)
    with ThreadServer(app) as s:
        url = s.url + "/v2/models/tiny/infer"
        code, _, body = http(url, fp32_request(rows(1)))
        params = json.loads(body)["parameters"]
        assert code == 200 and params["operating_point"] == 0 and params["expected_accuracy"] == 0.95
        stop, seen = time.monotonic() + 4.0, []

        def client(i: int) -> None:  # 16 closed-loop clients: ~4x what the home point sustains within the SLO
            while time.monotonic() < stop:
                c, _, b = http(url, fp32_request(rows(1, seed=i)))
                if c == 200:
                    seen.append(json.loads(b)["parameters"]["operating_point"])

        threads = [threading.Thread(target=client, args=(i,)) for i in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
        assert max(seen) >= 2, seen  # moved down the curve under load
        text = http(s.url + "/metrics")[2].decode()
        assert _gauge(text, "deploykit_operating_point_changes_total") >= 2 or "direction=\"down\"" in text
        assert _gauge(text, "deploykit_latency_slo_seconds") == 0.1
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:  # load stopped: it comes back to the calibrated thresholds
            if json.loads(http(s.url + "/stats")[2])["adaptive"]["operating_point"] == 0:
                break
            time.sleep(0.2)
        stats = json.loads(http(s.url + "/stats")[2])["adaptive"]
        assert stats["operating_point"] == 0 and stats["changes"]["up"] >= 2, stats
        text = http(s.url + "/metrics")[2].decode()
        assert _gauge(text, "deploykit_operating_point") == 0
        assert _gauge(text, "deploykit_operating_point_expected_accuracy") == 0.95
        code, _, body = http(url, fp32_request(rows(1), exit_thresholds=[0.0, None, None, None]))
        out = json.loads(body)
        assert code == 200 and "parameters" not in out  # explicit thresholds are the client's choice


def test_off_by_default(server):
    code, _, body = http(server.url + "/v2/models/tiny/infer", fp32_request(rows(2)))
    assert code == 200 and "parameters" not in json.loads(body)
    text = http(server.url + "/metrics")[2].decode()
    assert "deploykit_operating_point" not in text
    assert "adaptive" not in json.loads(http(server.url + "/stats")[2])


def test_slo_without_calibration_curve_is_a_clear_error(cascade):
    with pytest.raises(ConfigError, match="deploykit calibrate"):
        create_app(cascade, ServeConfig(latency_slo_ms=50))
