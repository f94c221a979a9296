"""The ``deploykit`` command line: thin click commands, each calling one library function.

Library modules are imported inside each command, so ``deploykit --help`` is instant and needs no GPU, torch or
onnxruntime. A :class:`DeployKitError` becomes a one-line message and exit code 2 instead of a traceback.
"""

from __future__ import annotations

import functools
import json
import logging
import sys
from collections.abc import Callable
from typing import Any

import click

from deploykit import __version__
from deploykit.errors import DeployKitError


def _friendly_errors(fn: Callable) -> Callable:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except DeployKitError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(e.exit_code)

    return wrapper


def _csv(kind: Callable) -> Callable:
    def parse(ctx: Any, param: Any, value: str | None) -> list | None:
        if value is None:
            return None
        try:
            return [kind(v) for v in value.split(",") if v.strip()]
        except ValueError as e:
            raise click.BadParameter(f"expected comma-separated {kind.__name__} values, got {value!r}") from e

    return parse


def _write_json(path: str, obj: Any) -> None:
    """``--json PATH``: the full report goes to a file; the terminal gets a one-line summary."""
    from pathlib import Path

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(obj, indent=2) + "\n")


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 120})
@click.version_option(__version__, prog_name="deploykit")
def main() -> None:
    """Train, export and run early-exit / token-merging vision transformers cheaply."""
    _show_progress_lines()


class _Stderr(logging.StreamHandler):
    """A handler on whatever ``sys.stderr`` is when it writes (click's test runner swaps the stream)."""

    @property
    def stream(self) -> Any:  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


def _show_progress_lines() -> None:
    """Show the library's INFO lines (where a server listens, what a run did) on stderr, one message per line."""
    log = logging.getLogger("deploykit")
    if not any(isinstance(h, _Stderr) for h in log.handlers):
        handler = _Stderr()
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False


# ---- train ---------------------------------------------------------------------------------------------------
@main.command()
@click.option("--recipe", "-r", type=click.Path(dir_okay=False), help="YAML recipe file.")
@click.option("--method", help="Method name (overrides method.name).")
@click.option("--backbone", help="timm ViT name, optionally with a pretrained tag, or hf-hub:ORG/REPO "
                                 "(overrides backbone.name).")
@click.option("--data", help="Data spec: digits or imagefolder:PATH (overrides data.spec).")
@click.option("--pretrained/--no-pretrained", default=None,
              help="Start from the backbone's pretrained weights, from the local Hugging Face cache "
                   "(backbone.pretrained; timm's --pretrained).")
@click.option("--initial-checkpoint", type=click.Path(dir_okay=False),
              help="Start from this weights file: safetensors, a state dict, or a timm train.py checkpoint such as "
                   "model_best.pth.tar (backbone.checkpoint; timm's --initial-checkpoint).")
@click.option("--use-ema/--no-use-ema", default=None,
              help="With a timm checkpoint: require / refuse its EMA weights (default: EMA when present; "
                   "backbone.checkpoint_ema).")
@click.option("--img-size", type=int, help="Input resolution (backbone.kwargs.img_size; timm's --img-size).")
@click.option("--epochs", type=int, help="Training epochs (train.epochs).")
@click.option("--max-steps", type=int, help="Stop after this many optimizer steps (the schedule keeps its length).")
@click.option("--batch-size", type=int, help="Global batch size (split across torchrun processes).")
@click.option("--lr", type=float, help="Peak learning rate after warm-up (train.lr).")
@click.option("--seed", type=int, help="Seed for initialisation, data order and augmentation (train.seed).")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Any recipe key, e.g. train.lr=3e-4.")
@click.option("--out", "-o", type=click.Path(file_okay=False), help="Run directory (default runs/<name>).")
@click.option("--resume", type=click.Path(file_okay=False), help="Continue the run in this directory.")
@_friendly_errors
def train(recipe: str | None, method: str | None, backbone: str | None, data: str | None, pretrained: bool | None,
          initial_checkpoint: str | None, use_ema: bool | None, img_size: int | None, epochs: int | None,
          max_steps: int | None, batch_size: int | None, lr: float | None, seed: int | None, sets: tuple[str, ...],
          out: str | None, resume: str | None) -> None:
    """Train a model from a recipe (any family); writes config.json, model.safetensors, metrics.jsonl."""
    import logging

    from deploykit.families import family_for_recipe

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    overrides = {"method.name": method, "backbone.name": backbone, "data.spec": data,
                 "backbone.pretrained": pretrained, "backbone.checkpoint": initial_checkpoint,
                 "backbone.checkpoint_ema": use_ema, "backbone.kwargs.img_size": img_size, "train.epochs": epochs,
                 "train.max_steps": max_steps, "train.batch_size": batch_size, "train.lr": lr, "train.seed": seed}
    family = family_for_recipe(recipe, overrides, resume)
    run_dir = family.train(recipe, out=out, resume=resume, overrides=overrides, sets=sets)
    click.echo(str(run_dir))


