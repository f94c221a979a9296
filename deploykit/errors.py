"""One error hierarchy for deploykit.

Every message says what was expected, what was found, and what to do, so the CLI can print it as-is and exit
with a non-zero code instead of a traceback.
"""

from __future__ import annotations


class DeployKitError(Exception):
    """Base class of every error deploykit raises on purpose."""

    exit_code = 2


class ConfigError(DeployKitError):
    """A recipe, option or method setting is invalid."""


class UnknownNameError(ConfigError):
    """A method, backbone, backend or data source name is not known."""


class BackboneError(ConfigError):
    """The backbone can't be used (not ViT-family, exits past its depth, weights that don't fit)."""


class DataError(DeployKitError):
    """Input data is missing, undecodable, or has the wrong shape, dtype or values."""


class CheckpointError(DeployKitError):
    """A training checkpoint is missing, corrupt, or doesn't match its config."""


class ManifestError(DeployKitError):
    """A deploykit.json manifest is missing, corrupt, of another schema version, or doesn't match its graphs."""


class ExportError(DeployKitError):
    """ONNX export or its parity check against PyTorch failed."""


class BackendError(DeployKitError):
    """An inference backend is unavailable or failed to load / run a graph."""


class EngineError(BackendError):
    """A compiled engine (TensorRT plan) doesn't fit this device, version or batch size."""
