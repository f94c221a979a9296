"""KServe v2 over gRPC (``GRPCInferenceService``), a thin adapter over the shared request handler.

The service and its messages are the published KServe v2 / Triton protobufs as compiled by ``tritonclient[grpc]``
(``tritonclient.grpc.service_pb2`` / ``service_pb2_grpc`` / ``model_config_pb2``), not hand-rolled. A
``ModelInferRequest`` becomes the decoded request the HTTP parsers take (the header as a dict, the raw tensor
bytes; no JSON text, no per-element conversion) and goes to :meth:`KServeHandler.infer`, so gRPC shares the
parsers, the batcher, the limits, the metrics and the load-adaptive exits with HTTP; the response's binary outputs
become ``raw_output_contents``. HTTP statuses map to gRPC codes here, once (``_STATUS_NAMES``).

:class:`KServeGrpc` is the service itself, framework-free; :func:`start_grpc` serves it with ``grpc.aio``
(serve-local) and :func:`ray_rpc` makes the methods serve-ray's ingress exposes to Ray Serve's gRPC proxy.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import numpy as np

from deploykit import __version__
from deploykit.errors import ConfigError
from deploykit.serve import limits, protocol
from deploykit.serve.handler import KServeHandler, Reply

try:
    import grpc
    from google.protobuf import json_format
    from tritonclient.grpc import model_config_pb2
    from tritonclient.grpc import service_pb2 as pb
    from tritonclient.grpc import service_pb2_grpc as pb_grpc
except ImportError as _e:  # the grpc extra is optional
    _MISSING: ImportError | None = _e
    pb_grpc = None
else:
    _MISSING = None

# typed InferTensorContents field and wire dtype per KServe datatype (clients may send these instead of raw bytes)
_CONTENTS = {"FP32": ("fp32_contents", "<f4"), "FP64": ("fp64_contents", "<f8"), "UINT8": ("uint_contents", "u1"),
             "INT32": ("int_contents", "<i4"), "INT64": ("int64_contents", "<i8"), "BOOL": ("bool_contents", "?"),
             "UINT32": ("uint_contents", "<u4"), "UINT64": ("uint64_contents", "<u8")}


def require_grpc() -> None:
    """Raise :class:`ConfigError` naming the install when grpcio / the compiled protobufs are missing."""
    if _MISSING is not None:
        raise ConfigError(f"--grpc-port needs the grpc extra ({_MISSING}); install it with "
                          "`pip install 'deploykit[grpc]'`, or pass --grpc-port 0 to serve HTTP only")


def to_decoded(request: Any) -> protocol.Decoded:
    """A ``ModelInferRequest`` as the decoded request the parsers take (all outputs asked binary).

    The header dict is built from the message's fields and the tensors are its raw bytes, so nothing goes through
    JSON text; the parsers then validate it exactly as they validate an HTTP request.
    """
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise protocol.ProtocolError(f"{len(raw)} raw_input_contents for {len(request.inputs)} inputs; send one "
                                     "per input, in order")
    inputs, blobs = [], []
    for i, t in enumerate(request.inputs):
        data = raw[i] if raw else _contents_bytes(t)
        inputs.append({"name": t.name, "datatype": t.datatype, "shape": list(t.shape),
                       "parameters": {"binary_data_size": len(data)}})
        blobs.append(data)
    params = {k: _param_value(k, v) for k, v in request.parameters.items()}
    params["binary_data_output"] = True
    head: dict[str, Any] = {"inputs": inputs, "parameters": params}
    if request.id:
        head["id"] = request.id
    if request.outputs:
        head["outputs"] = [{"name": o.name, "parameters": {"binary_data": True}} for o in request.outputs]
    return protocol.Decoded(head, blobs[0] if len(blobs) == 1 else b"".join(blobs))


def _contents_bytes(t: Any) -> bytes:
    if t.datatype == "BYTES":
        return b"".join(len(b).to_bytes(4, "little") + b for b in t.contents.bytes_contents)
    if t.datatype not in _CONTENTS:
        raise protocol.ProtocolError(f"input {t.name!r}: send {t.datatype} data in raw_input_contents")
    field, dtype = _CONTENTS[t.datatype]
    return np.asarray(getattr(t.contents, field), dtype=dtype).tobytes()


def _param_value(key: str, p: Any) -> Any:
    kind = p.WhichOneof("parameter_choice")
    value = getattr(p, kind) if kind else None
    if key == "exit_thresholds" and isinstance(value, str):  # a list has no InferParameter type: JSON text
        try:
            return limits.loads_bounded(value)
        except (json.JSONDecodeError, limits.LimitError) as e:
            raise protocol.ProtocolError(f"parameters.exit_thresholds must be a JSON list as a string, e.g. "
                                         f"'[0.9, null, null]' ({e})") from e
    return value


def _param(v: Any) -> Any:
    if isinstance(v, bool):
        return pb.InferParameter(bool_param=v)
    if isinstance(v, int):
        return pb.InferParameter(int64_param=v)
    if isinstance(v, float):
        return pb.InferParameter(double_param=v)
    return pb.InferParameter(string_param=str(v))


def to_infer_response(parts: protocol.Encoded) -> Any:
    """The handler's response (all outputs binary) as a ``ModelInferResponse`` with ``raw_output_contents``."""
    head = parts.head
    resp = pb.ModelInferResponse(model_name=head["model_name"], model_version=head["model_version"],
                                 id=head.get("id", ""), raw_output_contents=parts.blobs)
    for k, v in (head.get("parameters") or {}).items():
        if v is not None:
            resp.parameters[k].CopyFrom(_param(v))
    for o in head["outputs"]:
        resp.outputs.add(name=o["name"], datatype=o["datatype"], shape=o["shape"])
    return resp


