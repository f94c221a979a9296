"""INT8 stages: quantise every stage graph (and the monolithic graph) with ONNX Runtime's quantisation tooling.

Two modes. ``dynamic`` quantises weights ahead of time and activations per batch at run time (MatMulInteger; ONNX
Runtime CPU only). ``static`` calibrates activation ranges on real images and writes symmetric INT8 QDQ graphs
(QuantizeLinear / DequantizeLinear pairs), which ONNX Runtime runs with INT8 kernels and TensorRT 10 / 11 builds as
explicit-precision INT8 engines. Static calibration data goes through the manifest's preprocessing and, for stage
k > 0, through the FP32 stages before it, so each stage is calibrated on the activations it really sees.

Exit heads and score computation stay FP32: a small error in a logit moves the exit score, and with it the exit
decision. Only weight MatMul / Gemm / Conv nodes of the trunk are quantised; attention's activation-by-activation
MatMuls stay FP32 too (under 10% of a ViT's FLOPs, and softmax probabilities quantise poorly). Thresholds
calibrated on the FP32 graphs are copied but marked stale: run ``deploykit calibrate`` on the INT8 directory.
"""

from __future__ import annotations

import copy
import logging
import os
import re
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from deploykit import progress as P
from deploykit.errors import ConfigError, DataError, ManifestError
from deploykit.manifest import MANIFEST_NAME, Manifest, StageSpec, as_manifest, file_sha256
from deploykit.manifest_sections import GraphEntry, auxiliary_files, graph_entries
from deploykit.staging import staged_dir

MODES = ("dynamic", "static", "openvino")
CALIBRATED = ("static", "openvino")  # modes that calibrate activation ranges on real images
CALIBRATE_METHODS = ("minmax", "percentile", "entropy")
PRECISION = {"dynamic": "int8-dynamic", "static": "int8-static", "openvino": "int8-openvino"}
MIN_CALIB_SAMPLES = 16
QUANT_OPS = ("MatMul", "Gemm", "Conv")
# ops only a quantised graph has (QDQ pairs, or what quantize_dynamic writes)
INT8_OPS = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "MatMulInteger", "ConvInteger",
            "QLinearMatMul", "QLinearConv"}
_BLOCK_SCOPE = re.compile(r"\.blocks\.\d+$")


