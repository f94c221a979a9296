"""Typed sections of the manifest, validated on load for every family, and one view of an engine's graphs.

``deploykit.json`` keeps its JSON form (engines written before these types load unchanged): the sections live in
``Manifest.extra`` as plain dicts, and each has a dataclass here whose ``from_dict`` checks it and says what is
wrong. ``validate_sections(manifest)`` runs them all on load; ``graph_entries(manifest)`` lists every ONNX graph an
engine has (cascade stages and monolithic graph, or MuE's per-layer graphs) with what the graph tools need
(inputs, the exit outputs that stay FP32, whether it is quantised), so ``lint`` / ``quantize`` / ``build`` never ask
which family a manifest belongs to.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from deploykit.errors import ManifestError

if TYPE_CHECKING:
    from deploykit.manifest import Manifest, StageSpec

MUE_KEY, AXES_KEY, QUANT_KEY, TRT_KEY = "mue", "dynamic_axes", "quantization", "trt"
KV_POLICIES = ("copy", "compute")


def _need(d: Any, keys: tuple[str, ...], where: str) -> None:
    if not isinstance(d, dict):
        raise ManifestError(f"manifest {where} must be a JSON object, found {type(d).__name__}; re-export the model")
    missing = [k for k in keys if k not in d]
    if missing:
        raise ManifestError(f"manifest {where} lacks {missing}; re-export the model")


# ---- dynamic axes -------------------------------------------------------------------------------------------------
@dataclass
class AxisRange:
    """``[min, opt, max]`` of one named (non-batch) dynamic axis: the TensorRT profile's range."""

    min: int
    opt: int
    max: int

    @classmethod
    def from_value(cls, name: str, v: Any) -> AxisRange:
        if not (isinstance(v, list | tuple) and len(v) == 3 and all(isinstance(i, int) for i in v)):
            raise ManifestError(f"extra.dynamic_axes[{name!r}] must be [min, opt, max] integers, found {v!r}")
        r = cls(*v)
        if not 0 <= r.min <= r.opt <= r.max:
            raise ManifestError(f"extra.dynamic_axes[{name!r}] = {list(v)} needs 0 <= min <= opt <= max")
        return r


def dynamic_axes(extra: dict[str, Any]) -> dict[str, AxisRange]:
    """The declared axis ranges (empty when the engine has only the batch axis)."""
    d = extra.get(AXES_KEY) or {}
    if not isinstance(d, dict):
        raise ManifestError("extra.dynamic_axes must map axis names to [min, opt, max]")
    return {str(k): AxisRange.from_value(k, v) for k, v in d.items()}


# ---- MuE ----------------------------------------------------------------------------------------------------------
@dataclass
class GraphRecord:
    """One MuE graph: file, input / output specs, hash, precision (and its TensorRT plan once built)."""

    file: str
    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]
    sha256: str = ""
    precision: str = "fp32"

    @classmethod
    def from_dict(cls, name: str, d: Any) -> GraphRecord:
        _need(d, ("file", "inputs", "outputs"), f"extra.mue.graphs[{name!r}]")
        for t in [*d["inputs"], *d["outputs"]]:
            _need(t, ("name", "shape"), f"extra.mue.graphs[{name!r}] tensor")
        return cls(str(d["file"]), list(d["inputs"]), list(d["outputs"]), str(d.get("sha256", "")),
                   str(d.get("precision", "fp32")))


@dataclass
class TaskThresholds:
    """One task's exit thresholds: image stream, text stream, decoder (``None`` = never exit) and step decay."""

    img: float | None
    txt: float | None
    dec: float | None
    decay: bool = False

    @classmethod
    def from_dict(cls, task: str, d: Any) -> TaskThresholds:
        _need(d, ("img", "txt", "dec"), f"extra.mue.thresholds[{task!r}]")
        vals = []
        for k in ("img", "txt", "dec"):
            v = d[k]
            if v is not None and not isinstance(v, int | float):
                raise ManifestError(f"extra.mue.thresholds[{task!r}].{k} must be a number or null, found {v!r}")
            vals.append(None if v is None else float(v))
        return cls(*vals, decay=bool(d.get("decay", False)))


MUE_TASKS = ("entailment", "caption")
MUE_GRAPHS = ("image_stem", "text_embed", "enc_out", "dec_embed", "head")


