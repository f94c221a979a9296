import copy

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import timm
import torch
from torch import nn

from deploykit.errors import ConfigError
from deploykit.methods.peft import (
    Adapter,
    LoRALinear,
    apply_adapters,
    apply_lora,
    has_lora,
    merge_lora,
    set_trainable,
)


def tiny_vit(**kw) -> nn.Module:
    torch.manual_seed(0)
    args = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=5)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, exportable=True, **{**args, **kw}).eval()


def randomise_lora(model: nn.Module) -> None:
    """A trained-looking update (lora_b starts at zero, which would hide merge bugs)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_b.copy_(torch.randn(m.lora_b.shape, generator=g) * 0.1)


def export_onnx(model: nn.Module, path, x: torch.Tensor) -> onnx.ModelProto:
    batch = torch.export.Dim("batch", min=1, max=64)
    torch.onnx.export(model, (x,), str(path), dynamo=True, opset_version=18, input_names=["image"],
                      output_names=["logits"], dynamic_shapes=({0: batch},))
    return onnx.load(str(path))


def test_lora_targets_and_identity_at_init():
    m = tiny_vit()
    x = torch.randn(2, 3, 32, 32)
    ref = m(x)
    names = apply_lora(m, targets=("qkv", "proj"), rank=4, alpha=8)
    assert names == ["blocks.0.attn.qkv", "blocks.0.attn.proj", "blocks.1.attn.qkv", "blocks.1.attn.proj"]
    assert "blocks.0.attn.qkv.weight" in m.state_dict() and "blocks.0.attn.qkv.lora_a" in m.state_dict()
    torch.testing.assert_close(m(x), ref)  # lora_b == 0: a fresh patch changes nothing


def test_lora_placement_by_block():
    m = tiny_vit()
    assert apply_lora(m, targets=("qkv",), rank=2, blocks=[1]) == ["blocks.1.attn.qkv"]
    assert apply_lora(tiny_vit(), targets=("blocks.0.attn.*",), rank=2) == ["blocks.0.attn.qkv", "blocks.0.attn.proj"]


def test_merge_matches_unmerged_and_restores_plain_linear():
    m = tiny_vit()
    apply_lora(m, targets=("qkv", "proj"), rank=4, alpha=8)
    randomise_lora(m)
    x = torch.randn(3, 3, 32, 32)
    unmerged = m(x)
    merged = merge_lora(copy.deepcopy(m))
    assert not has_lora(merged) and has_lora(m)
    assert all(type(mod) is nn.Linear for n, mod in merged.named_modules() if n.endswith(("attn.qkv", "attn.proj")))
    assert not any("lora" in k for k in merged.state_dict())
    assert set(merged.state_dict()) == set(tiny_vit().state_dict())
    torch.testing.assert_close(merged(x), unmerged, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(unmerged, tiny_vit()(x))  # the update did something


def test_merged_export_has_no_lora(tmp_path):
    m = tiny_vit()
    apply_lora(m, targets=("qkv", "proj"), rank=4)
    randomise_lora(m)
    merged = merge_lora(copy.deepcopy(m))
    x = torch.randn(2, 3, 32, 32)
    proto = export_onnx(merged, tmp_path / "m.onnx", x)
    plain = export_onnx(tiny_vit(), tmp_path / "plain.onnx", x)
    names = [i.name for i in proto.graph.initializer] + [n.name for n in proto.graph.node]
    assert not any("lora" in n.lower() for n in names)
    # same graph as the plain timm model: the fold costs nothing at inference
    assert sorted(n.op_type for n in proto.graph.node) == sorted(n.op_type for n in plain.graph.node)
    params = sum(int(np.prod(i.dims)) for i in proto.graph.initializer)
    assert params == sum(int(np.prod(i.dims)) for i in plain.graph.initializer)
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    xb = torch.randn(5, 3, 32, 32)
    (out,) = sess.run(None, {"image": xb.numpy()})
    np.testing.assert_allclose(out, m(xb).detach().numpy(), rtol=1e-4, atol=1e-4)


def test_adapters_are_identity_at_init_and_export(tmp_path):
    m = tiny_vit()
    x = torch.randn(2, 3, 32, 32)
    ref = m(x)
    names = apply_adapters(m, bottleneck=4, scale=0.1)
    assert names == ["blocks.0.mlp", "blocks.1.mlp"]
    assert "blocks.0.mlp.fc1.weight" in m.state_dict() and "blocks.0.mlp.adapter.down.weight" in m.state_dict()
    torch.testing.assert_close(m(x), ref)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, Adapter):
                mod.up.weight.normal_(0, 0.1)
    export_onnx(m, tmp_path / "a.onnx", x)
    sess = ort.InferenceSession(str(tmp_path / "a.onnx"), providers=["CPUExecutionProvider"])
    (out,) = sess.run(None, {"image": x.numpy()})
    np.testing.assert_allclose(out, m(x).detach().numpy(), rtol=1e-4, atol=1e-4)
    assert copy.deepcopy(m)(x).shape == (2, 5)


def test_set_trainable_modes():
    m = tiny_vit()
    apply_lora(m, targets=("qkv",), rank=2)
    n = set_trainable(m, "lora", always_train=("head.",))
    trainable = {k for k, p in m.named_parameters() if p.requires_grad}
    assert trainable == {"blocks.0.attn.qkv.lora_a", "blocks.0.attn.qkv.lora_b", "blocks.1.attn.qkv.lora_a",
                         "blocks.1.attn.qkv.lora_b", "head.weight", "head.bias"}
    assert n == sum(p.numel() for p in m.parameters() if p.requires_grad)
    a = tiny_vit()
    apply_adapters(a, bottleneck=4)
    set_trainable(a, "adapter")
    assert {k for k, p in a.named_parameters() if p.requires_grad} == {
        f"blocks.{i}.mlp.adapter.{layer}.{w}" for i in range(2) for layer in ("down", "up") for w in ("weight", "bias")}
    assert set_trainable(a, "full") == sum(p.numel() for p in a.parameters())


def test_bad_settings_are_named():
    with pytest.raises(ConfigError, match="match no linear"):
        apply_lora(tiny_vit(), targets=("query",), rank=2)
    with pytest.raises(ConfigError, match="rank"):
        apply_lora(tiny_vit(), rank=0)
    with pytest.raises(ConfigError, match="PEFT mode"):
        set_trainable(tiny_vit(), "prefix")
