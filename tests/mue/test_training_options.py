import pytest
import torch

from deploykit.errors import ConfigError
from deploykit.methods.mue.model import layerwise_loss


def test_loss_norm_token_vs_sample():
    torch.manual_seed(0)
    logits = [torch.randn(2, 3, 5)]
    target = torch.tensor([[1, 2, 3], [4, 0, 0]])  # a 3-token row and a 1-token row (0 = pad)
    ce = torch.nn.functional.cross_entropy(logits[0].flatten(0, 1), target.flatten(), reduction="none").view(2, 3)
    tok, _ = layerwise_loss(logits, target, norm="token")
    smp, _ = layerwise_loss(logits, target, norm="sample")
    assert torch.isclose(tok, (ce[0].sum() + ce[1, 0]) / 4)
    assert torch.isclose(smp, (ce[0].mean() + ce[1, 0]) / 2)
    with pytest.raises(ValueError, match="norm"):
        layerwise_loss(logits, target, norm="batch")


def test_entailment_share_is_validated(tmp_path):
    from deploykit.methods.mue.train import train_mue

    recipe = {"method": {"name": "mue", "dim": 16, "heads": 2, "enc_layers": 1, "dec_layers": 1, "img_size": 16,
                         "patch_size": 8}, "data": {"spec": "synthetic-vl", "n_train": 4, "n_val": 2},
              "train": {"steps": 1, "entailment_share": 1.5}}
    with pytest.raises(ConfigError, match="entailment_share"):
        train_mue(recipe, tmp_path / "run")


def _tiny_model():
    from deploykit.methods.mue.config import MuEConfig
    from deploykit.methods.mue.model import MuEModel

    torch.manual_seed(0)
    cfg = MuEConfig(dim=16, heads=2, enc_layers=3, dec_layers=2, img_size=16, patch_size=8, max_text_len=6)
    return MuEModel(cfg, 20).eval(), cfg


def test_stream_depths_truncate_each_stream_per_sample():
    from deploykit.methods.mue.train import draw_stream_depths

    model, cfg = _tiny_model()
    image, ids = torch.randn(4, 3, 16, 16), torch.tensor([[3, 4, 5, 0, 0, 0]] * 4)
    mask = (ids != 0).float()
    full, _ = model.encode_full(image, ids, mask)
    same, _ = model.encode_full(image, ids, mask, (torch.full((4,), 3), torch.full((4,), 3)))
    assert torch.equal(full, same)  # depth = enc_layers is full depth
    # p = 1: every stream of every sample stops early (k in 1..enc_layers-1), so every sample's encoding changes
    di, dt = draw_stream_depths(4, cfg.enc_layers, 1.0, torch.Generator().manual_seed(0))
    assert ((di >= 1) & (di < 3)).all() and ((dt >= 1) & (dt < 3)).all()
    cut, _ = model.encode_full(image, ids, mask, (di, dt))
    assert all(not torch.allclose(cut[b], full[b]) for b in range(4))
    # the truncated streams are exactly the runtime's: k layers, then encode_out
    depths = (torch.tensor([1, 2, 3, 1]), torch.tensor([3, 1, 2, 2]))
    enc, _ = model.encode_full(image, ids, mask, depths)
    for b in range(4):
        img, txt = model.embed_image(image[b:b + 1]), model.embed_text(ids[b:b + 1])
        for i in range(int(depths[0][b])):
            img, _ = model.encoder_layer(i, img, torch.ones(img.shape[:2]))
        for i in range(int(depths[1][b])):
            txt, _ = model.encoder_layer(i, txt, mask[b:b + 1])
        ref, _ = model.encode_out(img, txt, mask[b:b + 1])
        assert torch.allclose(enc[b:b + 1], ref, atol=1e-5)
    assert not (draw_stream_depths(64, 3, 0.0, torch.Generator().manual_seed(0))[0] != 3).any()


def test_stream_depth_drop_zero_is_the_reference_training(tmp_path):
    from safetensors.torch import load_file

    from deploykit.methods.mue.train import train_mue

    def run(name, **train):
        recipe = {"method": {"name": "mue", "dim": 16, "heads": 2, "enc_layers": 2, "dec_layers": 1, "img_size": 16,
                             "patch_size": 8, "max_text_len": 12, "dec_prompt": True},
                  "data": {"spec": "synthetic-vl", "n_train": 160, "n_val": 16},
                  "train": {"steps": 3, "batch_size": 8, "eval_every": 100, "threads": 1, **train}}
        return load_file(str(train_mue(recipe, tmp_path / name) / "model.safetensors"))

    ref, zero, drop = run("ref"), run("zero", stream_depth_drop=0.0), run("drop", stream_depth_drop=1.0)
    assert all(torch.equal(ref[k], zero[k]) for k in ref)
    assert any(not torch.equal(ref[k], drop[k]) for k in ref)
    with pytest.raises(ConfigError, match="stream_depth_drop"):
        run("bad", stream_depth_drop=1.5)
