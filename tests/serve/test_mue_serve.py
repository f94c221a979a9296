"""serve-local over a MuE engine, over real HTTP: entailment and captions exactly as `deploykit predict`, mixed
tasks batched concurrently with per-sample exits, tritonclient's binary tensors, and 4xx JSON errors."""

from __future__ import annotations

import base64
import json
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner
from serve_helpers import ThreadServer, error, http, outputs

from deploykit.cli import main


def predict_cli(engine_dir: Any, paths: list[Any], task: str, texts: list[str] | None = None) -> list[dict]:
    """What `deploykit predict` prints, one dict per image."""
    args = ["predict", str(engine_dir), *map(str, paths), "--task", task]
    for t in texts or []:
        args += ["--text", t]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    return [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]


def mue_request(files: list[bytes], task: str | None, texts: list[str] | None = None, **params: Any) -> dict:
    inputs = [{"name": "image_bytes", "datatype": "BYTES", "shape": [len(files)],
               "data": [base64.b64encode(f).decode() for f in files]}]
    if texts is not None:
        inputs.append({"name": "text", "datatype": "BYTES", "shape": [len(texts)], "data": texts})
    if task is not None:
        params["task"] = task
    return {"inputs": inputs, **({"parameters": params} if params else {})}


def assert_same(out: dict[str, np.ndarray], want: list[dict], key: str) -> None:
    assert [str(t) for t in out["text"]] == [w[key] for w in want]
    assert out["image_layers"].tolist() == [w["image_layers"] for w in want]
    assert out["text_layers"].tolist() == [w["text_layers"] for w in want]
    for row, w in zip(out["decoder_layers"].tolist(), want):
        n = len(w["decoder_layers"])
        assert row[:n] == w["decoder_layers"] and not any(row[n:])
    np.testing.assert_allclose(out["layer_fraction"], [w["layer_fraction"] for w in want], rtol=1e-6)


def test_entailment_and_caption_answer_exactly_as_predict(mue_server, mue_engine_dir, mue_inputs):
    url = mue_server.url + "/v2/models/tiny-mue/infer"
    paths, files, texts = mue_inputs["paths"][:5], mue_inputs["files"][:5], mue_inputs["texts"][:5]
    code, _, body = http(url, mue_request(files, "entailment", texts) | {"id": "e1"})
    assert code == 200, body
    d = json.loads(body)
    assert d["id"] == "e1" and d["parameters"]["task"] == "entailment"
    want = predict_cli(mue_engine_dir, paths, "entailment", texts)
    assert_same(outputs(body), want, "answer")
    assert {w["answer"] for w in want} <= {"entailment", "neutral", "contradiction"}

    code, _, body = http(url, mue_request(files, "caption"))
    assert code == 200, body
    want = predict_cli(mue_engine_dir, paths, "caption")
    assert_same(outputs(body), want, "caption")
    prompt = ["what does the image describe ?"] * 5  # the default prompt, sent explicitly: the same captions
    assert_same(outputs(http(url, mue_request(files, "caption", prompt))[2]), want, "caption")


