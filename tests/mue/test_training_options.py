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