class Abort(Exception):
    """An RPC that ends with a non-OK status: the gRPC code's name, the message, trailing metadata."""

    def __init__(self, code: str, message: str, trailing: tuple[tuple[str, str], ...] = ()) -> None:
        super().__init__(message)
        self.code, self.message, self.trailing = code, message, trailing


#: the RPCs of ``GRPCInferenceService`` served here (the others answer UNIMPLEMENTED) and their response types
RPCS = ("ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata", "ModelInfer", "ModelConfig",
        "ModelStatistics", "RepositoryIndex")
_STATUS_NAMES = {400: "INVALID_ARGUMENT", 404: "NOT_FOUND", 405: "UNIMPLEMENTED", 413: "RESOURCE_EXHAUSTED",
                 415: "INVALID_ARGUMENT", 500: "INTERNAL", 503: "RESOURCE_EXHAUSTED"}


class KServeGrpc:
    """The KServe v2 gRPC service over one :class:`KServeHandler`, framework-free.

    Each RPC is ``await service.<Name>(request)`` -> the response message, or :class:`Abort`. serve-local's
    ``grpc.aio`` server and serve-ray's ingress (Ray Serve's gRPC proxy) are thin adapters over it, so both answer
    every call, and every error, alike.
    """

    def __init__(self, handler: KServeHandler, draining: Any = lambda: False) -> None:
        require_grpc()
        self.h, self.draining = handler, draining

    def _fail(self, reply: Reply) -> Abort:
        msg = json.loads(reply.body).get("error", "") if reply.body else ""
        code = _STATUS_NAMES.get(reply.status, "UNKNOWN")
        if reply.status == 503 and self.draining():
            return Abort("UNAVAILABLE", msg)
        if "retry-after" in reply.headers:  # the standard gRPC retry hint, and Triton-style text
            s = reply.headers["retry-after"]
            return Abort(code, msg, (("grpc-retry-pushback-ms", str(int(float(s) * 1000))), ("retry-after", s)))
        return Abort(code, msg)

    def _checked(self, name: str, version: str) -> None:
        try:
            protocol.check_model(self.h.model.info, name, version or None)
        except protocol.ProtocolError as e:
            raise Abort("NOT_FOUND", str(e)) from None

    async def ServerLive(self, request: Any) -> Any:  # noqa: N802  (the proto's names)
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: Any) -> Any:  # noqa: N802
        return pb.ServerReadyResponse(ready=self.h.ready())

    async def ModelReady(self, request: Any) -> Any:  # noqa: N802
        self._checked(request.name, request.version)
        return pb.ModelReadyResponse(ready=self.h.ready())

    async def ServerMetadata(self, request: Any) -> Any:  # noqa: N802
        meta = protocol.server_metadata(__version__)
        return pb.ServerMetadataResponse(name=meta["name"], version=meta["version"], extensions=meta["extensions"])

    async def ModelMetadata(self, request: Any) -> Any:  # noqa: N802
        self._checked(request.name, request.version)
        meta = self.h.model.metadata()
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=meta["name"], versions=meta["versions"], platform=meta["platform"],
            inputs=[tensor(name=t["name"], datatype=t["datatype"], shape=t["shape"]) for t in meta["inputs"]],
            outputs=[tensor(name=t["name"], datatype=t["datatype"], shape=t["shape"]) for t in meta["outputs"]])

    async def ModelInfer(self, request: Any) -> Any:  # noqa: N802
        try:
            decoded = to_decoded(request)
        except protocol.ProtocolError as e:
            raise Abort(_STATUS_NAMES[e.status], str(e)) from None
        reply = await self.h.infer(request.model_name, request.model_version or None, {}, decoded)
        if reply.status != 200:
            raise self._fail(reply)
        return to_infer_response(reply.parts)

    async def ModelConfig(self, request: Any) -> Any:  # noqa: N802
        self._checked(request.name, request.version)
        config = json_format.ParseDict(self.h.model_config(), model_config_pb2.ModelConfig())
        return pb.ModelConfigResponse(config=config)

    async def ModelStatistics(self, request: Any) -> Any:  # noqa: N802
        if request.name:
            self._checked(request.name, request.version)
        stats = {"model_stats": [self.h.metrics.triton_statistics(self.h.model.version)]}
        return json_format.ParseDict(stats, pb.ModelStatisticsResponse(), ignore_unknown_fields=True)

    async def RepositoryIndex(self, request: Any) -> Any:  # noqa: N802
        models = [pb.RepositoryIndexResponse.ModelIndex(**m) for m in self.h.repository_index()]
        return pb.RepositoryIndexResponse(models=models)


