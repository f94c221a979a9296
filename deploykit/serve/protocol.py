"""KServe v2 / Open Inference Protocol: parse and validate infer requests, build responses and metadata.

Front-end agnostic (no HTTP framework imports), so serve-local and a later Ray Serve front-end share it. Supports
JSON tensors (flat or nested ``data``) and the binary tensor data extension that ``tritonclient`` uses by default
(``Inference-Header-Content-Length`` header, ``binary_data_size`` per input, ``binary_data`` per output).
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from deploykit.errors import DataError
from deploykit.serve import limits

HEADER_LENGTH = "inference-header-content-length"
OUTPUT_NAMES = ("label", "probabilities", "exit_stage", "score", "class_index")
_OUTPUT_TYPES = {"label": "BYTES", "probabilities": "FP32", "exit_stage": "INT64", "score": "FP32",
                 "class_index": "INT64"}
_NP = {"FP32": np.float32, "INT64": np.int64}


class ProtocolError(Exception):
    """A request that can't be served; ``status`` is the HTTP code, the message says what was expected."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class InferRequest:
    """A parsed, validated infer request: the model-ready rows plus what to send back."""

    rows: np.ndarray
    thresholds: tuple[float | None, ...] | None = None
    id: str | None = None
    outputs: list[str] = field(default_factory=lambda: list(OUTPUT_NAMES))
    binary_outputs: set[str] = field(default_factory=set)


@dataclass
class ModelInfo:
    """What the protocol layer needs to know about the served model (taken from the manifest)."""

    name: str
    labels: list[str]
    input_name: str
    input_shape: tuple[int, int, int]
    num_stages: int
    platform: str = "deploykit_cascade"
    version: str = "1"
    mean: tuple[float, ...] = (0.0, 0.0, 0.0)  # preprocessing normalisation (UINT8 pixels are normalised with it)
    std: tuple[float, ...] = (1.0, 1.0, 1.0)

    @classmethod
    def from_manifest(cls, manifest: Any) -> ModelInfo:
        spec = manifest.input_spec
        c, h, w = (int(v) for v in spec.shape[1:])
        pre = manifest.preprocessing
        return cls(name=manifest.name, labels=list(manifest.labels), input_name=spec.name,
                   input_shape=(c, h, w), num_stages=manifest.num_stages,
                   mean=tuple(float(v) for v in pre.mean), std=tuple(float(v) for v in pre.std))


# ---- metadata ----------------------------------------------------------------------------------------------
def server_metadata(version: str) -> dict[str, Any]:
    """Body of ``GET /v2``."""
    return {"name": "deploykit", "version": version, "extensions": ["binary_tensor_data"]}


def model_metadata(info: ModelInfo) -> dict[str, Any]:
    """Body of ``GET /v2/models/{name}``: one FP32 pixel input or one BYTES image-file input (send one of them)."""
    c, h, w = info.input_shape
    k = len(info.labels)
    return {
        "name": info.name,
        "versions": [info.version],
        "platform": info.platform,
        "inputs": [
            {"name": info.input_name, "datatype": "FP32", "shape": [-1, c, h, w]},
            {"name": "image_bytes", "datatype": "BYTES", "shape": [-1]},
        ],
        "outputs": [
            {"name": "label", "datatype": "BYTES", "shape": [-1]},
            {"name": "probabilities", "datatype": "FP32", "shape": [-1, k]},
            {"name": "exit_stage", "datatype": "INT64", "shape": [-1]},
            {"name": "score", "datatype": "FP32", "shape": [-1]},
            {"name": "class_index", "datatype": "INT64", "shape": [-1]},
        ],
        "parameters": {"num_stages": info.num_stages},
    }


def check_model(info: ModelInfo, name: str, version: str | None = None) -> None:
    """Raise a 404 :class:`ProtocolError` unless ``name`` (and ``version``, when given) is the served model."""
    if name != info.name:
        raise ProtocolError(f"model {name!r} is not served here; this server serves {info.name!r}", 404)
    if version is not None and version != info.version:
        raise ProtocolError(f"model {name!r} has no version {version!r}; available: [{info.version!r}]", 404)


