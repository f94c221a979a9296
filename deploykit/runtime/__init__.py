"""Running exported models: the cascade, calibration, benchmarks and prediction."""

from deploykit.runtime.cascade import Cascade, CascadeResult

__all__ = ["Cascade", "CascadeResult"]