@dataclass
class QuantSettings:
    """What ``quantize`` was asked for (recorded in the manifest's ``extra["quantization"]``)."""

    mode: str = "dynamic"
    calib_data: str = ""
    calib_samples: int = 256
    calibrate_method: str = "minmax"
    per_channel: bool = True
    batch_size: int = 32

    def validate(self) -> None:
        """Raise :class:`ConfigError` / :class:`DataError` for settings no quantisation can satisfy."""
        if self.mode not in MODES:
            raise ConfigError(f"quantisation mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.calibrate_method not in CALIBRATE_METHODS:
            raise ConfigError(f"calibrate_method must be one of {', '.join(CALIBRATE_METHODS)}, "
                              f"got {self.calibrate_method!r}")
        if self.mode in CALIBRATED and self.calib_samples < MIN_CALIB_SAMPLES:
            raise DataError(f"{self.mode} quantisation needs at least {MIN_CALIB_SAMPLES} calibration samples, got "
                            f"{self.calib_samples}; pass --calib-samples {MIN_CALIB_SAMPLES} or more (256 is typical)")
        if self.batch_size < 1:
            raise ConfigError(f"calibration batch size must be >= 1, got {self.batch_size}")


# ---- which nodes stay FP32 --------------------------------------------------------------------------------------
def _ancestors(graph: Any, tensors: set[str]) -> set[str]:
    """Names of the nodes that ``tensors`` depend on (the graph's node list is topologically sorted)."""
    need, out = set(tensors), set()
    for node in reversed(graph.node):
        if need.intersection(node.output):
            out.add(node.name)
            need.update(i for i in node.input if i)
    return out


def _scopes(node: Any) -> str:
    for p in node.metadata_props:
        if p.key == "pkg.torch.onnx.name_scopes":
            return p.value
    return ""


def _trunk_end(graph: Any, exit_outputs: set[str]) -> str | None:
    """The trunk's last output in a graph that hands on no state (last stage, monolithic graph).

    The exporter records each node's module scope: the trunk ends with the last node inside a transformer block
    (``...blocks.N``). Without that metadata, the last residual Add (two computed inputs, 3-D output) is used.
    """
    feeds_exit = _ancestors(graph, exit_outputs)
    nodes = [n for n in graph.node if n.name in feeds_exit]
    for node in reversed(nodes):
        if any(_BLOCK_SCOPE.search(s.strip(" '\"")) for s in _scopes(node).strip("[]").split(",")):
            return node.output[0]
    inits = {t.name for t in graph.initializer}
    for node in reversed(nodes):
        if node.op_type == "Add" and len(node.input) == 2 and not inits.intersection(node.input):
            return node.output[0]
    return None


def exit_head_nodes(model: Any, state_outputs: list[str], exit_outputs: list[str]) -> list[str]:
    """Nodes that compute only the exit head and score: they feed ``exit_outputs`` and not the trunk.

    Stages that hand on state: every ancestor of the exit outputs that is not an ancestor of the state. Graphs
    that hand on nothing: every ancestor of the exit outputs downstream of the trunk's end (:func:`_trunk_end`).
    """
    g = model.graph
    exits = set(exit_outputs)
    if state_outputs:
        trunk = _ancestors(g, set(state_outputs))
    else:
        end = _trunk_end(g, exits)
        if end is None:
            raise ManifestError("can't tell the exit head from the trunk in a graph without transformer blocks; "
                                "re-export the model with this deploykit version")
        trunk = _ancestors(g, {end})
    return sorted(_ancestors(g, exits) - trunk)


def activation_matmuls(model: Any) -> list[str]:
    """MatMuls of two computed tensors (attention's q·k and p·v): kept FP32 (few FLOPs, quantise poorly)."""
    inits = {t.name for t in model.graph.initializer}
    consts = {o for n in model.graph.node if n.op_type == "Constant" for o in n.output} | inits
    return [n.name for n in model.graph.node if n.op_type == "MatMul" and not consts.intersection(n.input)]


# ---- calibration data --------------------------------------------------------------------------------------------
def calibration_inputs(manifest: Manifest, calib_data: str | np.ndarray, samples: int) -> np.ndarray:
    """Preprocessed calibration images ``[N, C, H, W]`` (the train split of a data spec, or a given array)."""
    want = [int(v) for v in manifest.input_spec.shape[1:]]
    if isinstance(calib_data, np.ndarray):
        x = calib_data[:samples]
        what = "the given array"
    else:
        from deploykit.data import stack_split

        x, _ = stack_split(calib_data, "train", manifest.preprocessing.__dict__, limit=samples)
        what = f"{calib_data!r} (train split)"
    if x.ndim != 1 + len(want) or list(x.shape[1:]) != want:
        raise DataError(f"calibration data from {what} has shape {list(x.shape)}, but the model takes "
                        f"[batch, {', '.join(map(str, want))}]; preprocess it per the manifest's preprocessing")
    if len(x) < MIN_CALIB_SAMPLES:
        raise DataError(f"{what} gives {len(x)} calibration samples; static quantisation needs at least "
                        f"{MIN_CALIB_SAMPLES} — use more data")
    if not np.isfinite(x).all():
        raise DataError(f"calibration data from {what} has NaN or infinite values; fix the preprocessing")
    return np.ascontiguousarray(x, dtype=np.float32)


def stage_feeds(manifest: Manifest, x: np.ndarray, batch_size: int = 32) -> list[list[dict[str, np.ndarray]]]:
    """Per stage, the feeds it sees when the FP32 stages before it run on ``x`` (batched)."""
    from deploykit.backends.ort import OrtRunner

    batches: list[dict[str, np.ndarray]] = [{manifest.input_spec.name: x[i:i + batch_size]}
                                            for i in range(0, len(x), batch_size)]
    per_stage = []
    for spec in manifest.stages:
        per_stage.append(batches)
        if not spec.outputs:
            break
        with OrtRunner(manifest.path_of(spec.file)) as runner:
            names = [t.name for t in spec.outputs]
            batches = [{n: v for n, v in runner.run(b, names).items()} for b in batches]
    return per_stage


def _reader(feeds: list[dict[str, np.ndarray]]) -> Any:
    from onnxruntime.quantization import CalibrationDataReader

    class _Feeds(CalibrationDataReader):
        def __init__(self) -> None:
            self._it = iter(feeds)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._it, None)

        def rewind(self) -> None:
            self._it = iter(feeds)

    return _Feeds()


