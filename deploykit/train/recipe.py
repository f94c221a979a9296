"""Training recipes: YAML (or a run's ``config.json``) plus CLI overrides, validated into one :class:`Recipe`.

Every key is checked against the dataclasses below, so a typo fails before any model is built, with the valid keys
listed. Method settings are checked by the method's own config class (``make_method_config``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from deploykit.errors import ConfigError

AMP_MODES = ("auto", "bf16", "fp16", "off")
RUN_ONLY_KEYS = ("labels", "preprocessing", "method_config", "versions")  # in config.json but not in a recipe


@dataclass
class BackboneSpec:
    """Which timm model to build; ``kwargs`` go to ``timm.create_model`` (``img_size``, ``depth``, ...).

    ``checkpoint_ema``: with a timm train.py checkpoint, ``null`` prefers its EMA weights when present (timm's
    default), ``true`` requires them, ``false`` loads the plain weights.
    """

    name: str = ""
    pretrained: bool = False
    checkpoint: str | None = None
    checkpoint_ema: bool | None = None
    kwargs: dict = field(default_factory=dict)


@dataclass
class DataSpec:
    """Data source spec (``digits`` or ``imagefolder:PATH``), augmentation, and an optional eval-crop override.

    ``crop_pct`` replaces the backbone's eval crop (timm's data config); 1.0 keeps the whole image, for small images
    whose content fills the frame, such as the digits.
    """

    spec: str = "digits"
    augment: bool = True
    crop_pct: float | None = None


@dataclass
class TrainSettings:
    """Schedule and loop settings. ``batch_size`` is global (split across ranks under torchrun)."""

    epochs: int = 30
    max_steps: int | None = None
    batch_size: int = 64
    lr: float = 1.0e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 2.0
    seed: int = 0
    num_workers: int = 0
    amp: str = "auto"
    label_smoothing: float = 0.0

    def validate(self) -> None:
        """Range checks the types alone can't express."""
        floats = {"lr": self.lr, "weight_decay": self.weight_decay, "warmup_epochs": self.warmup_epochs,
                  "label_smoothing": self.label_smoothing}
        for key, v in floats.items():
            if not math.isfinite(v):
                raise ConfigError(f"train.{key} must be a finite number, got {v} (a non-finite value trains to NaN)")
        checks = [
            (self.epochs >= 1, "train.epochs must be >= 1"),
            (self.max_steps is None or self.max_steps >= 1, "train.max_steps must be >= 1 or null"),
            (self.batch_size >= 1, "train.batch_size must be >= 1"),
            (self.lr > 0, "train.lr must be > 0"),
            (self.weight_decay >= 0, "train.weight_decay must be >= 0"),
            (0 <= self.warmup_epochs <= self.epochs, "train.warmup_epochs must be in [0, epochs]"),
            (self.num_workers >= 0, "train.num_workers must be >= 0"),
            (self.amp in AMP_MODES, f"train.amp must be one of {AMP_MODES}"),
            (0 <= self.label_smoothing < 1, "train.label_smoothing must be in [0, 1)"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ConfigError(f"{msg}; got {asdict(self)}")


@dataclass
class Recipe:
    """A resolved recipe: what ``config.json`` records besides labels and preprocessing."""

    name: str
    method: dict
    backbone: BackboneSpec
    data: DataSpec
    train: TrainSettings

    def to_dict(self) -> dict[str, Any]:
        """Plain nested mapping, as written to ``config.json``."""
        return asdict(self)

    def method_settings(self) -> dict[str, Any]:
        """Method settings without the name, as ``make_method_config`` takes them."""
        return {k: v for k, v in self.method.items() if k != "name"}


def _check_value(value: Any, hint: Any, where: str) -> Any:
    """Check (and gently coerce) one value against a field's type hint."""
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    if value is None:
        if type(None) in options:
            return None
        raise ConfigError(f"{where} must not be null")
    for t in options:
        if t is bool and isinstance(value, bool):
            return value
        if t is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if t is float and isinstance(value, int | float) and not isinstance(value, bool):
            try:
                return float(value)
            except OverflowError:  # an integer too large for a float
                break
        if t is float and isinstance(value, str):  # YAML 1.1 reads ``1e-3`` as a string
            try:
                return float(value)
            except ValueError:
                pass
        if t in (str, dict) and isinstance(value, t):
            return value
    names = " or ".join(getattr(t, "__name__", str(t)) for t in options)
    raise ConfigError(f"{where} must be {names}, got {value!r} ({type(value).__name__})")


# timm ViT constructor arguments that must be positive integers (or, for img_size, a pair of them)
_POSITIVE_INT_KWARGS = ("depth", "embed_dim", "num_heads", "patch_size", "in_chans", "img_size", "num_classes")


def check_backbone_kwargs(kwargs: dict[str, Any]) -> None:
    """Refuse sizes timm would fail on deep inside model building (``depth: -1``, ``embed_dim: 0``...)."""
    for key in _POSITIVE_INT_KWARGS:
        if key not in kwargs:
            continue
        v = kwargs[key]
        vals = v if key == "img_size" and isinstance(v, list | tuple) and len(v) == 2 else [v]
        if key == "num_classes" and v == 0:
            continue  # timm: 0 = no head
        if not all(isinstance(x, int) and not isinstance(x, bool) and x >= 1 for x in vals):
            raise ConfigError(f"backbone.kwargs.{key} must be a positive integer, got {v!r}")
    ratio = kwargs.get("mlp_ratio")
    if ratio is not None and (isinstance(ratio, bool) or not isinstance(ratio, int | float) or not
                              math.isfinite(ratio) or ratio <= 0):
        raise ConfigError(f"backbone.kwargs.mlp_ratio must be a finite number > 0, got {ratio!r}")


def _build(cls: type, data: Any, where: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown} in {where}; valid keys: {', '.join(names)}")
    return cls(**{k: _check_value(v, hints[k], f"{where}.{k}") for k, v in data.items()})


def recipe_from_dict(d: dict[str, Any]) -> Recipe:
    """Validate a recipe mapping (defaults filled in) and check the method settings with the method's config."""
    from deploykit.methods import make_method_config

    if not isinstance(d, dict):
        raise ConfigError(f"a recipe must be a mapping, got {type(d).__name__}")
    d = {k: v for k, v in d.items() if k not in RUN_ONLY_KEYS}
    unknown = sorted(set(d) - {"name", "method", "backbone", "data", "train"})
    if unknown:
        raise ConfigError(f"unknown recipe key(s) {unknown}; valid keys: name, method, backbone, data, train")
    method = d.get("method") or {}
    if isinstance(method, str):
        method = {"name": method}
    if not isinstance(method, dict) or not isinstance(method.get("name"), str):
        raise ConfigError(f"recipe 'method' must be a mapping with a 'name', got {method!r}")
    backbone = _build(BackboneSpec, d.get("backbone") or {}, "backbone")
    if not backbone.name:
        raise ConfigError("recipe has no backbone.name; set it in the recipe or pass --backbone (a timm ViT name)")
    check_backbone_kwargs(backbone.kwargs)
    data = _build(DataSpec, d.get("data") or {}, "data")
    train = _build(TrainSettings, d.get("train") or {}, "train")
    if train.epochs >= 1 and train.warmup_epochs > train.epochs:  # short runs (--epochs 1): warm up half the run
        train.warmup_epochs = train.epochs / 2
    train.validate()
    recipe = Recipe(
        name=str(d.get("name") or f"{method['name']}-{backbone.name}"),
        method=dict(method), backbone=backbone, data=data, train=train,
    )
    try:
        make_method_config(method["name"], **recipe.method_settings())
    except (TypeError, ValueError) as e:
        raise ConfigError(f"bad setting for method {method['name']!r}: {e}") from e
    return recipe


def _set_dotted(d: dict[str, Any], item: str) -> None:
    """Apply one ``a.b.c=value`` override; the value is parsed as YAML (``3e-4``, ``[2, 4]``, ``null``)."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set expects KEY=VALUE (e.g. train.lr=3e-4), got {item!r}")
    parts = key.strip().split(".")
    node = d
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {item!r}: {p!r} is not a section")
    try:
        node[parts[-1]] = yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {item!r}: value is not valid YAML ({e})") from e


def read_recipe_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML recipe or a run's ``config.json`` as a plain mapping."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"recipe {path} does not exist; give a YAML file such as recipes/multiexit-digits.yaml")
    try:
        text = path.read_text()
        d = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (yaml.YAMLError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"recipe {path} can't be parsed: {e}") from e
    if not isinstance(d, dict):
        raise ConfigError(f"recipe {path} must hold a mapping of sections, got {type(d).__name__}")
    return d


def load_recipe(
        path: str | Path | dict | None = None,
        overrides: dict[str, Any] | None = None,
        sets: list[str] | tuple[str, ...] | None = None,
) -> Recipe:
    """Load a recipe, apply dotted overrides (``{"train.lr": 3e-4}``; ``None`` = not given) then ``--set`` items.

    Args:
        path: YAML recipe, a run's ``config.json``, an already-read mapping, or ``None`` for defaults only.
        overrides: dotted key -> value from named CLI options; ``None`` values are skipped.
        sets: ``KEY=VALUE`` strings from ``--set``, applied last.
    """
    if path is None:
        d: dict[str, Any] = {}
    elif isinstance(path, dict):
        d = json.loads(json.dumps(path))  # deep copy, and proves it is plain data
    else:
        d = read_recipe_file(path)
    if isinstance(d.get("method"), str):
        d["method"] = {"name": d["method"]}
    items = [f"{k}={json.dumps(v)}" for k, v in (overrides or {}).items() if v is not None]
    for item in [*items, *(sets or [])]:
        _set_dotted(d, item)
    return recipe_from_dict(d)