def _engine(engine_dir: str) -> tuple[Any, Any]:
    """Load ENGINE_DIR's manifest once and the family that runs it."""
    from deploykit.families import family_for_manifest
    from deploykit.manifest import Manifest

    manifest = Manifest.load(engine_dir)
    return family_for_manifest(manifest), manifest

# ---- export / calibrate / bench / predict ----------------------------------------------------------------------
_BACKEND = click.option("--backend", default="ort-cpu", show_default=True,
                        type=click.Choice(["ort-cpu", "openvino", "ort-cuda", "ort-trt", "trt"]),
                        help="Runner for the graphs (openvino: `pip install 'deploykit[openvino]'`).")


@main.command()
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--out", "-o", "out", required=True, type=click.Path(file_okay=False), help="Engine directory to write.")
@click.option("--score", type=click.Choice(["max_softmax", "entropy"]),
              help="Exit score (default: the method's; MuE's is cosine and takes none).")
@click.option("--no-check", is_flag=True, help="Skip the parity check against PyTorch on real test inputs.")
@click.option("--parity-samples", default=256, show_default=True, help="Test examples used for the parity check.")
@click.option("--opset", type=int, help="ONNX opset (default: the family's: 18 classification, 17 MuE).")
@click.option("--check-trt", is_flag=True, help="Also lint every graph for TensorRT (no TensorRT needed).")
@click.option("--force", is_flag=True, help="Replace an existing engine directory.")
@_friendly_errors
def export(run_dir: str, out: str, score: str | None, no_check: bool, parity_samples: int, opset: int | None,
           check_trt: bool, force: bool) -> None:
    """Export a training run as ONNX graphs + deploykit.json, checked against PyTorch."""
    from deploykit.families import family_for_run

    r = family_for_run(run_dir).export(run_dir, out, score=score, check=not no_check, parity_samples=parity_samples,
                                       opset=opset, overwrite=force, check_trt=check_trt)
    click.echo(r.text)


@main.command()
@click.argument("engine_dir", type=click.Path(file_okay=False))
@click.option("--data", help="Val + test data: digits (default) or imagefolder:PATH (with --loss consistency PATH may "
                            "be a flat folder of unlabelled images); MuE: synthetic-vl (default) or "
                            "jsonl:PATH/{split}.jsonl.")
@click.option("--max-drop", type=float, help="Allowed accuracy drop (points) vs full depth [default 0.5]: on val, or "
                                             "with --confidence on new data.")
@click.option("--flops-budget", type=float, help="Instead: FLOPs budget as a fraction of the full model.")
@click.option("--confidence", type=float,
              help="1 - δ: distribution-free guarantee (Learn-then-Test) that the drop on new data is <= --max-drop "
                   "with this probability, e.g. 0.9.")
@click.option("--loss", type=click.Choice(["consistency", "accuracy"]),
              help="With --confidence: consistency (differs from full depth; no labels needed) or accuracy (right "
                   "at full depth, wrong at the exit) [default consistency].")
@click.option("--bound", type=click.Choice(["binomial", "hb"]),
              help="With --confidence: binomial tail (exact for 0/1 losses) or Hoeffding-Bentkus [default binomial].")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), help="Write the report here (+ a PNG beside).")
@_BACKEND
@_friendly_errors
def calibrate(engine_dir: str, data: str | None, max_drop: float | None, flops_budget: float | None,
              confidence: float | None, loss: str | None, bound: str | None, json_out: str | None,
              backend: str) -> None:
    """Pick exit thresholds on the validation split, write them to the manifest, evaluate on test."""
    family, manifest = _engine(engine_dir)
    r = family.calibrate(manifest, data=data, max_drop=max_drop, flops_budget=flops_budget, json_out=json_out,
                         backend=backend, confidence=confidence, loss=loss, bound=bound)
    for w in r.data.get("warnings", []) if isinstance(r.data, dict) else []:
        click.echo(f"warning: {w}", err=True)
    click.echo(r.text)


