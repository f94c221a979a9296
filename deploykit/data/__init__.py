"""Data sources and preprocessing."""

from deploykit.data.datasets import create_dataset, data_info, stack_split, write_samples
from deploykit.data.preprocess import load_image, preprocess_image

__all__ = ["create_dataset", "data_info", "load_image", "preprocess_image", "stack_split", "write_samples"]
