"""What a model family provides: one method per command, each taking the loaded manifest (or recipe / run dir).

The CLI resolves the family once (``deploykit.families.family_for_*``) and calls these; library code below (train,
export, tune, graphs, runtime) never asks which family it is in. An option a family can't honour raises
:class:`ConfigError` naming the option (:func:`refuse`), never silently does something else.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from deploykit.errors import ConfigError

if TYPE_CHECKING:
    from deploykit.manifest import Manifest


@dataclass
class Outcome:
    """A command's result (``data``, for library callers) and the text the CLI prints for it."""

    data: Any
    text: str


def check_risk_flags(confidence: float | None, loss: str | None, bound: str | None) -> None:
    """``--loss`` / ``--bound`` choose how risk control works, so they mean nothing without ``--confidence``."""
    if confidence is None and (loss or bound):
        raise ConfigError(f"--{'loss' if loss else 'bound'} applies only with --confidence (risk control)")


def refuse(flag: str, family: str, why: str) -> ConfigError:
    """The error for an option this family does not support (raise it)."""
    return ConfigError(f"{flag} does not apply to {family} engines / runs: {why}")


class Family:
    """Base class: the graph tools (``lint``, ``build``) work on any engine through ``manifest_sections``."""

    name: str = ""
    description: str = ""
    methods: tuple[str, ...] = ()
    tasks: tuple[str, ...] = ()
    backends: tuple[str, ...] = ("ort-cpu", "openvino", "ort-cuda", "ort-trt", "trt")
    default_opset: int = 18

    # ---- runs ---------------------------------------------------------------------------------------------------
    def train(self, recipe: Any, *, out: str | os.PathLike | None = None, resume: str | os.PathLike | None = None,
              overrides: dict[str, Any] | None = None, sets: tuple[str, ...] | list[str] | None = None) -> Path:
        raise NotImplementedError

    def export(self, run_dir: str | os.PathLike, out_dir: str | os.PathLike, *, score: str | None = None,
               check: bool = True, parity_samples: int = 256, opset: int | None = None, overwrite: bool = False,
               check_trt: bool = False) -> Outcome:
        raise NotImplementedError

    # ---- engines --------------------------------------------------------------------------------------------------
    def check_backend(self, backend: str) -> None:
        if backend not in self.backends:
            raise refuse(f"--backend {backend}", self.name, f"these engines run on {', '.join(self.backends)}")

    def open_engine(self, manifest: Manifest, *, backend: str = "ort-cpu", threads: int | None = None) -> Any:
        """The runtime object that runs this engine (a ``Cascade`` or a ``MuEEngine``): what serving uses."""
        raise NotImplementedError

    def calibrate(self, manifest: Manifest, *, data: str | None = None, max_drop: float | None = None,
                  flops_budget: float | None = None, json_out: str | os.PathLike | None = None,
                  backend: str = "ort-cpu", confidence: float | None = None, loss: str | None = None,
                  bound: str | None = None) -> Outcome:
        """Thresholds for a target; with ``confidence`` (1 - δ) chosen by distribution-free risk control."""
        raise NotImplementedError

    def bench(self, manifest: Manifest, **options: Any) -> Outcome:
        raise NotImplementedError

    def predict(self, manifest: Manifest, images: list[str], *, backend: str = "ort-cpu",
                thresholds: list[float | None] | None = None, texts: list[str] | None = None,
                task: str | None = None) -> list[dict[str, Any]]:
        raise NotImplementedError

    def quantize(self, manifest: Manifest, out: str | os.PathLike, *, mode: str = "dynamic",
                 calib_data: str | None = None, calib_samples: int | None = None, overwrite: bool = False) -> Outcome:
        raise NotImplementedError

    # ---- graph tools (any family: they see graphs through manifest_sections.graph_entries) ------------------------
    def lint(self, manifest: Manifest, *, target: str) -> Any:
        from deploykit.graphs.trt_lint import lint_engine_dir

        return lint_engine_dir(manifest.root, target=target)

    def build(self, manifest: Manifest, *, precision: str = "fp32", max_batch: int = 32, opt_batch: int | None = None,
              workspace_mb: int | None = None) -> Outcome:
        from deploykit.graphs.trt_build import build_engines

        r = build_engines(manifest.root, precision=precision, max_batch=max_batch, opt_batch=opt_batch,
                          workspace_mb=workspace_mb)
        return Outcome(r, f"built {precision} engines with TensorRT {r['version']} on {r['gpu']} "
                          f"(batch 1..{r['max_batch']}, opt {r['opt_batch']}) in {r['build_seconds']} s")

    def info(self, manifest: Manifest) -> str:
        m = manifest
        return f"{m.name}: {m.method.get('name')} on {m.backbone.get('name')}, {m.num_classes} classes, task {m.task}"
