"""The classification cascade family: timm ViTs cut into stages with exit heads (multiexit, dmpo, tome, pyra)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from deploykit.families._registry import register_family
from deploykit.families.base import Family, Outcome, check_risk_flags, refuse
from deploykit.kinds import FAMILIES

if TYPE_CHECKING:
    from deploykit.manifest import Manifest


@register_family
class ClassificationFamily(Family):
    """Stage graphs run as a cascade (runtime.Cascade); thresholds per stage; FLOPs as the cost."""

    name = "classification"
    description = "multi-exit / token-merging ViT classifiers run as a cascade of stage graphs"
    methods = FAMILIES["classification"].methods
    tasks = FAMILIES["classification"].tasks

    def train(self, recipe: Any, *, out: str | os.PathLike | None = None, resume: str | os.PathLike | None = None,
              overrides: dict[str, Any] | None = None, sets: tuple[str, ...] | list[str] | None = None) -> Path:
        from deploykit.train import train as run_training

        return run_training(recipe, out=out, resume=resume, overrides=overrides, sets=sets)

    def export(self, run_dir: str | os.PathLike, out_dir: str | os.PathLike, *, score: str | None = None,
               check: bool = True, parity_samples: int = 256, opset: int | None = None, overwrite: bool = False,
               check_trt: bool = False) -> Outcome:
        from deploykit.export import export_run

        m = export_run(run_dir, out_dir, score=score, check=check, parity_samples=parity_samples,
                       opset=opset or self.default_opset, overwrite=overwrite, check_trt=check_trt)
        parity = m.provenance.get("parity")
        return Outcome(m, f"wrote {m.num_stages} stage graphs + full.onnx to {out_dir}"
                          + (f"; parity on {parity['samples']} test images: predictions identical" if parity else ""))

    def open_engine(self, manifest: Manifest, *, backend: str = "ort-cpu", threads: int | None = None,
                    **runner_kwargs: Any) -> Any:
        from deploykit.runtime.engines import open_cascade

        self.check_backend(backend)
        return open_cascade(manifest, backend=backend, threads=threads, **runner_kwargs)

    def calibrate(self, manifest: Manifest, *, data: str | None = None, max_drop: float | None = None,
                  flops_budget: float | None = None, json_out: str | os.PathLike | None = None,
                  backend: str = "ort-cpu", confidence: float | None = None, loss: str | None = None,
                  bound: str | None = None) -> Outcome:
        from deploykit.tune.calibrate import calibrate

        check_risk_flags(confidence, loss, bound)
        self.check_backend(backend)
        r = calibrate(manifest, data=data or "digits", max_drop=max_drop, flops_budget=flops_budget,
                      json_out=json_out, backend=backend, confidence=confidence, loss=loss or "consistency",
                      bound=bound or "binomial")
        if "guarantee" in r:
            from deploykit.tune.guarantee import describe

            text, warning = describe(r)
            if warning:
                r.setdefault("warnings", []).append(warning)
            return Outcome(r, text)
        t = r["test"]
        return Outcome(r, f"thresholds {['-' if v is None else round(v, 4) for v in r['thresholds']]}; test: full "
                          f"{100 * t['full_accuracy']:.2f}%, cascade {100 * t['cascade_accuracy']:.2f}% at "
                          f"{100 * t['flops_ratio']:.1f}% of full FLOPs, exits "
                          f"{[round(f, 3) for f in t['exit_fractions']]}")

    def bench(self, manifest: Manifest, **options: Any) -> Outcome:

        from deploykit.tune.bench import bench

        self.check_backend(options.get("backend", "ort-cpu"))
        if options.get("checkpoint") and options.get("torch_model") is None:
            options["torch_model"] = _eager_model(options["checkpoint"], options.get("threads"))
        from deploykit.tune.report import bench_summary

        r = bench(manifest, **options)
        return Outcome(r, bench_summary(r, options.get("json_out")))

    def predict(self, manifest: Manifest, images: list[str], *, backend: str = "ort-cpu",
                thresholds: list[float | None] | None = None, texts: list[str] | None = None,
                task: str | None = None) -> Iterator[dict[str, Any]]:
        from deploykit.tune.predict import iter_predict

        if texts:
            raise refuse("--text", self.name, "it gives a hypothesis to vision-language (MuE) engines")
        if task:
            raise refuse("--task", self.name, "it picks what a vision-language (MuE) engine generates")
        self.check_backend(backend)
        return iter_predict(manifest, images, backend=backend, thresholds=thresholds)

    def quantize(self, manifest: Manifest, out: str | os.PathLike, *, mode: str = "dynamic",
                 calib_data: str | None = None, calib_samples: int | None = None, overwrite: bool = False) -> Outcome:
        from deploykit.graphs.quantize import quantize

        m = quantize(manifest, out, mode=mode, calib_data=calib_data,
                     calib_samples=256 if calib_samples is None else calib_samples, overwrite=overwrite)
        n = sum(len(g["quantized_nodes"]) for g in m.extra["quantization"]["graphs"].values())
        return Outcome(m, f"wrote {m.num_stages} {m.stages[0].precision} stage graphs + full.onnx to {out} ({n} nodes "
                          f"INT8, exit heads FP32); thresholds are stale: run `deploykit calibrate {out}"
                          + (" --backend openvino`" if mode == "openvino" else "`"))

    def info(self, manifest: Manifest) -> str:
        m = manifest
        lines = [super().info(m)]
        for s, t in zip(m.stages, m.thresholds()):
            lines.append(f"  stage {s.index}: {s.file} blocks {s.blocks[:1]}..{s.blocks[-1:]} {s.flops / 1e6:.1f} "
                         f"MFLOPs + head {s.exit_flops / 1e6:.2f} MFLOPs, threshold {t}")
        t = (m.calibration or {}).get("test") or {}
        if all(k in t for k in ("cascade_accuracy", "flops_ratio", "full_accuracy")):
            lines.append(f"  calibrated: test cascade {100 * t['cascade_accuracy']:.2f}% at "
                         f"{100 * t['flops_ratio']:.1f}% FLOPs (full {100 * t['full_accuracy']:.2f}%)")
        g = (m.calibration or {}).get("guarantee")
        if g:
            lines.append(f"  guarantee: {g['statement']}" + ("" if g["certified"] else " -- not met, exits off"))
        return "\n".join(lines)


def _eager_model(checkpoint: str | os.PathLike, threads: int | None) -> Any:
    """The trained ``ExitModel`` of a run directory, for bench's PyTorch eager variant (``--checkpoint``)."""
    import torch

    from deploykit.train import load_run

    if threads:
        torch.set_num_threads(threads)
    model, _ = load_run(checkpoint)
    return model.eval()
