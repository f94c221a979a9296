"""The family registry: every method and manifest task belongs to exactly one family, found without heavy imports."""

from __future__ import annotations

import json

import pytest

from deploykit.errors import ManifestError, UnknownNameError
from deploykit.families import (
    family_for_method,
    family_for_recipe,
    family_for_run,
    family_for_task,
    get_family,
    list_families,
)
from deploykit.families.base import Family


def test_every_registered_method_has_exactly_one_family():
    from deploykit.methods import list_methods

    owners = {m: [f for f in list_families() if m in get_family(f).methods] for m in list_methods()}
    assert all(len(v) == 1 for v in owners.values()), owners
    assert owners["mue"] == ["vl-generation"] and owners["dmpo"] == ["classification"]
    assert sorted(m for f in list_families() for m in get_family(f).methods) == list_methods()


@pytest.mark.parametrize("task, family", [("classification", "classification"), ("vl", "vl-generation"),
                                          ("vl-entailment", "vl-generation"), ("vl-caption", "vl-generation")])
def test_family_for_task(task, family):
    assert family_for_task(task).name == family


def test_unknown_names_are_clear_errors(tmp_path):
    with pytest.raises(UnknownNameError, match="method 'nope'.*known: dmpo"):
        family_for_method("nope")
    with pytest.raises(UnknownNameError, match="task 'vl-vqa'"):
        family_for_task("vl-vqa")
    with pytest.raises(ManifestError, match="config.json is missing"):
        family_for_run(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ManifestError, match="not valid JSON"):
        family_for_run(tmp_path)


def test_family_for_recipe_follows_the_method_override(tmp_path):
    assert family_for_recipe("recipes/mue-synthetic.yaml").name == "vl-generation"
    assert family_for_recipe("recipes/dmpo-digits.yaml").name == "classification"
    assert family_for_recipe("recipes/dmpo-digits.yaml", {"method.name": "mue"}).name == "vl-generation"
    assert family_for_recipe({"method": "pyra"}).name == "classification"
    assert family_for_recipe(None).name == "classification"  # its recipe checks say what is missing
    (tmp_path / "config.json").write_text(json.dumps({"method": {"name": "mue"}}))
    assert family_for_recipe(None, resume=tmp_path).name == "vl-generation"


def test_registering_a_clashing_family_is_refused():
    from deploykit.families import register_family

    class Clash(Family):
        name = "clash"
        methods = ("mue",)

    with pytest.raises(ValueError, match="both claim"):
        register_family(Clash)
    assert "clash" not in list_families()
