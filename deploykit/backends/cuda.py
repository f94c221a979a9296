"""Device buffers for the GPU runners: torch CUDA tensors, so survivors are compacted on the GPU.

TensorRT and ONNX Runtime (I/O binding) both read and write raw device pointers; torch owns the memory, runs the
``take`` gather on the device and copies to the host only what the cascade asks for (the exit scores). All work
goes on torch's current CUDA stream, which the runners also hand to TensorRT / ORT, so no extra syncs are needed.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from deploykit.errors import BackendError, DataError

_NP_TO_TORCH = {"float32": "float32", "float16": "float16", "int64": "int64", "int32": "int32", "bool": "bool",
                "uint8": "uint8", "int8": "int8", "bfloat16": "bfloat16"}


def cuda_device(device_id: int = 0) -> Any:
    """The torch device for ``device_id``, or a :class:`BackendError` saying why there is none."""
    import torch

    if not torch.cuda.is_available():
        raise BackendError(
            "no CUDA GPU is visible to torch here; GPU backends (trt, ort-cuda, ort-trt) need an NVIDIA GPU with a "
            "CUDA build of torch — use --backend ort-cpu on this machine"
        )
    if device_id >= torch.cuda.device_count():
        raise BackendError(f"CUDA device {device_id} asked for but only {torch.cuda.device_count()} visible")
    return torch.device("cuda", device_id)


def torch_dtype(np_dtype: Any) -> Any:
    """The torch dtype of a numpy dtype (or dtype name)."""
    import torch

    name = np.dtype(np_dtype).name if not isinstance(np_dtype, str) else np_dtype
    if name not in _NP_TO_TORCH:
        raise DataError(f"dtype {name} has no device buffer type; expected one of {sorted(_NP_TO_TORCH)}")
    return getattr(torch, _NP_TO_TORCH[name])


def to_device(x: Any, device: Any, dtype: Any, name: str) -> Any:
    """``x`` (numpy array or torch tensor) as a contiguous tensor of ``dtype`` on ``device``; no silent casts."""
    import torch

    t = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(x))
    if t.dtype != dtype:
        raise DataError(f"input {name!r} has dtype {t.dtype}, the engine wants {dtype}")
    return t.to(device, non_blocking=True).contiguous()


def take(x: Any, index: np.ndarray) -> Any:
    """Rows ``index`` of a device tensor, gathered on the device (batch compaction)."""
    import torch

    if isinstance(x, torch.Tensor):
        idx = torch.as_tensor(np.asarray(index, dtype=np.int64)).to(x.device, non_blocking=True)
        return x.index_select(0, idx)
    return x[index]


def to_host(x: Any) -> np.ndarray:
    """Copy a device tensor to a numpy array (synchronises the stream); numpy passes through."""
    import torch

    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


class SharedScratch:
    """One device scratch buffer shared by the execution contexts of engines that run one after another.

    TensorRT lets contexts created with user-managed memory share scratch space when they never run at the same
    time (same stream, one after another), which is how a cascade runs its stages. The buffer grows to the largest
    request; ``generation`` changes when it is reallocated, so runners re-point their contexts.
    """

    _pools: dict[int, SharedScratch] = {}

    def __init__(self, device: Any):
        self.device = device
        self.buffer: Any = None
        self.generation = 0

    @classmethod
    def for_device(cls, device: Any) -> SharedScratch:
        """The process-wide pool of ``device``."""
        key = device.index or 0
        if key not in cls._pools:
            cls._pools[key] = cls(device)
        return cls._pools[key]

    def reserve(self, nbytes: int) -> None:
        """Make the buffer at least ``nbytes`` long (256-byte aligned by the CUDA allocator)."""
        import torch

        if self.buffer is None or self.buffer.numel() < nbytes:
            self.buffer = torch.empty(max(int(nbytes), 1), dtype=torch.uint8, device=self.device)
            self.generation += 1

    @property
    def ptr(self) -> int:
        return int(self.buffer.data_ptr())

    @property
    def nbytes(self) -> int:
        return int(self.buffer.numel())


class DeviceOutputs:
    """Runner methods for outputs that stay torch CUDA tensors (ORT's CUDA I/O binding, TensorRT).

    Mixed in before :class:`~deploykit.backends.base.Runner`, whose host-array versions these replace.
    """

    device: Any
    _loaded: bool

    def sync(self) -> None:
        """Wait for the kernels enqueued on torch's stream (the runs return before they finish)."""
        if self._loaded:
            import torch

            torch.cuda.synchronize(self.device)

    def to_host(self, x: Any) -> np.ndarray:
        """Copy a device output to the host (only the exit scores and final rows need this)."""
        return to_host(x)

    def take(self, x: Any, index: np.ndarray) -> Any:
        """Survivor rows of a device tensor, gathered on the GPU."""
        return take(x, index)
