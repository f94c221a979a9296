"""Offline TensorRT lint: check ONNX graphs against TensorRT's ONNX parser support, with no TensorRT installed.

The rules come from the ONNX-TensorRT operator support matrix (``docs/operators.md`` of onnx/onnx-tensorrt, the
10.15 table, cross-checked against the 10.x changelog) plus what deploykit's builder needs: one optimisation
profile over the batch axis, and over the named non-batch axes whose ranges the manifest declares
(``extra["dynamic_axes"] = {name: [min, opt, max]}``, written by the MuE export; see :func:`axis_ranges_of`).
Only restrictions that make a build fail or give wrong results are errors; things that may cost speed or need a
check on the device are warnings. ``build`` refuses graphs with errors.

Run it as ``deploykit lint ENGINE_DIR`` or from ``deploykit export --check-trt`` (:func:`check_trt`).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto

from deploykit.errors import ConfigError, ExportError, ManifestError

# ---- the support matrix, condensed ------------------------------------------------------------------------------
# Type classes of an op's data input ("T"): F float only, I float + INT32/INT64, A also BOOL, B BOOL only, X any.
_F, _I, _A, _B, _X = "F", "I", "A", "B", "X"
_SUPPORTED: dict[str, str] = {}
for _cls, _ops in {
    _F: "Acos Acosh Asin Asinh Atan Atanh Attention AveragePool BatchNormalization BlackmanWindow Ceil Celu Clip "
        "Conv ConvTranspose Cos Cosh CumSum DeformConv Dropout Einsum Elu Erf Exp Floor Gemm GlobalAveragePool "
        "GlobalLpPool GlobalMaxPool GridSample GroupNormalization GRU HammingWindow HannWindow HardSigmoid "
        "HardSwish Hardmax ImageScaler InstanceNormalization IsInf LayerNormalization LeakyRelu Log LogSoftmax LRN "
        "LSTM LpNormalization LpPool MatMul MaxPool MeanVarianceNormalization Mish NonMaxSuppression NonZero "
        "ParametricSoftplus PRelu QuantizeLinear RandomNormal RandomNormalLike RandomUniform RandomUniformLike "
        "Reciprocal Resize RMSNormalization RNN RoiAlign RotaryEmbedding Round STFT ScaledTanh Scan Selu Sigmoid "
        "Sin Sinh Softmax Softplus Softsign Sqrt Tan Tanh TensorScatter ThresholdedRelu Upsample",
    _I: "Abs Add ArgMax ArgMin DepthToSpace Div Equal Gelu Greater GreaterOrEqual IsNaN Less LessOrEqual Max Mean "
        "Min Mod Mul Neg Pad Pow Range ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean "
        "ReduceMin ReduceProd ReduceSum ReduceSumSquare Relu Scatter ScatterElements ScatterND Shrink Sign "
        "SpaceToDepth Sub Sum TopK",
    _A: "Concat Constant ConstantOfShape Expand EyeLike Flatten Gather GatherElements GatherND Identity If Loop "
        "OneHot Reshape ReverseSequence Slice Split Squeeze Tile Transpose Trilu Unsqueeze Where",
    _B: "And Not Or Xor",
    _X: "Cast CastLike DequantizeLinear Shape Size",
}.items():
    for _op in _ops.split():
        _SUPPORTED[_op] = _cls

# Ops first listed in the support matrix of a later TensorRT release than JetPack 6's 10.3.
_SINCE = {"Attention": (10, 14), "RMSNormalization": (10, 15), "RotaryEmbedding": (10, 15), "TensorScatter": (10, 15)}
# Inputs the parser needs as build-time constants: (op, input index, severity).
_CONST_INPUTS = [("TopK", 1, "warning"), ("CumSum", 1, "error"), ("OneHot", 1, "error"),
                 ("Squeeze", 1, "warning"), ("Unsqueeze", 1, "warning")] + [
    (op, 1, "error") for op in ("ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean",
                                "ReduceMin", "ReduceProd", "ReduceSum", "ReduceSumSquare")]
_TYPE_OK = {
    _F: {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16},
    _I: {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.INT32, TensorProto.INT64},
    _A: {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.INT32, TensorProto.INT64,
         TensorProto.BOOL},
    _B: {TensorProto.BOOL},
}
_CONTROL_FLOW = {"If", "Loop", "Scan"}
# what onnxruntime.quantization.quantize_dynamic writes: no TensorRT importer (QDQ graphs are the portable form)
_DYNAMIC_INT8 = {"DynamicQuantizeLinear", "MatMulInteger", "ConvInteger", "QLinearMatMul", "QLinearConv"}
TOPK_MAX_K = 3840
DEFAULT_TARGET = "10.3"  # JetPack 6
WIDE_RANGE_RATIO = 8  # a declared axis whose max is this many times its opt gets a warning (kernels tuned for opt)
AxisRanges = dict[str, tuple[int, int, int]]


def axis_ranges_of(extra: dict[str, Any] | None) -> AxisRanges:
    """Validated ``{axis name: (min, opt, max)}`` from a manifest's ``extra["dynamic_axes"]`` (empty when absent).

    TensorRT needs ``0 <= min <= opt <= max`` and ``max >= 1``; anything else is a :class:`ManifestError`.
    """
    raw = (extra or {}).get("dynamic_axes") or {}
    if not isinstance(raw, dict):
        raise ManifestError(f"extra.dynamic_axes must map axis names to [min, opt, max], got {raw!r}")
    out: AxisRanges = {}
    for name, r in raw.items():
        try:
            lo, opt, hi = (int(v) for v in r)
        except (TypeError, ValueError) as e:
            raise ManifestError(f"extra.dynamic_axes[{name!r}] must be [min, opt, max] integers, got {r!r}") from e
        if not (0 <= lo <= opt <= hi and hi >= 1):
            raise ManifestError(f"extra.dynamic_axes[{name!r}] = {[lo, opt, hi]}: TensorRT needs "
                                "0 <= min <= opt <= max and max >= 1")
        out[str(name)] = (lo, opt, hi)
    return out


def opset_range(target: str) -> tuple[int, int]:
    """ai.onnx opsets the target TensorRT's parser accepts (conservative: 9..20 before 10.15, 9..24 after)."""
    major, minor = _version_tuple(target)
    return (9, 24) if (major, minor) >= (10, 15) else (9, 20)


