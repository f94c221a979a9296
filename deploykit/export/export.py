"""Model -> per-stage ONNX graphs + the monolithic graph + ``deploykit.json``.

Export is all-or-nothing: graphs are written to a temporary directory beside the target and moved into place only
after every check passed, so a failed export never leaves a half-written engine directory.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from deploykit.errors import ExportError
from deploykit.export.graphs import FullGraph, StageGraph, stage_flops
from deploykit.export.onnx_io import DEFAULT_OPSET, export_graph
from deploykit.manifest import (
    BATCH_DIM,
    MANIFEST_NAME,
    ExitPolicy,
    Manifest,
    Preprocessing,
    StageSpec,
    TensorSpec,
    file_sha256,
)
from deploykit.methods.base import ExitModel
from deploykit.staging import staged_dir


def _spec(name: str, t: torch.Tensor) -> TensorSpec:
    return TensorSpec(name=name, shape=[BATCH_DIM, *t.shape[1:]], dtype=str(t.dtype).replace("torch.", ""))


def export_model(
        model: ExitModel,
        out_dir: str | os.PathLike,
        *,
        labels: list[str],
        preprocessing: dict[str, Any] | Preprocessing,
        name: str = "model",
        score: str | None = None,
        parity_inputs: np.ndarray | None = None,
        opset: int = DEFAULT_OPSET,
        provenance: dict[str, Any] | None = None,
        backbone: dict[str, Any] | None = None,
        overwrite: bool = True,
) -> Manifest:
    """Export ``model`` as one ONNX graph per stage plus the monolithic graph, and write the manifest.

    Args:
        model: the trained multi-exit model.
        out_dir: engine directory to create (replaced if it already holds an engine and ``overwrite``).
        labels: class names, in logit order.
        preprocessing: input size, mean, std, interpolation (the backbone's timm data config).
        name: model name (the serve endpoint name).
        score: exit score computed in the graphs (default: the method's setting).
        parity_inputs: real inputs ``[N, C, H, W]`` to check the graphs against PyTorch on; skipped when None.
        opset: ONNX opset.
        provenance: extra provenance fields (checkpoint hash, run dir).
        backbone: backbone description for the manifest.
        overwrite: replace an existing engine directory.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        if not (out_dir / MANIFEST_NAME).exists():
            raise ExportError(f"{out_dir} exists and is not a deploykit engine directory; choose an empty or new path")
        if not overwrite:
            raise ExportError(f"{out_dir} already holds an engine; pass --force to replace it")
    pre = preprocessing if isinstance(preprocessing, Preprocessing) else Preprocessing.from_dict(dict(preprocessing))
    if len(labels) != model.num_classes:
        raise ExportError(f"{len(labels)} labels for a model with {model.num_classes} classes")
    score = score or getattr(model.cfg, "score", "max_softmax")
    model = model.prepare_for_export().eval()
    with staged_dir(out_dir) as tmp:
        manifest = _write_graphs(model, tmp, labels, pre, name, score, opset, backbone or {}, provenance or {})
        if parity_inputs is not None:
            from deploykit.export.validate import check_parity

            manifest.provenance["parity"] = check_parity(model, manifest, parity_inputs).to_dict()
            manifest.save(tmp)
    return Manifest.load(out_dir)


def _write_graphs(model: ExitModel, root: Path, labels: list[str], pre: Preprocessing, name: str, score: str,
                  opset: int, backbone: dict[str, Any], provenance: dict[str, Any]) -> Manifest:
    c, h, w = pre.input_size
    torch.manual_seed(0)
    example = torch.randn(2, c, h, w)
    trunk_flops, head_flops, full_flops = stage_flops(model, pre.input_size)
    stages: list[StageSpec] = []
    state: tuple[torch.Tensor, ...] = (example,)
    in_names = ["image"]
    for k in range(model.num_stages):
        last = k == model.num_stages - 1
        graph = StageGraph(model, k, score)
        with torch.no_grad():
            outs = graph(*state)
        state_out = outs[:-2]
        # a graph can't use one name for an input and an output, so state names carry the stage that made them
        out_names = [] if last else [f"{n}_{k}" for n in model.state_names]
        if len(state_out) != len(out_names):
            raise ExportError(f"stage {k} returns {len(state_out)} state tensors but the method names {out_names}")
        file = f"stage{k}.onnx"
        export_graph(graph, state, root / file, in_names, [*out_names, "logits", "score"], opset)
        stages.append(StageSpec(
            index=k, file=file,
            inputs=[_spec(n, t) for n, t in zip(in_names, state)],
            outputs=[_spec(n, t) for n, t in zip(out_names, state_out)],
            flops=trunk_flops[k], exit_flops=head_flops[k], blocks=list(model.stage_block_range(k)),
            sha256=file_sha256(root / file),
        ))
        state, in_names = tuple(state_out), out_names
    full = FullGraph(model)
    with torch.no_grad():
        full_logits = full(example)
    export_graph(full, (example,), root / "full.onnx", ["image"], ["logits"], opset)
    monolithic = StageSpec(index=0, file="full.onnx", inputs=[_spec("image", example)],
                           outputs=[_spec("logits", full_logits)], exit_logits="logits", exit_score="",
                           flops=full_flops, blocks=list(range(model.depth)), sha256=file_sha256(root / "full.onnx"))
    manifest = Manifest(
        name=name, method=model.method_config(), backbone=backbone, labels=list(labels), preprocessing=pre,
        stages=stages, exit_policy=ExitPolicy(score=score, thresholds=[None] * model.num_stages),
        monolithic=monolithic, provenance={**_versions(), "opset": opset, "exported_at": time.time(), **provenance},
    )
    manifest.save(root)
    return manifest


def _versions() -> dict[str, str]:
    import onnx
    import timm

    import deploykit

    v = {"deploykit": deploykit.__version__, "torch": torch.__version__, "timm": timm.__version__,
         "onnx": onnx.__version__}
    try:
        import onnxruntime

        v["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    return v


def export_run(
        run_dir: str | os.PathLike,
        out_dir: str | os.PathLike,
        *,
        score: str | None = None,
        check: bool = True,
        parity_samples: int = 256,
        opset: int = DEFAULT_OPSET,
        overwrite: bool = True,
        check_trt: bool = False,
) -> Manifest:
    """Export a training run (``deploykit train`` output) and check it against PyTorch on real inputs.

    The parity inputs are the first ``parity_samples`` images of the run's test split.
    """
    from deploykit.data import stack_split
    from deploykit.train import load_run

    model, config = load_run(run_dir)
    run_dir = Path(run_dir)
    parity = None
    if check:
        parity, _ = stack_split(config["data"]["spec"], "test", config["preprocessing"], limit=parity_samples)
    ckpt = run_dir / "model.safetensors"
    manifest = export_model(
        model, out_dir, labels=config["labels"], preprocessing=config["preprocessing"],
        name=str(config.get("name", run_dir.name)), score=score, parity_inputs=parity, opset=opset,
        backbone=dict(config.get("backbone", {})), overwrite=overwrite,
        provenance={"run_dir": str(run_dir.resolve()), "checkpoint_sha256": file_sha256(ckpt),
                    "data": config["data"]["spec"]},
    )
    if check_trt:
        from deploykit.graphs.trt_lint import check_trt as lint_for_trt

        lint_for_trt(out_dir, target="10.3")
    return manifest