@main.command()
@click.argument("engine_dir", type=click.Path(file_okay=False))
@click.option("--batch-sizes", default="1,32", show_default=True, callback=_csv(int),
              help="Comma-separated batch sizes to time.")
@click.option("--exit-fractions", callback=_csv(float), help="Fix the exit distribution, e.g. 0.4,0.3,0.2,0.1.")
@click.option("--checkpoint", type=click.Path(file_okay=False), help="Run directory: adds PyTorch eager.")
@click.option("--data", help="Inputs from this data source's test split, e.g. digits (default: random inputs, which "
                             "decide the exits when --exit-fractions is not given).")
@click.option("--samples", default=64, show_default=True, help="Inputs per timed pass.")
@click.option("--repeats", default=5, show_default=True,
              help="Timed passes per variant; figures are min / median / max over them.")
@click.option("--warmup", default=2, show_default=True, help="Untimed passes per variant first.")
@click.option("--threads", type=int, help="Intra-op threads (default: usable cores).")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), help="Write the report here (+ a PNG beside).")
@click.option("--compare", type=click.Path(file_okay=False),
              help="Second engine directory (e.g. the INT8 copy) timed side by side at the same exit fractions.")
@click.option("--runtimes", is_flag=False, flag_value="all", default=None, metavar="all|NAME,...",
              help="Also time the monolithic model on every installed CPU runtime (ORT FP32 default / deploykit "
                   "options, ORT INT8 dynamic, OpenVINO FP32 / INT8) and report the cascade's ratio to the fastest.")
@_BACKEND
@_friendly_errors
def bench(engine_dir: str, batch_sizes: list[int], exit_fractions: list[float] | None, checkpoint: str | None,
          data: str | None, samples: int, repeats: int, warmup: int, threads: int | None, json_out: str | None,
          compare: str | None, runtimes: str | None, backend: str) -> None:
    """Time the engine side by side with its references (monolithic / full depth, PyTorch eager); report speed-ups."""
    family, manifest = _engine(engine_dir)
    r = family.bench(manifest, batch_sizes=batch_sizes, exit_fractions=exit_fractions, checkpoint=checkpoint,
                     data=data, samples=samples, repeats=repeats, warmup=warmup, threads=threads, json_out=json_out,
                     backend=backend, progress=True, compare=compare, runtimes=_runtimes(runtimes))
    for w in r.data.get("warnings", []) if isinstance(r.data, dict) else []:
        click.echo(f"warning: {w}", err=True)
    click.echo(r.text)


def _runtimes(spec: str | None) -> list[str] | None | bool:
    if spec is None:
        return False
    from deploykit.tune.monolithic import runtime_names

    return runtime_names(spec)


@main.command()
@click.argument("engine_dir", type=click.Path(file_okay=False))
@click.option("--out", "-o", "out", required=True, type=click.Path(file_okay=False), help="INT8 engine directory.")
@click.option("--mode", default="dynamic", show_default=True, type=click.Choice(["dynamic", "static", "openvino"]),
              help="dynamic: ORT CPU only; static: calibrated QDQ graphs (ORT CPU and TensorRT); openvino: NNCF "
                   "calibrated OpenVINO IR (--backend openvino only).")
@click.option("--calib-data", default=None,
              help="Static / openvino: digits or imagefolder:PATH (its train split); default: the data the engine was "
                   "trained on (manifest provenance.data). Classes must match the engine's.")
@click.option("--calib-samples", type=int, help="Static / openvino: calibration images [default: 256].")
@click.option("--force", is_flag=True, help="Replace an existing engine directory at --out.")
@_friendly_errors
def quantize(engine_dir: str, out: str, mode: str, calib_data: str | None, calib_samples: int | None,
             force: bool) -> None:
    """Write an INT8 copy of ENGINE_DIR (exit heads and scores stay FP32); re-run calibrate on it afterwards."""
    family, manifest = _engine(engine_dir)
    r = family.quantize(manifest, out, mode=mode, calib_data=calib_data, calib_samples=calib_samples,
                        overwrite=force)
    click.echo(r.text)


