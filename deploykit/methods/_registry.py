"""Method registry: one decorator to register, one factory to build (after timm's ``_registry`` / ``_factory``)."""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from deploykit.errors import UnknownNameError

_METHODS: dict[str, MethodEntry] = {}


@dataclass(frozen=True)
class MethodEntry:
    """A registered method: its builder and its config dataclass (config is data, written to the manifest)."""

    name: str
    builder: Callable[..., Any]
    config_cls: type
    description: str = ""


def register_method(name: str, config_cls: type, description: str = "") -> Callable[[Callable], Callable]:
    """Register ``builder(backbone, num_classes, cfg) -> ExitModel`` under ``name``."""

    def wrap(fn: Callable) -> Callable:
        if name in _METHODS and _METHODS[name].builder is not fn:
            raise ValueError(f"method {name!r} is registered twice")
        _METHODS[name] = MethodEntry(name, fn, config_cls, description or (fn.__doc__ or "").strip().split("\n")[0])
        return fn

    return wrap


def list_methods() -> list[str]:
    """Names of every registered method, sorted."""
    return sorted(_METHODS)


def get_method(name: str) -> MethodEntry:
    """Look a method up by name, with a did-you-mean hint when it is unknown."""
    if name not in _METHODS:
        close = difflib.get_close_matches(name, list(_METHODS), n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise UnknownNameError(f"unknown method {name!r}; registered methods: {', '.join(list_methods())}.{hint}")
    return _METHODS[name]


def make_method_config(name: str, **kwargs: Any) -> Any:
    """Build a method's config dataclass; ``None`` values mean "use the default" and are dropped."""
    entry = get_method(name)
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    fields = getattr(entry.config_cls, "__dataclass_fields__", {})
    unknown = sorted(set(kwargs) - set(fields))
    if unknown:
        raise UnknownNameError(
            f"method {name!r} has no setting(s) {unknown}; its settings are: {', '.join(sorted(fields))}"
        )
    cfg = entry.config_cls(**kwargs)
    if hasattr(cfg, "validate"):
        cfg.validate()
    return cfg


def create_method(name: str, backbone: Any, num_classes: int, **kwargs: Any) -> Any:
    """Build method ``name`` on a timm ``backbone`` for ``num_classes`` classes."""
    cfg = make_method_config(name, **kwargs)
    return get_method(name).builder(backbone, num_classes, cfg)
