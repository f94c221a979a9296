"""Bad recipes and damaged run directories: one-line errors from the CLI, never a traceback or a NaN run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

from deploykit.cli import main


def _cli(*args: str) -> tuple[int, str]:
    r = CliRunner().invoke(main, list(args))
    assert r.exception is None or isinstance(r.exception, SystemExit), r.exc_info
    return r.exit_code, r.output


def _one_line_error(code: int, out: str, expect: str) -> None:
    assert code == 2 and "Traceback" not in out, out
    lines = [ln for ln in out.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and expect in lines[0], out


@pytest.mark.parametrize("edit, expect", [
    (lambda r: r["train"].update(lr=float("inf")), "train.lr must be a finite number"),
    (lambda r: r["train"].update(lr=float("nan")), "train.lr must be a finite number"),
    (lambda r: r["train"].update(weight_decay=float("inf")), "finite"),
    (lambda r: r["train"].update(epochs=0), "epochs must be >= 1"),
    (lambda r: r["train"].update(lr=10**400), "train.lr must be float"),
    (lambda r: r["backbone"]["kwargs"].update(depth=-1), "backbone.kwargs.depth must be a positive integer"),
    (lambda r: r["backbone"]["kwargs"].update(embed_dim=0), "embed_dim"),
    (lambda r: r["backbone"]["kwargs"].update(num_heads=True), "num_heads"),
    (lambda r: r["backbone"]["kwargs"].update(img_size=[16, -16]), "img_size"),
    (lambda r: r["backbone"]["kwargs"].update(mlp_ratio=float("nan")), "mlp_ratio"),
])
def test_bad_recipe_values_are_refused_before_training(tiny_recipe, tmp_path, edit, expect):
    edit(tiny_recipe)
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe))
    _one_line_error(*_cli("train", "--recipe", str(path), "-o", str(tmp_path / "run")), expect)
    assert not (tmp_path / "run" / "model.safetensors").exists()


def test_yaml_dot_inf_lr_is_refused(tiny_recipe, tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe).replace("lr: 0.001", "lr: .inf"))
    assert "lr: .inf" in path.read_text()
    _one_line_error(*_cli("train", "--recipe", str(path), "-o", str(tmp_path / "run")), "finite")


def _truncate(p: Path) -> None:
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


@pytest.mark.parametrize("damage, expect", [
    (lambda run: _truncate(run / "model.safetensors"), "corrupt or truncated"),
    (lambda run: (run / "model.safetensors").unlink(), "has no model.safetensors"),
    (lambda run: torch.save({"step": 3, "epoch": 0}, run / "train_state.pt"), "lacks ['optimizer'"),
    (lambda run: torch.save([1, 2], run / "train_state.pt"), "lacks"),
    (lambda run: _truncate(run / "train_state.pt"), "can't read"),
])
def test_resume_from_a_damaged_run_is_a_one_line_error(run_copy, damage, expect):
    damage(run_copy)
    _one_line_error(*_cli("train", "--resume", str(run_copy), "--max-steps", "4"), expect)


def test_resume_survives_a_corrupt_metrics_log(run_copy):
    metrics = run_copy / "metrics.jsonl"
    metrics.write_text(metrics.read_text() + '{"step": 2, "trunc\n\x00\x01garbage\n')
    code, out = _cli("train", "--resume", str(run_copy), "--max-steps", "4")
    assert code == 0 and "Traceback" not in out, out
    rows = [json.loads(ln) for ln in metrics.read_text().splitlines()]
    assert rows[-1]["step"] == 4


@pytest.mark.parametrize("labels", [5, [], "abc", None])
def test_export_with_malformed_labels_is_a_one_line_error(run_copy, tmp_path, labels):
    cfg = json.loads((run_copy / "config.json").read_text())
    cfg["labels"] = labels
    (run_copy / "config.json").write_text(json.dumps(cfg))
    _one_line_error(*_cli("export", str(run_copy), "-o", str(tmp_path / "engine")), "labels")
