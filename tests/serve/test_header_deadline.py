"""Slowloris: ``deploykit serve-local`` (a child process) gives request headers ``--read-timeout`` to arrive.

A client that trickles its headers, or connects and sends nothing, gets a 408 and a closed connection within the
deadline; an idle keep-alive connection is not cut by it, and the server keeps answering everyone else.
"""

from __future__ import annotations

import json
import socket
import time

import numpy as np
from serve_helpers import ProcessServer, fp32_request, http

TIMEOUT_S = 1.0


def _read_all(s: socket.socket, limit_s: float) -> tuple[bytes, float]:
    """Everything the server sends until it closes (or ``limit_s``), and when it closed."""
    t0, data = time.monotonic(), b""
    s.settimeout(0.1)
    while time.monotonic() - t0 < limit_s:
        try:
            chunk = s.recv(4096)
        except TimeoutError:
            continue
        if not chunk:
            return data, time.monotonic() - t0
        data += chunk
    return data, float("inf")


def _response(s: socket.socket) -> bytes:
    """One whole HTTP response (head and Content-Length body) from a keep-alive connection."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += s.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(next(line.split(b":", 1)[1] for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length:")))
    while len(body) < length:
        body += s.recv(65536)
    assert len(body) == length
    return head


def _request(x: np.ndarray) -> bytes:
    body = json.dumps(fp32_request(x)).encode()
    return (b"POST /v2/models/tiny/infer HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body)) + body


def test_slow_headers_and_silent_clients_get_408_and_are_closed(engine_dir):
    with ProcessServer(engine_dir, "--read-timeout", str(TIMEOUT_S)) as srv:
        with socket.create_connection(("127.0.0.1", srv.port)) as slow:
            slow.sendall(b"POST /v2/models/tiny/infer HTTP/1.1\r\nHost: t\r\n")
            t0, closed = time.monotonic(), False
            while time.monotonic() - t0 < 4 * TIMEOUT_S:  # one header byte every 0.2 s: never completes
                try:
                    slow.sendall(b"X")
                except OSError:
                    closed = True
                    break
                time.sleep(0.2)
            data, _ = _read_all(slow, 2.0)
            assert data.startswith(b"HTTP/1.1 408") and b"--read-timeout" in data, data[:200]
            assert closed or time.monotonic() - t0 < 4 * TIMEOUT_S + 2.5

        with socket.create_connection(("127.0.0.1", srv.port)) as silent:
            data, after = _read_all(silent, 5 * TIMEOUT_S)
            assert data.startswith(b"HTTP/1.1 408") and after < 3 * TIMEOUT_S, (data[:100], after)

        code, _, _ = http(srv.url + "/v2/health/ready", timeout=5)
        assert code == 200  # nobody else was held up


def test_idle_keep_alive_is_not_cut_by_the_header_deadline(engine_dir):
    x = np.random.default_rng(0).standard_normal((1, 3, 16, 16)).astype(np.float32)
    with ProcessServer(engine_dir, "--read-timeout", str(TIMEOUT_S)) as srv:
        with socket.create_connection(("127.0.0.1", srv.port)) as s:
            s.settimeout(10)
            for _ in range(2):
                s.sendall(_request(x))
                head = _response(s)
                assert head.startswith(b"HTTP/1.1 200"), head[:200]
                time.sleep(2 * TIMEOUT_S)  # idle between requests: longer than the header deadline