# ---- request parsing ---------------------------------------------------------------------------------------
@dataclass
class Decoded:
    """An infer request's JSON header as a dict and the binary tensor bytes after it (inputs in order).

    HTTP gets one from :func:`decode_body`; the gRPC front-end builds one straight from the protobuf message, so
    both protocols share the parsers below without a JSON round trip. ``max_values`` bounds how many numbers JSON
    ``data`` can hold (the header's length; 0 when there is no JSON text).
    """

    head: dict[str, Any]
    binary: bytes = b""
    max_values: int = 0



PARSE_IN_THREAD_BYTES = 64 * 1024  # requests past this size are parsed off the event loop


def heavy(request: bytes | Decoded) -> bool:
    """Worth parsing off the event loop: image files to decode (BYTES inputs), or a large tensor to copy.

    ``request`` is an HTTP body (judged before its JSON is decoded) or a decoded request (gRPC).
    """
    if isinstance(request, bytes):
        return len(request) > PARSE_IN_THREAD_BYTES or b'"BYTES"' in request[:4096]
    if len(request.binary) > PARSE_IN_THREAD_BYTES:
        return True
    inputs = request.head.get("inputs")
    return isinstance(inputs, list) and any(isinstance(t, dict) and t.get("datatype") == "BYTES" for t in inputs)


def decode_body(body: bytes, headers: dict[str, str]) -> Decoded:
    """Split an HTTP infer body (binary tensor extension) and decode its JSON header, within the parsing limits."""
    header, binary = _split_body(body, headers)
    try:
        req = limits.loads_bounded(header)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ProtocolError(f"request body is not valid JSON ({e}); expected a KServe v2 infer request "
                            '{"inputs": [{"name", "shape", "datatype", "data"}]}') from e
    except limits.LimitError as e:
        raise ProtocolError(str(e)) from e
    if not isinstance(req, dict):
        raise ProtocolError(f"request body must be a JSON object, found {type(req).__name__}")
    return Decoded(req, binary, len(header))


def parse_infer_request(body: bytes, headers: dict[str, str], info: ModelInfo,
                        decode_image: Callable[[bytes], np.ndarray]) -> InferRequest:
    """Validate an HTTP infer request body and turn it into model-ready ``float32 [B, C, H, W]`` rows.

    Args:
        body: the raw request body (JSON, or JSON header + binary tensors).
        headers: request headers, lower-cased keys.
        info: the served model.
        decode_image: image-file bytes -> ``float32 [C, H, W]`` (raises DataError when undecodable).

    Raises:
        ProtocolError: 400 with a message saying what was expected.
    """
    return parse_decoded(decode_body(body, headers), info, decode_image)


def parse_decoded(d: Decoded, info: ModelInfo, decode_image: Callable[[bytes], np.ndarray]) -> InferRequest:
    """:func:`parse_infer_request` for a request whose header is already decoded (HTTP or gRPC)."""
    try:
        return _parse(d.head, d.binary, d.max_values, info, decode_image)
    except limits.LimitError as e:
        raise ProtocolError(str(e)) from e


def _parse(req: dict[str, Any], binary: bytes, max_values: int, info: ModelInfo,
           decode_image: Callable[[bytes], np.ndarray]) -> InferRequest:
    inputs = req.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        chw = ",".join(map(str, info.input_shape))
        raise ProtocolError(f"expected exactly one input ('{info.input_name}' FP32 [B,{chw}] or 'image_bytes' "
                            f"BYTES [B]), found {_describe_inputs(inputs)}")
    tensor = inputs[0]
    dtype = tensor.get("datatype")
    shape = limits.check_shape(tensor.get("shape"))
    raw = _binary_part(tensor, binary)
    if dtype in _PIXEL_TYPES:
        rows = _pixel_rows(tensor, shape, raw, info, dtype, max_values=max_values)
    elif dtype == "BYTES":
        rows = _bytes_rows(tensor, shape, raw, info, decode_image)
    else:
        raise ProtocolError(f"input datatype {dtype!r} is not supported; send FP32 (or FP16) pre-processed pixels "
                            f"[B,{','.join(map(str, info.input_shape))}], UINT8 raw pixels of that shape, or BYTES "
                            "image files")
    if rows.shape[0] == 0:
        raise ProtocolError("the request has a batch of 0 rows; send at least one")
    if not np.isfinite(rows).all():
        raise ProtocolError("input has NaN or infinite values; expected finite pre-processed pixels")
    outputs, binary_outputs = _requested_outputs(req)
    return InferRequest(rows=rows, thresholds=parse_thresholds(req.get("parameters"), info.num_stages),
                        id=None if req.get("id") is None else str(req["id"]),
                        outputs=outputs, binary_outputs=binary_outputs)


