import pytest
import torch

from deploykit.errors import BackboneError, ConfigError, UnknownNameError
from deploykit.methods import create_backbone, create_method, get_method, list_methods, make_method_config

TINY = dict(img_size=16, patch_size=4, depth=4, embed_dim=32, num_heads=2)

# timm ViT-family variants deploykit must split: cls token, global-average pooling without cls token,
# distillation token, register tokens.
BACKBONES = {
    "cls": ("vit_tiny_patch16_224", {}),
    "avgpool_no_cls": ("vit_tiny_patch16_224", {"global_pool": "avg", "class_token": False, "fc_norm": False}),
    "distilled": ("deit_tiny_distilled_patch16_224", {}),
    "registers": ("vit_base_patch16_reg4_gap_256", {}),
}


def test_multiexit_registered():
    assert "multiexit" in list_methods()
    assert get_method("multiexit").description


def test_unknown_method_suggests():
    with pytest.raises(UnknownNameError, match="did you mean multiexit|Did you mean multiexit"):
        get_method("multiexitt")


def test_unknown_setting():
    with pytest.raises(UnknownNameError, match="no setting"):
        make_method_config("multiexit", exits_after=[1, 2])


def test_bad_score():
    with pytest.raises(ConfigError, match="score"):
        make_method_config("multiexit", score="margin")


@pytest.mark.parametrize("kind", sorted(BACKBONES))
def test_backbone_variants_split_exactly(kind):
    name, extra = BACKBONES[kind]
    torch.manual_seed(0)
    bb = create_backbone(name, 10, **TINY, **extra).eval()
    model = create_method("multiexit", bb, 10).eval()
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        outs = model(x)
        full = model.forward_full(x)
        ref = bb(x)
    assert len(outs) == 4 and all(o.shape == (3, 10) for o in outs)
    # the last exit and the monolithic view are exactly timm's own forward
    assert torch.equal(full, ref)
    assert torch.equal(outs[-1], ref)


def test_exit_blocks_default_and_explicit():
    bb = create_backbone("vit_tiny_patch16_224", 10, **{**TINY, "depth": 8})
    assert create_method("multiexit", bb, 10).exit_blocks == [2, 4, 6, 8]
    assert create_method("multiexit", bb, 10, exit_blocks=[3, 5]).exit_blocks == [3, 5, 8]


def test_exits_past_depth():
    bb = create_backbone("vit_tiny_patch16_224", 10, **TINY)
    with pytest.raises(BackboneError, match="depth"):
        create_method("multiexit", bb, 10, exit_blocks=[2, 6])
    with pytest.raises(BackboneError, match="only 4 blocks"):
        create_method("multiexit", bb, 10, num_exits=6)


def test_not_vit_family():
    with pytest.raises(BackboneError, match="not ViT-family"):
        create_backbone("resnet18", 10)


def test_unknown_backbone():
    with pytest.raises(UnknownNameError, match="timm has no such model"):
        create_backbone("vit_tiny_patch16_2244", 10)
