"""gRPC and HTTP reach the same parsed request and the same answer (Hypothesis, no server).

The gRPC adapter builds the decoded request straight from the protobuf message (no JSON text); these properties
check it against the HTTP path on requests written by the real clients' encoders (tritonclient.http's body
builder, the compiled KServe v2 messages), and that hostile messages end in a ProtocolError, never anything else.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

grpcclient = pytest.importorskip("tritonclient.grpc", reason="needs tritonclient[grpc]")
httpclient = pytest.importorskip("tritonclient.http", reason="needs tritonclient[http]")
from tritonclient.grpc import service_pb2 as pb  # noqa: E402

from deploykit.data.preprocess import decode_image  # noqa: E402
from deploykit.serve import grpc_app, protocol  # noqa: E402

PRE = {"input_size": [3, 4, 4], "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "interpolation": "bilinear"}
INFO = protocol.ModelInfo(name="tiny", labels=[f"class_{i}" for i in range(5)], input_name="image",
                          input_shape=(3, 4, 4), num_stages=3, mean=(0.5,) * 3, std=(0.25,) * 3)
DTYPES = {"FP32": np.float32, "FP16": np.float16, "UINT8": np.uint8}


def _decode(b: bytes) -> np.ndarray:
    return decode_image(b, PRE)


@st.composite
def requests(draw: st.DrawFn) -> dict:
    dtype = draw(st.sampled_from(sorted(DTYPES)))
    batch = draw(st.integers(1, 4))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    x = (rng.integers(0, 256, (batch, 3, 4, 4)) if dtype == "UINT8" else rng.normal(size=(batch, 3, 4, 4)))
    params = draw(st.one_of(st.none(), st.fixed_dictionaries({"exit_threshold": st.floats(0, 1)}),
                            st.fixed_dictionaries({"exit_thresholds": st.lists(
                                st.one_of(st.none(), st.floats(0, 1)), min_size=3, max_size=3)})))
    outputs = draw(st.one_of(st.none(), st.lists(st.sampled_from(protocol.OUTPUT_NAMES), min_size=1, max_size=5,
                                                 unique=True)))
    return {"x": x.astype(DTYPES[dtype]), "dtype": dtype, "params": params, "outputs": outputs,
            "id": draw(st.sampled_from(["", "r-1", "ünïcode"]))}


def _grpc_request(r: dict) -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name="tiny", id=r["id"])
    req.inputs.add(name="image", datatype=r["dtype"], shape=list(r["x"].shape))
    req.raw_input_contents.append(r["x"].tobytes())
    for k, v in (r["params"] or {}).items():  # what tritonclient.grpc sends: a list only as JSON text
        req.parameters[k].CopyFrom(grpc_app._param(v if not isinstance(v, list) else json.dumps(v)))
    for name in r["outputs"] or []:
        req.outputs.add(name=name)
    return req


def _http_request(r: dict) -> tuple[bytes, dict[str, str]]:
    inp = httpclient.InferInput("image", list(r["x"].shape), r["dtype"])
    inp.set_data_from_numpy(r["x"], binary_data=True)
    outs = [httpclient.InferRequestedOutput(n, binary_data=True) for n in r["outputs"]] if r["outputs"] else None
    body, n = httpclient.InferenceServerClient.generate_request_body(
        [inp], outputs=outs, request_id=r["id"], parameters=r["params"])
    return body, ({protocol.HEADER_LENGTH: str(n)} if n is not None else {})


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(requests())
def test_grpc_and_http_parse_to_the_same_request(r):
    via_grpc = protocol.parse_decoded(grpc_app.to_decoded(_grpc_request(r)), INFO, _decode)
    via_http = protocol.parse_infer_request(*_http_request(r), INFO, _decode)
    np.testing.assert_array_equal(via_grpc.rows, via_http.rows)
    assert via_grpc.rows.dtype == np.float32 and via_grpc.rows.shape == r["x"].shape
    assert via_grpc.thresholds == via_http.thresholds
    assert via_grpc.id == (r["id"] or None) and via_grpc.outputs == via_http.outputs


@settings(max_examples=100, deadline=None)
@given(requests(), st.integers(0, 2**32 - 1))
def test_grpc_and_http_answer_the_same(r, seed):
    rng = np.random.default_rng(seed)
    n = r["x"].shape[0]
    probs = rng.dirichlet(np.ones(5), size=n).astype(np.float32)
    result = {"probs": probs, "exit_stage": rng.integers(0, 3, n), "score": probs.max(1)}
    req = protocol.parse_decoded(grpc_app.to_decoded(_grpc_request(r)), INFO, _decode)
    parts = protocol.response_parts(req, protocol.output_arrays(result, INFO.labels), INFO, {"operating_point": 2})
    via_grpc = grpcclient.InferResult(grpc_app.to_infer_response(parts))
    body, headers = protocol.encode_http(parts)
    via_http = httpclient.InferResult.from_response_body(
        body, header_length=int(headers.get(protocol.HEADER_LENGTH, len(body))))
    for name in r["outputs"] or protocol.OUTPUT_NAMES:
        np.testing.assert_array_equal(via_grpc.as_numpy(name), via_http.as_numpy(name))
    assert via_grpc.as_numpy("probabilities") is None or np.array_equal(via_grpc.as_numpy("probabilities"), probs)
    assert via_grpc.get_response().parameters["operating_point"].int64_param == 2


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(["FP32", "FP16", "UINT8", "BYTES", "INT8", ""]),
       st.lists(st.integers(-2, 2**33), max_size=6), st.binary(max_size=512), st.integers(0, 3),
       st.dictionaries(st.sampled_from(["exit_threshold", "exit_thresholds", "x"]),
                       st.one_of(st.text(max_size=20), st.floats(allow_nan=True), st.integers(-2**63, 2**63 - 1),
                                 st.booleans()),
                       max_size=2))
def test_hostile_grpc_messages_end_in_a_protocol_error(dtype, shape, raw, n_raw, params):
    req = pb.ModelInferRequest(model_name="tiny")
    req.inputs.add(name="image", datatype=dtype, shape=shape)
    for _ in range(n_raw):
        req.raw_input_contents.append(raw)
    for k, v in params.items():
        req.parameters[k].CopyFrom(grpc_app._param(v))
    try:
        parsed = protocol.parse_decoded(grpc_app.to_decoded(req), INFO, _decode)
    except protocol.ProtocolError as e:
        assert 400 <= e.status < 500 and str(e)
    else:  # accepted only when it really is a well-formed request
        assert parsed.rows.shape[1:] == INFO.input_shape and np.isfinite(parsed.rows).all()
