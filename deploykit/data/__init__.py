"""Data sources and preprocessing.

Imports are lazy: ``preprocess`` needs only Pillow and numpy, so a server that only preprocesses images never loads
torch (which the datasets need).
"""

from __future__ import annotations

from typing import Any

_LAZY = {
    "create_dataset": "deploykit.data.datasets", "data_info": "deploykit.data.datasets",
    "stack_split": "deploykit.data.datasets", "write_samples": "deploykit.data.datasets",
    "check_labels": "deploykit.data.datasets",
    "is_unlabelled": "deploykit.data.datasets",
    "load_image": "deploykit.data.preprocess", "preprocess_image": "deploykit.data.preprocess",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'deploykit.data' has no attribute {name!r}")


__all__ = sorted(_LAZY)