@dataclass
class MuESection:
    """``extra.mue``: everything MuE's runtime reads (graphs, per-task thresholds, sizes, vocabulary file)."""

    graphs: dict[str, GraphRecord]
    tasks: list[str]
    thresholds: dict[str, TaskThresholds]
    kv_policy: str
    vocab: str
    answer_tokens: list[str]
    enc_layers: int
    dec_layers: int
    heads: int
    dim: int
    max_text_len: int
    max_gen_len: int
    num_patches: int
    dec_prompt: bool = False  # absent in engines from before the setting: the <bos>-only entailment decoder
    parity: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: Any) -> MuESection:
        keys = ("graphs", "tasks", "thresholds", "kv_policy", "vocab", "answer_tokens", "enc_layers", "dec_layers",
                "heads", "dim", "max_text_len", "max_gen_len", "num_patches")
        _need(d, keys, "extra.mue")
        try:
            s = cls(graphs={str(k): GraphRecord.from_dict(k, g) for k, g in d["graphs"].items()},
                    tasks=[str(t) for t in d["tasks"]],
                    thresholds={str(t): TaskThresholds.from_dict(t, v) for t, v in d["thresholds"].items()},
                    kv_policy=str(d["kv_policy"]), vocab=str(d["vocab"]),
                    answer_tokens=[str(a) for a in d["answer_tokens"]],
                    **{k: int(d[k]) for k in ("enc_layers", "dec_layers", "heads", "dim", "max_text_len",
                                              "max_gen_len", "num_patches")},
                    dec_prompt=bool(d.get("dec_prompt", False)), parity=dict(d.get("parity") or {}))
        except (AttributeError, TypeError, ValueError) as e:
            raise ManifestError(f"extra.mue has the wrong form ({e}); re-export the model") from e
        s.validate()
        return s

    def validate(self) -> None:
        bad = sorted(set(self.tasks) - set(MUE_TASKS))
        if bad or not self.tasks:
            raise ManifestError(f"extra.mue.tasks {self.tasks} invalid: expected some of {MUE_TASKS}")
        missing = [t for t in self.tasks if t not in self.thresholds]
        if missing:
            raise ManifestError(f"extra.mue.thresholds has no entry for task(s) {missing}; run `deploykit calibrate`")
        if self.kv_policy not in KV_POLICIES:
            raise ManifestError(f"extra.mue.kv_policy {self.kv_policy!r} unknown; expected one of {KV_POLICIES}")
        want = [*MUE_GRAPHS, *(f"enc{i}" for i in range(self.enc_layers)),
                *(f"dec{j}" for j in range(self.dec_layers))]
        if self.dec_prompt:
            want += ["prompt_embed", *(f"dec{j}_prompt" for j in range(self.dec_layers))]
        absent = [g for g in want if g not in self.graphs]
        if absent:
            raise ManifestError(f"extra.mue.graphs lacks {absent}; the manifest and graphs don't belong together — "
                                "re-export the model")
        if min(self.enc_layers, self.dec_layers, self.heads, self.dim) < 1 or self.dim % self.heads:
            raise ManifestError("extra.mue sizes invalid (layers, heads, dim must be >= 1, dim divisible by heads)")


# ---- quantisation / TensorRT records ---------------------------------------------------------------------------
@dataclass
class QuantizationRecord:
    """``extra.quantization``: how ``deploykit quantize`` made this directory (and which nodes it quantised)."""

    mode: str
    source: str
    graphs: dict[str, dict[str, Any]]

    @classmethod
    def from_dict(cls, d: Any) -> QuantizationRecord:
        _need(d, ("mode", "graphs"), "extra.quantization")
        if d["mode"] not in ("dynamic", "static", "openvino"):
            raise ManifestError(f"extra.quantization.mode {d['mode']!r} unknown; expected dynamic, static or openvino")
        if not isinstance(d["graphs"], dict):
            raise ManifestError("extra.quantization.graphs must map graph files to what was quantised")
        return cls(str(d["mode"]), str(d.get("source", "")), dict(d["graphs"]))


@dataclass
class TrtBuildRecord:
    """``extra.trt``: the TensorRT build (device, version, precision, batch range) of the plans beside the graphs."""

    precision: str
    max_batch: int
    opt_batch: int
    version: str = ""
    gpu: str = ""

    @classmethod
    def from_dict(cls, d: Any) -> TrtBuildRecord:
        _need(d, ("precision", "max_batch", "opt_batch"), "extra.trt")
        r = cls(str(d["precision"]), int(d["max_batch"]), int(d["opt_batch"]), str(d.get("version", "")),
                str(d.get("gpu", "")))
        if not 1 <= r.opt_batch <= r.max_batch:
            raise ManifestError(f"extra.trt batch range invalid (opt {r.opt_batch}, max {r.max_batch}); rebuild")
        return r


