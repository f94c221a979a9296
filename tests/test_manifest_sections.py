"""Typed manifest sections: validated on load for every family, with old engines' JSON still accepted."""

from __future__ import annotations

import copy
import json

import pytest

from deploykit.errors import ManifestError
from deploykit.manifest import Manifest
from deploykit.manifest_sections import MuESection, graph_entries, mue_section


def _mue_dict() -> dict:
    g = {"file": "x.onnx", "inputs": [{"name": "x", "shape": ["batch", "seq", 8]}], "outputs": []}
    names = ["image_stem", "text_embed", "enc_out", "dec_embed", "head", "enc0", "dec0", "dec0_kv"]
    return {"graphs": {n: dict(g, file=f"{n}.onnx") for n in names}, "tasks": ["caption"],
            "thresholds": {"caption": {"img": 0.9, "txt": None, "dec": 0.8, "decay": True}}, "kv_policy": "copy",
            "vocab": "vocab.json", "answer_tokens": ["entailment", "neutral", "contradiction"], "enc_layers": 1,
            "dec_layers": 1, "heads": 2, "dim": 8, "max_text_len": 4, "max_gen_len": 6, "num_patches": 4}


def _manifest(extra: dict) -> dict:
    return {"schema_version": 1, "name": "m", "task": "vl-caption", "method": {"name": "mue"}, "backbone": {},
            "labels": [], "preprocessing": {"input_size": [3, 8, 8], "mean": [0.5] * 3, "std": [0.5] * 3},
            "stages": [], "exit_policy": {"score": "cosine", "thresholds": []}, "extra": extra}


def test_a_mue_section_round_trips_and_lists_its_graphs():
    d = _manifest({"mue": _mue_dict(), "dynamic_axes": {"seq": [1, 4, 4]}})
    m = Manifest.from_dict(d)
    s = mue_section(m)
    assert isinstance(s, MuESection) and s.thresholds["caption"].txt is None and s.dec_prompt is False
    entries = {e.name: e for e in graph_entries(m)}
    assert set(entries) == set(d["extra"]["mue"]["graphs"])
    assert entries["enc0"].quantize and not entries["head"].quantize and not entries["image_stem"].quantize
    assert m.to_dict()["extra"] == d["extra"]  # JSON form unchanged


@pytest.mark.parametrize("change, match", [
    (lambda d: d["extra"]["mue"]["graphs"].pop("dec0"), r"lacks \['dec0'\]"),
    (lambda d: d["extra"]["mue"]["thresholds"].pop("caption"), "no entry for task"),
    (lambda d: d["extra"]["mue"]["thresholds"]["caption"].update(img="high"), "img must be a number"),
    (lambda d: d["extra"]["mue"].update(kv_policy="skip"), "kv_policy"),
    (lambda d: d["extra"]["mue"].update(tasks=["vqa"]), "tasks"),
    (lambda d: d["extra"]["mue"].pop("vocab"), "lacks"),
    (lambda d: d["extra"].update(dynamic_axes={"seq": [4, 2, 8]}), "min <= opt <= max"),
    (lambda d: d["extra"].update(quantization={"mode": "fancy", "graphs": {}}), "quantization.mode"),
    (lambda d: d["extra"].update(trt={"precision": "fp16", "max_batch": 4, "opt_batch": 8}), "batch range"),
    (lambda d: d["extra"].pop("mue"), "no stages and no MuE graphs"),
])
def test_bad_sections_are_refused_on_load(change, match, tmp_path):
    d = _manifest({"mue": _mue_dict()})
    change(d)
    (tmp_path / "deploykit.json").write_text(json.dumps(d))
    with pytest.raises(ManifestError, match=match):
        Manifest.load(tmp_path)


def test_classification_engines_get_their_graphs_and_sections_checked(trained_engine, tmp_path):
    m = Manifest.load(trained_engine)
    entries = graph_entries(m)
    assert [e.file for e in entries] == [s.file for s in m.stages] + ["full.onnx"]
    assert entries[0].exit_outputs == ["logits", "score"] and entries[0].state_outputs == ["tokens_0"]
    assert entries[-1].state_outputs == [] and entries[-1].score_outputs == []
    d = copy.deepcopy(m.to_dict())
    d["extra"]["trt"] = {"precision": "fp16"}
    (tmp_path / "deploykit.json").write_text(json.dumps(d))
    with pytest.raises(ManifestError, match="extra.trt lacks"):
        Manifest.load(tmp_path)