def _version_tuple(v: str) -> tuple[int, int]:
    parts = (str(v).split(".") + ["0"])[:2]
    try:
        return int(parts[0]), int(parts[1])
    except ValueError as e:
        raise ExportError(f"TensorRT target version must look like '10.3' or '11', got {v!r}") from e


# ---- report ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LintIssue:
    """One problem: where it is (graph, node name, op), how bad, and what to do."""

    graph: str
    node: str
    op: str
    code: str
    severity: str
    message: str

    def __str__(self) -> str:
        return f"{self.severity}: {self.graph}: {self.op} node {self.node!r} [{self.code}]: {self.message}"


@dataclass
class LintReport:
    """Issues of every graph in an engine directory; ``ok`` when there are no errors (warnings are allowed)."""

    target: str
    graphs: list[str] = field(default_factory=list)
    issues: list[LintIssue] = field(default_factory=list)

    @property
    def errors(self) -> list[LintIssue]:
        """Issues that make a build fail or give wrong results."""
        return [i for i in self.issues if i.severity == "error"]

    @property
    def warnings(self) -> list[LintIssue]:
        """Issues worth a look on the device that don't block the build."""
        return [i for i in self.issues if i.severity == "warning"]

    @property
    def ok(self) -> bool:
        """True when nothing blocks the build."""
        return not self.errors

    def format(self) -> str:
        """Human-readable summary, one line per issue."""
        head = (f"TensorRT {self.target} lint of {len(self.graphs)} graph(s): {len(self.errors)} error(s), "
                f"{len(self.warnings)} warning(s)")
        return "\n".join([head] + [f"  {i}" for i in self.issues])

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (for ``--json`` output and reports)."""
        return {"target": self.target, "ok": self.ok, "graphs": self.graphs, "issues": [asdict(i) for i in self.issues]}


# ---- the lint -------------------------------------------------------------------------------------------------
def lint_graph(
        model: str | os.PathLike | onnx.ModelProto,
        target: str = DEFAULT_TARGET,
        name: str | None = None,
        axis_ranges: dict[str, Any] | None = None,
) -> list[LintIssue]:
    """Check one ONNX graph against TensorRT's ONNX parser support.

    Args:
        model: path to an ``.onnx`` file or a loaded ``ModelProto``.
        target: TensorRT version the engine will be built with (``"10.3"`` for JetPack 6, ``"11"``).
        name: graph name used in the issues (defaults to the file name).
        axis_ranges: ``{axis name: (min, opt, max)}`` declared by the manifest; inputs' dynamic non-batch axes
            with these names get a profile range at build time and are not errors.

    Returns:
        Every issue found, errors and warnings, in graph order.
    """
    if not isinstance(model, onnx.ModelProto):
        path = Path(model)
        if not path.exists():
            raise ExportError(f"no ONNX graph at {path}; export the model first (`deploykit export`)")
        name = name or path.name
        try:
            model = onnx.load(str(path), load_external_data=False)
        except Exception as e:  # protobuf decode errors have no common base class
            raise ExportError(f"{path} is not a readable ONNX model ({e}); re-export it") from e
    ranges = {k: tuple(int(x) for x in v) for k, v in (axis_ranges or {}).items()}
    return _Linter(model, name or model.graph.name or "graph", target, ranges).run()


class _Linter:
    def __init__(self, model: onnx.ModelProto, name: str, target: str, axis_ranges: dict[str, tuple[int, ...]]):
        self.model, self.name, self.target, self.axis_ranges = model, name, target, axis_ranges
        self.version = _version_tuple(target)
        self.issues: list[LintIssue] = []
        try:
            inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
        except Exception:  # shape inference is a helper here; the checks below work without it
            inferred = model
        g = inferred.graph
        self.types: dict[str, int] = {}
        for v in list(g.input) + list(g.output) + list(g.value_info):
            if v.type.HasField("tensor_type"):
                self.types[v.name] = v.type.tensor_type.elem_type
        for t in g.initializer:
            self.types[t.name] = t.data_type
        self.consts = {t.name for t in g.initializer}
        self.producer: dict[str, onnx.NodeProto] = {}
        for n in model.graph.node:
            if n.op_type == "Constant":
                self.consts.update(n.output)
            for o in n.output:
                self.producer[o] = n

    def add(self, node: onnx.NodeProto | None, code: str, severity: str, message: str, op: str = "") -> None:
        node_name = "" if node is None else (node.name or f"<unnamed {node.op_type}>")
        self.issues.append(LintIssue(self.name, node_name, op or (node.op_type if node else "graph"), code, severity,
                                     message))

    def run(self) -> list[LintIssue]:
        self.check_opset()
        self.check_io()
        for node in self.model.graph.node:
            self.check_node(node)
        return self.issues

    def check_opset(self) -> None:
        lo, hi = opset_range(self.target)
        for imp in self.model.opset_import:
            if imp.domain in ("", "ai.onnx") and not lo <= imp.version <= hi:
                self.add(None, "opset", "error",
                         f"graph uses ai.onnx opset {imp.version}; TensorRT {self.target} parses opsets {lo}..{hi} — "
                         f"re-export with an opset in that range", op="opset")

    def check_io(self) -> None:
        g = self.model.graph
        inits = {t.name for t in g.initializer}
        derived: dict[str, list[Any]] | None = None
        for kind, values in (("input", [v for v in g.input if v.name not in inits]), ("output", list(g.output))):
            for v in values:
                tt = v.type.tensor_type
                dims = list(tt.shape.dim)
                for axis, d in enumerate(dims):
                    if axis == 0 or (d.HasField("dim_value") and d.dim_value > 0):
                        continue
                    label = d.dim_param or "?"
                    if d.dim_param and d.dim_param in self.axis_ranges:
                        if kind == "input":
                            self.check_range(v.name, axis, d.dim_param)
                        continue
                    if kind == "output":  # exporter-named dims TensorRT computes from the (profiled) inputs are fine
                        derived = self.derived_output_dims() if derived is None else derived
                        got = derived.get(v.name, [])
                        if axis < len(got) and (isinstance(got[axis], int) or got[axis] in self.axis_ranges):
                            continue
                    declared = f" (declared: {', '.join(sorted(self.axis_ranges))})" if self.axis_ranges else ""
                    self.add(None, "dynamic-dim", "error",
                             f"graph {kind} {v.name!r} has a dynamic axis {axis} ({label!r}) with no declared range"
                             f"{declared}; the build makes profiles over the batch axis and the axes the manifest "
                             "declares in extra.dynamic_axes only — export static non-batch shapes or declare "
                             f"{label!r}: [min, opt, max]", op=kind)
                if tt.elem_type == TensorProto.INT64:
                    self.add(None, "int64-io", "warning",
                             f"graph {kind} {v.name!r} is INT64; it must be bound as int64 on the device and TensorRT "
                             "computes shape tensors in INT32/INT64 — deploykit stages hand on float32 only", op=kind)
                elif tt.elem_type == TensorProto.DOUBLE:
                    self.add(None, "double-io", "error",
                             f"graph {kind} {v.name!r} is DOUBLE; TensorRT has no FP64 — export it as float32", op=kind)

    def check_range(self, tensor: str, axis: int, axis_name: str) -> None:
        lo, opt, hi = self.axis_ranges[axis_name]
        if hi > WIDE_RANGE_RATIO * max(opt, 1):
            self.add(None, "wide-axis-range", "warning",
                     f"graph input {tensor!r} axis {axis} ({axis_name!r}) spans {lo}..{hi} with opt {opt}; kernels are "
                     "tuned for opt and may be slow near max — consider a narrower range or a second profile",
                     op="input")

    def derived_output_dims(self) -> dict[str, list[Any]]:
        """Output dims ONNX shape inference derives from the inputs (ints, or the input axis names they follow)."""
        m = onnx.ModelProto()
        m.CopyFrom(self.model)
        for o in m.graph.output:
            o.type.tensor_type.ClearField("shape")
        try:
            inferred = onnx.shape_inference.infer_shapes(m, strict_mode=False, data_prop=True)
        except Exception:
            return {}
        out: dict[str, list[Any]] = {}
        for o in inferred.graph.output:
            if o.type.tensor_type.HasField("shape"):
                out[o.name] = [d.dim_value if d.HasField("dim_value") else d.dim_param
                               for d in o.type.tensor_type.shape.dim]
        return out

    def check_node(self, node: onnx.NodeProto) -> None:
        op = node.op_type
        if node.domain not in ("", "ai.onnx"):
            self.add(node, "custom-domain", "error",
                     f"op from domain {node.domain!r} needs a TensorRT plugin; don't save ORT-optimised graphs "
                     "(com.microsoft fused ops) — export plain ONNX")
            return
        if op in _CONTROL_FLOW:
            self.add(node, "control-flow", "error",
                     f"{op} control flow: TensorRT restricts it (same-rank branches, static loop shapes) and it blocks "
                     "CUDA graphs; deploykit stages must be straight-line graphs — move the decision to the runtime")
            return
        cls = _SUPPORTED.get(op)
        if op in _DYNAMIC_INT8:
            self.add(node, "dynamic-int8", "error",
                     f"{op} comes from dynamic INT8 quantisation, which runs on ONNX Runtime CPU only; for TensorRT "
                     "quantise with `deploykit quantize --mode static` (QDQ graphs)")
            return
        if cls is None:
            self.add(node, "unsupported-op", "error",
                     f"TensorRT's ONNX parser has no importer for {op}; rewrite it with supported ops or add a plugin")
            return
        since = _SINCE.get(op)
        if since and self.version < since:
            self.add(node, "op-too-new", "error",
                     f"{op} is only in the support matrix from TensorRT {since[0]}.{since[1]}; target is "
                     f"{self.target} — decompose it at export")
        self.check_types(node, cls)
        self.check_constant_inputs(node)
        check = getattr(self, f"check_{op}", None)
        if check is not None:
            check(node)

    def check_types(self, node: onnx.NodeProto, cls: str) -> None:
        if cls == _X:
            return
        idx = 1 if node.op_type == "Where" else 0
        if len(node.input) <= idx or not node.input[idx]:
            return
        t = self.types.get(node.input[idx])
        if t is None or t == TensorProto.UNDEFINED or t in _TYPE_OK[cls]:
            return
        src = self.producer.get(node.input[idx])
        via = f" (from {src.op_type} {src.name!r})" if src is not None else ""
        tname = TensorProto.DataType.Name(t)
        severity = "warning" if t == TensorProto.DOUBLE else "error"
        self.add(node, "dtype", severity,
                 f"{node.op_type} gets {tname} input {node.input[idx]!r}{via}; TensorRT's {node.op_type} supports "
                 f"{_describe(cls)} — keep this computation in float32 (drop the cast to {tname})")

    def check_constant_inputs(self, node: onnx.NodeProto) -> None:
        for op, idx, severity in _CONST_INPUTS:
            if node.op_type == op and len(node.input) > idx and node.input[idx] and node.input[idx] not in self.consts:
                self.add(node, "non-constant-input", severity,
                         f"input {idx} ({node.input[idx]!r}) of {op} must be a build-time constant for TensorRT; "
                         "fold constants after export (e.g. `polygraphy surgeon sanitize --fold-constants`)")

    # ---- per-op restrictions ------------------------------------------------------------------------------------
    def check_scatter_reduction(self, node: onnx.NodeProto, why: str) -> None:
        red = _attr(node, "reduction", b"none")
        if red not in (b"none", "none"):
            self.add(node, "scatter-reduction", "error",
                     f"{node.op_type} with reduction={_s(red)!r} {why}; write the many-to-one sum as a one-hot "
                     "assignment matrix times the values (MatMul)")

    def check_ScatterND(self, node: onnx.NodeProto) -> None:  # noqa: N802
        self.check_scatter_reduction(node, "is not supported by TensorRT")

    def check_ScatterElements(self, node: onnx.NodeProto) -> None:  # noqa: N802
        self.check_scatter_reduction(node, "runs through a plugin in TensorRT 10 and gave wrong results in 8.x")

    def check_TopK(self, node: onnx.NodeProto) -> None:  # noqa: N802
        if _attr(node, "sorted", 1) == 0:
            self.add(node, "topk-unsorted", "error", "TopK with sorted=0 is not supported by TensorRT; use sorted=1")
        k = self.constant_value(node.input[1]) if len(node.input) > 1 else None
        if k is not None and k.size and int(k.reshape(-1)[0]) >= TOPK_MAX_K:
            self.add(node, "topk-k", "error",
                     f"TopK with K={int(k.reshape(-1)[0])}; TensorRT needs K < {TOPK_MAX_K} — reduce K or split")

    def check_Resize(self, node: onnx.NodeProto) -> None:  # noqa: N802
        mode = _s(_attr(node, "mode", b"nearest"))
        if mode not in ("nearest", "linear"):
            self.add(node, "resize-mode", "error", f"Resize mode {mode!r}: TensorRT supports nearest and linear only")
        if _attr(node, "antialias", 0):
            self.add(node, "resize-antialias", "error", "Resize with antialias=1 is not supported by TensorRT")

    def check_QuantizeLinear(self, node: onnx.NodeProto) -> None:  # noqa: N802
        if len(node.input) < 3 or not node.input[2]:
            return  # no zero point: symmetric INT8 (opset 19+ default type is uint8 only with a zero point given)
        zp = self.constant_value(node.input[2])
        if zp is None:
            self.add(node, "qdq-zero-point", "error",
                     f"{node.op_type} zero point {node.input[2]!r} is not a constant; TensorRT needs constant scales")
        elif zp.dtype != np.int8 or np.any(zp != 0):
            self.add(node, "qdq-zero-point", "error",
                     f"{node.op_type} has a {zp.dtype} zero point {zp.reshape(-1)[:4].tolist()}; TensorRT's INT8 is "
                     "symmetric signed only (int8, zero point 0) — quantise with `deploykit quantize --mode static`")

    check_DequantizeLinear = check_QuantizeLinear  # noqa: N815

    def check_LayerNormalization(self, node: onnx.NodeProto) -> None:  # noqa: N802
        extra = [o for o in node.output[1:] if o]
        if extra:
            self.add(node, "layernorm-outputs", "error",
                     f"LayerNormalization outputs {extra} (mean / inv std) are not supported; only Y is")

    def constant_value(self, name: str) -> Any:
        for t in self.model.graph.initializer:
            if t.name == name:
                return onnx.numpy_helper.to_array(t)
        src = self.producer.get(name)
        if src is not None and src.op_type == "Constant":
            for a in src.attribute:
                if a.name == "value":
                    return onnx.numpy_helper.to_array(a.t)
        return None


def _attr(node: onnx.NodeProto, name: str, default: Any) -> Any:
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _describe(cls: str) -> str:
    return {_F: "FP32/FP16/BF16 only", _I: "float and INT32/INT64", _A: "float, INT32/INT64 and BOOL",
            _B: "BOOL only"}[cls]


# ---- engine directories ---------------------------------------------------------------------------------------
def engine_graphs(engine_dir: str | os.PathLike) -> list[Path]:
    """The ONNX graphs the manifest of ``engine_dir`` names (every family: ``manifest_sections.graph_entries``)."""
    from deploykit.manifest import Manifest
    from deploykit.manifest_sections import graph_entries

    root = Path(engine_dir)
    if not root.is_dir():
        raise ManifestError(f"engine directory {root} does not exist; run `deploykit export RUN_DIR -o {root}` first")
    m = Manifest.load(root)
    paths = [m.path_of(e.file) for e in graph_entries(m)]
    ir = [p.name for p in paths if p.suffix == ".xml"]
    if ir:
        raise ConfigError(f"{engine_dir} holds OpenVINO IR ({ir[0]}, from `quantize --mode openvino`), which TensorRT "
                          "can't build; lint the FP32 directory or a `quantize --mode static` one")
    for p in paths:
        if not p.exists():
            raise ManifestError(f"graph file {p} named by the manifest is missing; re-export the model")
    return paths


def lint_engine_dir(engine_dir: str | os.PathLike, target: str = DEFAULT_TARGET) -> LintReport:
    """Lint every graph the manifest of ``engine_dir`` names (what ``deploykit lint`` prints).

    Named dynamic axes declared in the manifest's ``extra["dynamic_axes"]`` are allowed on graph inputs; a range
    that may be 0 (an empty tensor, e.g. MuE's KV cache at the first decoding step) gets one warning.
    """
    from deploykit.manifest import MANIFEST_NAME, Manifest

    report = LintReport(target=target)
    graphs = engine_graphs(engine_dir)
    ranges = axis_ranges_of(Manifest.load(engine_dir).extra)
    for axis, (lo, _, hi) in sorted(ranges.items()):
        if lo == 0:
            report.issues.append(LintIssue(
                MANIFEST_NAME, "", "dynamic_axes", "empty-axis", "warning",
                f"axis {axis!r} may be 0 (range {lo}..{hi}): TensorRT supports empty tensors but each empty binding "
                "still needs a non-null address (TrtRunner binds a 1-element buffer) — verify on the device"))
    for path in graphs:
        report.graphs.append(path.name)
        report.issues.extend(lint_graph(path, target=target, axis_ranges=ranges))
    return report


def check_trt(engine_dir: str | os.PathLike, target: str = DEFAULT_TARGET) -> LintReport:
    """Lint ``engine_dir`` and raise :class:`ExportError` listing the errors, if any (``export --check-trt``)."""
    report = lint_engine_dir(engine_dir, target=target)
    if not report.ok:
        raise ExportError(
            f"the exported graphs would not build with TensorRT {target}:\n{report.format()}\n"
            "fix the export (see docs/jetson.md) or build for another backend"
        )
    return report


__all__ = ["DEFAULT_TARGET", "LintIssue", "LintReport", "axis_ranges_of", "check_trt", "engine_graphs",
           "lint_engine_dir", "lint_graph", "opset_range"]
