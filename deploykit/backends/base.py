"""The runner interface every backend implements (after Polygraphy: lazy load, run, close).

The cascade only ever sees this interface, so it never imports onnxruntime or tensorrt itself.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import numpy as np

from deploykit.errors import BackendError, DataError


class Runner(ABC):
    """Runs one graph: named arrays in, named arrays out.

    ``load()`` is idempotent and is called on first ``run`` if the caller didn't; ``close()`` frees the session or
    engine. Runners are context managers.
    """

    name: str = "runner"

    def __init__(self) -> None:
        self._loaded = False
        self._inputs: list[str] = []
        self._outputs: list[str] = []

    # ---- lifecycle ----------------------------------------------------------------------------------------
    def load(self) -> Runner:
        if not self._loaded:
            self.load_impl()
            self._loaded = True
        return self

    def close(self) -> None:
        if self._loaded:
            self.close_impl()
            self._loaded = False

    def __enter__(self) -> Runner:
        return self.load()

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ---- inference ----------------------------------------------------------------------------------------
    def run(self, feeds: dict[str, Any], outputs: list[str] | None = None) -> dict[str, Any]:
        """Run the graph on ``feeds``; returns the requested outputs (all when ``outputs`` is None)."""
        self.load()
        missing = [n for n in self.input_names if n not in feeds]
        if missing:
            raise DataError(f"{self.name}: missing input(s) {missing}; the graph takes {self.input_names}")
        return self.run_impl(feeds, outputs)

    # ---- to implement -------------------------------------------------------------------------------------
    @property
    def input_names(self) -> list[str]:
        """Graph input names, in order (``load_impl`` fills ``self._inputs``)."""
        self.load()
        return self._inputs

    @property
    def output_names(self) -> list[str]:
        """Graph output names (``load_impl`` fills ``self._outputs``)."""
        self.load()
        return self._outputs

    @abstractmethod
    def load_impl(self) -> None: ...

    @abstractmethod
    def run_impl(self, feeds: dict[str, Any], outputs: list[str] | None) -> dict[str, Any]: ...

    def close_impl(self) -> None:  # noqa: B027  (optional hook)
        """Free resources; default does nothing."""

    def sync(self) -> None:  # noqa: B027  (optional hook)
        """Wait until work this runner queued has finished (timers stop after this); CPU runners return at once."""

    # ---- device-agnostic array helpers the cascade uses (overridden by GPU runners) ------------------------
    def to_host(self, x: Any) -> np.ndarray:
        """Bring an output to host memory (a no-op for CPU runners)."""
        return np.asarray(x)

    def take(self, x: Any, index: np.ndarray) -> Any:
        """Rows ``index`` of ``x``, kept on the runner's device (batch compaction)."""
        return x[index]


def require(module: str, extra: str) -> Any:
    """Import an optional backend module, or say exactly what to install."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise BackendError(
            f"this backend needs the Python package {module!r}, which is not installed here ({e}); "
            f"install it with `pip install 'deploykit[{extra}]'`"
        ) from e
