"""The CLI contract, once per model family: train -> export -> calibrate -> predict -> bench -> serve-local.

Each family's tiny model is trained, exported and run through the real ``deploykit`` commands (click's CliRunner,
in-process; serve-local as a subprocess over HTTP), from the recipe a user would start from, shortened only with
``--set`` / ``--max-steps``. Adding a family means adding its row to ``FAMILIES``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from deploykit.cli import main
from deploykit.families import family_for_manifest, list_families
from deploykit.manifest import Manifest

REPO = Path(__file__).resolve().parents[1]

FAMILIES: dict[str, dict[str, Any]] = {
    "classification": {
        "recipe": "recipes/multiexit-digits.yaml",
        "sets": ["backbone.kwargs.img_size=16", "backbone.kwargs.patch_size=4", "backbone.kwargs.depth=4",
                 "backbone.kwargs.embed_dim=32", "backbone.kwargs.num_heads=2", "train.epochs=2"],
        "max_steps": 10,
        "export": ["--parity-samples", "32"],
        "calibrate": ["--data", "digits"],
        "bench": ["--batch-sizes", "2", "--samples", "4", "--repeats", "1", "--warmup", "0"],
    },
    "vl-generation": {
        "recipe": "recipes/mue-synthetic.yaml",
        "sets": ["method.dim=32", "method.heads=2", "method.enc_layers=2", "method.dec_layers=2",
                 "method.img_size=32", "data.n_train=128", "data.n_val=8", "data.n_test=8", "train.batch_size=32",
                 "train.eval_every=1000", "train.verbose=false"],
        "max_steps": 15,
        "export": ["--parity-samples", "8"],
        "calibrate": ["--data", "jsonl:{data}/{{split}}.jsonl"],
        "bench": ["--batch-sizes", "2", "--samples", "4", "--repeats", "1", "--warmup", "0", "--data",
                  "jsonl:{data}/{{split}}.jsonl"],
    },
}


def _ok(args: list[str]) -> str:
    r = CliRunner().invoke(main, args, catch_exceptions=False)
    assert r.exit_code == 0, f"deploykit {' '.join(args)}:\n{r.output}"
    return r.output


def _vl_data(root: Path) -> Path:
    """Small val / test splits as JSONL files + PNGs (the real-data format), for calibrate and bench."""
    from deploykit.data.vl import synthetic_vl, write_vl_jsonl

    for split in ("val", "test"):
        write_vl_jsonl(synthetic_vl(split, n=6, size=32), root, f"{split}.jsonl")
    return root


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def pipeline(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Train and export the family's tiny model through the CLI (module-wide; copy the engine before changing it)."""
    name = request.param
    spec = FAMILIES[name]
    root = tmp_path_factory.mktemp(name)
    data = _vl_data(root / "data")
    run, engine = root / "run", root / "engine"
    sets = [a for s in spec["sets"] for a in ("--set", s)]
    out = _ok(["train", "--recipe", str(REPO / spec["recipe"]), *sets, "--max-steps", str(spec["max_steps"]),
               "--out", str(run)])
    assert out.strip().endswith(str(run))
    out = _ok(["export", str(run), "-o", str(engine), *spec["export"]])
    assert "wrote" in out and "identical" in out
    fmt = {"data": data}
    return {"name": name, "run": run, "engine": engine, "data": data,
            "calibrate": [a.format(**fmt) for a in spec["calibrate"]],
            "bench": [a.format(**fmt) for a in spec["bench"]]}


def _inputs(p: dict[str, Any], tmp: Path) -> tuple[list[str], list[str]]:
    """Image files to predict on, and the extra predict options (MuE: the task)."""
    if p["name"] == "vl-generation":
        from deploykit.data.vl import read_vl_jsonl

        rows = [r for r in read_vl_jsonl(p["data"] / "test.jsonl") if r.task == "caption"][:3]
        return [str(r.image) for r in rows], ["--task", "caption"]
    out = _ok(["samples", "digits", "-n", "3", "-o", str(tmp / "imgs")])
    return out.split(), []


