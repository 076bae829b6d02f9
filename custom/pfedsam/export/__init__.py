"""Export and inference: ONNX (verified against PyTorch), TensorRT (untested here), ``predict``.

The names below are imported on first use (PEP 562), so ``pfedsam.export.cli`` and the
``pfedsam`` parser load without torch or onnx.
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {"ExportError": "onnx_export", "export_model": "onnx_export", "export_onnx": "onnx_export",
          "PredictError": "inference", "load_runner": "inference", "predict": "inference"}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
