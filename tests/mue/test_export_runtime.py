import json

import numpy as np
import onnx
import pytest
import torch

from deploykit.data.vl import synthetic_vl
from deploykit.manifest import Manifest
from deploykit.methods.mue.reference import reference_generate
from deploykit.methods.mue.train import load_mue_run
from deploykit.runtime.exit_rules import Thresholds, decoder_threshold
from deploykit.runtime.generation import MuEEngine


def _inputs(eng, task, n=12):
    rows = synthetic_vl("test", n=n, size=32, tasks=(task,))
    return rows, eng.load_images([r.image for r in rows]), eng.encode_texts([r.text for r in rows])


def test_manifest_describes_graphs_with_symbolic_batch(mue_engine):
    root, _ = mue_engine
    m = Manifest.load(root)
    assert m.task == "vl" and m.stages == [] and m.exit_policy.score == "cosine"
    meta = m.extra["mue"]
    assert meta["decisions"] == "per-sample"
    names = set(meta["graphs"])
    assert {"image_stem", "text_embed", "enc_out", "dec_embed", "head"} <= names
    assert {f"enc{i}" for i in range(3)} | {f"dec{j}" for j in range(3)} | {f"dec{j}_kv" for j in range(3)} <= names
    assert {"prompt_embed"} | {f"dec{j}_prompt" for j in range(3)} <= names  # dec_prompt (the tiny recipe's)
    for g in meta["graphs"].values():
        model = onnx.load(str(root / g["file"]))
        for inp in model.graph.input:
            assert inp.type.tensor_type.shape.dim[0].dim_param == "batch"
        assert g["inputs"][0]["shape"][0] == "batch"
    assert {o["name"] for o in meta["graphs"]["enc0"]["outputs"]} == {"y", "score"}
    assert {"past_k", "past_v", "cross_k", "cross_v"} <= {i["name"] for i in meta["graphs"]["dec1"]["inputs"]}


def test_export_parity_answers_and_greedy_captions(mue_engine):
    _, manifest = mue_engine
    report = manifest.extra["mue"]["parity"]
    assert set(report) == {"entailment/full/copy", "entailment/exits/copy", "caption/full/copy",
                           "caption/exits/copy", "caption/exits/compute"}
    assert all(v["mismatches"] == 0 and v["n"] > 0 for v in report.values())


def test_decisions_are_per_sample_and_batch_independent(mue_engine, mue_run):
    root, _ = mue_engine
    model, vocab, _ = load_mue_run(mue_run)
    with MuEEngine.from_dir(root) as eng:
        rows, imgs, ids = _inputs(eng, "entailment", 16)
        # thresholds at the median of the first layer's scores, so rows of one batch split
        img = eng.runners["image_stem"].run({"image": np.stack(imgs)})["tokens"]
        s0 = eng.runners["enc0"].run({"x": img, "mask": np.ones(img.shape[:2], np.float32)})["score"]
        thr = Thresholds(img=float(np.median(s0)), txt=None, dec=None)
        batched = eng.generate_ids(imgs, ids, "entailment", thr, batch_size=16)
        single = [eng.generate_ids([i], [t], "entailment", thr, batch_size=1)[0] for i, t in zip(imgs, ids)]
    assert [b.__dict__ for b in batched] == [s.__dict__ for s in single]
    layers = {b.img_layers for b in batched}
    assert 1 in layers and len(layers) > 1  # some rows exited after layer 1, others went on
    ans = [vocab.stoi[w] for w in ("entailment", "neutral", "contradiction")]
    for b, im, t in zip(batched, imgs, ids):
        ref = reference_generate(model, torch.from_numpy(im), t, "entailment", thr, "copy", ans)
        assert (ref.tokens, ref.img_layers) == (b.tokens, b.img_layers)


def test_encoder_compaction_shrinks_the_batch(mue_engine):
    root, _ = mue_engine
    with MuEEngine.from_dir(root) as eng:
        _, imgs, ids = _inputs(eng, "entailment", 16)
        seen = []
        runner = eng.runners["enc1"]
        orig = runner.run

        def spy(feeds, outputs=None):
            seen.append(len(feeds["x"]))
            return orig(feeds, outputs)

        runner.run = spy
        img = eng.runners["image_stem"].run({"image": np.stack(imgs)})["tokens"]
        s0 = eng.runners["enc0"].run({"x": img, "mask": np.ones(img.shape[:2], np.float32)})["score"]
        thr = Thresholds(img=float(np.median(s0)), txt=1.0, dec=None)
        res = eng.generate_ids(imgs, ids, "entailment", thr, batch_size=16)
    survivors = sum(r.img_layers > 1 for r in res)
    assert seen == [survivors, 16]  # image stream: only survivors reach layer 2; text stream: all rows


def test_decoder_exits_per_token_and_kv_policies(mue_engine, mue_run):
    root, _ = mue_engine
    model, _, _ = load_mue_run(mue_run)
    with MuEEngine.from_dir(root) as eng:
        _, imgs, ids = _inputs(eng, "caption", 6)
        res = eng.generate_ids(imgs, ids, "caption", Thresholds(dec=-1.0, decay=True), batch_size=6)
        forced = sum(decoder_threshold(s, -1.0, 18, True) == 1.0 for s in range(18))
        assert forced == 7  # steps s < (N+1)/3 = 19/3 run at full depth
        for r in res:  # then every token exits after layer 1 (threshold about -0.9)
            assert r.dec_layers[:forced] == [3] * min(forced, len(r.dec_layers)) and set(r.dec_layers[forced:]) <= {1}
        res = eng.generate_ids(imgs, ids, "caption", Thresholds(dec=-1.0, decay=False), batch_size=6)
        assert all(set(r.dec_layers) == {1} for r in res)
        # skipped layers' caches: copy = the exited layer's K/V; compute = the skipped layer's projection of y
        n, h, dh = 2, 2, 16
        y = np.random.default_rng(0).normal(size=(n, 1, 32)).astype(np.float32)
        k = np.random.default_rng(1).normal(size=(n, h, 1, dh)).astype(np.float32)
        for policy in ("copy", "compute"):
            kc = [np.zeros((3, h, 4, dh), np.float32) for _ in range(3)]
            vc = [np.zeros((3, h, 4, dh), np.float32) for _ in range(3)]
            eng._fill_skipped(policy, np.array([0, 2]), 0, 1, y, k, k * 2, kc, vc)
            for jj in (1, 2):
                if policy == "copy":
                    want_k = k[:, :, 0]
                else:
                    want_k = model.dec[jj].self_kv(torch.from_numpy(y))[0].detach().numpy()[:, :, 0]
                assert np.allclose(kc[jj][[0, 2], :, 1], want_k, atol=1e-5)
                assert not kc[jj][1].any() and not kc[0].any()


def test_kv_policy_setting_is_validated(mue_engine):
    from deploykit.errors import ConfigError

    root, _ = mue_engine
    with MuEEngine.from_dir(root) as eng, pytest.raises(ConfigError, match="kv_policy"):
        _, imgs, ids = _inputs(eng, "caption", 1)
        eng.generate_ids(imgs, ids, "caption", kv_policy="drop")


def test_manifest_json_round_trip(mue_engine):
    root, _ = mue_engine
    d = json.loads((root / "deploykit.json").read_text())
    assert d["extra"]["mue"]["kv_policy"] in ("copy", "compute")
    assert set(d["extra"]["mue"]["thresholds"]) == {"entailment", "caption"}
    assert d["extra"]["mue"]["thresholds"]["caption"]["decay"] is True
    assert d["extra"]["mue"]["thresholds"]["entailment"]["decay"] is False
