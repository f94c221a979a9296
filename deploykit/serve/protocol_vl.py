"""KServe v2 for MuE (vision-language) engines: image files and texts in as BYTES, the task in ``parameters``.

Request::

    {"parameters": {"task": "entailment"},
     "inputs": [{"name": "image_bytes", "datatype": "BYTES", "shape": [B], "data": [<base64 image file>, ...]},
                {"name": "text", "datatype": "BYTES", "shape": [B], "data": ["two shapes are shown", ...]}]}

``text`` is the hypothesis (entailment, required) or the prompt (caption, optional: the model's caption prompt
when absent). JSON ``data`` holds image files as base64 and texts as plain strings; with the binary tensor data
extension (tritonclient's default) both are length-prefixed bytes after the JSON header, in input order. Outputs:
``text`` (the answer or the caption), ``image_layers`` / ``text_layers`` (encoder layers each stream ran),
``decoder_layers`` (layers per generated token, 0 after the last token) and ``layer_fraction``. Uses the body
framing and BYTES helpers of :mod:`deploykit.serve.protocol`, so both kinds share their limits.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from deploykit.errors import DataError
from deploykit.serve import protocol
from deploykit.serve.protocol import ProtocolError

IMAGE_INPUT, TEXT_INPUT = "image_bytes", "text"
OUTPUT_TYPES = {"text": "BYTES", "image_layers": "INT64", "text_layers": "INT64", "decoder_layers": "INT64",
                "layer_fraction": "FP32"}


@dataclass
class VLModelInfo:
    """What the protocol layer needs to know about a served MuE engine."""

    name: str
    tasks: list[str]
    max_gen_len: int
    version: str = "1"
    platform: str = "deploykit_mue"


@dataclass(frozen=True)
class VLSample:
    """One row: the preprocessed image and its text (hypothesis or caption prompt)."""

    image: np.ndarray
    text: str


@dataclass
class VLRequest:
    """A parsed MuE infer request; ``rows`` is an object array of :class:`VLSample` (sliced by the batcher)."""

    rows: np.ndarray
    task: str
    id: str | None = None
    outputs: list[str] = field(default_factory=lambda: list(OUTPUT_TYPES))
    binary_outputs: set[str] = field(default_factory=set)


def model_metadata(info: VLModelInfo) -> dict[str, Any]:
    """Body of ``GET /v2/models/{name}`` for a MuE engine."""
    return {
        "name": info.name, "versions": [info.version], "platform": info.platform,
        "inputs": [{"name": IMAGE_INPUT, "datatype": "BYTES", "shape": [-1]},
                   {"name": TEXT_INPUT, "datatype": "BYTES", "shape": [-1]}],
        "outputs": [{"name": n, "datatype": t, "shape": [-1, info.max_gen_len] if n == "decoder_layers" else [-1]}
                    for n, t in OUTPUT_TYPES.items()],
        "parameters": {"tasks": info.tasks, "task_parameter": "task"},
    }


def parse_vl_decoded(d: protocol.Decoded, info: VLModelInfo, load_images: Callable[[list[Any]], list[np.ndarray]],
                     encode_texts: Callable[..., list[list[int]]]) -> VLRequest:
    """Validate a MuE infer request (HTTP or gRPC, header decoded).

    Every image is decoded and every text checked before it is queued.

    Raises:
        ProtocolError: 400 with a message saying what was expected.
    """
    req, binary = d.head, d.binary
    task = _task(req.get("parameters"), info)
    items = _inputs(req.get("inputs"), binary)
    if IMAGE_INPUT not in items:
        raise ProtocolError(f"missing input {IMAGE_INPUT!r} (BYTES [B]: one image file per row)")
    images = items[IMAGE_INPUT]
    if not images:
        raise ProtocolError("the request has a batch of 0 rows; send at least one")
    texts = items.get(TEXT_INPUT)
    if texts is None:
        if task == "entailment":
            raise ProtocolError(f"entailment needs input {TEXT_INPUT!r} (BYTES [B]: one hypothesis per image)")
        from deploykit.data.vl import CAPTION_PROMPT

        texts = [CAPTION_PROMPT] * len(images)
    if len(texts) != len(images):
        raise ProtocolError(f"{len(images)} images but {len(texts)} texts; send one text per image")
    rows = np.empty(len(images), dtype=object)
    for i, (img, text) in enumerate(zip(images, texts)):
        try:
            pixels = load_images([protocol._maybe_base64(img)])[0]
        except DataError as e:
            raise ProtocolError(f"row {i} ({IMAGE_INPUT}): {e}") from e
        text = _text(text, i)
        try:
            with warnings.catch_warnings():  # unknown words become <unk>, as in `deploykit predict`
                warnings.simplefilter("ignore")
                encode_texts([text])
        except DataError as e:
            raise ProtocolError(f"row {i} ({TEXT_INPUT}): {e}") from e
        rows[i] = VLSample(pixels, text)
    outputs, binary_outputs = _requested_outputs(req)
    return VLRequest(rows, task, None if req.get("id") is None else str(req["id"]), outputs, binary_outputs)


def _task(params: Any, info: VLModelInfo) -> str:
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise ProtocolError(f"'parameters' must be a JSON object, found {type(params).__name__}")
    for key in ("exit_threshold", "exit_thresholds"):
        if key in params:
            raise ProtocolError(f"parameters.{key} applies to classification cascades; a MuE engine uses its "
                                "calibrated per-task thresholds (set them with `deploykit calibrate`)")
    task = params.get("task")
    if task is None:
        if len(info.tasks) == 1:
            return info.tasks[0]
        raise ProtocolError(f"parameters.task is required: one of {info.tasks}")
    if task not in info.tasks:
        raise ProtocolError(f"parameters.task {task!r} is not served: this engine was trained for {info.tasks}")
    return str(task)


def _inputs(inputs: Any, binary: bytes) -> dict[str, list[Any]]:
    """Input name -> its elements (bytes from the binary section, or the JSON ``data`` items)."""
    want = f"'{IMAGE_INPUT}' (BYTES [B]) and, per task, '{TEXT_INPUT}' (BYTES [B])"
    if not isinstance(inputs, list) or not 1 <= len(inputs) <= 2 or not all(isinstance(t, dict) for t in inputs):
        raise ProtocolError(f"expected inputs {want}, found {protocol._describe_inputs(inputs)}")
    out: dict[str, list[Any]] = {}
    pos = 0
    for t in inputs:
        name = t.get("name")
        if name not in (IMAGE_INPUT, TEXT_INPUT) or name in out:
            raise ProtocolError(f"unexpected input {name!r}; expected {want}, each once")
        if t.get("datatype") != "BYTES":
            raise ProtocolError(f"input {name!r} has datatype {t.get('datatype')!r}; expected BYTES")
        shape = t.get("shape")
        if (not isinstance(shape, list) or len(shape) not in (1, 2) or not all(isinstance(d, int) and d >= 0
                                                                              for d in shape)
                or (len(shape) == 2 and shape[1] != 1)):
            raise ProtocolError(f"input {name!r} shape {shape!r} is not supported; expected [B] (one per row)")
        params = t.get("parameters") or {}
        size = params.get("binary_data_size") if isinstance(params, dict) else None
        if size is not None:
            if not isinstance(size, int) or size < 0 or pos + size > len(binary):
                raise ProtocolError(f"input {name!r}: binary_data_size {size!r} runs past the {len(binary)} binary "
                                    "bytes after the JSON header")
            items: list[Any] = protocol._unpack_bytes(binary[pos:pos + size])
            pos += size
        else:
            data = t.get("data")
            if not isinstance(data, list):
                raise ProtocolError(f"input {name!r} has no 'data' list (and no binary_data_size)")
            items = [_one(d, name) for d in data]
        if len(items) != shape[0]:
            raise ProtocolError(f"input {name!r} has {len(items)} elements; shape {shape} needs {shape[0]}")
        out[name] = items
    if pos != len(binary):
        raise ProtocolError(f"the binary_data_size of the inputs add up to {pos} bytes, but {len(binary)} binary "
                            "bytes follow the JSON header")
    return out


def _one(d: Any, name: str) -> Any:
    """A JSON ``data`` element: image files are base64 text (bytes here), texts plain strings."""
    if name == IMAGE_INPUT:
        return protocol._flatten_one(d)
    while isinstance(d, list) and len(d) == 1:
        d = d[0]
    if not isinstance(d, str):
        raise ProtocolError(f"input {name!r}: JSON 'data' elements must be strings, found {type(d).__name__}")
    return d


def _text(t: Any, row: int) -> str:
    if isinstance(t, bytes):
        try:
            t = t.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ProtocolError(f"row {row} ({TEXT_INPUT}): text is not UTF-8 ({e})") from e
    if not isinstance(t, str):
        raise ProtocolError(f"row {row} ({TEXT_INPUT}): expected a string, found {type(t).__name__}")
    return t


def _requested_outputs(req: dict[str, Any]) -> tuple[list[str], set[str]]:
    params = req.get("parameters") if isinstance(req.get("parameters"), dict) else {}
    all_binary = bool(params.get("binary_data_output", False))
    wanted = req.get("outputs")
    if wanted is None:
        return list(OUTPUT_TYPES), set(OUTPUT_TYPES) if all_binary else set()
    if not isinstance(wanted, list):
        raise ProtocolError("'outputs' must be a list of {\"name\": ...} objects")
    names, binary = [], set()
    for o in wanted:
        name = o.get("name") if isinstance(o, dict) else None
        if name not in OUTPUT_TYPES:
            raise ProtocolError(f"unknown output {name!r}; this model has outputs {list(OUTPUT_TYPES)}")
        names.append(name)
        p = o.get("parameters")
        if p.get("binary_data", all_binary) if isinstance(p, dict) else all_binary:
            binary.add(name)
    return names, binary


def result_arrays(results: list[dict[str, Any]], max_gen_len: int) -> dict[str, np.ndarray]:
    """Per-row arrays from :meth:`MuEEngine.predict`'s dicts (decoder layers 0-padded to ``max_gen_len``)."""
    n = len(results)
    dec = np.zeros((n, max_gen_len), np.int64)
    for i, r in enumerate(results):
        dec[i, : len(r["decoder_layers"])] = r["decoder_layers"]
    return {"text": np.array([r["answer"] if "answer" in r else r["caption"] for r in results], dtype=object),
            "image_layers": np.array([r["image_layers"] for r in results], np.int64),
            "text_layers": np.array([r["text_layers"] for r in results], np.int64),
            "decoder_layers": dec,
            "layer_fraction": np.array([r["layer_fraction"] for r in results], np.float32)}


def vl_response_parts(req: VLRequest, result: dict[str, np.ndarray], info: VLModelInfo,
                      parameters: dict[str, Any] | None = None) -> protocol.Encoded:
    """The response (binary outputs per the binary tensor data extension); the task goes in ``parameters``."""
    return protocol.response_parts(req, result, info, {"task": req.task, **(parameters or {})}, types=OUTPUT_TYPES)
