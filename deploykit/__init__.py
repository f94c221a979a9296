"""deploykit: train, export and run early-exit and token-merging vision transformers cheaply.

Heavy dependencies (torch, onnxruntime, tensorrt) are imported where they are used, so ``import deploykit`` and
``deploykit --help`` stay fast and work without a GPU.
"""

__version__ = "0.1.0"

from deploykit.errors import DeployKitError  # noqa: E402

__all__ = ["DeployKitError", "__version__"]
