"""timm users' weights: train.py checkpoints (args Namespace, EMA, DDP prefixes) and hub caches, through the CLI."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from deploykit.cli import main
from deploykit.errors import BackboneError, CheckpointError
from deploykit.methods.backbone import create_backbone
from deploykit.methods.timm_weights import read_checkpoint

ARCH = "vit_tiny_patch16_224"
TINY = {"patch_size": 4, "depth": 2, "embed_dim": 32, "num_heads": 2}
SIZE = 16


def _timm_model(seed: int, num_classes: int = 7) -> torch.nn.Module:
    import timm

    torch.manual_seed(seed)
    return timm.create_model(ARCH, pretrained=False, num_classes=num_classes, img_size=SIZE, **TINY)


def write_timm_checkpoint(path: Path, *, ema: bool, ddp: bool, args: bool) -> tuple[dict, dict]:
    """A file laid out as timm's train.py CheckpointSaver writes it; returns (plain, ema) state dicts."""
    model, avg = _timm_model(1), _timm_model(2)
    plain = {k: v.clone() for k, v in model.state_dict().items()}
    averaged = {k: v.clone() for k, v in avg.state_dict().items()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, 3, SIZE, SIZE)).sum().backward()
    opt.step()
    prefix = "module." if ddp else ""
    state = {"epoch": 3, "arch": ARCH, "state_dict": {prefix + k: v for k, v in plain.items()},
             "optimizer": opt.state_dict(), "version": 2, "metric": 91.25}
    if args:
        state["args"] = argparse.Namespace(model=ARCH, img_size=SIZE, lr=1e-3, model_ema=ema, pretrained=False,
                                           initial_checkpoint="", mean=None, input_size=None, drop_path=0.1,
                                           sched="cosine", aa="rand-m9-mstd0.5-inc1", batch_size=128)
    if ema:
        state["state_dict_ema"] = {prefix + k: v for k, v in averaged.items()}
    torch.save(state, path)
    return plain, averaged


def _same(a: dict, b: dict) -> bool:
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_read_checkpoint_formats(tmp_path):
    path = tmp_path / "model_best.pth.tar"
    plain, averaged = write_timm_checkpoint(path, ema=True, ddp=True, args=True)
    got = read_checkpoint(path)
    assert got.source == "state_dict_ema" and got.arch == ARCH and _same(got.state, averaged)
    got = read_checkpoint(path, ema=False)
    assert got.source == "state_dict" and _same(got.state, plain)
    no_ema = tmp_path / "checkpoint-3.pth.tar"
    plain, _ = write_timm_checkpoint(no_ema, ema=False, ddp=True, args=False)
    assert _same(read_checkpoint(no_ema).state, plain)
    with pytest.raises(CheckpointError, match="no EMA weights.*--use-ema"):
        read_checkpoint(no_ema, ema=True)


