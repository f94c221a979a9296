"""FP16 at the ONNX level, for strongly typed TensorRT networks (TensorRT 11, and 10.x built strongly typed).

TensorRT 11 has no ``BuilderFlag.FP16``: a strongly typed network computes each layer in the type its ONNX tensors
have. So the precision decision moves into the graph: weights and most compute become FP16, while the ops that
lose accuracy in FP16 stay FP32 with Casts around them:

- softmax and normalisation ops (``Softmax``, ``LogSoftmax``, ``LayerNormalization`` and friends), and decomposed
  layer norms (``ReduceMean -> Sub -> Pow -> ReduceMean -> Add -> Sqrt -> Div`` chains): sums of many squares and
  exponentials overflow or cancel in FP16;
- the exit-score subgraph (the nodes that only feed the ``score`` output): the cascade compares the score with a
  threshold, so it must match the FP32 graph it was calibrated on;
- graph inputs and outputs (``keep_io_types``): runners and the manifest keep float32 I/O.

Written in-house (not onnxconverter-common) so it has no extra dependency and knows deploykit's score output.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from deploykit.errors import ExportError

FP16_MAX = 65504.0
DEFAULT_KEEP_OPS = ("Softmax", "LogSoftmax", "LayerNormalization", "GroupNormalization", "InstanceNormalization",
                    "RMSNormalization", "BatchNormalization", "Sqrt", "Reciprocal")
DEFAULT_KEEP_OUTPUTS = ("score",)
# Inputs that stay float32 whatever the node's precision (by ONNX's type constraints).
_FIXED_FP32_INPUTS = {("Resize", 2), ("Upsample", 1)}
# Ops whose inputs may have any type: no cast needed in front of them.
_ANY_INPUT = {"Shape", "Size", "Cast"}


@dataclass
class Fp16Summary:
    """What the conversion did: nodes kept in FP32, casts inserted, weights converted or clipped."""

    fp32_nodes: list[str] = field(default_factory=list)
    casts: int = 0
    converted_initializers: int = 0
    clipped_values: int = 0


def convert_to_fp16(
        model: onnx.ModelProto | str | os.PathLike,
        keep_ops: Iterable[str] = DEFAULT_KEEP_OPS,
        keep_nodes: Iterable[str] = (),
        keep_outputs: Iterable[str] = DEFAULT_KEEP_OUTPUTS,
        keep_layernorm_patterns: bool = True,
) -> tuple[onnx.ModelProto, Fp16Summary]:
    """FP16 copy of ``model`` with the numerically sensitive parts and the graph I/O left in FP32.

    Args:
        model: a float32 ONNX model (or a path to one); it is not modified.
        keep_ops: op types computed in FP32.
        keep_nodes: node names computed in FP32.
        keep_outputs: graph outputs whose exclusive producer subgraph stays FP32 (the exit score).
        keep_layernorm_patterns: also keep decomposed layer / RMS norm chains in FP32.

    Returns:
        The converted model (checked with ``onnx.checker``) and a summary.
    """
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model))
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in g.node for a in n.attribute):
        raise ExportError("fp16 conversion does not handle subgraphs (If/Loop/Scan); deploykit stages have none — "
                          "run `deploykit lint` on the engine directory")
    types = _tensor_types(m)
    summary = Fp16Summary()

    keep = _kept_nodes(g, set(keep_ops), set(keep_nodes), set(keep_outputs), keep_layernorm_patterns)
    fp16_node = [i not in keep for i in range(len(g.node))]
    summary.fp32_nodes = [g.node[i].name or f"#{i}:{g.node[i].op_type}" for i in sorted(keep)]

    # Consumers of each tensor (node index, input slot).
    consumers: dict[str, list[tuple[int, int]]] = {}
    for i, n in enumerate(g.node):
        for j, name in enumerate(n.input):
            if name:
                consumers.setdefault(name, []).append((i, j))

    def wants(i: int, j: int) -> int | None:
        """Float type node i wants at input j, or None when the input is not float-typed compute."""
        n = g.node[i]
        if n.op_type in _ANY_INPUT or (n.op_type, j) in _FIXED_FP32_INPUTS:
            return None
        return TensorProto.FLOAT16 if fp16_node[i] else TensorProto.FLOAT

    # ---- where each float tensor lives ("home" type) ----------------------------------------------------------
    home: dict[str, int] = {}
    graph_inputs = {v.name for v in g.input}
    for v in g.input:
        if types.get(v.name) == TensorProto.FLOAT:
            home[v.name] = TensorProto.FLOAT
    for t in g.initializer:
        if t.data_type != TensorProto.FLOAT or t.name in graph_inputs:
            continue
        wanted = {wants(i, j) for i, j in consumers.get(t.name, [])} - {None}
        if wanted == {TensorProto.FLOAT16}:
            _to_fp16_initializer(t, summary)
            home[t.name] = TensorProto.FLOAT16
        else:
            home[t.name] = TensorProto.FLOAT
    for i, n in enumerate(g.node):
        half = fp16_node[i]
        if n.op_type == "Constant":
            _convert_constant(n, {wants(a, b) for o in n.output for a, b in consumers.get(o, [])} - {None}, home,
                              summary)
            continue
        if n.op_type == "Cast":
            to = _attr(n, "to")
            if to == TensorProto.FLOAT and half:
                _set_attr(n, "to", TensorProto.FLOAT16)
            home[n.output[0]] = TensorProto.FLOAT16 if (to == TensorProto.FLOAT and half) else TensorProto.FLOAT
            continue
        if n.op_type == "ConstantOfShape" and half:
            for a in n.attribute:
                if a.name == "value" and a.t.data_type == TensorProto.FLOAT:
                    a.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(a.t).astype(np.float16), a.t.name))
        for o in n.output:
            if types.get(o) == TensorProto.FLOAT:
                home[o] = TensorProto.FLOAT16 if half else TensorProto.FLOAT

    # ---- insert casts where a node wants another type than its input has ----------------------------------------
    new_nodes: list[onnx.NodeProto] = []
    cast_of: dict[tuple[str, int], str] = {}

    def cast(name: str, to: int) -> str:
        key = (name, to)
        if key not in cast_of:
            suffix = "fp16" if to == TensorProto.FLOAT16 else "fp32"
            out = f"{name}__{suffix}"
            new_nodes.append(helper.make_node("Cast", [name], [out], name=f"cast_{suffix}/{name}", to=to))
            cast_of[key] = out
            summary.casts += 1
        return cast_of[key]

    for i, n in enumerate(g.node):
        for j, name in enumerate(n.input):
            if not name or name not in home:
                continue
            want = wants(i, j)
            if want is not None and home[name] != want:
                n.input[j] = cast(name, want)
        new_nodes.append(n)

    # ---- graph outputs stay float32 -------------------------------------------------------------------------------
    for v in g.output:
        if home.get(v.name) == TensorProto.FLOAT16:
            inner = f"{v.name}__fp16out"
            for n in new_nodes:
                for lst in (n.input, n.output):
                    for k, name in enumerate(lst):
                        if name == v.name:
                            lst[k] = inner
            new_nodes.append(helper.make_node("Cast", [inner], [v.name], name=f"cast_out/{v.name}",
                                              to=TensorProto.FLOAT))
            summary.casts += 1

    del g.node[:]
    g.node.extend(new_nodes)
    del g.value_info[:]
    try:
        m = onnx.shape_inference.infer_shapes(m, strict_mode=True)
        onnx.checker.check_model(m)
    except Exception as e:
        raise ExportError(f"fp16 conversion produced an invalid graph ({e}); report this with the source graph") from e
    return m, summary


def convert_file(src: str | os.PathLike, dst: str | os.PathLike, **kwargs: object) -> Fp16Summary:
    """Convert the graph at ``src`` and write it to ``dst`` (what ``build --precision fp16`` does on TRT 11)."""
    model, summary = convert_to_fp16(src, **kwargs)  # type: ignore[arg-type]
    Path(dst).parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(dst))
    return summary


# ---- helpers --------------------------------------------------------------------------------------------------
def _tensor_types(m: onnx.ModelProto) -> dict[str, int]:
    inferred = onnx.shape_inference.infer_shapes(m, strict_mode=False)
    types: dict[str, int] = {}
    g = inferred.graph
    for v in list(g.input) + list(g.output) + list(g.value_info):
        if v.type.HasField("tensor_type"):
            types[v.name] = v.type.tensor_type.elem_type
    for t in g.initializer:
        types[t.name] = t.data_type
    for n in g.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    types[n.output[0]] = a.t.data_type
    return types


def _kept_nodes(g: onnx.GraphProto, ops: set[str], names: set[str], outputs: set[str], ln: bool) -> set[int]:
    keep = {i for i, n in enumerate(g.node) if n.op_type in ops or (n.name and n.name in names)}
    producer = {o: i for i, n in enumerate(g.node) for o in n.output}
    if ln:
        keep |= _layernorm_chains(g, producer)
    out_names = {v.name for v in g.output}
    if outputs & out_names:
        keep |= _ancestors(g, producer, outputs & out_names) - _ancestors(g, producer, out_names - outputs)
    return keep


def _ancestors(g: onnx.GraphProto, producer: dict[str, int], names: set[str]) -> set[int]:
    seen: set[int] = set()
    stack = [producer[n] for n in names if n in producer]
    while stack:
        i = stack.pop()
        if i in seen:
            continue
        seen.add(i)
        stack.extend(producer[x] for x in g.node[i].input if x in producer)
    return seen


def _layernorm_chains(g: onnx.GraphProto, producer: dict[str, int]) -> set[int]:
    """Nodes of decomposed layer / RMS norms, found backwards from each Sqrt (and forwards to its Div)."""
    def prod(name: str, *ops: str) -> int | None:
        i = producer.get(name)
        return i if i is not None and g.node[i].op_type in ops else None

    keep: set[int] = set()
    consumers: dict[str, list[int]] = {}
    for i, n in enumerate(g.node):
        for x in n.input:
            consumers.setdefault(x, []).append(i)
    for i, n in enumerate(g.node):
        if n.op_type != "Sqrt":
            continue
        add = prod(n.input[0], "Add")
        if add is None:
            continue
        var = next((v for v in (prod(x, "ReduceMean") for x in g.node[add].input) if v is not None), None)
        if var is None:
            continue
        sq = prod(g.node[var].input[0], "Pow", "Mul")
        if sq is None:
            continue
        chain = {i, add, var, sq}
        sub = prod(g.node[sq].input[0], "Sub")
        if sub is not None:
            chain.add(sub)
            mean = prod(g.node[sub].input[1], "ReduceMean")
            if mean is not None:
                chain.add(mean)
        for c in consumers.get(n.output[0], []):
            if g.node[c].op_type in ("Div", "Reciprocal"):
                chain.add(c)
        keep |= chain
    return keep


def _to_fp16_initializer(t: onnx.TensorProto, summary: Fp16Summary) -> None:
    a = numpy_helper.to_array(t)
    over = int(np.sum(np.abs(a) > FP16_MAX))
    summary.clipped_values += over
    summary.converted_initializers += 1
    t.CopyFrom(numpy_helper.from_array(np.clip(a, -FP16_MAX, FP16_MAX).astype(np.float16), t.name))


def _convert_constant(n: onnx.NodeProto, wanted: set[int | None], home: dict[str, int], s: Fp16Summary) -> None:
    for a in n.attribute:
        if a.name == "value" and a.t.data_type == TensorProto.FLOAT:
            if wanted == {TensorProto.FLOAT16}:
                _to_fp16_initializer(a.t, s)
                home[n.output[0]] = TensorProto.FLOAT16
            else:
                home[n.output[0]] = TensorProto.FLOAT


def _attr(n: onnx.NodeProto, name: str) -> object:
    for a in n.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return None


def _set_attr(n: onnx.NodeProto, name: str, value: int) -> None:
    for a in n.attribute:
        if a.name == name:
            a.i = value


def fp32_compute_ops(model: onnx.ModelProto) -> dict[str, list[str]]:
    """Float type each node computes in (``"float32"`` / ``"float16"``), by node name; for tests and reports.

    A node's compute type is the type of its first float input; nodes with no float input are left out.
    """
    types = _tensor_types(model)
    out: dict[str, list[str]] = {"float32": [], "float16": []}
    for i, n in enumerate(model.graph.node):
        for x in n.input:
            t = types.get(x)
            if t in (TensorProto.FLOAT, TensorProto.FLOAT16) and n.op_type != "Cast":
                out["float32" if t == TensorProto.FLOAT else "float16"].append(n.name or f"#{i}:{n.op_type}")
                break
    return out


__all__ = ["DEFAULT_KEEP_OPS", "DEFAULT_KEEP_OUTPUTS", "Fp16Summary", "convert_file", "convert_to_fp16",
           "fp32_compute_ops"]