@main.command()
@click.argument("engine_dir", type=click.Path(file_okay=False))
@click.argument("images", nargs=-1, required=True, type=click.Path())
@click.option("--thresholds", callback=_csv(float), help="Override the manifest's thresholds (one per early exit).")
@click.option("--text", "texts", multiple=True, help="MuE engines: one hypothesis per image (entailment).")
@click.option("--task", type=click.Choice(["entailment", "caption"]), help="MuE engines: what to generate.")
@_BACKEND
@_friendly_errors
def predict(engine_dir: str, images: tuple[str, ...], thresholds: list[float] | None, texts: tuple[str, ...],
            task: str | None, backend: str) -> None:
    """Classify image files and directories (MuE engines: answer / caption them); one JSON line per image.

    A file that can't be decoded gets a line {"image": ..., "error": ...} and the rest go on; the exit code is then 1.
    """
    failed = 0
    family, manifest = _engine(engine_dir)
    for r in family.predict(manifest, list(images), backend=backend, thresholds=thresholds,
                            texts=list(texts) or None, task=task):
        failed += "error" in r
        click.echo(json.dumps(r))
    if failed:
        click.echo(f"error: {failed} image(s) could not be read; see their \"error\" lines", err=True)
        sys.exit(1)


@main.command()
@click.argument("data", default="digits")
@click.option("--split", default="test", show_default=True, type=click.Choice(["train", "val", "test"]),
              help="Which split to take the images from.")
@click.option("-n", "count", default=8, show_default=True, help="How many images.")
@click.option("--out", "-o", "out", required=True, type=click.Path(file_okay=False), help="Folder to write them to.")
@_friendly_errors
def samples(data: str, split: str, count: int, out: str) -> None:
    """Write images of a data split as PNG files (e.g. to try `deploykit predict`)."""
    from deploykit.data import write_samples

    for p in write_samples(data, split, count, out):
        click.echo(str(p))


@main.command("methods")
def methods_cmd() -> None:
    """List the registered methods and the family each belongs to."""
    from deploykit.families import family_for_method
    from deploykit.methods import get_method, list_methods

    for name in list_methods():
        click.echo(f"{name:12s} [{family_for_method(name).name}] {get_method(name).description}")


@main.command()
@click.argument("engine_dir", type=click.Path(file_okay=False))
@_friendly_errors
def info(engine_dir: str) -> None:
    """Show an engine directory's manifest summary (stages or MuE graphs, thresholds, calibration)."""
    family, manifest = _engine(engine_dir)
    click.echo(family.info(manifest))



@main.command("serve-local")
@click.argument("engine_dir", type=click.Path(file_okay=False))
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (loopback unless you say so).")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(1, 65535), help="TCP port to listen on.")
@_BACKEND
@click.option("--max-batch-size", default=32, show_default=True, type=int, help="Rows per cascade run.")
@click.option("--max-queue-delay-ms", default=5.0, show_default=True, type=float,
              help="How long the oldest request waits for a batch to fill.")
@click.option("--max-queue", default=256, show_default=True, type=int, help="Waiting requests before 503.")
@click.option("--max-request-mb", default=16.0, show_default=True, type=float, help="Request body limit (413).")
@click.option("--threads", default=None, type=int, help="Intra-op threads for the backend (default: its own).")
@click.option("--instances", default=1, show_default=True, type=int,
              help="Batches run at once, one inference thread each (ort-cpu, openvino); e.g. 2 x --threads 1 on 2 "
                   "cores.")
@click.option("--latency-slo-ms", default=None, type=float,
              help="Load-adaptive exits: move to earlier exits (calibrated curve) when latency nears this p99 target.")
@click.option("--drift-window", default=None, type=int,
              help="Drift watch: served rows compared with the calibration record [default 500 when the manifest "
                   "has one; 0 = off].")
@click.option("--drift-threshold", default=None, type=float,
              help="Drift watch: total-variation distance that logs a warning and marks the page [default 0.25].")
@click.option("--grpc-port", default=None, type=int,
              help="KServe v2 over gRPC on this port too, same --host (0: off) [default: 8001 with the grpc extra].")