def test_concurrent_mixed_tasks_are_batched_with_per_sample_results(mue_server, mue_engine_dir, mue_inputs):
    from deploykit.runtime.generation import predict_vl

    paths, files, texts = mue_inputs["paths"], mue_inputs["files"], mue_inputs["texts"]
    ref = {"entailment": predict_vl(mue_engine_dir, paths, texts, "entailment"),
           "caption": predict_vl(mue_engine_dir, paths, None, "caption")}
    assert len({r["image_layers"] for r in ref["entailment"]}) > 1  # samples exit at different layers
    url = mue_server.url + "/v2/models/tiny-mue/infer"
    jobs = [("entailment" if i % 2 else "caption", list(range(i, i + 1 + i % 3))) for i in range(14)]
    jobs.append(("entailment", list(range(0, 11))))  # more rows than max batch 8: split over two batches

    def one(job: tuple[str, list[int]]) -> tuple[int, bytes]:
        task, idx = job
        req = mue_request([files[i] for i in idx], task, [texts[i] for i in idx] if task == "entailment" else None)
        code, _, body = http(url, req, timeout=120)
        return code, body

    before = _metric(mue_server.url, "deploykit_batches_total")
    with ThreadPoolExecutor(15) as ex:
        results = list(ex.map(one, jobs))
    for (task, idx), (code, body) in zip(jobs, results):
        assert code == 200, body
        assert_same(outputs(body), [ref[task][i] for i in idx], "answer" if task == "entailment" else "caption")
    batches = _metric(mue_server.url, "deploykit_batches_total") - before
    assert batches < len(jobs), "concurrent requests were not batched together"
    assert batches >= sum(len(i) for _, i in jobs) / 8, "a batch went over max_batch_size"
    text = http(mue_server.url + "/metrics")[2].decode()
    assert "\ndeploykit_layer_fraction_bucket{" in text and "\ndeploykit_requests_total{" in text
    stats = json.loads(http(mue_server.url + "/stats")[2])
    assert stats["kind"] == "mue" and stats["tasks"] == ["entailment", "caption"]
    assert 0 < stats["mean_layer_fraction"] <= 1


