"""What the servers need from an engine, per engine kind: the one place serve/ tells cascades from MuE engines.

:func:`engine_kind` decides the kind from the manifest; :data:`ADAPTERS` maps it to a :class:`ServedModel`, which
parses a KServe v2 infer request body for that kind, names its batching key, runs a batch on the inference thread
and builds the response. The request handler (:mod:`deploykit.serve.handler`), the batcher and the front-ends know
nothing of kinds. When the model-family registry (``deploykit/families``) reports an engine's kind, ``engine_kind``
is the one line to point at it.
"""

from __future__ import annotations

import os
from collections.abc import Hashable
from typing import Any

import numpy as np

from deploykit import kinds
from deploykit.errors import ConfigError
from deploykit.serve import protocol


def engine_kind(manifest: Any) -> str:
    """How the manifest's engine runs, from the one family table (:func:`deploykit.kinds.engine_kind`)."""
    return kinds.engine_kind(manifest)


class ServedModel:
    """One engine kind as the servers see it.

    ``engine`` is what :meth:`run` calls (``None`` for a front-end that runs the graphs elsewhere, like serve-ray's
    ingress).
    """

    kind = ""
    #: front-ends (``serve-ray``, ``export-triton``) this kind can't use, with the error that says what to do
    refused: dict[str, str] = {}

    def __init__(self, manifest: Any, engine: Any = None) -> None:
        self.manifest, self.engine = manifest, engine
        self.name, self.version = manifest.name, "1"
        self.num_stages = 0
        from deploykit.data.preprocess import MAX_IMAGE_PIXELS

        self.max_image_pixels: int | None = MAX_IMAGE_PIXELS  # per image file, from its header (--max-image-pixels)

    def metadata(self) -> dict[str, Any]:
        """Body of ``GET /v2/models/{name}``."""
        raise NotImplementedError

    def parse(self, body: bytes, headers: dict[str, str]) -> Any:
        """Validate an HTTP infer request body (raises :class:`protocol.ProtocolError`); returns what ``run`` needs."""
        return self.parse_decoded(protocol.decode_body(body, headers))

    def parse_decoded(self, d: protocol.Decoded) -> Any:
        """Validate an infer request whose header is decoded (HTTP or gRPC); returns what ``run`` needs."""
        raise NotImplementedError

    def batch_key(self, req: Any) -> Hashable:
        """Requests are batched together only when their keys are equal."""
        raise NotImplementedError

    def run(self, rows: np.ndarray, key: Any) -> dict[str, Any]:
        """One batch on the inference thread: per-row result arrays (sliced back per request by the batcher)."""
        raise NotImplementedError

    def respond(self, req: Any, result: dict[str, np.ndarray], parameters: dict[str, Any] | None
                ) -> tuple[bytes, dict[str, str]]:
        """HTTP response body and headers for one request's rows of the result."""
        return protocol.encode_http(self.respond_parts(req, result, parameters))

    def respond_parts(self, req: Any, result: dict[str, np.ndarray], parameters: dict[str, Any] | None
                      ) -> protocol.Encoded:
        """The response for one request's rows of the result, before serialisation (HTTP or gRPC)."""
        raise NotImplementedError

    def page_info(self) -> dict[str, Any]:
        """What the page at ``/`` (via ``/stats``) needs to draw itself for this kind."""
        return {"kind": self.kind, "num_stages": self.num_stages}

    def adaptive_controller(self, slo_ms: float, instances: int) -> Any:
        """The load-adaptive exit controller for ``--latency-slo-ms``."""
        raise ConfigError(f"--latency-slo-ms moves along a classification cascade's calibrated curve; this "
                          f"{self.kind} engine has none: serve it without --latency-slo-ms")

    @classmethod
    def open(cls, engine_dir: str | os.PathLike, backend: str, threads: int | None) -> Any:
        """Load this kind's engine from ``engine_dir`` (what :meth:`run` calls)."""
        raise NotImplementedError

    def close(self) -> None:
        if self.engine is not None and hasattr(self.engine, "close"):
            self.engine.close()


class CascadeModel(ServedModel):
    """A classification cascade: FP32 pixels or BYTES image files in; label, probabilities, exit stage out."""

    kind = "cascade"

    def __init__(self, manifest: Any, engine: Any = None) -> None:
        super().__init__(manifest, engine)
        self.info = protocol.ModelInfo.from_manifest(manifest)
        self.num_stages = self.info.num_stages
        from deploykit.data.preprocess import decode_image

        pre = manifest.preprocessing
        # the pixel budget is checked from the header, before anything is decoded
        self._decode = lambda data: decode_image(data, pre, max_pixels=self.max_image_pixels)

    @classmethod
    def open(cls, engine_dir: str | os.PathLike, backend: str, threads: int | None) -> Any:
        from deploykit.runtime.cascade import Cascade

        return Cascade.from_dir(engine_dir, backend=backend, threads=threads)

    def metadata(self) -> dict[str, Any]:
        return protocol.model_metadata(self.info)

    def parse_decoded(self, d: protocol.Decoded) -> protocol.InferRequest:
        return protocol.parse_decoded(d, self.info, self._decode)

    def batch_key(self, req: protocol.InferRequest) -> Hashable:
        return req.thresholds

    def run(self, rows: np.ndarray, key: Any) -> dict[str, Any]:
        r = self.engine.run(rows, list(key) if key is not None else None)
        return {"probs": r.probs, "exit_stage": r.exit_stage, "score": r.score,
                "stage_batch_sizes": list(r.stage_batch_sizes)}

    def respond_parts(self, req: protocol.InferRequest, result: dict[str, np.ndarray],
                      parameters: dict[str, Any] | None) -> protocol.Encoded:
        return protocol.response_parts(req, protocol.output_arrays(result, self.info.labels), self.info, parameters)

    def page_info(self) -> dict[str, Any]:
        return {**super().page_info(), "labels": self.info.labels, "thresholds": list(self.manifest.thresholds())}

    def adaptive_controller(self, slo_ms: float, instances: int) -> Any:
        from deploykit.serve.adaptive import AdaptiveController

        return AdaptiveController.from_manifest(self.manifest, slo_ms, instances=instances)


