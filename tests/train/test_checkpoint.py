import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from deploykit.errors import CheckpointError, ConfigError
from deploykit.train import load_run, train


def test_run_dir_is_complete(tiny_run):
    config = json.loads((tiny_run / "config.json").read_text())
    assert config["labels"] == [str(i) for i in range(10)]
    assert config["preprocessing"]["input_size"] == [3, 16, 16]
    assert config["method_config"]["exit_blocks"] == [1, 2]
    assert config["train"]["max_steps"] == 3
    rows = [json.loads(ln) for ln in (tiny_run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["step"] == 3 and rows[0]["partial"]
    assert len(rows[0]["val_acc"]) == 2 and {"epoch", "lr", "train_loss", "time"} <= set(rows[0])
    state = torch.load(tiny_run / "train_state.pt", weights_only=True)
    assert state["step"] == 3 and {"optimizer", "scheduler", "rng"} <= set(state)


def test_load_run_round_trip(tiny_run):
    model, config = load_run(tiny_run)
    assert not model.training
    saved = load_file(str(tiny_run / "model.safetensors"))
    assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())
    logits = model(torch.zeros(2, 3, 16, 16))
    assert [tuple(lg.shape) for lg in logits] == [(2, 10), (2, 10)]


def test_missing_dir(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_run(tmp_path / "nope")


def test_corrupt_weights(run_copy):
    (run_copy / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_run(run_copy)


def test_missing_weights(run_copy):
    (run_copy / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="has no model.safetensors"):
        load_run(run_copy)


def test_invalid_config_json(run_copy):
    (run_copy / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_run(run_copy)


def test_keys_that_dont_match(run_copy):
    state = load_file(str(run_copy / "model.safetensors"))
    state.pop("exit_heads.0.fc.weight")
    state["extra.weight"] = torch.zeros(1)
    save_file(state, str(run_copy / "model.safetensors"))
    with pytest.raises(CheckpointError, match="does not match"):
        load_run(run_copy)


def test_config_of_another_model(run_copy):
    config = json.loads((run_copy / "config.json").read_text())
    config["backbone"]["kwargs"]["embed_dim"] = 64
    (run_copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="shapes"):
        load_run(run_copy)


def test_resume_refuses_another_recipe(run_copy, tiny_recipe):
    with pytest.raises(ConfigError, match="train.lr"):
        train(tiny_recipe, resume=run_copy, overrides={"train.lr": 0.01})


def test_resume_needs_a_train_state(run_copy):
    (run_copy / "train_state.pt").unlink()
    with pytest.raises(CheckpointError, match="no train_state.pt"):
        train(resume=run_copy)