def test_train_export_calibrate_predict_bench(pipeline, tmp_path):
    p = pipeline
    m = Manifest.load(p["engine"])
    assert family_for_manifest(m).name == p["name"]
    info = _ok(["info", str(p["engine"])])
    assert m.name in info
    _ok(["calibrate", str(p["engine"]), *p["calibrate"], "--json", str(tmp_path / "cal.json")])
    report = json.loads((tmp_path / "cal.json").read_text())
    assert Manifest.load(p["engine"]).calibration and (tmp_path / "cal.png").exists()
    assert report["tasks" if p["name"] == "vl-generation" else "thresholds"]
    images, extra = _inputs(p, tmp_path)
    lines = _ok(["predict", str(p["engine"]), *images, *extra]).strip().splitlines()
    results = [json.loads(line) for line in lines]
    assert len(results) == len(images)
    for r in results:
        assert ("caption" in r and 0 < r["layer_fraction"] <= 1) if extra else ("label" in r and r["exit_stage"] >= 0)
    bench = tmp_path / "bench.json"
    _ok(["bench", str(p["engine"]), *p["bench"], "--json", str(bench)])
    assert json.loads(bench.read_text()) and bench.with_suffix(".png").exists()


def test_serve_local_answers_like_predict(pipeline, tmp_path):
    import base64
    import urllib.request

    images, extra = _inputs(pipeline, tmp_path)
    want = [json.loads(line) for line in
            _ok(["predict", str(pipeline["engine"]), *images, *extra]).strip().splitlines()]
    port, grpc_port = _free_port(), _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "deploykit", "serve-local", str(pipeline["engine"]), "--port",
                             str(port), "--grpc-port", str(grpc_port)], cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(240):
            try:
                with urllib.request.urlopen(f"{url}/v2/health/ready", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.25)
        else:
            pytest.fail("serve-local did not get ready: " + proc.stderr.read1().decode(errors="replace"))
        body: dict[str, Any] = {"inputs": [{"name": "image_bytes", "shape": [len(images)], "datatype": "BYTES",
                                            "data": [base64.b64encode(Path(f).read_bytes()).decode()
                                                     for f in images]}]}
        if extra:  # MuE: the task goes in the request parameters (captions need no text)
            body["parameters"] = {"task": extra[1]}
        req = urllib.request.Request(f"{url}/v2/models/{Manifest.load(pipeline['engine']).name}/infer",
                                     data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            out = {o["name"]: o["data"] for o in json.loads(r.read())["outputs"]}
        if extra:
            assert out["text"] == [w["caption"] for w in want], out
            assert out["image_layers"] == [w["image_layers"] for w in want], out
        else:
            assert out["label"] == [w["label"] for w in want], out
        _check_grpc(grpc_port, Manifest.load(pipeline["engine"]).name, images, extra, want)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _check_grpc(port: int, name: str, images: list[str], extra: list[str], want: list[dict[str, Any]]) -> None:
    """The same request over KServe v2 gRPC (tritonclient.grpc, as a user sends it) answers as predict did."""
    import numpy as np

    grpcclient = pytest.importorskip("tritonclient.grpc", reason="needs tritonclient[grpc] (the dev extra)")
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{port}")
    try:
        inp = grpcclient.InferInput("image_bytes", [len(images)], "BYTES")
        inp.set_data_from_numpy(np.array([Path(f).read_bytes() for f in images], dtype=object))
        res = client.infer(name, [inp], parameters={"task": extra[1]} if extra else None)
        if extra:
            assert [t.decode() for t in res.as_numpy("text")] == [w["caption"] for w in want]
            assert res.as_numpy("image_layers").tolist() == [w["image_layers"] for w in want]
        else:
            assert [t.decode() for t in res.as_numpy("label")] == [w["label"] for w in want]
    finally:
        client.close()


def test_every_registered_family_has_a_contract_row():
    assert sorted(FAMILIES) == list_families()
