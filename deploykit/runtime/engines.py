"""Open the runtime object of an already-loaded manifest (so a command loads ``deploykit.json`` once)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from deploykit.backends import create_runner

if TYPE_CHECKING:
    from deploykit.manifest import Manifest
    from deploykit.runtime.cascade import Cascade
    from deploykit.runtime.generation import MuEEngine


def open_cascade(manifest: Manifest, backend: str = "ort-cpu", threads: int | None = None,
                 **runner_kwargs: Any) -> Cascade:
    """One runner per stage of ``manifest``; checks the files and that the graphs match the manifest."""
    from deploykit.runtime.cascade import Cascade

    manifest.check_files()
    kwargs = dict(runner_kwargs)
    if threads is not None:
        kwargs["threads"] = threads
    cascade = Cascade(manifest, [create_runner(manifest.path_of(s.file), backend, **kwargs) for s in manifest.stages])
    cascade.check_graphs()
    return cascade


def open_generation(manifest: Manifest, threads: int | None = None) -> MuEEngine:
    """MuE's generation engine on ONNX Runtime (CPU) for ``manifest``."""
    from deploykit.runtime.generation import MuEEngine

    return MuEEngine(manifest, threads)
