"""Tuning and measuring an exported model: exit-threshold calibration, benchmarks, prediction."""
