"""The one table that says which methods and manifest tasks belong to which model family, and how it is run.

Config as data (after timm's pretrained cfgs): every layer that must tell a classification cascade from a MuE
generation engine asks this table instead of comparing method or task strings itself. The family registry
(:mod:`deploykit.families`) builds its families from it; the runtime, the manifest checks and the servers, which
must not import the families (they pull in training code), ask :func:`engine_kind`. Adding a family means adding a
row here and a ``Family`` class that names it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from deploykit.errors import UnknownNameError

CASCADE = "cascade"  # stage graphs chained by runtime.Cascade, one threshold per stage
GENERATION = "generation"  # per-layer graphs driven by runtime.generation.MuEEngine (streams + decoder steps)


@dataclass(frozen=True)
class FamilyKind:
    """One family: the methods that train it, the manifest tasks its engines carry, how its engines run."""

    methods: tuple[str, ...]
    tasks: tuple[str, ...]
    engine: str


FAMILIES: dict[str, FamilyKind] = {
    "classification": FamilyKind(methods=("multiexit", "dmpo", "tome", "pyra"), tasks=("classification",),
                                 engine=CASCADE),
    "vl-generation": FamilyKind(methods=("mue",), tasks=("vl", "vl-entailment", "vl-caption"), engine=GENERATION),
}


def family_of_task(task: str) -> str:
    """The family name whose engines carry manifest task ``task``."""
    for name, kind in FAMILIES.items():
        if task in kind.tasks:
            return name
    every = sorted(t for k in FAMILIES.values() for t in k.tasks)
    raise UnknownNameError(f"no model family handles manifest task {task!r}; known: {', '.join(every)}")


def engine_kind(manifest: Any) -> str:
    """:data:`CASCADE` or :data:`GENERATION` for a manifest (anything with a ``task``)."""
    return FAMILIES[family_of_task(str(getattr(manifest, "task", "classification")))].engine


def is_cascade(manifest: Any) -> bool:
    """Whether the manifest's engine is a chain of stage graphs (one threshold per stage)."""
    return engine_kind(manifest) == CASCADE
