"""INT8 stages for OpenVINO: NNCF post-training quantisation of each stage graph, written as OpenVINO IR.

The flow is ``deploykit quantize --mode static``'s: the calibration split goes through the manifest's
preprocessing and, for stage k > 0, through the FP32 stages before it, so NNCF sees the activations each stage
really gets. The exit head and score (every node that feeds only the exit outputs, see
:func:`deploykit.graphs.quantize.exit_head_nodes`) are put in NNCF's ignored scope and stay FP32: a small error in
a logit moves the exit score and with it the exit decision. ``model_type=TRANSFORMER`` lets NNCF keep the
attention parts it knows quantise badly in FP32 (softmax, layer norm inputs); see :func:`nncf_options`. The result
is an ``.xml`` + ``.bin`` pair per graph, which only the ``openvino`` backend runs.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from deploykit.backends.base import require
from deploykit.manifest import StageSpec

IR_WEIGHTS = ".bin"


def _ov_ops_for(model: Any, onnx_nodes: list[str], onnx_model: Any) -> list[str]:
    """OpenVINO op names that compute the outputs of the given ONNX nodes (matched by tensor name)."""
    wanted = {n.name: list(n.output) for n in onnx_model.graph.node if n.name in set(onnx_nodes)}
    tensors = {t for outs in wanted.values() for t in outs if t}
    names = []
    for op in model.get_ops():
        if op.get_type_name() in ("Parameter", "Result", "Constant"):
            continue
        name = op.get_friendly_name()
        outs = {t for o in op.outputs() for t in o.get_names()}
        # the ONNX frontend names an op after its node, and the ops it splits a node into "<node>/<part>"
        if name in wanted or name.split("/", 1)[0] in wanted or outs & tensors:
            names.append(name)
    return sorted(set(names))


def nncf_options() -> dict[str, Any]:
    """Keyword arguments for ``nncf.quantize`` (one place).

    TRANSFORMER model type and the MIXED preset (symmetric weights, asymmetric activations), SmoothQuant off: on
    the digits cascade after re-calibration (docs/results.md) SmoothQuant did not help (-0.8 points with, -0.3 /
    -1.1 without, noise-level) and the PERFORMANCE preset (symmetric activations) lost 6 points.
    """
    nncf = require("nncf", "openvino")
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, AdvancedSmoothQuantParameters

    return {"model_type": nncf.ModelType.TRANSFORMER, "preset": nncf.QuantizationPreset.MIXED,
            "advanced_parameters": AdvancedQuantizationParameters(
                smooth_quant_alphas=AdvancedSmoothQuantParameters(matmul=-1))}


def quantize_graph_ov(src: Path, dst_dir: Path, spec: StageSpec, feeds: list[dict[str, np.ndarray]],
                      subset_size: int, options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Quantise one ONNX graph with NNCF into ``dst_dir/<stem>.xml``; the exit head stays FP32.

    Returns what was kept and quantised, and the IR file names (``file``, ``weights``).
    """
    import onnx

    from deploykit.graphs.quantize import exit_head_nodes

    ov = require("openvino", "openvino")
    nncf = require("nncf", "openvino")
    nncf.set_log_level(logging.ERROR)
    onnx_model = onnx.load(str(src), load_external_data=False)
    state = [t.name for t in spec.outputs] if spec.exit_score else []
    head = exit_head_nodes(onnx_model, state, [n for n in (spec.exit_logits, spec.exit_score) if n])
    model = ov.Core().read_model(str(src))
    ignored = _ov_ops_for(model, head, onnx_model)
    qmodel = nncf.quantize(model, nncf.Dataset(feeds), subset_size=subset_size,
                           ignored_scope=nncf.IgnoredScope(names=ignored, validate=False),
                           **(nncf_options() if options is None else options))
    xml = dst_dir / (Path(spec.file).stem + ".xml")
    ov.save_model(qmodel, str(xml), compress_to_fp16=False)
    fq = [op.get_friendly_name() for op in qmodel.get_ops() if op.get_type_name() == "FakeQuantize"]
    return {"file": xml.name, "weights": xml.with_suffix(IR_WEIGHTS).name, "exit_head_nodes": head,
            "exit_head_ops_fp32": ignored, "quantized_nodes": fq}


def nncf_version() -> str:
    """The NNCF and OpenVINO versions the IR was written with (recorded in the manifest's provenance)."""
    ov = require("openvino", "openvino")
    nncf = require("nncf", "openvino")
    return f"nncf {nncf.__version__}, openvino {ov.__version__}"
