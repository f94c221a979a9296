"""KServe v2 endpoints, FP32 / BYTES infer, thresholds and 400 / 413 handling, over real HTTP."""

from __future__ import annotations

import base64
import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from serve_helpers import bytes_request, error, fp32_request, http, outputs, rows

from deploykit.data.preprocess import load_image, preprocess_image


def test_health_and_metadata(server):
    u = server.url
    assert http(u + "/v2/health/live")[0] == 200
    assert http(u + "/v2/health/ready")[0] == 200
    code, _, body = http(u + "/v2")
    assert code == 200 and json.loads(body)["name"] == "deploykit"
    for path in ("/v2/models/tiny", "/v2/models/tiny/versions/1"):
        code, _, body = http(u + path)
        meta = json.loads(body)
        assert code == 200 and meta["name"] == "tiny"
        assert meta["inputs"][0] == {"name": "image", "datatype": "FP32", "shape": [-1, 3, 16, 16]}
        assert {o["name"] for o in meta["outputs"]} >= {"label", "probabilities", "exit_stage", "score"}
    assert http(u + "/v2/models/tiny/ready")[0] == 200
    assert http(u + "/v2/models/tiny/versions/1/ready")[0] == 200
    code, _, body = http(u + "/v2/models/nope")
    assert code == 404 and "tiny" in error(body)
    assert http(u + "/v2/models/tiny/versions/7/ready")[0] == 404


