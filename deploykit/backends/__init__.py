"""Backends: one runner class per engine kind, all with the same load / run / close interface."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from deploykit.backends.base import Runner
from deploykit.errors import UnknownNameError

BACKENDS = ("ort-cpu", "ort-cuda", "ort-trt", "trt")


def create_runner(path: str | Path, backend: str = "ort-cpu", **kwargs: Any) -> Runner:
    """A runner for one graph file on the named backend."""
    if backend in ("ort-cpu", "ort-cuda", "ort-trt"):
        from deploykit.backends.ort import ORT_PROVIDERS, OrtRunner

        return OrtRunner(path, providers=kwargs.pop("providers", None) or ORT_PROVIDERS[backend], **kwargs)
    if backend == "trt":
        from deploykit.backends.trt import TrtRunner  # type: ignore[import-not-found]

        return TrtRunner(path, **kwargs)
    raise UnknownNameError(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")


__all__ = ["BACKENDS", "Runner", "create_runner"]