# ---- one graph --------------------------------------------------------------------------------------------------
def quantize_graph(src: Path, dst: Path, entry: GraphEntry, s: QuantSettings,
                   feeds: list[dict[str, np.ndarray]] | None) -> dict[str, Any]:
    """Quantise one graph, keeping its exit head and score FP32; returns what was kept and quantised."""
    import onnx

    model = onnx.load(str(src))
    exits = list(entry.exit_outputs)
    head = exit_head_nodes(model, list(entry.state_outputs), exits) if exits else []
    attention = activation_matmuls(model)
    gemms = {n.name for n in model.graph.node if n.op_type == "Gemm"}
    # quantize_dynamic rewrites every Gemm as <name>_MatMul + <name>_Add before it reads nodes_to_exclude
    renamed = [f"{n}{suffix}" for n in head if n in gemms for suffix in ("_MatMul", "_Add", "_Transpose")]
    exclude = sorted(set(head) | set(renamed) | set(attention))
    quantized = [n.name for n in model.graph.node if n.op_type in QUANT_OPS and n.name not in exclude]
    common = dict(op_types_to_quantize=list(QUANT_OPS), per_channel=s.per_channel, nodes_to_exclude=exclude)
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # ORT logs "consider pre-processing" advice on the root logger for every graph
    try:
        _run_quantizer(model, dst, s, feeds, common)
    finally:
        root.setLevel(level)
    written = {n.name for n in onnx.load(str(dst)).graph.node}
    head = sorted(n for n in {*head, *renamed} if n in written)
    return {"exit_head_nodes": head, "fp32_attention_matmuls": attention, "quantized_nodes": quantized}


def _run_quantizer(model: Any, dst: Path, s: QuantSettings, feeds: list[dict[str, np.ndarray]] | None,
                   common: dict[str, Any]) -> None:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_dynamic, quantize_static

    if s.mode == "dynamic":
        quantize_dynamic(model, dst, weight_type=QuantType.QInt8, **common)
    else:
        method = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
                  "entropy": CalibrationMethod.Entropy}[s.calibrate_method]
        # symmetric signed INT8 and float biases: the QDQ form TensorRT builds (it has no INT32 DequantizeLinear)
        quantize_static(model, dst, _reader(feeds or []), quant_format=QuantFormat.QDQ,
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, calibrate_method=method,
                        extra_options={"ActivationSymmetric": True, "WeightSymmetric": True,
                                       "CalibTensorRangeSymmetric": True, "CalibMovingAverage": False,
                                       "QuantizeBias": False}, **common)


FORMATS = {"dynamic": "MatMulInteger (dynamic)", "static": "QDQ", "openvino": "OpenVINO IR (NNCF FakeQuantize)"}


def _quantize_ov(m: Manifest, spec: StageSpec, tmp: Path, feeds: list[dict[str, np.ndarray]], n_calib: int,
                 graphs: dict[str, Any]) -> None:
    """One graph through NNCF; the spec now names the IR, whose weights file is hashed as a sidecar."""
    from deploykit.graphs.ov_quantize import quantize_graph_ov

    info = quantize_graph_ov(m.path_of(spec.file), tmp, spec, feeds, subset_size=n_calib)
    graphs[info["file"]] = {k: v for k, v in info.items() if k not in ("file", "weights")}
    spec.file = info["file"]
    spec.extra["sidecars"] = [{"file": info["weights"], "sha256": file_sha256(tmp / info["weights"])}]


