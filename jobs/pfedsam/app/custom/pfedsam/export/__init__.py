"""Export and inference: ONNX (verified against PyTorch), TensorRT (untested here), ``predict``."""

from .onnx_export import ExportError, export_model, export_onnx
from .predict import PredictError, load_runner, predict

__all__ = ["ExportError", "PredictError", "export_model", "export_onnx", "load_runner", "predict"]
