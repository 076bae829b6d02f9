"""Export a personalized site model to ONNX: image encoder (with the site's L-MoE) + mask decoder.

Two files and a manifest are written to the output folder:

- ``image_encoder.onnx``: input ``images`` ``(1, 3, S, S)`` float32, preprocessed the SAM way
  (longest side resized to S, normalized, zero-padded bottom/right); output
  ``image_embeddings`` ``(1, C, h, w)``. The frozen backbone, the global encoder LoRA (if any)
  and the site's experts and router are all inside.
- ``mask_decoder.onnx``: input ``image_embeddings`` and, in box mode, ``boxes`` ``(1, 4)``
  (x0, y0, x1, y1 in pixels of the S x S padded input frame); output ``masks`` ``(1, 1, S, S)``
  mask logits. There is no ``orig_im_size`` post-processing in the graph (a data-dependent
  shape that TensorRT cannot build): cropping the valid region and resizing it to the original
  image size happens outside, in ``pfedsam predict``.
- ``manifest.json``: input size, normalization, prompt mode, threshold, backbone, opset, the
  source site and round, sha256 of each file, the pFedSAM version and the measured
  ONNX Runtime vs PyTorch differences on a random input.

All shapes are static (batch 1, one box), so the graphs need no optimization profiles.
Traps handled here (see the project notes): the legacy TorchScript exporter (``dynamo=False``,
opset 17) is used because the dynamo exporter fails on the SAM decoder, and every module that
is exported is put in ``eval()`` first -- the legacy exporter restores the wrapper's previous
mode afterwards, and TinyViT has BatchNorm.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .. import __version__
from ..config import PFedSAMConfig, resolved_image_size
from ..model.checkpoint import load_site_model
from ..model.lora import LoRALinear
from ..model.pfedsam import PFedSAM
from .names import DECODER_FILE, ENCODER_FILE, MANIFEST_FILE, MANIFEST_FORMAT, OPSET, PROMPTS  # noqa: F401


class ExportError(RuntimeError):
    """Export or its verification failed (the message says which file or check)."""


class ImageEncoderExport(nn.Module):
    """``images (1, 3, S, S)`` -> ``image_embeddings (1, C, h, w)`` with the site's experts applied."""

    def __init__(self, model: PFedSAM) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.embed_from_prefix(self.model.encode_prefix(images), use_experts=True)


class MaskDecoderExport(nn.Module):
    """``image_embeddings`` (+ ``boxes (1, 4)`` in box mode) -> mask logits ``(1, 1, S, S)``."""

    def __init__(self, model: PFedSAM) -> None:
        super().__init__()
        self.model = model

    def forward(self, image_embeddings: torch.Tensor, boxes: torch.Tensor | None = None) -> torch.Tensor:
        return self.model.decode(image_embeddings, boxes)


@contextlib.contextmanager
def merged_lora(model: PFedSAM):
    """Within the block, every LoRA adapter of ``model`` is folded into a plain ``nn.Linear``.

    ``W[idx_t] += (alpha / r) * B_t @ A_t`` for each target t: the same function, one matmul
    instead of three per layer. It is also what makes the encoder exportable: the legacy ONNX
    exporter writes ``index_add`` on the last axis (TinyViT's interleaved q/v channels, SAM's
    fused qkv) as an ``Expand`` that ONNX Runtime rejects. The adapters are put back on exit
    (in place, because the model's encoder units hold references to its blocks).
    """
    swapped: list[tuple[nn.Module, str, LoRALinear]] = []
    try:
        with torch.no_grad():
            for name, lora in [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]:
                base = lora.base
                weight = base.weight.detach().clone()
                for target in lora.target_names:
                    delta = lora.scale * (getattr(lora, f"lora_{target}_B") @ getattr(lora, f"lora_{target}_A"))
                    index = getattr(lora, f"index_{target}", None)
                    if index is None:
                        weight += delta.to(weight.dtype)
                    else:
                        weight.index_add_(0, index, delta.to(weight.dtype))
                linear = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None)
                linear.weight.copy_(weight)
                if base.bias is not None:
                    linear.bias.copy_(base.bias)
                parent_name, _, attr = name.rpartition(".")
                parent = model.get_submodule(parent_name) if parent_name else model
                setattr(parent, attr, linear.eval())
                swapped.append((parent, attr, lora))
        yield model
    finally:
        for parent, attr, lora in reversed(swapped):
            setattr(parent, attr, lora)


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def normalization_of(backbone: str) -> str:
    from ..train.site import NORMALIZATION

    return NORMALIZATION[backbone]


