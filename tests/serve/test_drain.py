"""Real ``serve-local`` processes: SIGTERM under concurrent load answers every accepted request exactly once,
readiness turns 503 while draining, a stalled body gets a 408, and a PNG bomb costs no memory."""

from __future__ import annotations

import http.client as hc
import json
import signal
import socket
import threading
import time
from collections import Counter

import pytest
from serve_helpers import ProcessServer, bytes_request, fp32_request, http, png_bytes, rows


def _client(port: int, stop: threading.Event, outcomes: Counter, lock: threading.Lock, seed: int) -> None:
    body = json.dumps(fp32_request(rows(3, seed=seed))).encode()
    while not stop.is_set():
        conn = hc.HTTPConnection("127.0.0.1", port, timeout=30)
        try:
            conn.connect()
        except OSError:  # refused: the server had stopped listening, this request was never accepted
            with lock:
                outcomes["refused"] += 1
            time.sleep(0.01)
            continue
        try:
            conn.request("POST", "/v2/models/tiny/infer", body, {"content-type": "application/json"})
            r = conn.getresponse()
            r.read()
            key = r.status
        except OSError as e:  # sent, then reset or closed without an answer
            key = f"dropped:{type(e).__name__}"
        except hc.HTTPException as e:
            key = f"dropped:{type(e).__name__}"
        finally:
            conn.close()
        with lock:
            outcomes[key] += 1


def _stalled_body(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(b"POST /v2/models/tiny/infer HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
              b"content-length: 5000\r\n\r\n{\"inputs\": [")
    return s


def test_sigterm_under_load_answers_every_accepted_request_once(engine_dir):
    with ProcessServer(engine_dir, "--max-batch-size", "8", "--max-queue-delay-ms", "5", "--read-timeout", "3",
                       "--drain-timeout", "8") as srv:
        stalled = _stalled_body(srv.port)
        stop, lock, outcomes = threading.Event(), threading.Lock(), Counter()
        threads = [threading.Thread(target=_client, args=(srv.port, stop, outcomes, lock, i)) for i in range(12)]
        for t in threads:
            t.start()
        time.sleep(1.5)
        ready = hc.HTTPConnection("127.0.0.1", srv.port, timeout=5)
        ready.request("GET", "/v2/health/ready")
        r0 = ready.getresponse()
        assert (r0.status, r0.read()) == (200, b"")  # a keep-alive connection, reused while draining
        t0 = time.monotonic()
        srv.proc.send_signal(signal.SIGTERM)
        seen = set()
        while srv.proc.poll() is None and time.monotonic() - t0 < 20:
            try:
                ready.request("GET", "/v2/health/ready")
                r = ready.getresponse()
                r.read()
                seen.add(r.status)
            except (OSError, hc.HTTPException):
                break
            time.sleep(0.05)
        code = srv.proc.wait(timeout=30)
        took = time.monotonic() - t0
        stop.set()
        for t in threads:
            t.join(timeout=30)
        stalled.settimeout(5)
        answer = stalled.recv(4096).decode()
    assert code == 0
    assert 503 in seen  # readiness turned 503 while draining
    assert took < 8 + 3  # bounded by --drain-timeout (plus shutdown overhead)
    assert " 408 " in answer.split("\r\n")[0] and "read-timeout" in answer  # the stalled client got an answer
    dropped = {k: v for k, v in outcomes.items() if str(k).startswith("dropped")}
    assert not dropped, outcomes  # every request that was sent got exactly one answer
    assert outcomes[200] > 20 and 500 not in outcomes, outcomes


def test_png_bomb_gets_a_400_and_memory_stays_flat(engine_dir):
    from test_limits import png_bomb

    bomb = png_bomb(13000)
    with ProcessServer(engine_dir, "--max-image-pixels", "500") as srv:
        url = srv.url + "/v2/models/tiny/infer"
        assert http(url, fp32_request(rows(2)))[0] == 200  # warm
        idle_peak = srv.rss_kb("VmHWM")
        results = []
        threads = [threading.Thread(target=lambda: results.append(http(url, bytes_request([bomb]))))
                   for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        peak = srv.rss_kb("VmHWM")
        assert [c for c, _, _ in results] == [400] * 3
        assert all(b"pixel budget" in body for _, _, body in results)
        assert http(url, fp32_request(rows(2)))[0] == 200
        assert http(url, bytes_request([png_bytes(size=20)]))[0] == 200  # 400 pixels: within --max-image-pixels
        code, _, body = http(url, bytes_request([png_bytes(size=24)]))  # 576 pixels: over it
        assert code == 400 and b"over the pixel budget of 500" in body
    assert peak - idle_peak < 100 * 1024, (idle_peak, peak)  # < 100 MB over idle (a decode would be ~500 MB)


@pytest.mark.parametrize("flag, value", [("--read-timeout", "0"), ("--drain-timeout", "-1"),
                                         ("--max-image-pixels", "0")])
def test_bad_timeouts_and_budgets_are_refused(engine_dir, flag, value):
    from click.testing import CliRunner

    from deploykit.cli import main

    r = CliRunner().invoke(main, ["serve-local", str(engine_dir), flag, value])
    assert r.exit_code == 2 and flag in r.output and "Traceback" not in r.output, r.output
