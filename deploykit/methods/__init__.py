"""Methods that make a ViT cheap to run; importing this package registers them all."""

from deploykit.methods import dmpo, mue, multiexit, pyra  # noqa: F401  (registers; pyra.py registers tome and pyra)
from deploykit.methods._registry import create_method, get_method, list_methods, make_method_config, register_method
from deploykit.methods.backbone import create_backbone
from deploykit.methods.base import ExitConfig, ExitModel

__all__ = [
    "ExitConfig", "ExitModel", "create_backbone", "create_method", "get_method", "list_methods",
    "make_method_config", "register_method",
]
