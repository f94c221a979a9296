"""``dec_prompt``: the entailment decoder runs once over <bos> + hypothesis (the reference's prev_output prompt)."""

import numpy as np
import torch

from deploykit.data.vl import synthetic_vl
from deploykit.manifest import Manifest
from deploykit.methods.mue.config import MuEConfig
from deploykit.methods.mue.model import key_bias
from deploykit.methods.mue.reference import reference_generate
from deploykit.methods.mue.train import load_mue_run, tensorize
from deploykit.runtime.exit_rules import Thresholds
from deploykit.runtime.generation import MuEEngine
from deploykit.runtime.tokenizer import Vocab


def _inputs(eng, task, n=16):
    rows = synthetic_vl("test", n=n, size=32, tasks=(task,))
    return rows, eng.load_images([r.image for r in rows]), eng.encode_texts([r.text for r in rows])


def test_tensorize_puts_the_hypothesis_in_the_decoder_prompt():
    rows = synthetic_vl("train", n=4, size=32)
    vocab = Vocab.build([r.text for r in rows] + [r.target for r in rows] + ["entailment", "neutral", "contradiction"])
    for prompt in (False, True):
        cfg = MuEConfig(dim=16, heads=2, img_size=32, max_text_len=12, max_gen_len=18, dec_prompt=prompt)
        t = tensorize(rows, vocab, cfg)
        assert t["dec_in"].shape[1] == 18 and cfg.dec_positions == 19  # max(18, 12) + 1
        for i, r in enumerate(rows):
            hyp = vocab.encode(r.text)
            if r.task == "entailment" and prompt:  # <bos> + hypothesis; the label at the last prompt position only
                assert t["dec_in"][i, : len(hyp) + 1].tolist() == [Vocab.bos_id, *hyp]
                assert int(t["ans_pos"][i]) == len(hyp)
                want = [0] * 18
                want[len(hyp)] = vocab.stoi[r.target]
                assert t["target"][i].tolist() == want
            else:  # old design / captions: <bos> + target (teacher forcing), target + <eos>
                y = vocab.encode(r.target) + [Vocab.eos_id]
                assert t["target"][i, : len(y)].tolist() == y and t["dec_in"][i, 0] == Vocab.bos_id
                assert int(t["ans_pos"][i]) == 0
    long = MuEConfig(dim=16, heads=2, img_size=32, max_text_len=20, max_gen_len=18, dec_prompt=True)
    assert long.dec_positions == 21 and tensorize(rows, vocab, long)["dec_in"].shape[1] == 21  # <bos> + 20 words
    assert MuEConfig(max_text_len=20, max_gen_len=18).dec_positions == 19  # the old layout without the prompt


def test_prompt_graphs_and_manifest(mue_engine):
    root, manifest = mue_engine
    meta = manifest.extra["mue"]
    assert meta["dec_prompt"] is True
    assert {"prompt_embed"} | {f"dec{j}_prompt" for j in range(3)} <= set(meta["graphs"])
    g = meta["graphs"]["dec0_prompt"]
    assert [i["name"] for i in g["inputs"]] == ["x", "mask", "cross_k", "cross_v", "enc_mask"]
    assert g["inputs"][0]["shape"][:2] == ["batch", "prompt"] and g["outputs"][1]["shape"] == ["batch"]
    assert manifest.extra["dynamic_axes"]["prompt"] == [2, 7, 13]  # <bos> + 1..max_text_len words


def test_prompted_exits_per_sample_match_reference_and_compact(mue_engine, mue_run):
    """Thresholds at the median of decoder layer 1's prompt scores: rows of one batch split; the ORT batch (with
    compaction) equals one-by-one ORT and the per-sample PyTorch reference; layer 2 sees only the survivors."""
    root, _ = mue_engine
    model, vocab, _ = load_mue_run(mue_run)
    ans = [vocab.stoi[w] for w in ("entailment", "neutral", "contradiction")]
    with MuEEngine.from_dir(root) as eng:
        assert eng.prompted
        _, imgs, ids = _inputs(eng, "entailment")
        full = eng.generate_ids(imgs, ids, "entailment", Thresholds.full_depth(), batch_size=16)
        assert all(r.dec_layers == [3] for r in full)
        # layer-1 scores of every row, through the PyTorch model (the same scores the graph computes)
        scores = []
        with torch.no_grad():
            for im, t in zip(imgs, ids):
                img = model.embed_image(torch.from_numpy(im)[None])
                txt = model.embed_text(torch.tensor([t]))
                for i in range(3):
                    img, _ = model.encoder_layer(i, img, torch.ones(img.shape[:2]))
                    txt, _ = model.encoder_layer(i, txt, torch.ones(txt.shape[:2]))
                enc, mask = model.encode_out(img, txt, torch.ones(1, len(t)))
                x = model.embed_prompt(torch.tensor([[Vocab.bos_id, *t]]))
                _, s = model.prompt_layer(0, x, *model.dec[0].cross_kv(enc), key_bias(mask), torch.ones(x.shape[:2]))
                scores.append(float(s))
        thr = Thresholds(dec=float(np.median(scores)))
        seen, runner = [], eng.runners["dec1_prompt"]
        orig = runner.run

        def spy(feeds, outputs=None):
            seen.append(len(feeds["x"]))
            return orig(feeds, outputs)

        runner.run = spy
        batched = eng.generate_ids(imgs, ids, "entailment", thr, batch_size=16)
        runner.run = orig
        single = [eng.generate_ids([i], [t], "entailment", thr, batch_size=1)[0] for i, t in zip(imgs, ids)]
    assert [b.__dict__ for b in batched] == [s.__dict__ for s in single]
    layers = [b.dec_layers[0] for b in batched]
    assert 1 in layers and max(layers) > 1
    assert seen == [sum(d > 1 for d in layers)]
    with torch.no_grad():
        for b, im, t in zip(batched, imgs, ids):
            ref = reference_generate(model, torch.from_numpy(im), t, "entailment", thr, "copy", ans)
            assert (ref.tokens, ref.dec_layers) == (b.tokens, b.dec_layers)


def test_old_engine_without_the_key_keeps_the_old_decoder(legacy_engine):
    run, root = legacy_engine
    m = Manifest.load(root)
    assert "dec_prompt" not in m.extra["mue"] and "prompt" not in m.extra["dynamic_axes"]
    assert not any(k.endswith("_prompt") or k == "prompt_embed" for k in m.extra["mue"]["graphs"])
    assert all(v["mismatches"] == 0 for v in m.extra["mue"]["parity"].values())
    model, vocab, config = load_mue_run(run)
    assert "dec_prompt" not in config["method"] and model.cfg.dec_prompt is False
    assert model.dec_pos.shape[0] == 19  # the old layout: max_gen_len + 1
    ans = [vocab.stoi[w] for w in ("entailment", "neutral", "contradiction")]
    with MuEEngine.from_dir(root) as eng:
        assert not eng.prompted
        _, imgs, ids = _inputs(eng, "entailment", 8)
        res = eng.generate_ids(imgs, ids, "entailment", Thresholds.full_depth(), batch_size=8)
        for r, im, t in zip(res, imgs, ids):
            ref = reference_generate(model, torch.from_numpy(im), t, "entailment", Thresholds.full_depth(), "copy",
                                     ans)
            assert r.tokens == ref.tokens and r.dec_layers == [3]
