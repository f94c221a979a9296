import json

import pytest

from deploykit.errors import ManifestError
from deploykit.manifest import SCHEMA_VERSION, Manifest


def test_round_trip(engine_copy):
    m = Manifest.load(engine_copy)
    m.save()
    again = Manifest.load(engine_copy)
    assert again.to_dict() == m.to_dict()
    assert again.num_stages == 4 and again.monolithic is not None
    assert again.stages[0].inputs[0].shape[0] == "batch"


def _edit(engine, fn):
    p = engine / "deploykit.json"
    d = json.loads(p.read_text())
    fn(d)
    p.write_text(json.dumps(d))


def test_schema_version_checked(engine_copy):
    _edit(engine_copy, lambda d: d.update(schema_version=SCHEMA_VERSION + 1))
    with pytest.raises(ManifestError, match="schema version"):
        Manifest.load(engine_copy)


def test_not_json(engine_copy):
    (engine_copy / "deploykit.json").write_text("{ not json")
    with pytest.raises(ManifestError, match="not valid JSON"):
        Manifest.load(engine_copy)


def test_missing_fields(engine_copy):
    _edit(engine_copy, lambda d: d.pop("stages"))
    with pytest.raises(ManifestError, match="missing required field"):
        Manifest.load(engine_copy)


def test_missing_manifest(tmp_path):
    with pytest.raises(ManifestError, match="no manifest"):
        Manifest.load(tmp_path)


def test_stage_handover_must_match(engine_copy):
    def rename(d):
        d["stages"][1]["inputs"][0]["name"] = "something_else"

    _edit(engine_copy, rename)
    with pytest.raises(ManifestError, match="hands on"):
        Manifest.load(engine_copy)


def test_too_many_thresholds(engine_copy):
    _edit(engine_copy, lambda d: d["exit_policy"].update(thresholds=[0.5] * 9))
    with pytest.raises(ManifestError, match="thresholds"):
        Manifest.load(engine_copy)


def test_missing_and_replaced_graph_files(engine_copy):
    m = Manifest.load(engine_copy)
    m.check_files(verify_hash=True)
    (engine_copy / "stage2.onnx").write_bytes(b"garbage")
    with pytest.raises(ManifestError, match="sha256"):
        m.check_files(verify_hash=True)
    (engine_copy / "stage2.onnx").unlink()
    with pytest.raises(ManifestError, match="missing"):
        m.check_files()