def _servicer_class() -> type:
    """``GRPCInferenceServiceServicer`` for ``grpc.aio``: each RPC of :data:`RPCS` calls :class:`KServeGrpc`."""

    def rpc(name: str) -> Any:
        async def call(self: Any, request: Any, context: Any) -> Any:
            try:
                return await getattr(self.service, name)(request)
            except Abort as e:
                if e.trailing:
                    context.set_trailing_metadata(e.trailing)
                await context.abort(getattr(grpc.StatusCode, e.code), e.message)

        call.__name__ = name
        return call

    def init(self: Any, service: KServeGrpc) -> None:
        self.service = service

    return type("Servicer", (pb_grpc.GRPCInferenceServiceServicer,),
                {"__init__": init, **{name: rpc(name) for name in RPCS}})


#: what Ray Serve's gRPC proxy imports and registers (``gRPCOptions.grpc_servicer_functions``)
SERVICER_FUNCTION = "deploykit.serve.grpc_app.add_servicer_for_ray"


def picklable_messages() -> None:
    """Make tritonclient's messages picklable: Ray Serve's proxy sends each request message to a replica pickled.

    tritonclient compiles its protos under the top-level module names ``grpc_service_pb2`` and ``model_config_pb2``
    (the messages' ``__module__``), which are not importable as such; pickle finds them once they are aliases of
    the real modules. Done on import of this module, which both Ray's proxy (via :data:`SERVICER_FUNCTION`) and
    serve-ray's ingress import.
    """
    if _MISSING is None:
        sys.modules.setdefault("grpc_service_pb2", pb)
        sys.modules.setdefault("model_config_pb2", model_config_pb2)


def add_servicer_for_ray(servicer: Any, server: Any) -> None:
    """Register the KServe v2 service (tritonclient's ``add_..._to_server``) in Ray Serve's gRPC proxy.

    Importing this module for it made the messages picklable in the proxy's process.
    """
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)


picklable_messages()


def ray_rpc(name: str) -> Any:
    """A serve-ray ingress method for RPC ``name``: Ray Serve's proxy calls it with the request message.

    An :class:`Abort` becomes the status set on Ray's gRPC context (Ray Serve's way to end an RPC with a code) and
    an empty response, which the proxy discards.
    """
    async def call(self: Any, request: Any, grpc_context: Any = None) -> Any:
        try:
            return await getattr(self.grpc_service(), name)(request)
        except Abort as e:
            if grpc_context is None:
                raise
            grpc_context.set_code(getattr(grpc.StatusCode, e.code))
            grpc_context.set_details(e.message)
            if e.trailing:
                grpc_context.set_trailing_metadata(e.trailing)
            return getattr(pb, f"{name}Response")()

    call.__name__ = name
    return call


async def start_grpc(handler: KServeHandler, host: str, port: int, draining: Any) -> Any:
    """Start the gRPC server on ``host:port`` on the running event loop (the batcher's); returns it."""
    require_grpc()
    limit = handler.max_bytes + 64 * 1024  # the tensors may use the whole request limit, plus the message framing
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", limit),
                                      ("grpc.max_send_message_length", -1),
                                      # gRPC core tuned for many requests in flight: +5 % served rows/s on the
                                      # digits load test, no change on vit_mid64 (docs/results.md)
                                      ("grpc.optimization_target", "throughput")])
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(_servicer_class()(KServeGrpc(handler, draining)), server)
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"  # IPv6 literals in brackets
    if server.add_insecure_port(address) == 0:
        raise ConfigError(f"can't bind gRPC to {host}:{port}; pick another --grpc-port (0 turns gRPC off)")
    await server.start()
    return server