class _Payload:
    """An object whose unpickling would run code (writes a marker file)."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_checkpoint_with_code_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth.tar"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "args": _Payload(str(marker))}, path)
    with pytest.raises(CheckpointError, match="refuses") as e:
        read_checkpoint(path)
    assert "\n" not in str(e.value)
    assert not marker.exists()
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(CheckpointError, match="is the file complete"):
        read_checkpoint(path)


@pytest.mark.parametrize("fmt", [
    {"ema": True, "ddp": True, "args": True},
    {"ema": False, "ddp": True, "args": False},
    {"ema": True, "ddp": False, "args": True, "flag": "--no-use-ema"},
])
def test_timm_checkpoint_trains_and_exports_through_the_cli(tmp_path, fmt):
    ckpt = tmp_path / "model_best.pth.tar"
    plain, averaged = write_timm_checkpoint(ckpt, ema=fmt["ema"], ddp=fmt["ddp"], args=fmt["args"])
    want = averaged if fmt["ema"] and fmt.get("flag") != "--no-use-ema" else plain
    run = tmp_path / "run"
    res = CliRunner().invoke(main, [
        "train", "--method", "multiexit", "--backbone", ARCH, "--data", "digits", "--initial-checkpoint", str(ckpt),
        "--img-size", str(SIZE), *([fmt["flag"]] if "flag" in fmt else []), "--epochs", "1", "--max-steps", "1",
        "--lr", "1e-9", "--batch-size", "16", "--out", str(run),
        *[f"--set=backbone.kwargs.{k}={v}" for k, v in TINY.items()], "--set", "method.num_exits=2"])
    assert res.exit_code == 0, res.output
    from safetensors.torch import load_file

    trained = load_file(str(run / "model.safetensors"))
    blocks = [k for k in want if k.startswith(("blocks.", "patch_embed.", "pos_embed", "cls_token"))]
    assert all(torch.allclose(trained[f"backbone.{k}"], want[k], atol=1e-5) for k in blocks)
    assert "head.weight" in want and trained["backbone.head.weight"].shape[0] == 10  # 7-class head replaced
    config = json.loads((run / "config.json").read_text())
    assert config["backbone"]["checkpoint"] == str(ckpt) and config["backbone"]["kwargs"]["img_size"] == SIZE
    res = CliRunner().invoke(main, ["export", str(run), "--out", str(tmp_path / "eng"), "--parity-samples", "16"])
    assert res.exit_code == 0, res.output
    assert "predictions identical" in res.output


def test_checkpoint_of_another_architecture_names_timm_model(tmp_path):
    ckpt = tmp_path / "model_best.pth.tar"
    write_timm_checkpoint(ckpt, ema=True, ddp=True, args=True)
    with pytest.raises(BackboneError, match=f"--model {ARCH}"):
        create_backbone(ARCH, 10, checkpoint=ckpt, img_size=SIZE, **{**TINY, "depth": 3})


def _hub_cache(root: Path, repo: str, files: dict[str, bytes]) -> None:
    """A Hugging Face hub cache entry laid out as huggingface_hub writes it (refs/main -> snapshot)."""
    base = root / f"models--{repo.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text(commit)
    snap = base / "snapshots" / commit
    snap.mkdir(parents=True)
    for name, data in files.items():
        (snap / name).write_bytes(data)


def _safetensors_bytes(state: dict, tmp_path: Path) -> bytes:
    from safetensors.torch import save_file

    p = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(p))
    return p.read_bytes()


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    import huggingface_hub.constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def test_pretrained_tag_resolves_from_the_local_cache(tmp_path, hub_cache):
    from timm.models import get_pretrained_cfg

    tag = f"{ARCH}.augreg_in21k"
    repo = get_pretrained_cfg(tag).hf_hub_id
    res = CliRunner().invoke(main, ["train", "--method", "multiexit", "--backbone", tag, "--pretrained",
                                    "--img-size", str(SIZE), "--max-steps", "1", "--out", str(tmp_path / "r0"),
                                    *[f"--set=backbone.kwargs.{k}={v}" for k, v in TINY.items()]])
    assert res.exit_code == 2 and "not in the local Hugging Face cache" in res.output
    assert "--initial-checkpoint" in res.output and "Traceback" not in res.output
    weights = _timm_model(5, num_classes=21843).state_dict()
    _hub_cache(hub_cache, repo, {"model.safetensors": _safetensors_bytes(weights, tmp_path)})
    bb = create_backbone(tag, 10, pretrained=True, img_size=SIZE, **TINY)
    got = bb.state_dict()
    assert all(torch.equal(got[k], weights[k]) for k in got if not k.startswith("head."))


def test_hf_hub_name_resolves_config_and_weights_from_the_cache(tmp_path, hub_cache):
    repo = "someone/tiny-vit-finetuned"
    with pytest.raises(BackboneError, match=f"config of hf-hub:{repo}.*not in the local Hugging Face cache"):
        create_backbone(f"hf-hub:{repo}", 10)
    weights = _timm_model(6, num_classes=7).state_dict()
    cfg = {"architecture": ARCH, "num_classes": 7, "model_args": {"img_size": SIZE, **TINY},
           "pretrained_cfg": {"input_size": [3, SIZE, SIZE], "crop_pct": 0.9, "interpolation": "bicubic",
                              "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "num_classes": 7,
                              "unknown_future_key": 1}}
    _hub_cache(hub_cache, repo, {"config.json": json.dumps(cfg).encode(),
                                 "model.safetensors": _safetensors_bytes(weights, tmp_path)})
    bb = create_backbone(f"hf-hub:{repo}", 7, pretrained=True)
    assert _same(bb.state_dict(), weights)
    assert bb.pretrained_cfg["crop_pct"] == 0.9 and bb.pretrained_cfg["mean"] == [0.5, 0.5, 0.5]
    res = CliRunner().invoke(main, ["train", "--method", "multiexit", "--backbone", f"hf-hub:{repo}", "--pretrained",
                                    "--data", "digits", "--max-steps", "1", "--batch-size", "16",
                                    "--set", "method.num_exits=2", "--out", str(tmp_path / "run")])
    assert res.exit_code == 0, res.output
    pre = json.loads((tmp_path / "run" / "config.json").read_text())["preprocessing"]
    assert pre["crop_pct"] == 0.9 and pre["input_size"] == [3, SIZE, SIZE] and pre["crop_mode"] == "center"