@contextlib.contextmanager
def _prompt_mode(model: PFedSAM, prompt: str):
    old = model.prompt
    model.prompt = prompt
    try:
        yield
    finally:
        model.prompt = old


def _export(module: nn.Module, args: tuple, path: Path, input_names: list[str], output_names: list[str],
            opset: int) -> None:
    module.eval()  # the legacy exporter restores this mode afterwards: it must already be eval
    with warnings.catch_warnings(), torch.no_grad(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")  # TracerWarnings and the legacy-exporter deprecation notice
        torch.onnx.export(module, args, str(path), dynamo=False, opset_version=opset, input_names=input_names,
                          output_names=output_names, do_constant_folding=True)
    module.eval()


def example_inputs(image_size: int, normalization: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A deterministic random preprocessed image (values in the normalization's range) and a box."""
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(1, 3, image_size, image_size, generator=g)
    if normalization == "sam":
        image = (image - 0.5) / 0.23  # roughly ImageNet-normalized range
    s = float(image_size)
    box = torch.tensor([[0.2 * s, 0.25 * s, 0.7 * s, 0.8 * s]])
    return image, box


def onnx_session(path: str | Path, providers: list[str] | None = None, threads: int = 0):
    """An onnxruntime session; errors name the file."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), sess_options=opts, providers=providers or ["CPUExecutionProvider"])
    except Exception as exc:
        raise ExportError(f"{path}: onnxruntime cannot load it: {exc}") from None


def verify_export(out_dir: str | Path, model: PFedSAM, prompt: str, normalization: str,
                  threshold: float, seed: int = 0) -> dict[str, Any]:
    """Run ONNX Runtime (CPU) and PyTorch on the same random input; report the differences."""
    import onnxruntime as ort

    out_dir = Path(out_dir)
    size = model.image_size
    image, box = example_inputs(size, normalization, seed)
    model.eval()
    with torch.no_grad(), _prompt_mode(model, prompt):
        emb_t = model.embed_from_prefix(model.encode_prefix(image), use_experts=True)
        logits_t = model.decode(emb_t, box if prompt == "box" else None)
    enc = onnx_session(out_dir / ENCODER_FILE)
    dec = onnx_session(out_dir / DECODER_FILE)
    emb_o = enc.run(None, {"images": image.numpy()})[0]
    feeds = {"image_embeddings": emb_o}
    if prompt == "box":
        feeds["boxes"] = box.numpy()
    logits_o = dec.run(None, feeds)[0]
    # The decoder on its own, fed the PyTorch embedding: isolates decoder error from encoder error.
    feeds["image_embeddings"] = emb_t.numpy()
    logits_dec_only = dec.run(None, feeds)[0]
    cut = math.log(threshold / (1.0 - threshold))
    lt = logits_t.numpy()
    agree = float(np.mean((lt > cut) == (logits_o > cut)))
    return {
        "input": f"random preprocessed image, torch.Generator seed {seed}"
                 + (f", box {box[0].tolist()}" if prompt == "box" else ""),
        "onnxruntime": ort.__version__,
        "torch": torch.__version__,
        "embedding_max_abs_diff": float(np.abs(emb_t.numpy() - emb_o).max()),
        "logits_max_abs_diff": float(np.abs(lt - logits_o).max()),
        "decoder_only_logits_max_abs_diff": float(np.abs(lt - logits_dec_only).max()),
        "logits_abs_max": float(np.abs(lt).max()),
        "mask_agreement": agree,
        "mask_foreground_fraction": float(np.mean(lt > cut)),
    }


def export_model(
    model: PFedSAM,
    cfg: PFedSAMConfig,
    out_dir: str | Path,
    meta: dict[str, Any] | None = None,
    prompt: str | None = None,
    opset: int = OPSET,
    verify: bool = True,
) -> dict[str, Any]:
    """Export an in-memory personalized model; returns the manifest (also written as manifest.json).

    Arguments:
      model: the personalized model (its L-MoE is exported with ``use_experts=True``).
      cfg: its config (backbone, image size, threshold, prompt default).
      out_dir: output folder (created).
      meta: the ``meta`` of the site's weights file (``site``, ``round``, ...).
      prompt: ``none`` or ``box``; None = ``cfg.prompt``.
      opset: ONNX opset of the legacy exporter.
      verify: compare ONNX Runtime against PyTorch on a random input and record the differences.
    """
    prompt = prompt or cfg.prompt
    if prompt not in PROMPTS:
        raise ExportError(f"prompt must be one of {', '.join(PROMPTS)}, got {prompt!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta = dict(meta or {})
    size = resolved_image_size(cfg)
    normalization = normalization_of(cfg.backbone)
    was_training = model.training
    device = next(model.parameters()).device
    model = model.cpu().eval()  # exported on the CPU; the caller's device and mode are restored below
    image, box = example_inputs(size, normalization)
    timings: dict[str, float] = {}
    try:
        with merged_lora(model) as exported, _prompt_mode(exported, prompt):
            encoder = ImageEncoderExport(exported).eval()
            start = time.perf_counter()
            _export(encoder, (image,), out / ENCODER_FILE, ["images"], ["image_embeddings"], opset)
            timings["encoder_export_s"] = time.perf_counter() - start
            with torch.no_grad():
                emb = encoder(image)
            decoder = MaskDecoderExport(exported).eval()
            args = (emb, box) if prompt == "box" else (emb,)
            names = ["image_embeddings", "boxes"] if prompt == "box" else ["image_embeddings"]
            start = time.perf_counter()
            _export(decoder, args, out / DECODER_FILE, names, ["masks"], opset)
            timings["decoder_export_s"] = time.perf_counter() - start
        verification = None
        if verify:
            start = time.perf_counter()
            verification = verify_export(out, model, prompt, normalization, cfg.eval.threshold)
            timings["verify_s"] = time.perf_counter() - start
    finally:
        model.train(was_training).to(device)
    files = {name: {"sha256": sha256_file(out / name), "bytes": (out / name).stat().st_size}
             for name in (ENCODER_FILE, DECODER_FILE)}
    emb_shape = [int(d) for d in emb.shape]
    inputs = {"image_embeddings": emb_shape}
    if prompt == "box":
        inputs["boxes"] = [1, 4]
    manifest = {
        "format": MANIFEST_FORMAT,
        "pfedsam_version": __version__,
        "backbone": cfg.backbone,
        "image_size": size,
        "normalization": normalization,
        "prompt": prompt,
        "prompt_trained": cfg.prompt,
        "box_frame": "x0,y0,x1,y1 in pixels of the SxS padded input frame (original coordinates x S / longest side)",
        "threshold": cfg.eval.threshold,
        "mask_convention": cfg.data.mask_convention,
        "opset": opset,
        "exporter": "torch.onnx legacy (dynamo=False)",
        "source": {"site": meta.get("site"), "round": meta.get("round"), "meta": meta},
        "encoder": {"file": ENCODER_FILE, "inputs": {"images": [1, 3, size, size]},
                    "outputs": {"image_embeddings": emb_shape},
                    "experts": {"placement": cfg.lmoe.placement, "num_experts": cfg.lmoe.num_experts,
                                "top_k": cfg.lmoe.top_k, "routing": cfg.lmoe.routing}},
        "decoder": {"file": DECODER_FILE, "inputs": inputs, "outputs": {"masks": [1, 1, size, size]},
                    "output_kind": "mask logits at the SxS input frame; crop the valid region and resize "
                                   "to the original size outside (no orig_im_size in the graph)"},
        "files": files,
        "verification": verification,
        "timings": timings,
        "created_unix": time.time(),
    }
    (out / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1, default=str))
    return manifest


def export_onnx(
    model_dir: str | Path,
    out_dir: str | Path,
    prompt: str | None = None,
    opset: int = OPSET,
    verify: bool = True,
) -> dict[str, Any]:
    """Export a site model folder (``config.yaml`` + ``weights.pt``) to ONNX; returns the manifest."""
    model, cfg, meta = load_site_model(model_dir)
    return export_model(model, cfg, out_dir, meta=meta, prompt=prompt, opset=opset, verify=verify)
