"""Hostile request bodies: bounded JSON, validated dimensions, pixel budget; pure parser and live endpoint.

Property-based (Hypothesis) with a few hundred examples each, so the suite stays fast; benchmarks/fuzz_serve.py
fires >= 10,000 at a real server.
"""

from __future__ import annotations

import base64
import json
import struct
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from serve_helpers import error, fp32_request, http, png_bytes, rows

from deploykit.data.preprocess import decode_image, load_image
from deploykit.errors import DataError
from deploykit.serve import limits, protocol

PRE = {"input_size": [3, 16, 16], "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "interpolation": "bilinear"}
INFO = protocol.ModelInfo(name="tiny", labels=[f"class_{i}" for i in range(10)], input_name="image",
                          input_shape=(3, 16, 16), num_stages=4)


def png_header_only(width: int, height: int) -> bytes:
    """A ~60-byte PNG whose header claims width x height (no pixel data)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)) + \
        chunk(b"IEND", b"")


def png_bomb(side: int = 13000) -> bytes:
    """A real, complete grayscale PNG of side x side zeros: ~170 MB of pixels in a file of a few hundred KB.

    Deterministic and streamed row by row, so building it never holds the image in memory.
    """
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    z, row, parts = zlib.compressobj(9), b"\x00" * (side + 1), []
    for _ in range(side):
        parts.append(z.compress(row))
    parts.append(z.flush())
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)) + \
        chunk(b"IDAT", b"".join(parts)) + chunk(b"IEND", b"")


def parse(body: bytes | str, headers: dict[str, str] | None = None) -> protocol.InferRequest:
    raw = body.encode() if isinstance(body, str) else body
    return protocol.parse_infer_request(raw, headers or {}, INFO, lambda b: decode_image(b, PRE))


# ---- hand-written hostile bodies (each was a 500 before) -------------------------------------------------------
def _fp32(shape: object, data: object = None, **extra: object) -> str:
    return json.dumps({"inputs": [{"name": "image", "shape": shape, "datatype": "FP32", "data": data or [0.0]}],
                       **extra})


HOSTILE = {
    "nested 5000 deep": ("[" * 5000 + "]" * 5000, "nested"),
    "nested objects in data": ('{"inputs": [{"data": ' + "[" * 3000 + "]" * 3000 + "}]}", "nested"),
    "true as a dimension": (_fp32([True, 3, 16, 16]), "non-negative integers"),
    "bool batch for BYTES": ('{"inputs": [{"name": "image_bytes", "shape": [true], "datatype": "BYTES", '
                             '"data": ["aGk="]}]}', "non-negative integers"),
    "negative dimension": (_fp32([-1, 3, 16, 16]), "non-negative integers"),
    "overflowing product": (_fp32([2**31 - 1, 3, 16, 16]), "more than the request body can hold"),
    "float dimension": (_fp32([1.0, 3, 16, 16]), "non-negative integers"),
    "hundreds of digits in data": ('{"inputs": [{"name": "image", "shape": [1, 3, 16, 16], "datatype": "FP32", '
                                   '"data": [' + "9" * 400 + "]}]}", "digits"),
    "5000 digits in a threshold": (_fp32([1, 3, 16, 16])[:-1] + ', "parameters": {"exit_threshold": '
                                   + "1" * 5000 + "}}", "digits"),
    "NaN threshold": (_fp32([1, 3, 16, 16])[:-1] + ', "parameters": {"exit_threshold": NaN}}', "not JSON"),
    "Infinity in data": ('{"inputs": [{"name": "image", "shape": [1], "datatype": "FP32", "data": [Infinity]}]}',
                         "not JSON"),
    "bool binary_data_size": ('{"inputs": [{"name": "image", "shape": [1, 3, 16, 16], "datatype": "FP32", '
                              '"parameters": {"binary_data_size": true}}]}', "binary_data_size"),
    "huge float": (_fp32([1, 3, 16, 16], [1e308] * 768), "finite"),
    "99-byte PNG claiming 20k x 20k": (json.dumps({"inputs": [{"name": "image_bytes", "shape": [1], "datatype":
                                       "BYTES", "data": [base64.b64encode(png_header_only(20000, 20000)).decode()]}]}),
                                       "pixel budget"),
    "truncated PNG": (json.dumps({"inputs": [{"name": "image_bytes", "shape": [1], "datatype": "BYTES",
                                              "data": [base64.b64encode(png_bytes()[:60]).decode()]}]}), "decode"),
    "shape with a million dims": (_fp32([1] * 1000), "at most 8"),
}


@pytest.mark.parametrize("what", list(HOSTILE))
def test_parser_refuses_hostile_bodies_with_a_400(what):
    body, expect = HOSTILE[what]
    with pytest.raises(protocol.ProtocolError) as e:
        parse(body)
    assert e.value.status == 400 and expect in str(e.value), str(e.value)


def test_hostile_bodies_over_http_are_400_with_a_json_error(server):
    url = server.url + "/v2/models/tiny/infer"
    for what, (body, expect) in HOSTILE.items():
        code, headers, resp = http(url, body.encode(), {"content-type": "application/json"})
        assert code == 400, (what, code, resp[:200])
        assert headers["content-type"] == "application/json" and expect in error(resp), (what, resp[:200])
    assert http(server.url + "/v2/health/live")[0] == 200
    text = http(server.url + "/metrics")[2].decode()
    assert 'code="500"' not in text


def test_nesting_depth_ignores_brackets_in_strings():
    assert limits.nesting_depth(b'{"a": "[[[[[[[[[", "b": [[1]]}') == 3
    assert limits.nesting_depth(b'["\\"[[[", [[]]]') == 3
    assert limits.nesting_depth(b"123") == 0


def test_legit_large_request_is_within_the_limits():
    x = rows(40)
    req = parse(json.dumps(fp32_request(x, nested=True)))
    np.testing.assert_array_equal(req.rows, x)


# ---- pixel budget -------------------------------------------------------------------------------------------
def test_png_bomb_is_refused_from_its_header_before_decoding():
    bomb = png_bomb(13000)
    assert len(bomb) < 400_000  # a small file...
    with pytest.raises(DataError, match="13000 x 13000 = 169000000 pixels, over the pixel budget"):
        decode_image(bomb, PRE)
    assert load_image(bomb, max_pixels=None).size == (13000, 13000)  # ...that really is a 13000 x 13000 image


def test_large_jpeg_is_drafted_into_the_budget_and_small_ones_decode_exactly():
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (4000, 3000), (200, 10, 10)).save(buf, format="JPEG")
    img = load_image(buf.getvalue(), max_pixels=2_000_000, draft_size=(16, 16))
    assert img.size[0] * img.size[1] <= 2_000_000 and img.size[0] >= 16  # decoded at 1/8 scale
    with pytest.raises(DataError, match="over the pixel budget"):
        load_image(buf.getvalue(), max_pixels=2_000_000)  # no draft size: refused
    assert load_image(buf.getvalue(), draft_size=(16, 16)).size == (4000, 3000)  # within budget: exact


# ---- property-based fuzzing ---------------------------------------------------------------------------------
_json_leaf = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=False),
                       st.text(max_size=8))
_json = st.recursive(_json_leaf, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                         st.dictionaries(st.text(max_size=6), inner, max_size=4)),
                     max_leaves=20)
_dims = st.lists(st.one_of(st.integers(-3, 2**40), st.booleans(), st.floats(), st.just(16), st.just(3)),
                 max_size=6)
_tensor = st.fixed_dictionaries({
    "name": st.sampled_from(["image", "image_bytes", "x"]),
    "datatype": st.sampled_from(["FP32", "BYTES", "INT64", None]),
    "shape": st.one_of(_dims, st.just([1, 3, 16, 16]), st.just([1])),
}, optional={"data": st.one_of(_json, st.lists(st.floats(), max_size=8), st.lists(st.text(max_size=12), max_size=3)),
             "parameters": st.one_of(_json, st.fixed_dictionaries({"binary_data_size": _json_leaf}))})
_request = st.fixed_dictionaries({"inputs": st.one_of(st.lists(_tensor, max_size=2), _json)},
                                 optional={"parameters": st.one_of(_json, st.fixed_dictionaries(
                                     {"exit_threshold": _json_leaf})), "outputs": _json, "id": _json})
_body = st.one_of(
    _request.map(lambda r: json.dumps(r).encode()),
    st.binary(max_size=200),
    st.text(alphabet='[]{}",:0123456789.-eE truenl\\', max_size=300).map(str.encode),
    _json.map(lambda r: json.dumps(r).encode()),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=_body, header_len=st.one_of(st.none(), st.integers(-5, 400).map(str), st.text(max_size=4)))
def test_fuzzed_bodies_parse_or_get_a_400_never_anything_else(body, header_len):
    headers = {} if header_len is None else {protocol.HEADER_LENGTH: header_len}
    try:
        req = parse(body, headers)
    except protocol.ProtocolError as e:
        assert e.status == 400 and str(e)
        return
    assert req.rows.dtype == np.float32 and req.rows.shape[1:] == (3, 16, 16) and np.isfinite(req.rows).all()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(body=_body)
def test_fuzzed_bodies_over_http_get_a_json_answer_never_a_5xx(server, body):
    code, headers, resp = http(server.url + "/v2/models/tiny/infer", body, {"content-type": "application/json"})
    assert code < 500, resp[:300]
    assert headers["content-type"] == "application/json"
    if code != 200:
        assert error(resp)


# ---- memory and accounting under odd clients --------------------------------------------------------------
def test_unique_per_request_thresholds_leave_nothing_behind(server):
    url = server.url + "/v2/models/tiny/infer"
    x = rows(1)
    for i in range(200):
        assert http(url, fp32_request(x, exit_threshold=0.5 + i * 1e-6))[0] == 200
    batcher = server.server.config.app.state.batcher
    assert batcher.depth == 0 and batcher._rows == {}  # one key per distinct thresholds used to stay forever


def test_client_that_disconnects_mid_body_is_499_not_500(server):
    import socket
    import time

    def count(code: str) -> float:
        text = http(server.url + "/metrics")[2].decode()
        return sum(float(ln.rsplit(" ", 1)[1]) for ln in text.splitlines()
                   if ln.startswith("deploykit_requests_total{") and f'code="{code}"' in ln)

    before_500, before_499 = count("500"), count("499")
    for _ in range(3):
        s = socket.create_connection(("127.0.0.1", server.port))
        s.sendall(b"POST /v2/models/tiny/infer HTTP/1.1\r\nhost: x\r\ncontent-length: 900\r\n\r\n{\"inputs\"")
        s.close()
    deadline = time.time() + 10
    while count("499") < before_499 + 3 and time.time() < deadline:
        time.sleep(0.05)
    assert count("499") == before_499 + 3 and count("500") == before_500