# ---- the engine directory ---------------------------------------------------------------------------------------
def is_quantized(manifest: Manifest) -> bool:
    """Whether an engine directory's graphs are already INT8."""
    return "quantization" in manifest.extra or any(str(e.get("precision", "fp32")).startswith("int8")
                                                   for e in graph_entries(manifest))


def quantize(
        engine_dir: str | os.PathLike | Manifest,
        out_dir: str | os.PathLike,
        mode: str = "dynamic",
        calib_data: str | np.ndarray | None = None,
        calib_samples: int = 256,
        calibrate_method: str = "minmax",
        per_channel: bool = True,
        batch_size: int = 32,
        overwrite: bool = False,
) -> Manifest:
    """Write an INT8 copy of an exported engine directory: every graph whose entry says so, quantised.

    Which graphs (cascade stages and the monolithic graph; MuE's encoder layers, ``enc_out`` and decoder steps, with
    embeddings and the output head copied FP32) and which outputs stay FP32 come from
    :func:`deploykit.manifest_sections.graph_entries`, so this works for every family.

    Args:
        engine_dir: FP32 engine directory (``deploykit export`` output), or its loaded manifest.
        out_dir: new engine directory (written atomically; refused if it holds something, unless ``overwrite``).
        mode: ``dynamic`` (ORT CPU only), ``static`` (QDQ; ORT CPU and TensorRT) or ``openvino`` (NNCF,
            OpenVINO IR ``.xml`` + ``.bin``; the ``openvino`` backend only).
        calib_data: static mode: ``digits``, ``imagefolder:PATH`` (its train split is used) or an array
            ``[N, C, H, W]`` already preprocessed per the manifest; default: the data the engine was trained on
            (the manifest's ``provenance.data``). A data spec with other classes than the engine is refused.
        calib_samples: static mode: how many images to calibrate on (at least 16).
        calibrate_method: static mode: ``minmax``, ``percentile`` or ``entropy`` (ORT's calibrators).
        per_channel: per-output-channel weight scales (better accuracy, same speed).
        batch_size: rows per calibration batch.
        overwrite: replace an existing engine directory at ``out_dir``.

    Returns:
        The new directory's manifest: stage precision ``int8-dynamic`` / ``int8-static``, the settings in
        ``extra["quantization"]``, the FP32 calibration kept but marked stale.
    """
    m = copy.deepcopy(as_manifest(engine_dir))
    src_dir, out = Path(m.root), Path(out_dir)
    calib_data = _calibration_source(m, mode, calib_data, src_dir)
    s = QuantSettings(mode, calib_data if isinstance(calib_data, str) else "array", int(calib_samples),
                      calibrate_method, per_channel, batch_size)
    s.validate()
    entries = graph_entries(m)
    if is_quantized(m):
        raise ConfigError(f"{src_dir} is already quantised; quantise the FP32 engine directory it came from (see "
                          "its deploykit.json extra.quantization.source)")
    if mode in CALIBRATED and not m.stages:
        raise ConfigError(f"--mode {mode} calibrates stage graphs on images; this engine has none (use "
                          "--mode dynamic)")
    for e in entries:
        if not m.path_of(e.file).exists():
            raise ManifestError(f"graph file {m.path_of(e.file)} named by the manifest is missing; re-export the model")
    if out.resolve() == src_dir.resolve():
        raise ConfigError("the output directory must differ from ENGINE_DIR (the FP32 graphs are kept)")
    if out.exists() and any(out.iterdir()):
        if not (out / MANIFEST_NAME).exists():
            raise ConfigError(f"{out} exists and is not a deploykit engine directory; choose an empty or new path")
        if not overwrite:
            raise ConfigError(f"{out} already holds an engine; pass --force to replace it")
    per_stage: list[list[dict[str, np.ndarray]]] = []
    mono_feeds: list[dict[str, np.ndarray]] = []
    n_calib = 0
    if mode in CALIBRATED:
        x = calibration_inputs(m, calib_data, s.calib_samples)
        n_calib = len(x)
        per_stage = stage_feeds(m, x, batch_size)
        mono_feeds = per_stage[0]
    started = time.time()
    with staged_dir(out) as tmp:
        graphs: dict[str, Any] = {}
        for i, e in enumerate(P.track(entries, f"quantize ({mode})")):
            e.set("trt", None)  # plans of the FP32 graphs don't belong to these
            if not e.quantize:
                shutil.copyfile(m.path_of(e.file), tmp / e.file)
                continue
            feeds = (per_stage[i] if i < len(m.stages) else mono_feeds) if mode in CALIBRATED else None
            if mode == "openvino":  # cascade stages only (refused above otherwise): the entry's target is a StageSpec
                _quantize_ov(m, e._target, tmp, feeds or [], n_calib, graphs)
                file = e._target.file
            else:
                graphs[e.file] = quantize_graph(m.path_of(e.file), tmp / e.file, e, s, feeds)
                file = e.file
            e.set("sha256", file_sha256(tmp / file))
            e.set("precision", PRECISION[mode])
        for f in auxiliary_files(m):
            shutil.copyfile(m.path_of(f), tmp / f)
        m.extra.pop("trt", None)
        m.extra["quantization"] = {
            **asdict(s), "calib_samples": n_calib, "calib_split": "train", "format": FORMATS[mode],
            "activation_type": "uint8 per batch" if mode == "dynamic" else "int8 symmetric",
            "weight_type": "int8 symmetric", "op_types": list(QUANT_OPS), "source": str(src_dir.resolve()),
            "seconds": round(time.time() - started, 1), "graphs": graphs,
        }
        if mode == "dynamic":
            for k in ("calib_data", "calibrate_method", "batch_size"):
                m.extra["quantization"].pop(k)
        if mode == "openvino":  # NNCF's own range estimators, not ORT's calibrate_method
            m.extra["quantization"].update(
                calibrate_method="nncf (model_type transformer, preset mixed, no SmoothQuant)",
                op_types="NNCF defaults", backend="openvino")
            from deploykit.graphs.ov_quantize import nncf_version

            m.provenance = {**m.provenance, "openvino": nncf_version()}
        if m.calibration:
            m.calibration = {**m.calibration, "stale": "thresholds were calibrated on the FP32 graphs; run "
                                                       "`deploykit calibrate` on this directory"}
        import onnxruntime

        m.provenance = {**m.provenance, "onnxruntime": onnxruntime.__version__, "quantized_at": time.time()}
        m.save(tmp)
    return Manifest.load(out)


def _calibration_source(m: Manifest, mode: str, calib_data: str | np.ndarray | None,
                        src_dir: Path) -> str | np.ndarray | None:
    """The data static / openvino calibration reads: as given, else the engine's own training data; same classes."""
    if mode not in CALIBRATED:
        if calib_data is not None:
            raise ConfigError("--calib-data applies to --mode static / openvino only (dynamic quantisation needs no "
                              "data)")
        return None
    if calib_data is None:
        calib_data = m.provenance.get("data")
        if not calib_data:
            raise ConfigError(f"{src_dir}'s manifest records no training data (provenance.data); pass --calib-data "
                              "digits or imagefolder:PATH with the classes the model was trained on")
    if isinstance(calib_data, str):
        from deploykit.data import check_labels

        check_labels(m.labels, calib_data, what="quantize --calib-data")
    return calib_data


__all__ = ["MIN_CALIB_SAMPLES", "MODES", "QuantSettings", "activation_matmuls", "calibration_inputs",
           "exit_head_nodes", "is_quantized", "quantize", "quantize_graph", "stage_feeds"]