def _metric(url: str, name: str) -> float:
    text = http(url + "/metrics")[2].decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{"))


def test_metadata_names_inputs_outputs_and_tasks(mue_server):
    code, _, body = http(mue_server.url + "/v2/models/tiny-mue")
    meta = json.loads(body)
    assert code == 200 and meta["parameters"]["tasks"] == ["entailment", "caption"]
    assert [i["name"] for i in meta["inputs"]] == ["image_bytes", "text"]
    assert {o["name"]: o["shape"] for o in meta["outputs"]}["decoder_layers"] == [-1, 18]
    assert http(mue_server.url + "/v2/models/tiny-mue/ready")[0] == 200


def test_bad_requests_are_4xx_json_errors(mue_server, mue_inputs):
    url = mue_server.url + "/v2/models/tiny-mue/infer"
    f, t = mue_inputs["files"][:2], mue_inputs["texts"][:2]
    cases = {
        "no task (two served)": (mue_request(f, None, t), "parameters.task is required"),
        "unknown task": (mue_request(f, "vqa", t), "not served"),
        "entailment without text": (mue_request(f, "entailment"), "one hypothesis per image"),
        "count mismatch": (mue_request(f, "entailment", t[:1]), "2 images but 1 texts"),
        "bad image": (mue_request([b"not an image", f[1]], "caption"), "row 0 (image_bytes)"),
        "too long text": (mue_request(f[:1], "entailment", ["word " * 40]), "row 0 (text)"),
        "empty text": (mue_request(f[:1], "entailment", [""]), "row 0 (text)"),
        "thresholds": (mue_request(f, "caption", exit_threshold=0.5), "calibrated per-task thresholds"),
        "fp32 pixels": ({"inputs": [{"name": "image", "datatype": "FP32", "shape": [1, 3, 32, 32],
                                     "data": [0.0] * 3072}], "parameters": {"task": "caption"}}, "unexpected input"),
        "text not a string": (mue_request(f[:1], "entailment", [[1, 2]]), "must be strings"),
        "unknown output": (mue_request(f, "caption") | {"outputs": [{"name": "label"}]}, "unknown output"),
        "no rows": (mue_request([], "caption"), "batch of 0 rows"),
        "not json": (b'{"inputs": [', "valid JSON"),
    }
    for what, (req, expect) in cases.items():
        code, headers, body = http(url, req, {"content-type": "application/json"})
        assert code == 400, (what, body)
        assert headers["content-type"] == "application/json"
        assert expect in error(body), (what, error(body))
    big = mue_request(mue_inputs["files"] * 30, "caption")  # > 1 MB limit
    code, _, body = http(url, big)
    assert code == 413 and "limit" in error(body)
    assert http(mue_server.url + "/v2/health/live")[0] == 200


def test_tritonclient_binary_tensors(mue_server, mue_engine_dir, mue_inputs):
    httpclient = pytest.importorskip("tritonclient.http", reason="tritonclient[http] not installed")
    files, texts = mue_inputs["files"][:3], mue_inputs["texts"][:3]
    want = predict_cli(mue_engine_dir, mue_inputs["paths"][:3], "entailment", texts)
    client = httpclient.InferenceServerClient(url=mue_server.url.removeprefix("http://"))
    for binary in (True, False):
        img = httpclient.InferInput("image_bytes", [3], "BYTES")
        img.set_data_from_numpy(np.array(files if binary else [base64.b64encode(x) for x in files], dtype=object),
                                binary_data=binary)
        txt = httpclient.InferInput("text", [3], "BYTES")
        txt.set_data_from_numpy(np.array([s.encode() for s in texts], dtype=object), binary_data=binary)
        outs = [httpclient.InferRequestedOutput(n, binary_data=binary) for n in ("text", "image_layers")]
        res = client.infer("tiny-mue", [img, txt], outputs=outs, parameters={"task": "entailment"})
        got = [v.decode() if isinstance(v, bytes) else v for v in res.as_numpy("text")]
        assert got == [w["answer"] for w in want]
        assert res.as_numpy("image_layers").tolist() == [w["image_layers"] for w in want]
    client.close()


class _SlowMuE:
    """The real MuE engine, each batch delayed (to fill the queue)."""

    def __init__(self, engine: Any, delay_s: float) -> None:
        self.engine, self.manifest, self.delay_s = engine, engine.manifest, delay_s

    def __getattr__(self, name: str) -> Any:
        return getattr(self.engine, name)

    def predict(self, *args: Any, **kwargs: Any) -> Any:
        time.sleep(self.delay_s)
        return self.engine.predict(*args, **kwargs)


def test_full_queue_is_503_with_retry_after(mue_engine_dir, mue_inputs):
    from deploykit.runtime.generation import MuEEngine
    from deploykit.serve.app import ServeConfig, create_app

    with MuEEngine.from_dir(mue_engine_dir, threads=1) as engine:
        app = create_app(_SlowMuE(engine, 0.3), ServeConfig(max_batch_size=1, max_queue_delay_ms=0, max_queue=2))
        with ThreadServer(app) as s:
            url = s.url + "/v2/models/tiny-mue/infer"
            req = mue_request(mue_inputs["files"][:1], "caption")
            with ThreadPoolExecutor(8) as ex:
                results = list(ex.map(lambda _: http(url, req), range(8)))
    codes = sorted(c for c, _, _ in results)
    assert set(codes) == {200, 503}, codes
    assert all(h["retry-after"] == "1" and "busy" in error(b) for c, h, b in results if c == 503)


def test_options_that_do_not_apply_to_mue_are_refused(mue_engine_dir):
    from deploykit.errors import ConfigError
    from deploykit.runtime.generation import MuEEngine
    from deploykit.serve.app import ServeConfig, create_app

    with MuEEngine.from_dir(mue_engine_dir, threads=1) as engine, pytest.raises(ConfigError, match="latency-slo-ms"):
        create_app(engine, ServeConfig(latency_slo_ms=50))
    for args, expect in ((["serve-local", str(mue_engine_dir), "--backend", "ort-cuda"], "ort-cpu"),
                         (["serve-local", str(mue_engine_dir), "--latency-slo-ms", "50"], "--latency-slo-ms"),
                         (["serve-ray", str(mue_engine_dir)], "serve-ray deploys a classification cascade"),
                         (["export-triton", str(mue_engine_dir), "-o", str(mue_engine_dir.parent / "repo")],
                          "export-triton writes a classification cascade")):
        r = CliRunner().invoke(main, args)
        assert r.exit_code == 2 and expect in r.output and "Traceback" not in r.output, (args, r.output)
