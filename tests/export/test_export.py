import json

import numpy as np
import onnx
import pytest

from deploykit.errors import CheckpointError, ExportError
from deploykit.manifest import Manifest


def test_engine_dir_contents(trained_engine):
    m = Manifest.load(trained_engine)
    assert [s.file for s in m.stages] == [f"stage{k}.onnx" for k in range(4)]
    assert m.monolithic.file == "full.onnx"
    assert m.labels == [str(i) for i in range(10)]
    assert m.preprocessing.input_size == [3, 16, 16]
    assert m.method["name"] == "multiexit" and m.backbone["name"] == "vit_tiny_patch16_224"
    for key in ("deploykit", "torch", "timm", "onnx", "opset", "checkpoint_sha256"):
        assert key in m.provenance
    parity = m.provenance["parity"]
    assert parity["prediction_mismatches"] == [0, 0, 0, 0]
    assert parity["chain_prediction_mismatches"] == [0, 0, 0, 0]
    assert max(parity["max_abs_logit_diff"]) <= parity["atol"] + 1e-2


def test_graphs_have_symbolic_batch_and_static_rest(trained_engine):
    m = Manifest.load(trained_engine)
    for s in m.stages:
        g = onnx.load(str(trained_engine / s.file)).graph
        names = [i.name for i in g.input]
        assert names == [t.name for t in s.inputs]
        outs = {o.name for o in g.output}
        assert outs == {t.name for t in s.outputs} | {"logits", "score"}
        for vi in list(g.input) + list(g.output):
            dims = vi.type.tensor_type.shape.dim
            assert dims[0].dim_param == "batch"
            assert all(d.HasField("dim_value") for d in dims[1:])


def test_flops_add_up(trained_engine):
    m = Manifest.load(trained_engine)
    trunk = sum(s.flops for s in m.stages)
    # the monolithic model is every stage's trunk plus only the final head
    assert m.monolithic.flops == trunk + m.stages[-1].exit_flops
    assert all(s.exit_flops > 0 for s in m.stages)


def test_failed_export_leaves_nothing(trained_run, tmp_path):
    from deploykit.export import export_model
    from deploykit.train import load_run

    model, cfg = load_run(trained_run)
    out = tmp_path / "eng"
    with pytest.raises(ExportError, match="labels"):
        export_model(model, out, labels=["a", "b"], preprocessing=cfg["preprocessing"])
    assert not out.exists()
    assert not any(p.name.startswith(".eng.tmp") for p in tmp_path.iterdir())


def test_refuses_foreign_directory(trained_run, tmp_path):
    from deploykit.export import export_run

    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(ExportError, match="not a deploykit engine"):
        export_run(trained_run, tmp_path, check=False)
    assert (tmp_path / "precious.txt").read_text() == "keep me"


def test_corrupt_checkpoint(trained_run, tmp_path):
    import shutil

    from deploykit.export import export_run

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    (run / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError):
        export_run(run, tmp_path / "eng", check=False)
    assert not (tmp_path / "eng").exists()


def test_parity_check_catches_a_wrong_graph(trained_run, engine_copy):
    """Plant another model's stage graph: the parity check must fail loudly."""
    import torch

    from deploykit.export.validate import check_parity
    from deploykit.train import load_run

    model, cfg = load_run(trained_run)
    with torch.no_grad():
        for p in model.exit_heads[0].parameters():
            p.add_(torch.randn_like(p))
    x = np.random.default_rng(0).standard_normal((32, 3, 16, 16), dtype=np.float32)
    with pytest.raises(ExportError, match="disagree"):
        check_parity(model, Manifest.load(engine_copy), x)


def test_manifest_is_plain_json(trained_engine):
    d = json.loads((trained_engine / "deploykit.json").read_text())
    assert d["schema_version"] == 1 and d["stages"][0]["inputs"][0]["name"] == "image"
