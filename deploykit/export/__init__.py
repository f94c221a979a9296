"""Model -> per-stage ONNX graphs, their manifest, and parity checks."""

from deploykit.export.export import export_model, export_run

__all__ = ["export_model", "export_run"]
