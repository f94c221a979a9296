"""The ``deploykit`` command line: thin click commands, each calling one library function.

Library modules are imported inside each command, so ``deploykit --help`` is instant and needs no GPU, torch or
onnxruntime. A :class:`DeployKitError` becomes a one-line message and exit code 2 instead of a traceback.
"""

from __future__ import annotations

import functools
import json
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


def _echo_json(obj: Any) -> None:
    click.echo(json.dumps(obj, indent=2))


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 120})
@click.version_option(__version__, prog_name="deploykit")
def main() -> None:
    """Train, export and run early-exit / token-merging vision transformers cheaply."""


# ---- train ---------------------------------------------------------------------------------------------------
@main.command()
@click.option("--recipe", "-r", type=click.Path(dir_okay=False), help="YAML recipe file.")
@click.option("--method", help="Method name (overrides method.name).")
@click.option("--backbone", help="timm ViT name (overrides backbone.name).")
@click.option("--data", help="Data spec: digits or imagefolder:PATH (overrides data.spec).")
@click.option("--epochs", type=int)
@click.option("--max-steps", type=int, help="Stop after this many optimizer steps (the schedule keeps its length).")
@click.option("--batch-size", type=int, help="Global batch size (split across torchrun processes).")
@click.option("--lr", type=float)
@click.option("--seed", type=int)
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Any recipe key, e.g. train.lr=3e-4.")
@click.option("--out", "-o", type=click.Path(file_okay=False), help="Run directory (default runs/<name>).")
@click.option("--resume", type=click.Path(file_okay=False), help="Continue the run in this directory.")
@_friendly_errors
def train(recipe: str | None, method: str | None, backbone: str | None, data: str | None, epochs: int | None,
          max_steps: int | None, batch_size: int | None, lr: float | None, seed: int | None, sets: tuple[str, ...],
          out: str | None, resume: str | None) -> None:
    """Train a multi-exit model from a recipe; writes config.json, model.safetensors, metrics.jsonl (torchrun-ready)."""
    import logging

    from deploykit.train import train as run_training

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    overrides = {"method.name": method, "backbone.name": backbone, "data.spec": data, "train.epochs": epochs,
                 "train.max_steps": max_steps, "train.batch_size": batch_size, "train.lr": lr, "train.seed": seed}
    run_dir = run_training(recipe, out=out, resume=resume, overrides=overrides, sets=sets)
    click.echo(str(run_dir))

# ---- export / calibrate / bench / predict ----------------------------------------------------------------------
_BACKEND = click.option("--backend", default="ort-cpu", show_default=True,
                        type=click.Choice(["ort-cpu", "openvino", "ort-cuda", "ort-trt", "trt"]),
                        help="Runner for the graphs (openvino: `pip install 'deploykit[openvino]'`).")


@main.command()
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--out", "-o", "out", required=True, type=click.Path(file_okay=False), help="Engine directory to write.")
@click.option("--score", type=click.Choice(["max_softmax", "entropy"]), help="Exit score (default: the method's).")
@click.option("--no-check", is_flag=True, help="Skip the parity check against PyTorch on real test inputs.")
@click.option("--parity-samples", default=256, show_default=True, help="Test images used for the parity check.")
@click.option("--opset", default=18, show_default=True)
@click.option("--check-trt", is_flag=True, help="Also lint every graph for TensorRT (no TensorRT needed).")
@click.option("--force", is_flag=True, help="Replace an existing engine directory.")
@_friendly_errors
def export(run_dir: str, out: str, score: str | None, no_check: bool, parity_samples: int, opset: int,
           check_trt: bool, force: bool) -> None:
    """Export a training run as per-stage ONNX graphs + deploykit.json, checked against PyTorch."""
    from deploykit.export import export_run

    m = export_run(run_dir, out, score=score, check=not no_check, parity_samples=parity_samples, opset=opset,
                   overwrite=force, check_trt=check_trt)
    parity = m.provenance.get("parity")
    click.echo(f"wrote {m.num_stages} stage graphs + full.onnx to {out}"
               + (f"; parity on {parity['samples']} test images: predictions identical" if parity else ""))