@click.option("--read-timeout", default=30.0, show_default=True, type=float,
              help="Seconds a request's headers, and then its body, may take to arrive (408 past it).")
@click.option("--drain-timeout", default=30.0, show_default=True, type=float,
              help="SIGTERM: seconds accepted requests may take to finish; those still queued then get a 503.")
@click.option("--max-image-pixels", default=None, type=int,
              help="Pixel budget per image file, read from its header before decoding (default 16777216).")
@_friendly_errors
def serve_local_cmd(engine_dir: str, host: str, port: int, backend: str, max_batch_size: int,
                    max_queue_delay_ms: float, max_queue: int, max_request_mb: float, threads: int | None,
                    instances: int, latency_slo_ms: float | None, drift_window: int | None,
                    drift_threshold: float | None, grpc_port: int | None, read_timeout: float, drain_timeout: float,
                    max_image_pixels: int | None) -> None:
    """Serve ENGINE_DIR (a cascade or a MuE engine) over HTTP (KServe v2) with dynamic batching, /metrics and a page."""
    from deploykit.serve import serve_local

    serve_local(engine_dir, host=host, port=port, backend=backend, max_batch_size=max_batch_size,
                max_queue_delay_ms=max_queue_delay_ms, max_queue=max_queue, max_request_mb=max_request_mb,
                threads=threads, instances=instances, latency_slo_ms=latency_slo_ms, drift_window=drift_window,
                drift_threshold=drift_threshold, grpc_port=grpc_port, read_timeout_s=read_timeout,
                drain_timeout_s=drain_timeout, max_image_pixels=max_image_pixels)


# ---- GPU deployment: TensorRT lint and engine build (issue 6) ---------------------------------------------------
@main.command()
@click.argument("engine_dir", type=click.Path(file_okay=False))
@click.option("--target", default="10.3", show_default=True, help="TensorRT version to check (10.3 = JetPack 6).")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), help="Write the report here as JSON.")
@_friendly_errors
def lint(engine_dir: str, target: str, json_out: str | None) -> None:
    """Check ENGINE_DIR's graphs against TensorRT's ONNX support, offline (no GPU or TensorRT needed)."""
    family, manifest = _engine(engine_dir)
    report = family.lint(manifest, target=target)
    if json_out is not None:
        _write_json(json_out, report.to_dict())
    click.echo(report.format() + (f"\nreport {json_out}" if json_out else ""))
    if not report.ok:
        sys.exit(1)


@main.command()
@click.argument("engine_dir", type=click.Path(file_okay=False))
@click.option("--precision", default="fp32", show_default=True, type=click.Choice(["fp32", "fp16"]),
              help="Engine precision (fp16: half-precision kernels where TensorRT allows).")
@click.option("--max-batch", default=32, show_default=True, type=int, help="Largest batch the engines accept.")
@click.option("--opt-batch", default=None, type=int, help="Batch the kernels are tuned for (default: min(8, max)).")
@click.option("--workspace", "workspace_mb", default=None, type=int, help="Builder workspace limit in MB.")
@_friendly_errors
def build(engine_dir: str, precision: str, max_batch: int, opt_batch: int | None, workspace_mb: int | None) -> None:
    """Build one TensorRT engine per graph of ENGINE_DIR on this GPU (run on the target device)."""
    family, manifest = _engine(engine_dir)
    r = family.build(manifest, precision=precision, max_batch=max_batch, opt_batch=opt_batch,
                     workspace_mb=workspace_mb)
    click.echo(r.text)


# ---- Triton model repository (issue 9) -------------------------------------------------------------------------
@main.command("export-triton")
@click.argument("engine_dir", type=click.Path(file_okay=False))
@click.option("--out", "-o", required=True, type=click.Path(file_okay=False), help="Model repository to write.")
@click.option("--backend", default="onnxruntime", show_default=True,
              type=click.Choice(["onnxruntime", "tensorrt", "python"]),
              help="Stage models as ONNX graphs (onnxruntime backend), as the TensorRT plans of `deploykit build`, "
                   "or as Python-backend models running the ONNX graphs with ONNX Runtime on CPU (for Triton builds "
                   "without the onnxruntime backend, e.g. PyTriton's).")