_MUE_SCALE_OUT = ("serve MuE engines with `deploykit serve-local` (several instances behind a load balancer to "
                  "scale out; see docs/scaling.md)")


class MuEModel(ServedModel):
    """A MuE engine: BYTES image files + BYTES texts in, the task in ``parameters``; text and layers used out."""

    kind = "mue"
    refused = {
        "serve-ray": "serve-ray deploys a classification cascade as one Ray deployment per stage; a MuE engine's "
                     "two encoder streams and generation loop have no stage split to deploy: " + _MUE_SCALE_OUT,
        "export-triton": "export-triton writes a classification cascade (per-stage models + a BLS exit model); a "
                         "MuE engine's generation loop has no Triton model here: " + _MUE_SCALE_OUT,
    }

    def __init__(self, manifest: Any, engine: Any = None) -> None:
        super().__init__(manifest, engine)
        from deploykit.serve import protocol_vl

        self._vl = protocol_vl
        meta = manifest.extra["mue"]
        self.tasks = list(meta["tasks"])
        self.max_gen_len = int(meta["max_gen_len"])
        self.info = protocol_vl.VLModelInfo(self.name, self.tasks, self.max_gen_len, version=self.version)

    @classmethod
    def open(cls, engine_dir: str | os.PathLike, backend: str, threads: int | None) -> Any:
        if backend != "ort-cpu":
            raise ConfigError(f"--backend {backend}: MuE engines run on ONNX Runtime CPU (ort-cpu) only")
        from deploykit.runtime.generation import MuEEngine

        return MuEEngine.from_dir(engine_dir, threads)

    def metadata(self) -> dict[str, Any]:
        return self._vl.model_metadata(self.info)

    def parse_decoded(self, d: protocol.Decoded) -> Any:
        return self._vl.parse_vl_decoded(d, self.info, self._load_images, self.engine.encode_texts)

    def _load_images(self, files: list[bytes]) -> list[np.ndarray]:
        from deploykit.data.preprocess import load_image

        return self.engine.load_images([load_image(f, max_pixels=self.max_image_pixels) for f in files])

    def batch_key(self, req: Any) -> Hashable:
        return req.task

    def run(self, rows: np.ndarray, key: Any) -> dict[str, Any]:
        """The engine's own ``predict`` (what ``deploykit predict`` runs) on the batch: exits per sample."""
        out = self.engine.predict([r.image for r in rows], [r.text for r in rows], key, batch_size=len(rows))
        return self._vl.result_arrays(out, self.max_gen_len)

    def respond_parts(self, req: Any, result: dict[str, np.ndarray], parameters: dict[str, Any] | None
                      ) -> protocol.Encoded:
        return self._vl.vl_response_parts(req, result, self.info, parameters)

    def page_info(self) -> dict[str, Any]:
        return {**super().page_info(), "tasks": self.tasks}


ADAPTERS: dict[str, type[ServedModel]] = {kinds.CASCADE: CascadeModel, kinds.GENERATION: MuEModel}


def served_model(engine: Any) -> ServedModel:
    """The adapter for a loaded engine (anything with a ``manifest``: a Cascade, a MuEEngine, a test wrapper)."""
    return model_for(engine.manifest, engine)


def model_for(manifest: Any, engine: Any = None) -> ServedModel:
    """The adapter for a manifest (``engine`` None: a front-end that runs the graphs itself, as serve-ray)."""
    return ADAPTERS[engine_kind(manifest)](manifest, engine)


def check_frontend(manifest: Any, frontend: str) -> None:
    """Raise :class:`ConfigError` when ``frontend`` (``serve-ray``, ``export-triton``) can't serve this engine."""
    why = ADAPTERS[engine_kind(manifest)].refused.get(frontend)
    if why:
        raise ConfigError(f"{manifest.root}: {why}")


def open_engine(engine_dir: str | os.PathLike, backend: str = "ort-cpu", threads: int | None = None) -> Any:
    """Load the engine in ``engine_dir`` for serve-local, as its kind's adapter says."""
    from deploykit.manifest import Manifest

    return ADAPTERS[engine_kind(Manifest.load(engine_dir))].open(engine_dir, backend, threads)