@main.command()
@click.argument("engine_dir", type=click.Path(file_okay=False))
@click.option("--data", default="digits", show_default=True, help="digits or imagefolder:PATH (val + test splits).")
@click.option("--max-drop", type=float, help="Allowed accuracy drop (points) vs full depth on val [default 0.5].")
@click.option("--flops-budget", type=float, help="Instead: FLOPs budget as a fraction of the full model.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), help="Write the report here (+ a PNG beside).")
@_BACKEND
@_friendly_errors
def calibrate(engine_dir: str, data: str, max_drop: float | None, flops_budget: float | None, json_out: str | None,
              backend: str) -> None:
    """Pick exit thresholds on the validation split, write them to the manifest, evaluate on test."""
    from deploykit.tune.calibrate import calibrate as run_calibration

    r = run_calibration(engine_dir, data=data, max_drop=max_drop, flops_budget=flops_budget, json_out=json_out,
                        backend=backend)
    if "tasks" in r:  # MuE engine: per-task thresholds
        _echo_json({t: {"thresholds": v["thresholds"], "test": v["test"]} for t, v in r["tasks"].items()})
        return
    t = r["test"]
    click.echo(f"thresholds {['-' if v is None else round(v, 4) for v in r['thresholds']]}; test: full "
               f"{100 * t['full_accuracy']:.2f}%, cascade {100 * t['cascade_accuracy']:.2f}% at "
               f"{100 * t['flops_ratio']:.1f}% of full FLOPs, exits {[round(f, 3) for f in t['exit_fractions']]}")


@main.command()
@click.argument("engine_dir", type=click.Path(file_okay=False))
@click.option("--batch-sizes", default="1,32", show_default=True, callback=_csv(int))
@click.option("--exit-fractions", callback=_csv(float), help="Fix the exit distribution, e.g. 0.4,0.3,0.2,0.1.")
@click.option("--checkpoint", type=click.Path(file_okay=False), help="Run directory: adds PyTorch eager.")
@click.option("--data", help="Use this data source's test split as inputs (default: random inputs).")
@click.option("--samples", default=64, show_default=True, help="Inputs per timed pass.")
@click.option("--repeats", default=5, show_default=True)
@click.option("--warmup", default=2, show_default=True)
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
    """Time monolithic, exit-less chain, cascade (and PyTorch eager) side by side; report speed-ups."""
    from deploykit.tune.bench import bench as run_bench

    r = run_bench(engine_dir, batch_sizes=batch_sizes, exit_fractions=exit_fractions, checkpoint=checkpoint,
                  data=data, samples=samples, repeats=repeats, warmup=warmup, threads=threads, json_out=json_out,
                  backend=backend, progress=True, compare=compare, runtimes=_runtimes(runtimes))
    _echo_json({"runs": r["runs"], **({"plot": r["plot"]} if "plot" in r else {})})


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
@click.option("--calib-data", default="digits", show_default=True,
              help="Static / openvino: digits or imagefolder:PATH (train).")
@click.option("--calib-samples", default=256, show_default=True, type=int,
              help="Static / openvino: calibration images.")
@click.option("--force", is_flag=True, help="Replace an existing engine directory at --out.")
@_friendly_errors
def quantize(engine_dir: str, out: str, mode: str, calib_data: str, calib_samples: int, force: bool) -> None:
    """Write an INT8 copy of ENGINE_DIR (exit heads and scores stay FP32); re-run calibrate on it afterwards."""
    from deploykit.graphs.quantize import quantize as run_quantize

    m = run_quantize(engine_dir, out, mode=mode, calib_data=calib_data, calib_samples=calib_samples,
                     overwrite=force)
    q = m.extra["quantization"]
    n = sum(len(g["quantized_nodes"]) for g in q["graphs"].values())
    click.echo(f"wrote {m.num_stages} {m.stages[0].precision} stage graphs + full.onnx to {out} ({n} nodes INT8, "
               f"exit heads FP32); thresholds are stale: run `deploykit calibrate {out}"
               + (" --backend openvino`" if mode == "openvino" else "`"))


@main.command()
@click.argument("engine_dir", type=click.Path(file_okay=False))
@click.argument("images", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--thresholds", callback=_csv(float), help="Override the manifest's thresholds (one per early exit).")
@click.option("--text", "texts", multiple=True, help="MuE engines: one hypothesis per image (entailment).")
@click.option("--task", type=click.Choice(["entailment", "caption"]), help="MuE engines: what to generate.")
@_BACKEND
@_friendly_errors
def predict(engine_dir: str, images: tuple[str, ...], thresholds: list[float] | None, texts: tuple[str, ...],
            task: str | None, backend: str) -> None:
    """Classify image files (or, for MuE engines, answer / caption them); one JSON line per image."""
    from deploykit.tune.predict import predict as run_predict

    for r in run_predict(engine_dir, list(images), backend=backend, thresholds=thresholds,
                         texts=list(texts) or None, task=task):
        click.echo(json.dumps(r))


@main.command()
@click.argument("data", default="digits")
@click.option("--split", default="test", show_default=True, type=click.Choice(["train", "val", "test"]))
@click.option("-n", "count", default=8, show_default=True, help="How many images.")
@click.option("--out", "-o", "out", required=True, type=click.Path(file_okay=False))
@_friendly_errors
def samples(data: str, split: str, count: int, out: str) -> None:
    """Write images of a data split as PNG files (e.g. to try `deploykit predict`)."""
    from deploykit.data import write_samples

    for p in write_samples(data, split, count, out):
        click.echo(str(p))


@main.command("methods")
def methods_cmd() -> None:
    """List the registered methods."""
    from deploykit.methods import get_method, list_methods

    for name in list_methods():
        click.echo(f"{name:12s} {get_method(name).description}")


@main.command()
@click.argument("engine_dir", type=click.Path(file_okay=False))
@_friendly_errors
def info(engine_dir: str) -> None:
    """Show an engine directory's manifest summary (stages, FLOPs, thresholds, calibration)."""
    from deploykit.manifest import Manifest

    m = Manifest.load(engine_dir)
    click.echo(f"{m.name}: {m.method.get('name')} on {m.backbone.get('name')}, {m.num_classes} classes, task {m.task}")
    for s, t in zip(m.stages, m.thresholds()):
        click.echo(f"  stage {s.index}: {s.file} blocks {s.blocks[:1]}..{s.blocks[-1:]} {s.flops / 1e6:.1f} MFLOPs "
                   f"+ head {s.exit_flops / 1e6:.2f} MFLOPs, threshold {t}")
    if m.calibration:
        t = m.calibration["test"]
        click.echo(f"  calibrated: test cascade {100 * t['cascade_accuracy']:.2f}% at {100 * t['flops_ratio']:.1f}% "
                   f"FLOPs (full {100 * t['full_accuracy']:.2f}%)")



@main.command("serve-local")
@click.argument("engine_dir", type=click.Path(file_okay=False))
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (loopback unless you say so).")
@click.option("--port", default=8000, show_default=True, type=int)
@click.option("--backend", default="ort-cpu", show_default=True, help="ort-cpu, openvino, ort-cuda, ort-trt or trt.")
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
@_friendly_errors
def serve_local_cmd(engine_dir: str, host: str, port: int, backend: str, max_batch_size: int,
                    max_queue_delay_ms: float, max_queue: int, max_request_mb: float, threads: int | None,
                    instances: int, latency_slo_ms: float | None) -> None:
    """Serve ENGINE_DIR over HTTP (KServe v2 protocol) with dynamic batching, /metrics and a page at /."""
    from deploykit.serve import serve_local

    serve_local(engine_dir, host=host, port=port, backend=backend, max_batch_size=max_batch_size,
                max_queue_delay_ms=max_queue_delay_ms, max_queue=max_queue, max_request_mb=max_request_mb,
                threads=threads, instances=instances, latency_slo_ms=latency_slo_ms)


# ---- GPU deployment: TensorRT lint and engine build (issue 6) ---------------------------------------------------
@main.command()
@click.argument("engine_dir", type=click.Path(file_okay=False))
@click.option("--target", default="10.3", show_default=True, help="TensorRT version to check (10.3 = JetPack 6).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@_friendly_errors
def lint(engine_dir: str, target: str, as_json: bool) -> None:
    """Check ENGINE_DIR's graphs against TensorRT's ONNX support, offline (no GPU or TensorRT needed)."""
    from deploykit.graphs.trt_lint import lint_engine_dir

    report = lint_engine_dir(engine_dir, target=target)
    if as_json:
        _echo_json(report.to_dict())
    else:
        click.echo(report.format())
    if not report.ok:
        sys.exit(1)


@main.command()
@click.argument("engine_dir", type=click.Path(file_okay=False))
@click.option("--precision", default="fp32", show_default=True, type=click.Choice(["fp32", "fp16"]))
@click.option("--max-batch", default=32, show_default=True, type=int, help="Largest batch the engines accept.")
@click.option("--opt-batch", default=None, type=int, help="Batch the kernels are tuned for (default: min(8, max)).")
@click.option("--workspace", "workspace_mb", default=None, type=int, help="Builder workspace limit in MB.")
@_friendly_errors
def build(engine_dir: str, precision: str, max_batch: int, opt_batch: int | None, workspace_mb: int | None) -> None:
    """Build one TensorRT engine per stage of ENGINE_DIR on this GPU (run on the target device)."""
    from deploykit.graphs.trt_build import build_engines

    record = build_engines(engine_dir, precision=precision, max_batch=max_batch, opt_batch=opt_batch,
                           workspace_mb=workspace_mb)
    click.echo(f"built {precision} engines with TensorRT {record['version']} on {record['gpu']} "
               f"(batch 1..{record['max_batch']}, opt {record['opt_batch']}) in {record['build_seconds']} s")


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
@click.option("--port", default=8000, show_default=True, type=int)
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
@_friendly_errors
def serve_ray_cmd(engine_dir: str, address: str, host: str, port: int, replicas: str | None,
                  total_replicas: int | None, autoscale: bool, max_batch_size: int, max_queue_delay_ms: float,
                  threads: int, backend: str, replica_cpus: float, latency_slo_ms: float | None) -> None:
    """Serve ENGINE_DIR on Ray Serve: one deployment per stage, KServe v2 HTTP API as serve-local."""
    from deploykit.errors import ConfigError
    from deploykit.serve import serve_ray

    try:
        counts = None if replicas is None else [int(v) for v in replicas.split(",")]
    except ValueError as e:
        raise ConfigError(f"--replicas must be comma-separated integers like 2,1,1,1, got {replicas!r}") from e
    serve_ray(engine_dir, address=address, host=host, port=port, replicas=counts, total_replicas=total_replicas,
              autoscale=autoscale, max_batch_size=max_batch_size, max_queue_delay_ms=max_queue_delay_ms,
              threads=threads, replica_cpus=replica_cpus, latency_slo_ms=latency_slo_ms, backend=backend)