@click.option("--max-batch-size", default=None, type=int, help="Triton max_batch_size (default: build's, else 32).")
@click.option("--max-queue-delay-us", default=500, show_default=True, type=int, help="dynamic_batching delay.")
@click.option("--instances", default=None, type=int,
              help="Total stage instances, split by calibrated exit fractions x stage cost (default: 1 each).")
@click.option("--threads", default=1, show_default=True, type=click.IntRange(min=1),
              help="--backend python: ONNX Runtime intra-op threads per stage instance.")
@_friendly_errors
def export_triton_cmd(engine_dir: str, out: str, backend: str, max_batch_size: int | None, max_queue_delay_us: int,
                      instances: int | None, threads: int) -> None:
    """Write a Triton model repository: one model per stage plus a Python-backend BLS model running the cascade."""
    from deploykit.serve.triton import export_triton

    r = export_triton(engine_dir, out, backend=backend, max_batch_size=max_batch_size,
                      max_queue_delay_us=max_queue_delay_us, instances=instances, threads=threads)
    click.echo(f"wrote {r['repository']}: {r['model']} (BLS cascade) + {', '.join(r['stage_models'])} "
               f"({backend}, max batch {r['max_batch_size']}, instances {r['instances']}); serve with "
               f"`tritonserver --model-repository {r['repository']}`")


# ---- Ray Serve: one deployment per stage (issue 9) --------------------------------------------------------------
@main.command("serve-ray")
@click.argument("engine_dir", type=click.Path(file_okay=False))
@click.option("--address", default="local", show_default=True,
              help="'local' starts a Ray cluster on 127.0.0.1; 'auto' or HOST:PORT joins a running one.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address Serve's HTTP proxy binds.")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(1, 65535),
              help="Port of Serve's HTTP proxy.")
@click.option("--replicas", default=None, help="Replicas per stage, e.g. 2,1,1,1 (default: the sizing rule).")
@click.option("--total-replicas", default=None, type=int,
              help="Replicas the sizing rule splits by exit fractions x stage cost (default: one per stage).")
@click.option("--autoscale", is_flag=True, help="Ray Serve autoscaling: min n/2, initial n, max 2n per stage.")
@click.option("--max-batch-size", default=32, show_default=True, type=int, help="Rows per stage batch.")
@click.option("--max-queue-delay-ms", default=5.0, show_default=True, type=float,
              help="How long a stage waits for its batch to fill (@serve.batch batch_wait_timeout_s).")
@click.option("--threads", default=1, show_default=True, type=int, help="Intra-op threads per stage replica.")
@click.option("--backend", default="ort-cpu", show_default=True, type=click.Choice(["ort-cpu", "openvino"]),
              help="CPU backend running each stage replica.")
@click.option("--replica-cpus", default=0.25, show_default=True, type=float, help="Ray CPUs reserved per replica.")
@click.option("--latency-slo-ms", default=None, type=float,
              help="Load-adaptive exits in the ingress (as serve-local): earlier exits when latency nears this p99.")
@click.option("--grpc-port", default=0, show_default=True, type=click.IntRange(0, 65535),
              help="KServe v2 over gRPC on Ray Serve's gRPC proxy (0: off). The proxy listens on every interface, "
                   "so this needs a non-loopback --host (say 0.0.0.0).")
@_friendly_errors
def serve_ray_cmd(engine_dir: str, address: str, host: str, port: int, replicas: str | None,
                  total_replicas: int | None, autoscale: bool, max_batch_size: int, max_queue_delay_ms: float,
                  threads: int, backend: str, replica_cpus: float, latency_slo_ms: float | None,
                  grpc_port: int) -> None:
    """Serve ENGINE_DIR on Ray Serve: one deployment per stage, KServe v2 HTTP API as serve-local."""
    from deploykit.errors import ConfigError
    from deploykit.serve import serve_ray

    try:
        counts = None if replicas is None else [int(v) for v in replicas.split(",")]
    except ValueError as e:
        raise ConfigError(f"--replicas must be comma-separated integers like 2,1,1,1, got {replicas!r}") from e
    serve_ray(engine_dir, address=address, host=host, port=port, replicas=counts, total_replicas=total_replicas,
              autoscale=autoscale, max_batch_size=max_batch_size, max_queue_delay_ms=max_queue_delay_ms,
              threads=threads, replica_cpus=replica_cpus, latency_slo_ms=latency_slo_ms, backend=backend,
              grpc_port=grpc_port)
