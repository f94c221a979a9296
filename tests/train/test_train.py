import json
import os
import subprocess
import sys
from pathlib import Path

import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import load_file

from deploykit.cli import main
from deploykit.train import load_run, train


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "model.safetensors"))


def test_cli_tiny_run(tmp_path, tiny_recipe):
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe))
    out = tmp_path / "run"
    res = CliRunner().invoke(main, ["train", "-r", str(recipe), "--max-steps", "2", "--lr", "2e-3", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert res.output.strip().splitlines()[-1] == str(out)
    assert json.loads((out / "config.json").read_text())["train"]["lr"] == 2e-3
    load_run(out)


def test_cli_error_is_one_line(tmp_path, tiny_recipe):
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe))
    res = CliRunner().invoke(main, ["train", "-r", str(recipe), "--backbone", "resnet18", "--set", "backbone.kwargs={}",
                                  "--out", str(tmp_path / "r")])
    assert res.exit_code == 2
    assert "not ViT-family" in res.output and "Traceback" not in res.output


def test_resume_gives_the_same_weights(tmp_path, tiny_recipe):
    # 20 steps cross the epoch boundary at 17; the interrupted run stops mid-epoch at 3
    straight = train(tiny_recipe, out=tmp_path / "a", overrides={"train.max_steps": 20})
    part = train(tiny_recipe, out=tmp_path / "b", overrides={"train.max_steps": 3})
    resumed = train(resume=part, overrides={"train.max_steps": 20})
    a, b = _weights(straight), _weights(resumed)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    steps = [json.loads(ln)["step"] for ln in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert steps == [3, 17, 20]


def test_out_with_train_state_resumes(tmp_path, tiny_recipe):
    out = train(tiny_recipe, out=tmp_path / "r", overrides={"train.max_steps": 2})
    train(tiny_recipe, out=out, overrides={"train.max_steps": 4})
    assert torch.load(out / "train_state.pt", weights_only=True)["step"] == 4


def test_torchrun_two_processes(tmp_path, tiny_recipe):
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe))
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "deploykit", "train", "-r", str(recipe), "--max-steps", "4", "--out", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = torch.load(out / "train_state.pt", weights_only=True)
    assert state["step"] == 4 and state["world_size"] == 2 and len(state["rng"]) == 2
    rows = (out / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 1  # only rank 0 writes
    model, _ = load_run(out)
    assert len(model(torch.zeros(1, 3, 16, 16))) == 2
