from pathlib import Path

import pytest
import yaml

from deploykit.errors import BackboneError, ConfigError, UnknownNameError
from deploykit.train import load_recipe, train

ROOT = Path(__file__).resolve().parents[2]


def test_repo_recipe_loads_with_defaults_filled():
    r = load_recipe(ROOT / "recipes" / "multiexit-digits.yaml")
    assert r.name == "multiexit-digits"
    assert r.method["name"] == "multiexit"
    assert r.train.max_steps is None and r.train.amp == "auto"


def test_overrides_and_set(tmp_path, tiny_recipe):
    tiny_recipe["train"]["lr"] = "1e-3"  # YAML 1.1 reads this as a string; accepted as a float
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe))
    r = load_recipe(path, overrides={"train.epochs": 5, "train.seed": None, "data.spec": "digits"},
                    sets=["train.lr=3e-4", "method.exit_blocks=[1, 2]", "backbone.kwargs.depth=3"])
    assert r.train.epochs == 5 and r.train.seed == 0
    assert r.train.lr == pytest.approx(3e-4)
    assert r.method["exit_blocks"] == [1, 2]
    assert r.backbone.kwargs["depth"] == 3


@pytest.mark.parametrize("sets, match", [
    (["train.epoch=3"], "unknown key"),
    (["bogus=1"], "unknown recipe key"),
    (["train.epochs=ten"], "train.epochs must be int"),
    (["train.amp=fp8"], "train.amp must be one of"),
    (["train.lr=-1"], "train.lr must be > 0"),
    (["backbone.kwargs=3"], "backbone.kwargs must be dict"),
    (["train.lr"], "KEY=VALUE"),
    (["train.epochs.x=1"], "not a section"),
    (["method.num_exits=four"], "method"),
])
def test_bad_input_is_a_config_error(tiny_recipe, sets, match):
    with pytest.raises(ConfigError, match=match):
        load_recipe(tiny_recipe, sets=sets)


def test_unknown_method_suggests_names(tiny_recipe):
    with pytest.raises(UnknownNameError, match="Did you mean multiexit"):
        load_recipe(tiny_recipe, overrides={"method.name": "multiexi"})


def test_unknown_method_setting(tiny_recipe):
    with pytest.raises(UnknownNameError, match="no setting"):
        load_recipe(tiny_recipe, sets=["method.exits=3"])


def test_missing_recipe_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_recipe(tmp_path / "nope.yaml")


def test_unknown_backbone(tiny_recipe, tmp_path):
    with pytest.raises(UnknownNameError, match="unknown backbone"):
        train(tiny_recipe, out=tmp_path / "r", overrides={"backbone.name": "vit_tinyy_patch16_224"})
    assert not (tmp_path / "r").exists()


def test_non_vit_backbone(tiny_recipe, tmp_path):
    tiny_recipe["backbone"] = {"name": "resnet18"}
    with pytest.raises(BackboneError, match="not ViT-family"):
        train(tiny_recipe, out=tmp_path / "r")


@pytest.mark.parametrize("sets", [["method.num_exits=4"], ["method.exit_blocks=[1, 5]"]])
def test_exits_past_depth(tiny_recipe, tmp_path, sets):
    with pytest.raises(BackboneError, match="depth|blocks"):
        train(tiny_recipe, out=tmp_path / "r", sets=sets)


def test_warmup_is_clipped_to_short_runs(tiny_recipe):
    from deploykit.train.recipe import load_recipe

    tiny_recipe["train"]["warmup_epochs"] = 2
    assert load_recipe(tiny_recipe, overrides={"train.epochs": 1}).train.warmup_epochs == 0.5
    assert load_recipe(tiny_recipe, overrides={"train.epochs": 3}).train.warmup_epochs == 2
