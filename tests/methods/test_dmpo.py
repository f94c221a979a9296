import copy

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import timm
import torch
from torch import nn

from deploykit.errors import BackboneError, ConfigError
from deploykit.export.graphs import ExitHeadGraph, StageGraph, count_flops
from deploykit.methods import create_backbone, create_method, list_methods, make_method_config
from deploykit.methods.dmpo import (
    DMPOModel,
    MomentPredictor,
    cross_covariance,
    neighbour_pairs,
    schedule_weights,
)
from deploykit.methods.peft import LoRALinear

TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2)


def tiny_backbone(name: str = "vit_tiny_patch16_224", **kw) -> nn.Module:
    torch.manual_seed(0)
    return create_backbone(name, 5, **{**TINY, **kw})


def tiny_dmpo(backbone: nn.Module | None = None, **settings) -> DMPOModel:
    torch.manual_seed(0)
    return create_method("dmpo", backbone or tiny_backbone(), 5, **{"num_exits": 2, "peft": "full", **settings})


def randomise(model: nn.Module) -> None:
    """Trained-looking weights: zero-initialised LoRA / bypass up-projections would hide bugs."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("lora_b", "up.weight")):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def export_stage(model: DMPOModel, k: int, state: tuple[torch.Tensor, ...], path) -> ort.InferenceSession:
    """One stage exported by the dynamo exporter at opset 18 with a symbolic batch, loaded in ONNX Runtime."""
    graph = StageGraph(model, k, "max_softmax").eval()
    batch = torch.export.Dim("batch", min=1, max=1024)
    names = ["image"] if k == 0 else ["tokens"]
    torch.onnx.export(graph, state, str(path), dynamo=True, opset_version=18, input_names=names,
                      dynamic_shapes=(tuple({0: batch} for _ in state),))
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_registered_with_its_settings():
    assert "dmpo" in list_methods() and "multiexit" in list_methods()
    cfg = make_method_config("dmpo", peft="lora", lora_rank=4, phase2_weights=[0.4, 0.3, 0.2, 0.1])
    assert cfg.lora_rank == 4 and cfg.to_dict()["phase2_weights"] == [0.4, 0.3, 0.2, 0.1]


def test_cross_covariance_is_the_centred_product():
    x = torch.randn(2, 7, 3, 4)  # [B, N, G, d]
    pairs = neighbour_pairs(3, "near")
    assert pairs == [(0, 1), (1, 2)] and len(neighbour_pairs(4, "all")) == 6
    cov = cross_covariance(x, pairs)
    xc = x - x.mean(1, keepdim=True)
    ref = torch.einsum("bni,bnj->bij", xc[:, :, 1], xc[:, :, 2]) / 7
    torch.testing.assert_close(cov[:, 1], torch.nn.functional.normalize(ref, dim=-1))


def test_predictor_sizes_follow_the_width():
    small = MomentPredictor(32, 5, "token", 1, proj_dim=32, groups=4)  # d=8: no convs
    assert len(small.downsample) == 0 and small.second.in_features == 3 * 8 * 8
    big = MomentPredictor(768, 5, "token", 1, proj_dim=512, groups=4)  # Moment Probing's ViT-B sizes
    assert big.second.in_features == 3 * 31 * 31
    assert big(torch.randn(2, 197, 768)).shape == (2, 5)


def test_trunk_is_unchanged_and_exits_see_the_bypass():
    bb = tiny_backbone()
    plain = copy.deepcopy(bb).eval()
    m = tiny_dmpo(bb).eval()
    randomise(m)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        logits = m(x)
        torch.testing.assert_close(logits[-1], plain(x))  # the bypass feeds only its exit
        torch.testing.assert_close(m.forward_full(x), plain(x))
        tokens = m.forward_stage(0, x)[0]
        head = m.exit_heads[0]
        no_bypass = head.predictor(head.norm(tokens))
    assert len(logits) == 2 and not torch.allclose(logits[0], no_bypass)


@pytest.mark.parametrize("name,kw,stages", [
    ("vit_tiny_patch16_224", {}, 2),  # cls token; both stages (the last one is the backbone's head)
    ("vit_tiny_patch16_224", {"class_token": False, "global_pool": "avg"}, 1),  # no prefix tokens
    ("vit_tiny_patch16_224", {"reg_tokens": 2}, 1),  # cls + 2 registers
    ("deit_tiny_distilled_patch16_224", {}, 1),  # cls + distillation token
])
def test_backbone_variants_export_to_onnx_runtime(tmp_path, name, kw, stages):
    m = tiny_dmpo(tiny_backbone(name, **kw), peft="lora", lora_targets=["qkv", "proj"])
    randomise(m)
    e = m.prepare_for_export().eval()
    x = torch.randn(3, 3, 32, 32)
    xs = torch.randn(5, 3, 32, 32)  # another batch size: the batch axis is symbolic
    with torch.no_grad():
        state, state5 = (x,), (xs,)
        for k in range(stages):
            sess = export_stage(e, k, state, tmp_path / f"stage{k}.onnx")
            out = sess.run(None, {sess.get_inputs()[0].name: state5[0].numpy()})
            ref = StageGraph(m, k, "max_softmax")(*state5)  # the unfolded model
            for got, want in zip(out, ref):
                np.testing.assert_allclose(got, want.numpy(), rtol=1e-4, atol=1e-4)
            state, state5 = e.forward_stage(k, *state), tuple(torch.from_numpy(o) for o in out[:-2])


def test_lora_is_folded_for_export():
    m = tiny_dmpo(peft="lora", lora_rank=2, lora_targets=["qkv", "proj"])
    randomise(m)
    assert any(isinstance(mod, LoRALinear) for mod in m.modules())
    e = m.prepare_for_export()
    assert not any(isinstance(mod, LoRALinear) for mod in e.modules())
    assert any(isinstance(mod, LoRALinear) for mod in m.modules())  # the trained model is left as it was
    assert not any("lora" in k for k in e.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        for a, b in zip(m.eval()(x), e(x)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_peft_modes_decide_what_trains():
    m = tiny_dmpo(peft="lora", lora_rank=2)
    trainable = [k for k, p in m.named_parameters() if p.requires_grad]
    assert all(k.startswith(("exit_heads.", "backbone.head.")) or "lora_" in k for k in trainable)
    assert any("lora_a" in k for k in trainable) and any(k.startswith("exit_heads.0.bypass") for k in trainable)
    assert not m.backbone.blocks[0].attn.qkv.weight.requires_grad
    a = tiny_dmpo(peft="adapter", adapter_dim=4)
    assert {k.split(".adapter.")[0] for k, p in a.named_parameters() if p.requires_grad and ".adapter." in k} == {
        f"backbone.blocks.{i}.mlp" for i in range(4)}
    assert all(p.requires_grad for p in tiny_dmpo(peft="full").parameters())
    # gradients reach exactly the trainable parameters
    logits = m(torch.randn(2, 3, 32, 32))
    loss, _ = m.compute_loss(logits, torch.tensor([0, 1]), 0.2)
    loss.backward()
    assert m.backbone.blocks[0].attn.qkv.lora_a.grad is not None
    assert m.backbone.blocks[0].attn.qkv.weight.grad is None


def test_two_phase_weights_and_distillation():
    assert schedule_weights("linear_up", 4) == pytest.approx([0.1, 0.2, 0.3, 0.4])
    assert schedule_weights("linear_down", 4) == pytest.approx([0.4, 0.3, 0.2, 0.1])
    assert schedule_weights("uniform", 2) == [0.5, 0.5]
    m = tiny_dmpo(num_exits=4, switch_point=0.3, phase1_weights="linear_up", phase2_weights=[1, 1, 0.5, 0.5],
                  distill_weight=0.5, distill_temperature=2.0)
    assert m.loss_weights(0.29) == pytest.approx([0.1, 0.2, 0.3, 0.4])
    assert m.loss_weights(0.3) == [1.0, 1.0, 0.5, 0.5]
    logits = m(torch.randn(4, 3, 32, 32))
    y = torch.tensor([0, 1, 2, 3])
    loss1, parts1 = m.compute_loss(logits, y, 0.1)
    loss2, parts2 = m.compute_loss(logits, y, 0.9)
    assert "loss_distill" not in parts1 and parts1["phase"] == 1.0
    assert parts2["phase"] == 2.0 and parts2["loss_distill"] > 0
    ce = [parts2[f"loss_exit{k}"] for k in range(4)]
    expected = sum(w * c for w, c in zip([1, 1, 0.5, 0.5], ce)) + 0.5 * parts2["loss_distill"]
    assert float(loss2.detach()) == pytest.approx(expected, rel=1e-5)


def test_ablations_build():
    x = torch.randn(2, 3, 32, 32)
    for settings in ({"bypass": False}, {"predictor": "linear"}, {"predictor_cross": "all", "predictor_groups": 2},
                     {"bypass_stop_grad": True, "bypass_dim": 4}):
        assert [t.shape for t in tiny_dmpo(**settings)(x)] == [(2, 5), (2, 5)]


def test_head_flops_include_bypass_and_predictor():
    x = torch.randn(1, 3, 32, 32)
    dmpo = tiny_dmpo().eval()
    base = create_method("multiexit", tiny_backbone(), 5, num_exits=2).eval()
    tokens = dmpo.forward_stage(0, x)
    f_dmpo = count_flops(ExitHeadGraph(dmpo, 0), *tokens)
    f_base = count_flops(ExitHeadGraph(base, 0), *tokens)
    f_nobypass = count_flops(ExitHeadGraph(tiny_dmpo(bypass=False).eval(), 0), *tokens)
    assert f_dmpo > f_nobypass > f_base > 0


@pytest.mark.parametrize("settings,match", [
    ({"num_exits": 4, "phase1_weights": [0.5, 0.5]}, r"phase1_weights .* has 2 values .* 4 exits; give 4"),
    ({"num_exits": 3, "phase2_weights": [1, 1, 1, 1]}, r"phase2_weights .* has 4 values .* 3 exits"),
    ({"phase1_weights": "linear"}, r"phase1_weights must be one of .*linear_up"),
])
def test_weights_that_dont_fit_the_exits(settings, match):
    with pytest.raises(ConfigError, match=match):
        tiny_dmpo(**settings)


@pytest.mark.parametrize("switch", [0.0, 1.0, 1.5, -0.2])
def test_switch_point_outside_0_1(switch):
    with pytest.raises(ConfigError, match=r"switch_point must be a fraction of training strictly between 0 and 1"):
        make_method_config("dmpo", switch_point=switch)


def test_other_bad_settings_are_named():
    with pytest.raises(ConfigError, match="peft must be one of"):
        make_method_config("dmpo", peft="prompt")
    with pytest.raises(ConfigError, match="lora_targets entry must be one of"):
        make_method_config("dmpo", lora_targets=["fc1"])
    with pytest.raises(ConfigError, match="not divisible by predictor_groups 3"):
        tiny_dmpo(predictor_groups=3)


def test_pretrained_checkpoint_loads_into_dmpo(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(123)
    src = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=1000, **TINY)
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(tmp_path / "vit.safetensors"))
    bb = create_backbone("vit_tiny_patch16_224", 5, checkpoint=tmp_path / "vit.safetensors", **TINY)
    m = tiny_dmpo(bb, peft="lora")
    sd = m.state_dict()
    for key in ("blocks.0.attn.qkv.weight", "blocks.3.mlp.fc2.bias", "pos_embed", "cls_token"):
        torch.testing.assert_close(sd[f"backbone.{key}"], src.state_dict()[key])
    assert m.backbone.head.weight.shape == (5, 32)  # classifier for 1000 classes dropped, fresh one kept
    # the folded export model still holds the pretrained weights (LoRA starts at zero)
    torch.testing.assert_close(m.prepare_for_export().backbone.blocks[0].attn.qkv.weight, src.blocks[0].attn.qkv.weight)


def test_checkpoint_that_does_not_fit(tmp_path):
    from safetensors.torch import save_file

    other = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=5, **{**TINY, "embed_dim": 48})
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(tmp_path / "wide.safetensors"))
    with pytest.raises(BackboneError, match=r"does not fit backbone .*width 32.*Pick the backbone"):
        create_backbone("vit_tiny_patch16_224", 5, checkpoint=tmp_path / "wide.safetensors", **TINY)
    deeper = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=5, **{**TINY, "depth": 6})
    save_file({k: v.contiguous() for k, v in deeper.state_dict().items()}, str(tmp_path / "deep.safetensors"))
    with pytest.raises(BackboneError, match=r"unexpected keys .*blocks\.4"):
        create_backbone("vit_tiny_patch16_224", 5, checkpoint=tmp_path / "deep.safetensors", **TINY)