def parse_thresholds(params: Any, num_stages: int) -> tuple[float | None, ...] | None:
    """Per-request exit thresholds from ``parameters``: ``exit_thresholds`` (one per stage) or ``exit_threshold``.

    ``exit_threshold`` (a number) applies to every early exit; ``exit_thresholds`` lists one value (or null to
    disable that exit) per stage. Neither: the manifest's thresholds.
    """
    if params is None:
        return None
    if not isinstance(params, dict):
        raise ProtocolError(f"'parameters' must be a JSON object, found {type(params).__name__}")
    if "exit_thresholds" in params:
        thr = params["exit_thresholds"]
        if not isinstance(thr, list) or len(thr) != num_stages:
            raise ProtocolError(f"parameters.exit_thresholds must be a list of {num_stages} numbers or nulls "
                                f"(one per stage), found {thr!r}")
        return tuple(None if t is None else _threshold(t) for t in thr)
    if "exit_threshold" in params:
        t = _threshold(params["exit_threshold"])
        return tuple([t] * (num_stages - 1) + [None])
    return None


def _threshold(t: Any) -> float:
    if isinstance(t, bool) or not isinstance(t, int | float) or not 0.0 <= float(t) <= 1.0:  # NaN fails too
        raise ProtocolError(f"exit thresholds must be numbers in [0, 1] (a row exits when score >= threshold), "
                            f"found {t!r}")
    return float(t)


def _split_body(body: bytes, headers: dict[str, str]) -> tuple[bytes, bytes]:
    size = headers.get(HEADER_LENGTH)
    if size is None:
        return body, b""
    try:
        n = int(size)
    except ValueError as e:
        raise ProtocolError(f"header Inference-Header-Content-Length must be an integer, found {size!r}") from e
    if not 0 <= n <= len(body):
        raise ProtocolError(f"Inference-Header-Content-Length {n} is outside the body of {len(body)} bytes")
    return body[:n], body[n:]


def _binary_part(tensor: dict[str, Any], binary: bytes) -> bytes | None:
    params = tensor.get("parameters") or {}
    if not isinstance(params, dict) or "binary_data_size" not in params:
        return None
    n = params["binary_data_size"]
    if isinstance(n, bool) or not isinstance(n, int) or n != len(binary):
        raise ProtocolError(f"binary_data_size {n!r} doesn't match the {len(binary)} binary bytes after the JSON "
                            "header")
    return binary


_PIXEL_TYPES = {"FP32": np.dtype("<f4"), "FP16": np.dtype("<f2"), "UINT8": np.dtype("u1")}


def _pixel_rows(tensor: dict[str, Any], shape: list[int], raw: bytes | None, info: ModelInfo,
                dtype: str, max_values: int) -> np.ndarray:
    """Pixel rows as float32 from an FP32, FP16 or UINT8 input.

    FP32 as sent; FP16 cast to FP32 (the same pre-processed pixels); UINT8: raw 0..255 pixels at the model's input
    size, normalised as the preprocessing does (``(x / 255 - mean) / std``).
    """
    wire = _PIXEL_TYPES[dtype]
    if raw is not None and dtype != "FP32":
        count = math.prod(shape) if shape else 0
        if len(raw) != count * wire.itemsize:
            raise ProtocolError(f"binary {dtype} data has {len(raw)} bytes; shape {shape} needs "
                                f"{count * wire.itemsize}")
        raw = np.frombuffer(raw, dtype=wire).astype("<f4").tobytes()
    rows = _fp32_rows(tensor, shape, raw, info, max_values)
    if dtype != "UINT8":
        return rows.astype(np.float32, copy=False)
    if ((rows < 0) | (rows > 255) | (rows != np.floor(rows))).any():
        raise ProtocolError("UINT8 input values must be integers in 0..255 (raw pixels)")
    mean = np.asarray(info.mean, np.float32)[:, None, None]
    std = np.asarray(info.std, np.float32)[:, None, None]
    return np.ascontiguousarray((rows / np.float32(255.0) - mean) / std, dtype=np.float32)


