"""Model families: the one place that decides how each command works for a kind of model.

``family_for_recipe`` / ``family_for_run`` / ``family_for_method`` (training, export) and ``family_for_manifest``
(every command on an engine directory) return a :class:`~deploykit.families.base.Family`; see
docs/dev/contracts.md. Importing this package is cheap: families import torch, methods or ONNX Runtime only inside
the commands that need them.
"""

from deploykit.families import classification, vl_generation  # noqa: F401  (registers the families)
from deploykit.families._registry import (
    family_for_manifest,
    family_for_method,
    family_for_recipe,
    family_for_run,
    family_for_task,
    get_family,
    list_families,
    register_family,
)
from deploykit.families.base import Family, Outcome

__all__ = ["Family", "Outcome", "family_for_manifest", "family_for_method", "family_for_recipe", "family_for_run",
           "family_for_task", "get_family", "list_families", "register_family"]
