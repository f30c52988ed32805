"""Datasets, in their official on-disk layouts, and loaders that deliver device-ready batches."""

from .batch import Batch
from .builders import build_data, resolved_options
from .bundle import DataBundle, LoaderOptions
from .images import DatasetError, ImageTensors
from .tensor_loader import TensorLoader

__all__ = ["Batch", "DataBundle", "DatasetError", "ImageTensors", "LoaderOptions", "TensorLoader", "build_data", "resolved_options"]