def mue_section(manifest: Manifest) -> MuESection | None:
    """The typed ``extra.mue`` section, or ``None`` for engines without one."""
    d = manifest.extra.get(MUE_KEY)
    return None if d is None else MuESection.from_dict(d)


def validate_sections(manifest: Manifest) -> None:
    """Check every section present: MuE graphs and thresholds, dynamic axes, quantisation and TensorRT records.

    An engine has stage graphs (a cascade) or a MuE section (VL generation), never neither.
    """
    mue = mue_section(manifest)
    if not manifest.stages and mue is None:
        raise ManifestError("manifest lists no stages and no MuE graphs; re-export the model")
    dynamic_axes(manifest.extra)  # the form; whether every graph's named axes are declared is `deploykit lint`'s
    if QUANT_KEY in manifest.extra:
        QuantizationRecord.from_dict(manifest.extra[QUANT_KEY])
    if TRT_KEY in manifest.extra:
        TrtBuildRecord.from_dict(manifest.extra[TRT_KEY])


# ---- one view of every graph ----------------------------------------------------------------------------------------
@dataclass
class GraphEntry:
    """One ONNX graph of an engine directory, as the graph tools (lint, quantize, build) see it.

    ``state_outputs`` are handed on to the next graph; ``exit_outputs`` (exit logits / scores) stay FP32 when the
    graph is quantised or converted to FP16. ``quantize`` says whether INT8 applies (embeddings and the tied output
    projection stay FP32). Writes (hash, precision, TensorRT record) go back into the manifest through the entry.
    """

    name: str
    file: str
    state_outputs: list[str]
    exit_outputs: list[str]
    quantize: bool
    _target: Any = field(repr=False)

    @property
    def score_outputs(self) -> list[str]:
        """The exit-score outputs: the FP16 conversion keeps what computes them FP32."""
        t = self._target
        if isinstance(t, dict):
            return list(self.exit_outputs)
        return [t.exit_score] if t.exit_score else []

    def set(self, key: str, value: Any) -> None:
        """Record ``sha256`` / ``precision`` (or a ``trt`` build record) for this graph in the manifest."""
        t = self._target
        if isinstance(t, dict):
            t.pop(key, None) if value is None else t.__setitem__(key, value)
        elif key == "trt":
            t.extra.pop("trt", None) if value is None else t.extra.__setitem__("trt", value)
        else:
            setattr(t, key, value)

    def get(self, key: str, default: Any = None) -> Any:
        t = self._target
        if isinstance(t, dict):
            return t.get(key, default)
        return t.extra.get("trt", default) if key == "trt" else getattr(t, key, default)


def _stage_entry(s: StageSpec, name: str) -> GraphEntry:
    return GraphEntry(name, s.file, [t.name for t in s.outputs] if s.exit_score else [],
                      [n for n in (s.exit_logits, s.exit_score) if n], True, s)


# graphs of MuE's that stay FP32 under quantisation: embeddings (Gather) and the tied output projection, whose
# argmax is the generated token
_MUE_FP32 = {"image_stem", "text_embed", "dec_embed", "prompt_embed", "head"}


def graph_entries(manifest: Manifest) -> list[GraphEntry]:
    """Every graph the manifest names: cascade stages then the monolithic graph, or MuE's graphs in export order."""
    out = [_stage_entry(s, f"stage{s.index}") for s in manifest.stages]
    if manifest.monolithic is not None:
        out.append(_stage_entry(manifest.monolithic, "monolithic"))
    for name, g in (manifest.extra.get(MUE_KEY) or {}).get("graphs", {}).items():
        outs = [t["name"] for t in g["outputs"]]
        exits = [o for o in outs if o == "score"]
        out.append(GraphEntry(name, g["file"], [o for o in outs if o not in exits], exits, name not in _MUE_FP32, g))
    return out


def auxiliary_files(manifest: Manifest) -> list[str]:
    """Files besides graphs that an engine directory needs (MuE's vocabulary), to copy with it."""
    mue = manifest.extra.get(MUE_KEY)
    return [str(mue["vocab"])] if mue and mue.get("vocab") else []


def section_dicts(s: Any) -> dict[str, Any]:
    """A section dataclass back to its JSON form."""
    return asdict(s)
