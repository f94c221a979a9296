"""Small HTTP helpers for serve tests (stdlib only, so the tests talk plain HTTP like any client)."""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request
from typing import Any

import numpy as np


def http(url: str, body: bytes | dict | None = None, headers: dict[str, str] | None = None,
         timeout: float = 30) -> tuple[int, dict[str, str], bytes]:
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    req = urllib.request.Request(url, data=data, headers=headers or {}, method="POST" if data is not None else "GET")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}, r.read()
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read()


def fp32_request(x: np.ndarray, nested: bool = False, **params: Any) -> dict:
    data = x.tolist() if nested else x.ravel().tolist()
    req: dict[str, Any] = {"inputs": [{"name": "image", "shape": list(x.shape), "datatype": "FP32", "data": data}]}
    if params:
        req["parameters"] = params
    return req


def bytes_request(files: list[bytes]) -> dict:
    return {"inputs": [{"name": "image_bytes", "shape": [len(files)], "datatype": "BYTES",
                        "data": [base64.b64encode(f).decode() for f in files]}]}


def outputs(body: bytes) -> dict[str, np.ndarray]:
    d = json.loads(body)
    return {o["name"]: np.asarray(o["data"]).reshape(o["shape"]) for o in d["outputs"]}


def error(body: bytes) -> str:
    d = json.loads(body)
    assert set(d) == {"error"}, d
    return d["error"]
