"""Backends: one runner class per engine kind, all with the same load / run / close interface."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from deploykit.backends.base import Runner
from deploykit.errors import BackendError, UnknownNameError

BACKENDS = ("ort-cpu", "openvino", "ort-cuda", "ort-trt", "trt")
# CPU backends: their runners take ``threads``, run on host arrays, and are thread-safe per calling thread
CPU_BACKENDS = ("ort-cpu", "openvino")


def create_runner(path: str | Path, backend: str = "ort-cpu", **kwargs: Any) -> Runner:
    """A runner for one graph file on the named backend."""
    if backend in GPU_BACKENDS or backend == "openvino":
        check_backend(backend)
    if Path(path).suffix == ".xml" and backend != "openvino":
        raise BackendError(f"{Path(path).name} is an OpenVINO IR graph (written by `deploykit quantize --mode "
                           f"openvino`); run it with --backend openvino, not {backend}")
    if backend == "openvino":
        from deploykit.backends.openvino import OpenVinoRunner

        return OpenVinoRunner(path, **kwargs)
    if backend in ("ort-cuda", "ort-trt"):
        from deploykit.backends.ort import OrtIoBindingRunner

        return OrtIoBindingRunner(path, backend=backend, **kwargs)
    if backend in ("ort-cpu", "ort-cuda", "ort-trt"):
        from deploykit.backends.ort import ORT_PROVIDERS, OrtRunner

        return OrtRunner(path, providers=kwargs.pop("providers", None) or ORT_PROVIDERS[backend], **kwargs)
    if backend == "trt":
        from deploykit.backends.trt import TrtRunner  # type: ignore[import-not-found]

        return TrtRunner(path, **kwargs)
    raise UnknownNameError(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")


GPU_BACKENDS = ("ort-cuda", "ort-trt", "trt")
_INSTALL = "install the GPU extra with `pip install 'deploykit[gpu]'` (onnxruntime-gpu + tensorrt; on Jetson use " \
           "JetPack's TensorRT and NVIDIA's Jetson onnxruntime-gpu wheel)"


def check_backend(backend: str) -> None:
    """Raise :class:`BackendError` naming what to install when ``backend`` can't run here (checked on CPU too)."""
    import importlib.util

    if backend not in BACKENDS:
        raise UnknownNameError(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    if backend == "ort-cpu":
        return
    if backend == "openvino":
        from deploykit.backends.openvino import check_openvino

        check_openvino()
        return
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    if backend == "trt":
        if importlib.util.find_spec("tensorrt") is None:
            raise BackendError(f"backend 'trt' needs the tensorrt Python package, which is not installed; {_INSTALL}")
    else:
        provider = "CUDAExecutionProvider" if backend == "ort-cuda" else "TensorrtExecutionProvider"
        try:
            import onnxruntime as ort

            available = ort.get_available_providers()
        except ImportError:
            available = []
        if provider not in available:
            raise BackendError(
                f"backend {backend!r} needs ONNX Runtime's {provider}, but this onnxruntime has {available or 'none'}; "
                f"{_INSTALL} — and uninstall the CPU `onnxruntime` wheel, which shadows onnxruntime-gpu"
            )
    if not has_cuda:
        raise BackendError(f"backend {backend!r} needs an NVIDIA GPU, but torch sees no CUDA device here; use "
                           "--backend ort-cpu on this machine")


__all__ = ["BACKENDS", "CPU_BACKENDS", "GPU_BACKENDS", "Runner", "check_backend", "create_runner"]