@pytest.mark.parametrize("nested", [False, True])
def test_fp32_infer_matches_offline_cascade(server, cascade, nested):
    x = rows(5, seed=1)
    code, _, body = http(server.url + "/v2/models/tiny/infer", fp32_request(x, nested=nested) | {"id": "r1"})
    assert code == 200, body
    assert json.loads(body)["id"] == "r1"
    out = outputs(body)
    ref = cascade.run(x)
    np.testing.assert_allclose(out["probabilities"], ref.probs, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(out["exit_stage"], ref.exit_stage)
    assert list(out["label"]) == [f"class_{i}" for i in ref.probs.argmax(1)]
    assert out["score"].shape == (5,)


def test_bytes_infer_preprocesses_per_manifest(server, cascade):
    from serve_helpers import png_bytes

    files = [png_bytes(i, size=20 + i) for i in range(3)]
    code, _, body = http(server.url + "/v2/models/tiny/infer", bytes_request(files))
    assert code == 200, body
    x = np.stack([preprocess_image(load_image(f), cascade.manifest.preprocessing) for f in files])
    np.testing.assert_allclose(outputs(body)["probabilities"], cascade.run(x).probs, rtol=1e-5, atol=1e-6)


def test_per_request_thresholds(server, cascade):
    x = rows(4, seed=2)
    url = server.url + "/v2/models/tiny/infer"
    out = outputs(http(url, fp32_request(x, exit_threshold=0.0))[2])
    assert (out["exit_stage"] == 0).all()
    out = outputs(http(url, fp32_request(x, exit_thresholds=[None, None, None, None]))[2])
    assert (out["exit_stage"] == 3).all()
    out = outputs(http(url, fp32_request(x, exit_thresholds=[None, 0.0, None, None]))[2])
    assert (out["exit_stage"] == 1).all()
    np.testing.assert_allclose(out["probabilities"], cascade.run(x, [None, 0.0, None, None]).probs, atol=1e-6)
    for bad in ({"exit_threshold": 2}, {"exit_thresholds": [0.5]}, {"exit_threshold": "high"}):
        code, _, body = http(url, fp32_request(x, **bad))
        assert code == 400 and "threshold" in error(body)


def test_concurrent_requests_get_their_own_rows(server, cascade):
    """Mixed sizes (one bigger than max batch 8, so it is split) and thresholds, all at once."""
    url = server.url + "/v2/models/tiny/infer"
    jobs = [(rows(1 + i % 5, seed=100 + i), [None, 0.0, None, None] if i % 4 == 3 else None) for i in range(23)]
    jobs.append((rows(19, seed=99), None))

    def one(job):
        x, thr = job
        req = fp32_request(x) if thr is None else fp32_request(x, exit_thresholds=thr)
        code, _, body = http(url, req)
        return code, body

    before = _metric(server.url, "deploykit_batches_total")
    with ThreadPoolExecutor(24) as ex:
        results = list(ex.map(one, jobs))
    for (x, thr), (code, body) in zip(jobs, results):
        assert code == 200, body
        out = outputs(body)
        ref = cascade.run(x, thr)
        assert out["probabilities"].shape == ref.probs.shape
        np.testing.assert_allclose(out["probabilities"], ref.probs, rtol=1e-4, atol=1e-5)
        np.testing.assert_array_equal(out["exit_stage"], ref.exit_stage)
    batches = _metric(server.url, "deploykit_batches_total") - before
    total_rows = sum(len(x) for x, _ in jobs)
    assert batches < len(jobs), "concurrent requests were not batched together"
    assert batches >= total_rows / 8, "a batch went over max_batch_size"


def _metric(url: str, name: str) -> float:
    text = http(url + "/metrics")[2].decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{"))


def test_bad_requests_say_what_was_expected(server):
    url = server.url + "/v2/models/tiny/infer"
    x = rows(2)
    cases = {
        "malformed json": (b'{"inputs": [', "valid JSON"),
        "no inputs": (json.dumps({"foo": 1}).encode(), "expected exactly one input"),
        "wrong shape": (json.dumps(fp32_request(rows(2)[:, :, :8, :8])).encode(), "expected [B,3,16,16]"),
        "wrong count": (json.dumps({"inputs": [{"name": "image", "shape": [2, 3, 16, 16], "datatype": "FP32",
                                                "data": [0.0] * 10}]}).encode(), "needs 1536"),
        "wrong dtype": (json.dumps({"inputs": [{"name": "image", "shape": [1, 3, 16, 16], "datatype": "INT32",
                                                "data": [0] * 768}]}).encode(), "FP32"),
        "not numbers": (json.dumps({"inputs": [{"name": "image", "shape": [1, 3, 16, 16], "datatype": "FP32",
                                                "data": ["a"] * 768}]}).encode(), "must be numbers"),
        "bad image": (json.dumps(bytes_request([b"not an image at all"])).encode(), "PNG, JPEG"),
        "bad base64 image": (json.dumps({"inputs": [{"name": "image_bytes", "shape": [1], "datatype": "BYTES",
                                                     "data": [base64.b64encode(b"GIF89a junk").decode()]}]}).encode(),
                             "can't decode image"),
        "unknown output": (json.dumps(fp32_request(x) | {"outputs": [{"name": "nope"}]}).encode(), "unknown output"),
    }
    nan = x.copy()
    nan[1, 0, 0, 0] = np.nan
    cases["nan"] = (json.dumps(fp32_request(nan)).replace("NaN", "NaN").encode(), "finite")
    for what, (body, expect) in cases.items():
        code, headers, resp = http(url, body, {"content-type": "application/json"})
        assert code == 400, (what, resp)
        assert headers["content-type"] == "application/json"
        assert expect in error(resp), (what, error(resp))


def test_request_too_large_is_413(server):
    big = rows(200)  # > 1 MB as JSON text (server limit is 1 MB)
    code, _, body = http(server.url + "/v2/models/tiny/infer", fp32_request(big))
    assert code == 413 and "limit" in error(body)
    assert http(server.url + "/v2/health/live")[0] == 200


def test_metrics_names(server):
    http(server.url + "/v2/models/tiny/infer", fp32_request(rows(1)))
    text = http(server.url + "/metrics")[2].decode()
    for name in ("deploykit_requests_total", "deploykit_request_duration_seconds_bucket",
                 "deploykit_queue_duration_seconds_bucket", "deploykit_batch_size_bucket",
                 "deploykit_stage_batch_size_bucket", "deploykit_exits_total", "deploykit_queue_depth",
                 "deploykit_batch_compute_duration_seconds_bucket", "deploykit_inference_rows_total"):
        assert f"\n{name}{{" in text, name
    assert 'outcome="success"' in text and 'code="200"' in text
    stats = json.loads(http(server.url + "/stats")[2])
    assert len(stats["exits_per_stage"]) == 4 and sum(stats["exits_per_stage"]) > 0


def test_tritonclient_works_unchanged(server, cascade):
    httpclient = pytest.importorskip("tritonclient.http", reason="tritonclient[http] not installed")
    from serve_helpers import png_bytes

    client = httpclient.InferenceServerClient(url=server.url.removeprefix("http://"))
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("tiny")
    assert client.get_model_metadata("tiny")["name"] == "tiny"
    x = rows(3, seed=5)
    for binary in (True, False):
        inp = httpclient.InferInput("image", list(x.shape), "FP32")
        inp.set_data_from_numpy(x, binary_data=binary)
        outs = [httpclient.InferRequestedOutput(n, binary_data=binary)
                for n in ("label", "probabilities", "exit_stage")]
        res = client.infer("tiny", [inp], outputs=outs, parameters={"exit_threshold": 0.0})
        np.testing.assert_allclose(res.as_numpy("probabilities"), cascade.run(x, [0.0, 0.0, 0.0, None]).probs,
                                   atol=1e-6)
        assert (res.as_numpy("exit_stage") == 0).all()
        labels = [v.decode() if isinstance(v, bytes) else v for v in res.as_numpy("label")]
        assert all(v.startswith("class_") for v in labels)
    img = httpclient.InferInput("image_bytes", [2], "BYTES")
    img.set_data_from_numpy(np.array([png_bytes(1), png_bytes(2)], dtype=object))
    res = client.infer("tiny", [img])
    assert res.as_numpy("probabilities").shape == (2, 10)
    with pytest.raises(Exception, match="expected"):
        bad = httpclient.InferInput("image", [1, 3, 8, 8], "FP32")
        bad.set_data_from_numpy(np.zeros((1, 3, 8, 8), np.float32))
        client.infer("tiny", [bad])
    client.close()


def _raw(port: int, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """One request over a plain socket (chunked bodies, HEAD), the connection closed after the answer."""
    import http.client
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(request)
        r = http.client.HTTPResponse(s, method=request.split(b" ", 1)[0].decode())
        r.begin()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()


def test_bare_asgi_front_reads_chunked_bodies_and_answers_head(server, cascade):
    # the KServe paths skip Starlette (serve/app.py): a body in several chunks is read whole, HEAD has no body
    body = json.dumps(fp32_request(rows(2))).encode()
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in (body[:100], body[100:1000], body[1000:])) + b"0\r\n\r\n"
    code, headers, resp = _raw(server.port, b"POST /v2/models/tiny/infer HTTP/1.1\r\nhost: x\r\nconnection: close"
                                            b"\r\ntransfer-encoding: chunked\r\n\r\n" + chunks)
    assert code == 200 and int(headers["content-length"]) == len(resp)
    assert outputs(resp)["probabilities"].shape == (2, 10)
    code, headers, resp = _raw(server.port, b"HEAD /v2/health/ready HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
    assert (code, resp) == (200, b"")
    # the page and /stats stay on Starlette; a wrong method there is still a one-line KServe-style error
    assert http(server.url + "/stats")[0] == 200
    code, headers, resp = http(server.url + "/", b"{}")
    assert code == 405 and "see GET /v2" in error(resp)
    code, _, resp = http(server.url + "/v2/nothing/here")
    assert code == 404 and "not found" in error(resp)
