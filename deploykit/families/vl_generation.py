"""The VL generation family: MuE's unified encoder-decoder, exported as per-layer graphs and run by ``MuEEngine``."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from deploykit.families._registry import register_family
from deploykit.families.base import Family, Outcome, check_risk_flags, refuse
from deploykit.kinds import FAMILIES

if TYPE_CHECKING:
    from deploykit.manifest import Manifest

# named `deploykit train` options -> the recipe key they set, and MuE's answer
_TRAIN_FLAGS = {"train.epochs": ("--epochs", "MuE trains for train.steps optimizer steps (use --set train.steps=N "
                                             "or --max-steps N)"),
                "backbone.name": ("--backbone", "MuE builds its own encoder-decoder (timm PatchEmbed stem); its size "
                                                "is method.dim / enc_layers / dec_layers")}


@register_family
class VLGenerationFamily(Family):
    """Per-layer graphs run by runtime.generation.MuEEngine; thresholds per task and stream; layers as the cost."""

    name = "vl-generation"
    description = "MuE: a unified vision-language encoder-decoder with per-stream and per-token exits"
    methods = FAMILIES["vl-generation"].methods
    tasks = FAMILIES["vl-generation"].tasks
    backends = ("ort-cpu",)
    default_opset = 17

    # ---- runs ---------------------------------------------------------------------------------------------------
    def train(self, recipe: Any, *, out: str | os.PathLike | None = None, resume: str | os.PathLike | None = None,
              overrides: dict[str, Any] | None = None, sets: tuple[str, ...] | list[str] | None = None) -> Path:
        from deploykit.methods.mue.train import train_mue
        from deploykit.train.recipe import _set_dotted, read_recipe_file

        if resume is not None:
            raise refuse("--resume", self.name, "MuE training does not resume; start a new run with --out")
        for key, (flag, why) in _TRAIN_FLAGS.items():
            if (overrides or {}).get(key) is not None:
                raise refuse(flag, self.name, why)
        d = copy.deepcopy(read_recipe_file(recipe) if isinstance(recipe, str | os.PathLike) else dict(recipe or {}))
        items = [f"{k}={json.dumps(v)}" for k, v in (overrides or {}).items() if v is not None]
        for item in [*items, *(sets or ())]:
            _set_dotted(d, item)
        return train_mue(d, Path(out) if out else Path("runs") / str(d.get("name", "mue")))

    def export(self, run_dir: str | os.PathLike, out_dir: str | os.PathLike, *, score: str | None = None,
               check: bool = True, parity_samples: int = 256, opset: int | None = None, overwrite: bool = False,
               check_trt: bool = False) -> Outcome:
        from deploykit.export.mue import export_mue

        if score not in (None, "cosine"):
            raise refuse(f"--score {score}", self.name, "MuE's exit score is the cosine between a layer's output "
                                                        "and its input, computed inside its graphs")
        m = export_mue(run_dir, out_dir, check=check, n_check=parity_samples, opset=opset or self.default_opset,
                       overwrite=overwrite)
        if check_trt:
            from deploykit.graphs.trt_lint import check_trt as lint_for_trt

            lint_for_trt(out_dir, target="10.3")
        mue = m.extra["mue"]
        parity = mue.get("parity") or {}
        n = sum(v["n"] for k, v in parity.items() if k.endswith("/full/copy"))
        return Outcome(m, f"wrote {len(mue['graphs'])} MuE graphs (opset {opset or self.default_opset}) + vocab.json "
                          f"to {out_dir}" + (f"; parity on {n} test examples: generated tokens identical"
                                             if parity else "") + ("; TensorRT lint passed" if check_trt else ""))

    # ---- engines --------------------------------------------------------------------------------------------------
    def open_engine(self, manifest: Manifest, *, backend: str = "ort-cpu", threads: int | None = None) -> Any:
        from deploykit.runtime.engines import open_generation

        self.check_backend(backend)
        return open_generation(manifest, threads)

    def calibrate(self, manifest: Manifest, *, data: str | None = None, max_drop: float | None = None,
                  flops_budget: float | None = None, json_out: str | os.PathLike | None = None,
                  backend: str = "ort-cpu", confidence: float | None = None, loss: str | None = None,
                  bound: str | None = None) -> Outcome:
        from deploykit.tune.mue_calibrate import calibrate_mue
        from deploykit.tune.report import mue_calibration_summary

        check_risk_flags(confidence, loss, bound)
        self.check_backend(backend)
        r = calibrate_mue(manifest, data=data, max_drop=max_drop, layer_budget=flops_budget, json_out=json_out,
                          confidence=confidence, loss=loss or "consistency", bound=bound or "binomial")
        r["warnings"] = [f"{t}: {v['guarantee']['message']}" for t, v in r["tasks"].items()
                         if (v.get("guarantee") or {}).get("message")]

        text = mue_calibration_summary(r, json_out)
        for t, v in r["tasks"].items():  # one line per guaranteed task: what holds, or that it fell back
            g = v.get("guarantee")
            if g:
                text += f"\n{t} guarantee: {g['statement']}" + ("" if g["certified"] else " -- not met, full depth")
        return Outcome(r, text)

    def bench(self, manifest: Manifest, *, batch_sizes: list[int] | tuple[int, ...] = (1, 32),
              exit_fractions: list[float] | None = None, checkpoint: str | os.PathLike | None = None,
              data: str | None = None, samples: int = 64, repeats: int = 5, warmup: int = 2,
              threads: int | None = None, json_out: str | os.PathLike | None = None,
              compare: str | os.PathLike | None = None, backend: str = "ort-cpu", progress: bool = False,
              runtimes: list[str] | None | bool = False) -> Outcome:
        from deploykit.manifest import Manifest
        from deploykit.tune.mue_bench import bench_vl

        if runtimes is not False:
            raise refuse("--runtimes", self.name, "it times the monolithic classifier on each CPU runtime; a MuE "
                                                  "engine has no monolithic graph (bench compares full depth instead)")

        if exit_fractions is not None:
            raise refuse("--exit-fractions", self.name, "MuE exits per image stream, text stream and generated "
                                                        "token by thresholds, not at a fixed distribution over "
                                                        "stages; bench uses the calibrated thresholds")
        self.check_backend(backend)
        other = None
        if compare is not None:
            other = Manifest.load(compare)
            if other.task != manifest.task or other.extra["mue"]["vocab"] != manifest.extra["mue"]["vocab"]:
                raise refuse("--compare", self.name, f"{compare} is not a copy of the same MuE model")
        eager = _eager_generate(checkpoint, threads) if checkpoint else None
        r = bench_vl(manifest, n=samples, batch_sizes=list(batch_sizes), repeats=repeats, warmup=warmup,
                     threads=threads, data=data, compare=other, eager=eager, json_out=json_out, progress=progress)
        from deploykit.tune.report import mue_bench_summary

        return Outcome(r, mue_bench_summary(r, json_out))  # the full report goes to --json

    def predict(self, manifest: Manifest, images: list[str], *, backend: str = "ort-cpu",
                thresholds: list[float | None] | None = None, texts: list[str] | None = None,
                task: str | None = None) -> list[dict[str, Any]]:
        if thresholds is not None:
            raise refuse("--thresholds", self.name, "it lists one threshold per cascade stage; MuE engines have "
                                                    "per-task thresholds for the image stream, text stream and "
                                                    f"decoder: run `deploykit calibrate {manifest.root}` to set them "
                                                    "(stored in the manifest's extra.mue.thresholds)")
        self.check_backend(backend)
        with self.open_engine(manifest, backend=backend) as eng:
            return eng.predict(list(images), texts, task or ("entailment" if texts else "caption"))

    def quantize(self, manifest: Manifest, out: str | os.PathLike, *, mode: str = "dynamic",
                 calib_data: str | None = None, calib_samples: int | None = None, overwrite: bool = False) -> Outcome:
        from deploykit.graphs.quantize import quantize

        if mode != "dynamic":
            raise refuse(f"--mode {mode}", self.name, "MuE graphs are quantised dynamically (INT8 weights, "
                                                      "activations per batch); static QDQ calibration would need "
                                                      "feeds for every layer and decoding step")
        if calib_data is not None or calib_samples is not None:
            raise refuse("--calib-data / --calib-samples", self.name, "they feed static calibration only")
        m = quantize(manifest, out, mode=mode, overwrite=overwrite)
        q = m.extra["quantization"]["graphs"]
        n = sum(len(g["quantized_nodes"]) for g in q.values())
        return Outcome(m, f"wrote {len(q)} int8-dynamic MuE graphs (encoder layers, decoder steps; {n} nodes INT8; "
                          "embeddings, output head and exit scores FP32) to "
                          f"{out}; thresholds are stale: run `deploykit calibrate {out}`")

    def info(self, manifest: Manifest) -> str:
        mue = manifest.extra["mue"]
        lines = [f"{manifest.name}: mue ({mue['enc_layers']} encoder + {mue['dec_layers']} decoder layers, dim "
                 f"{mue['dim']}), task {manifest.task}, {len(mue['graphs'])} graphs"]
        for t, v in mue["thresholds"].items():
            lines.append(f"  {t}: thresholds img {v['img']} txt {v['txt']} dec {v['dec']}"
                         + (" (step-decayed)" if v.get("decay") else ""))
        return "\n".join(lines)


def _eager_generate(checkpoint: str | os.PathLike, threads: int | None) -> Any:
    """PyTorch eager generation (the per-sample reference) of a MuE run, for ``bench --checkpoint``."""
    import torch

    from deploykit.data.vl import LABELS
    from deploykit.methods.mue.reference import reference_generate
    from deploykit.methods.mue.train import load_mue_run

    if threads:
        torch.set_num_threads(threads)
    model, vocab, _ = load_mue_run(checkpoint)
    answers = [vocab.stoi[w] for w in LABELS]

    def run(imgs: list[Any], ids: list[list[int]], task: str, thr: Any, policy: str) -> list[Any]:
        return [reference_generate(model, torch.from_numpy(im), i, task, thr, policy, answers)
                for im, i in zip(imgs, ids)]

    return run
