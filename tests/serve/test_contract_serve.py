"""The served path end to end through the CLI: `deploykit serve-local ENGINE --port P` as a subprocess, queried
over HTTP, answers exactly as `deploykit predict` on the same files, and a SIGTERM drains it to exit code 0."""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from serve_helpers import free_port, http, outputs, png_bytes


def cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "deploykit", *args], capture_output=True, text=True,
                          timeout=timeout, env=os.environ.copy())


def predict_lines(*args: str) -> list[dict]:
    r = cli("predict", *args)
    assert r.returncode == 0, r.stderr[-2000:]
    return [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]


@contextmanager
def serve_local(engine: Path, tmp: Path, grpc_port: int = 0) -> Iterator[str]:
    port = free_port()
    log = (tmp / f"serve-{port}.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "deploykit", "serve-local", str(engine), "--port", str(port),
                             "--threads", "1", "--max-queue-delay-ms", "20", "--grpc-port", str(grpc_port)],
                            stdout=log, stderr=subprocess.STDOUT, env=os.environ.copy())
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            assert proc.poll() is None, (tmp / f"serve-{port}.log").read_text()[-3000:]
            try:
                if http(url + "/v2/health/ready", timeout=2)[0] == 200:
                    break
            except OSError:
                pass
            assert time.time() < deadline, "serve-local did not become ready"
            time.sleep(0.2)
        yield url
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, (tmp / f"serve-{port}.log").read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()


def test_contract_serve_local_classification(engine_dir, tmp_path):
    files = [png_bytes(i, size=18 + i) for i in range(4)]
    paths = []
    for i, f in enumerate(files):
        paths.append(tmp_path / f"img{i}.png")
        paths[-1].write_bytes(f)
    want = predict_lines(str(engine_dir), *map(str, paths))
    grpc_port = free_port()
    with serve_local(engine_dir, tmp_path, grpc_port) as url:
        req = {"inputs": [{"name": "image_bytes", "datatype": "BYTES", "shape": [4],
                           "data": [base64.b64encode(f).decode() for f in files]}]}
        code, _, body = http(url + "/v2/models/tiny/infer", req)
        assert code == 200, body
        out = outputs(body)
        grpcclient = pytest.importorskip("tritonclient.grpc", reason="needs tritonclient[grpc]")
        client = grpcclient.InferenceServerClient(url=f"127.0.0.1:{grpc_port}")  # the same server over gRPC
        inp = grpcclient.InferInput("image_bytes", [4], "BYTES")
        inp.set_data_from_numpy(np.array(files, dtype=object))
        labels = [v.decode() for v in client.infer("tiny", [inp]).as_numpy("label")]
        client.close()
    assert labels == [w["label"] for w in want]
    assert [str(v) for v in out["label"]] == [w["label"] for w in want]
    assert out["exit_stage"].tolist() == [w["exit_stage"] for w in want]
    np.testing.assert_allclose(out["probabilities"].max(1), [w["confidence"] for w in want], rtol=1e-5)


def test_contract_serve_local_mue(mue_engine_dir, mue_inputs, tmp_path):
    paths, files, texts = mue_inputs["paths"][:3], mue_inputs["files"][:3], mue_inputs["texts"][:3]
    text_args = [a for t in texts for a in ("--text", t)]
    want_e = predict_lines(str(mue_engine_dir), *map(str, paths), "--task", "entailment", *text_args)
    want_c = predict_lines(str(mue_engine_dir), *map(str, paths), "--task", "caption")
    images = {"name": "image_bytes", "datatype": "BYTES", "shape": [3],
              "data": [base64.b64encode(f).decode() for f in files]}
    with serve_local(mue_engine_dir, tmp_path) as url:
        infer = url + "/v2/models/tiny-mue/infer"
        code, _, body = http(infer, {"inputs": [images, {"name": "text", "datatype": "BYTES", "shape": [3],
                                                         "data": texts}], "parameters": {"task": "entailment"}})
        assert code == 200, body
        ent = outputs(body)
        code, _, body = http(infer, {"inputs": [images], "parameters": {"task": "caption"}})
        assert code == 200, body
        cap = outputs(body)
        code, _, page = http(url + "/")
        assert code == 200 and b'id="task"' in page
    assert [str(v) for v in ent["text"]] == [w["answer"] for w in want_e]
    assert [str(v) for v in cap["text"]] == [w["caption"] for w in want_c]
    for out, want in ((ent, want_e), (cap, want_c)):
        assert out["image_layers"].tolist() == [w["image_layers"] for w in want]
        assert out["text_layers"].tolist() == [w["text_layers"] for w in want]
        assert [r[: len(w["decoder_layers"])] for r, w in zip(out["decoder_layers"].tolist(), want)] == \
            [w["decoder_layers"] for w in want]


def test_grpc_port_refusals(engine_dir):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        busy = s.getsockname()[1]
        r = cli("serve-local", str(engine_dir), "--port", str(free_port()), "--grpc-port", str(busy))
    assert r.returncode == 2 and f"--grpc-port {busy}: can't bind" in r.stderr and "Traceback" not in r.stderr
    r = cli("serve-local", str(engine_dir), "--grpc-port", "70000")
    assert r.returncode == 2 and "1..65535" in r.stderr
