"""Family registry: one decorator to register, one factory per kind of input (after timm's ``_registry``).

A *family* is a kind of model with its own pipeline: the classification cascade (multiexit, dmpo, tome, pyra) and
VL generation (mue). Every command asks this registry once which family it is dealing with, from a recipe's method,
a run directory's config or a manifest's task, and then calls the family; no other module tests method or task
names. Looking a family up imports nothing heavy: the families import torch, methods or ONNX Runtime inside the
commands that need them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from deploykit.errors import ConfigError, ManifestError, UnknownNameError

if TYPE_CHECKING:
    from deploykit.families.base import Family
    from deploykit.manifest import Manifest

_FAMILIES: dict[str, Family] = {}


def register_family(cls: type[Family]) -> type[Family]:
    """Class decorator: register one instance of a family under ``cls.name``; names, methods and tasks are unique."""
    fam = cls()
    for other in _FAMILIES.values():
        if type(other) is cls:
            continue
        clash = ({other.name} & {fam.name}) | (set(other.methods) & set(fam.methods)) \
            | (set(other.tasks) & set(fam.tasks))
        if clash:
            raise ValueError(f"families {other.name!r} and {fam.name!r} both claim {sorted(clash)}")
    _FAMILIES[fam.name] = fam
    return cls


def list_families() -> list[str]:
    return sorted(_FAMILIES)


def get_family(name: str) -> Family:
    if name not in _FAMILIES:
        raise UnknownNameError(f"unknown model family {name!r}; registered: {', '.join(list_families())}")
    return _FAMILIES[name]


def _find(pred: Callable[[Family], bool], what: str, known: Callable[[Family], tuple[str, ...]]) -> Family:
    for fam in _FAMILIES.values():
        if pred(fam):
            return fam
    every = sorted(v for f in _FAMILIES.values() for v in known(f))
    raise UnknownNameError(f"no model family handles {what}; known: {', '.join(every)}")


def family_for_method(name: str) -> Family:
    """The family that trains and exports method ``name`` (e.g. ``dmpo`` -> classification, ``mue`` -> VL)."""
    return _find(lambda f: name in f.methods, f"method {name!r}", lambda f: f.methods)


def family_for_task(task: str) -> Family:
    """The family that runs engines whose manifest says ``task``."""
    return _find(lambda f: task in f.tasks, f"manifest task {task!r}", lambda f: f.tasks)


def family_for_manifest(manifest: Manifest) -> Family:
    return family_for_task(manifest.task)


def method_of_recipe(recipe: Any, overrides: dict[str, Any] | None = None) -> str:
    """The method a recipe (path, mapping or ``Recipe``) names, after a ``--method`` override."""
    if overrides and overrides.get("method.name"):
        return str(overrides["method.name"])
    if isinstance(recipe, str | os.PathLike):
        from deploykit.train.recipe import read_recipe_file

        recipe = read_recipe_file(recipe)
    if hasattr(recipe, "method"):  # a Recipe dataclass
        recipe = recipe.to_dict()
    method = recipe.get("method") if isinstance(recipe, dict) else None
    name = method.get("name") if isinstance(method, dict) else method
    if not name:
        raise ConfigError("the recipe names no method (method.name); give one in the recipe or with --method")
    return str(name)


def family_for_recipe(recipe: Any, overrides: dict[str, Any] | None = None, resume: Any = None) -> Family:
    """The family that trains ``recipe`` (or, with no recipe, the run being resumed).

    A recipe that names no method goes to the classification trainer, whose recipe checks say what is missing.
    """
    if recipe is None and not (overrides or {}).get("method.name") and resume is not None:
        return family_for_run(resume)
    try:
        return family_for_method(method_of_recipe(recipe, overrides))
    except ConfigError:
        return get_family(DEFAULT_FAMILY)


def family_for_run(run_dir: str | os.PathLike) -> Family:
    """The family of a training run directory, from its ``config.json``."""
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise ManifestError(f"{path} is missing; point at a run directory written by `deploykit train`")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ManifestError(f"{path} is not valid JSON ({e}); re-run `deploykit train`") from e
    if not isinstance(config, dict) or not isinstance(config.get("method"), dict | str):
        raise ManifestError(f"{path} names no method; it is not a run directory written by `deploykit train`")
    return family_for_method(method_of_recipe(config))


DEFAULT_FAMILY = "classification"
