"""What runs the frozen encoder prefix when the feature cache is filled, and in which precision.

Filling the cache is the one place a CPU run still pays for the image encoder (about 1.7 s
per LiteMedSAM image in PyTorch on 2 cores). ONNX Runtime runs the same exported graph in
about half that time; the export is done once per backbone and kept in the cache folder.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from ..fileio import atomic_write

if TYPE_CHECKING:
    import onnxruntime

log = logging.getLogger(__name__)


def bf16_autocast(requested: bool, device: torch.device) -> tuple[bool, str]:
    """Whether bf16 autocast is used on ``device``, and why not when it was requested.

    Arguments:
      requested: ``train.amp``.
      device: the training device.
    On a CPU, bf16 pays only with native instructions (AVX512-BF16 or AMX); elsewhere it is
    emulated and slower than float32, so the run stays float32.
    """
    if not requested:
        return False, ""
    if device.type == "cuda":
        return True, ""
    if device.type == "cpu":
        native = False
        for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
            fn = getattr(torch.cpu, probe, None)
            try:
                native = native or bool(fn and fn())
            except RuntimeError:
                pass
        if native:
            return True, ""
        return False, ("train.amp: this CPU has no native bf16 (AVX512-BF16 or AMX; "
                       f"torch sees {torch.backends.cpu.get_cpu_capability()}): training stays float32")
    return False, f"train.amp: no bf16 autocast on device type {device.type!r}: float32"


def resolve_runtime(choice: str, backbone: str, device: torch.device) -> tuple[str, str]:
    """``(runtime, reason)`` for ``train.encoder_runtime``: ``torch`` or ``onnxruntime``.

    Arguments:
      choice: ``auto``, ``torch`` or ``onnxruntime``.
      backbone: the config's backbone (``auto`` picks ONNX Runtime only where it was measured:
        LiteMedSAM on a CPU).
      device: the training device.
    """
    have_ort = importlib.util.find_spec("onnxruntime") is not None
    if choice == "onnxruntime":
        if not have_ort:
            raise RuntimeError("train.encoder_runtime is 'onnxruntime' but the onnxruntime package is not "
                               "installed (pip install onnxruntime), or set it to 'torch'")
        if device.type != "cpu":
            return "torch", f"train.encoder_runtime: onnxruntime runs on the CPU only; {device} uses torch"
        return "onnxruntime", ""
    if choice == "auto" and device.type == "cpu" and backbone == "litemedsam":
        if have_ort:
            return "onnxruntime", ""
        return "torch", "train.encoder_runtime: onnxruntime not installed, the cache fill uses torch (slower)"
    return "torch", ""


class _Prefix(nn.Module):
    def __init__(self, model: nn.Module, cuts: tuple[int, ...]) -> None:
        super().__init__()
        self.model = model
        self.cuts = cuts

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.model.encode_cuts(images, self.cuts)


class OnnxPrefixEncoder:
    """The model's frozen encoder prefix exported to ONNX and run in ONNX Runtime (CPU).

    Arguments:
      model (PFedSAM): the model; only its frozen prefix is exported.
      path (Path): the ONNX file; exported there (atomically) when missing, reused otherwise.
      image_size (int): input side of the export.
      threads (int): ONNX Runtime intra-op threads (0 = torch's thread count).
      cuts (tuple[int, ...]): increasing unit counts; the graph outputs the features after each
        (default: the model's frozen prefix). Two cuts fill two caches in one pass, and give the
        same bits as two single-cut graphs (test).
    """

    def __init__(self, model: nn.Module, path: str | Path, image_size: int, threads: int = 0,
                 cuts: tuple[int, ...] | None = None) -> None:
        import onnxruntime as ort

        self.path = Path(path)
        self.cuts = cuts or (model.prefix_units,)
        if list(self.cuts) != sorted(set(self.cuts)):
            raise ValueError(f"OnnxPrefixEncoder: cuts must increase, got {self.cuts}")
        if not self.path.is_file():
            self.export(model, self.path, image_size, self.cuts)
        self.threads = threads
        self._sessions: dict[int, ort.InferenceSession] = {}
        self.input = self.session().get_inputs()[0].name

    def session(self) -> onnxruntime.InferenceSession:
        """The session for this call's thread count: with ``threads=0``, torch's count now, which a
        site re-counts as other site processes start and end (one session per count, kept)."""
        import onnxruntime as ort

        n = self.threads or torch.get_num_threads()
        if n not in self._sessions:
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = n
            opts.inter_op_num_threads = 1
            self._sessions[n] = ort.InferenceSession(str(self.path), opts, providers=["CPUExecutionProvider"])
        return self._sessions[n]

    @staticmethod
    def export(model: nn.Module, path: Path, image_size: int, cuts: tuple[int, ...]) -> None:
        """Export the prefix for one image (legacy exporter, opset 17).

        One image per call: TinyViT's reshapes are traced with the batch size as a constant, so
        a dynamic batch axis gives a graph that fails on any other batch size.
        """
        log.info(f"exporting the frozen encoder to {path} (once per backbone)")
        was_training = model.training
        wrapper = _Prefix(model, cuts).eval()  # the exporter restores the wrapper's mode: never train()
        dummy = torch.rand(1, 3, image_size, image_size)
        try:
            atomic_write(path, lambda tmp: torch.onnx.export(
                wrapper, (dummy,), tmp, dynamo=False, opset_version=17, input_names=["images"],
                output_names=[f"features{i}" for i in range(len(cuts))],
            ), suffix=".onnx")
        finally:
            model.train(was_training)

    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The features after each cut, ``(B, ...)`` per cut."""
        x = images.detach().cpu().float().numpy()
        session = self.session()
        out = [session.run(None, {self.input: np.ascontiguousarray(x[i : i + 1])}) for i in range(len(x))]
        return tuple(torch.from_numpy(np.concatenate([o[c] for o in out])) for c in range(len(self.cuts)))


def onnx_path(directory: Path, fingerprint: str) -> Path:
    """Where the prefix export of backbone ``fingerprint`` is kept (content-named)."""
    name = hashlib.sha1(f"{fingerprint}-torch{torch.__version__}".encode()).hexdigest()[:16]
    return Path(directory) / "onnx" / f"prefix-{name}.onnx"