def _fp32_rows(tensor: dict[str, Any], shape: list[int], raw: bytes | None, info: ModelInfo,
               max_values: int) -> np.ndarray:
    """``max_values``: JSON header length, a bound on how many numbers its ``data`` can hold."""
    chw = list(info.input_shape)
    want = f"[B,{','.join(map(str, chw))}]"
    if shape[1:] != chw or len(shape) != 4:
        if shape != chw:
            raise ProtocolError(f"FP32 input shape {shape} doesn't fit this model; expected {want} "
                                "(pre-processed pixels, normalised per the model's preprocessing)")
        shape = [1, *chw]
    count = limits.check_count(shape, len(raw) // 4 if raw is not None else max_values, "values")
    if raw is not None:
        if len(raw) != count * 4:
            raise ProtocolError(f"binary FP32 data has {len(raw)} bytes; shape {shape} needs {count * 4}")
        return np.frombuffer(raw, dtype="<f4").astype(np.float32, copy=False).reshape(shape)
    data = tensor.get("data")
    if data is None:
        raise ProtocolError("input has no 'data' (and no binary_data_size); expected row-major FP32 values")
    try:
        arr = np.asarray(data, dtype=np.float64)
    except (ValueError, TypeError, OverflowError) as e:
        raise ProtocolError(f"FP32 input 'data' must be numbers (flat or nested row-major), found an invalid "
                            f"value ({e})") from e
    if arr.size != count:
        raise ProtocolError(f"FP32 input 'data' has {arr.size} values; shape {shape} needs {count}")
    with np.errstate(over="ignore"):  # values past float32's range become inf, refused as non-finite below
        return arr.astype(np.float32).reshape(shape)


def _bytes_rows(tensor: dict[str, Any], shape: list[int], raw: bytes | None, info: ModelInfo,
                decode_image: Callable[[bytes], np.ndarray]) -> np.ndarray:
    if len(shape) not in (1, 2) or (len(shape) == 2 and shape[1] != 1):
        raise ProtocolError(f"BYTES input shape {shape} is not supported; expected [B] (one image file per row)")
    count = math.prod(shape)
    if raw is not None:
        items = _unpack_bytes(raw)
    else:
        data = tensor.get("data")
        if not isinstance(data, list):
            raise ProtocolError("BYTES input 'data' must be a list of base64-encoded image files")
        items = [_flatten_one(d) for d in data]
    if len(items) != count:
        raise ProtocolError(f"BYTES input has {len(items)} elements; shape {shape} needs {count}")
    rows = np.empty((count, *info.input_shape), dtype=np.float32)
    for i, item in enumerate(items):
        try:
            rows[i] = decode_image(_maybe_base64(item))
        except DataError as e:  # decode_image turns every failure on an untrusted file into a DataError
            raise ProtocolError(f"row {i}: {e}") from e
    return rows


def _flatten_one(d: Any) -> bytes:
    while isinstance(d, list) and len(d) == 1:
        d = d[0]
    if isinstance(d, str):
        return d.encode("ascii", errors="replace")
    raise ProtocolError(f"BYTES input elements must be base64 strings, found {type(d).__name__}")


def _maybe_base64(item: bytes) -> bytes:
    """Base64 text is decoded; raw image files (binary extension) pass through (their magic isn't base64)."""
    try:
        return base64.b64decode(item, validate=True)
    except (binascii.Error, ValueError):
        return item


def _unpack_bytes(raw: bytes) -> list[bytes]:
    items, pos = [], 0
    while pos < len(raw):
        if pos + 4 > len(raw):
            raise ProtocolError("binary BYTES data is truncated; expected 4-byte length prefixes")
        (n,) = struct.unpack_from("<I", raw, pos)
        pos += 4
        if pos + n > len(raw):
            raise ProtocolError("binary BYTES element runs past the end of the body")
        items.append(raw[pos: pos + n])
        pos += n
    return items


def _requested_outputs(req: dict[str, Any]) -> tuple[list[str], set[str]]:
    params = req.get("parameters") if isinstance(req.get("parameters"), dict) else {}
    all_binary = bool(params.get("binary_data_output", False))
    wanted = req.get("outputs")
    if wanted is None:
        return list(OUTPUT_NAMES), set(OUTPUT_NAMES) if all_binary else set()
    if not isinstance(wanted, list):
        raise ProtocolError("'outputs' must be a list of {\"name\": ...} objects")
    names, binary = [], set()
    for o in wanted:
        name = o.get("name") if isinstance(o, dict) else None
        if name not in OUTPUT_NAMES:
            raise ProtocolError(f"unknown output {name!r}; this model has outputs {list(OUTPUT_NAMES)}")
        names.append(name)
        p = o.get("parameters") or {}
        if (isinstance(p, dict) and p.get("binary_data", all_binary)) or (not isinstance(p, dict) and all_binary):
            binary.add(name)
    return names, binary


def _describe_inputs(inputs: Any) -> str:
    if not isinstance(inputs, list):
        return f"'inputs' of type {type(inputs).__name__}"
    return f"{len(inputs)} input(s)"


# ---- responses ---------------------------------------------------------------------------------------------
def output_arrays(result: dict[str, np.ndarray], labels: list[str]) -> dict[str, np.ndarray]:
    """Protocol outputs for a slice of a cascade result (``probs``, ``exit_stage``, ``score``)."""
    probs = np.asarray(result["probs"], dtype=np.float32)
    idx = probs.argmax(axis=1).astype(np.int64)
    return {
        "label": np.array([labels[i] for i in idx], dtype=object),
        "probabilities": probs,
        "exit_stage": np.asarray(result["exit_stage"], dtype=np.int64),
        "score": np.asarray(result["score"], dtype=np.float32),
        "class_index": idx,
    }


@dataclass
class Encoded:
    """A response before serialisation: the JSON header as a dict and the binary outputs, in order.

    HTTP writes it with :func:`encode_http`; the gRPC front-end turns it into a ``ModelInferResponse``.
    """

    head: dict[str, Any]
    blobs: list[bytes]


def response_parts(req: Any, arrays: dict[str, np.ndarray], info: Any, parameters: dict[str, Any] | None = None,
                   types: dict[str, str] | None = None) -> Encoded:
    """The response for ``req``'s requested outputs; binary outputs as raw bytes (binary tensor data extension).

    ``parameters`` (e.g. the load-adaptive operating point) go into the response's ``parameters`` object;
    ``types`` maps output names to KServe datatypes (default: the classification outputs').
    """
    types = types or _OUTPUT_TYPES
    outs, blobs = [], []
    for name in req.outputs:
        a = arrays[name]
        entry: dict[str, Any] = {"name": name, "datatype": types[name], "shape": list(a.shape)}
        if name in req.binary_outputs:
            dt = _NP.get(entry["datatype"])
            blob = _pack_bytes(a) if dt is None else np.ascontiguousarray(a, dtype=dt).tobytes()
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = ([str(v) for v in a.reshape(-1)] if entry["datatype"] == "BYTES"
                             else a.reshape(-1).tolist())
        outs.append(entry)
    head: dict[str, Any] = {"model_name": info.name, "model_version": info.version, "outputs": outs}
    if req.id is not None:
        head["id"] = req.id
    if parameters:
        head["parameters"] = parameters
    return Encoded(head, blobs)


def encode_http(enc: Encoded) -> tuple[bytes, dict[str, str]]:
    """HTTP body and extra headers of a response; binary outputs follow the JSON header."""
    header = json.dumps(enc.head, separators=(",", ":")).encode()
    if not enc.blobs:
        return header, {"content-type": "application/json"}
    return header + b"".join(enc.blobs), {"content-type": "application/octet-stream",
                                          "inference-header-content-length": str(len(header))}


def _pack_bytes(a: np.ndarray) -> bytes:
    parts = []
    for v in a.reshape(-1):
        b = v if isinstance(v, bytes) else str(v).encode()
        parts.append(struct.pack("<I", len(b)) + b)
    return b"".join(parts)


def error_body(message: str) -> bytes:
    """``{"error": "..."}``, the protocol's error form."""
    return json.dumps({"error": message}).encode()
