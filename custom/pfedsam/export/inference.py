"""Segment image files with a personalized model: PyTorch, ONNX Runtime or TensorRT.

``predict`` reads each image, preprocesses it the SAM way (``pfedsam.data.transforms``),
runs the image encoder (with the site's experts) and the mask decoder, crops the valid
(un-padded) region of the S x S mask logits and resizes it bilinearly to the original image
size, then thresholds. It writes, under the output folder:

- ``masks/<stem>.png``: the binary mask at the original image size (0 / 255);
- ``overlays/<stem>.png``: the image with the mask tinted green and its contour in yellow (and,
  with ground-truth masks, the truth's contour in magenta);
- ``timings.json``: per-image milliseconds (read + preprocess, encoder, decoder, post-process)
  and images/s;
- ``metrics.json`` when ground-truth masks are given (same file stem): Dice per image and the
  mean, computed at the ORIGINAL image resolution (mask > 0 is foreground unless the model's
  ``mask_convention`` says otherwise; truth and prediction both empty = Dice 1).

Every bad input is an error (``PredictError``) that names the file.
"""

from __future__ import annotations

import json
import logging
import math
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from ..data.sites import MAX_IMAGE_PIXELS
from ..data.transforms import preprocess_image, resized_hw
from .names import DECODER_FILE, ENCODER_FILE, ENGINES, MANIFEST_FILE  # noqa: F401
from .onnx_export import sha256_file

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
_MANIFEST_KEYS = ("image_size", "normalization", "prompt", "threshold", "backbone", "files", "encoder", "decoder")


log = logging.getLogger(__name__)


class PredictError(ValueError):
    """An input of ``predict`` is unusable; the message names the file."""


# -- inputs -------------------------------------------------------------------------------------------------
def read_rgb(path: str | Path) -> np.ndarray:
    """An image file as ``H x W x 3`` uint8; grey and RGBA are converted, other channel counts refused."""
    path = Path(path)
    if not path.is_file():
        raise PredictError(f"{path}: no such image file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit applies
            im = Image.open(path)
        with im:
            w, h = im.size
            if w * h > MAX_IMAGE_PIXELS:
                raise PredictError(f"{path}: image is {w}x{h} = {w * h / 1e6:.0f} M pixels, above the limit of "
                                   f"{MAX_IMAGE_PIXELS / 1e6:.0f} M (pfedsam.data.sites.MAX_IMAGE_PIXELS)")
            im.load()
            if im.mode == "P":
                im = im.convert("RGBA" if "transparency" in im.info else "RGB")
            elif im.mode in ("CMYK", "YCbCr"):
                im = im.convert("RGB")
            array = np.asarray(im)
    except PredictError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise PredictError(f"{path}: cannot read the image ({exc})") from None
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[..., 0]
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=2)
    elif array.ndim == 3 and array.shape[2] == 4:
        array = array[..., :3]
    if array.ndim != 3 or array.shape[2] != 3:
        channels = array.shape[2] if array.ndim == 3 else "?"
        raise PredictError(f"{path}: image has {channels} channels (shape {tuple(array.shape)}); "
                           "expected 1 (grey), 3 (RGB) or 4 (RGBA)")
    if array.shape[0] < 1 or array.shape[1] < 1:
        raise PredictError(f"{path}: image is empty (shape {tuple(array.shape)})")
    if array.dtype != np.uint8:  # 16-bit or float images: stretch to 0..255
        a = array.astype(np.float64)
        array = ((a - a.min()) / max(a.max() - a.min(), 1e-8) * 255).round().astype(np.uint8)
    return np.ascontiguousarray(array)


def read_mask(path: Path, hw: tuple[int, int], convention: str, image_path: Path) -> np.ndarray:
    """A ground-truth mask as ``H x W`` bool; its size must be the image's."""
    try:
        with Image.open(path) as im:
            im.load()
            m = np.asarray(im)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise PredictError(f"{path}: cannot read the ground-truth mask ({exc})") from None
    if m.ndim == 3:  # colour mask: every channel counts (a green foreground is foreground)
        m = m[..., :3].min(axis=2) if convention == "below_max" else m[..., :3].max(axis=2)
    if tuple(m.shape) != tuple(hw):
        raise PredictError(f"{path}: mask is {m.shape[1]}x{m.shape[0]} (WxH) but its image {image_path} "
                           f"is {hw[1]}x{hw[0]}")
    if convention == "zero":
        return m == 0
    if convention == "below_max":
        return m < (np.iinfo(m.dtype).max if m.dtype.kind in "ui" else m.max())
    return m > 0


def collect_images(inputs: list[str | Path]) -> list[Path]:
    """Image files from files and folders (a folder contributes its image files, sorted)."""
    files: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)
            if not found:
                raise PredictError(f"{p}: folder has no image files ({', '.join(IMAGE_EXTENSIONS)})")
            files += found
        elif p.is_file():
            files.append(p)
        else:
            raise PredictError(f"{p}: no such image file or folder")
    stems: dict[str, Path] = {}
    for f in files:
        if f.stem in stems and stems[f.stem] != f:
            raise PredictError(f"{f} and {stems[f.stem]} share the name '{f.stem}': their outputs would collide")
        stems[f.stem] = f
    return list(dict.fromkeys(files))


def parse_box(text: str) -> tuple[float, float, float, float]:
    """``"x0,y0,x1,y1"`` -> four floats (original-image pixel coordinates)."""
    parts = [p.strip() for p in str(text).split(",")]
    try:
        values = tuple(float(p) for p in parts)
    except ValueError:
        values = ()
    if len(values) != 4 or not all(math.isfinite(v) for v in values):
        raise PredictError(f"--box must be four numbers x0,y0,x1,y1 (pixels of the original image), got {text!r}")
    return values  # type: ignore[return-value]


def check_box(box: tuple[float, ...], hw: tuple[int, int], path: Path) -> None:
    x0, y0, x1, y1 = box
    h, w = hw
    if not (0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h):
        raise PredictError(f"{path}: box {','.join(f'{v:g}' for v in box)} lies outside the image or is empty "
                           f"(image {w}x{h} WxH; need 0 <= x0 < x1 <= {w} and 0 <= y0 < y1 <= {h})")


def box_from_mask(mask: np.ndarray) -> tuple[float, float, float, float]:
    """Tight box x0,y0,x1,y1 (x1, y1 exclusive) around the foreground; the whole image when empty."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return 0.0, 0.0, float(mask.shape[1]), float(mask.shape[0])
    return float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)


def find_mask(masks_dir: Path, stem: str, image: Path) -> Path:
    for ext in (".png", *[e for e in IMAGE_EXTENSIONS if e != ".png"]):
        for candidate in (masks_dir / f"{stem}{ext}", masks_dir / f"{stem}{ext.upper()}"):
            if candidate.is_file():
                return candidate
    raise PredictError(f"{image}: no ground-truth mask named '{stem}.<png|jpg|...>' in {masks_dir}")


# -- engines ------------------------------------------------------------------------------------------------
class Runner:
    """Common interface: ``embed(images) -> embedding`` and ``decode(embedding, box) -> logits (1, 1, S, S)``."""

    engine = ""
    image_size: int
    normalization: str
    prompt: str
    threshold: float
    backbone: str
    mask_convention = "nonzero"
    source: dict[str, Any]
    device = "cpu"

    def embed(self, images: np.ndarray) -> Any:
        raise NotImplementedError

    def decode(self, embedding: Any, box: np.ndarray | None) -> np.ndarray:
        raise NotImplementedError


class TorchRunner(Runner):
    """The site model folder (config.yaml + weights.pt) in PyTorch eager mode."""

    engine = "torch"

    def __init__(self, model_dir: Path, device: str = "cpu") -> None:
        from ..config import resolved_image_size
        from ..model.checkpoint import load_site_model
        from .onnx_export import normalization_of

        self.model, cfg, meta = load_site_model(model_dir, device)
        self.device = str(device)
        self.image_size = resolved_image_size(cfg)
        self.normalization = normalization_of(cfg.backbone)
        self.prompt = cfg.prompt
        self.threshold = cfg.eval.threshold
        self.backbone = cfg.backbone
        self.mask_convention = cfg.data.mask_convention
        self.source = {"model_dir": str(model_dir), "site": meta.get("site"), "round": meta.get("round")}

    def embed(self, images: np.ndarray) -> torch.Tensor:
        with torch.no_grad():
            x = torch.from_numpy(images).to(self.device)
            return self.model.embed_from_prefix(self.model.encode_prefix(x), use_experts=True)

    def decode(self, embedding: torch.Tensor, box: np.ndarray | None) -> np.ndarray:
        with torch.no_grad():
            boxes = None if box is None else torch.from_numpy(box).to(self.device)
            return self.model.decode(embedding, boxes).float().cpu().numpy()


def load_manifest(export_dir: Path, check_hashes: bool = True) -> dict[str, Any]:
    """Read and check ``manifest.json`` of an exported folder; errors name the file at fault."""
    path = export_dir / MANIFEST_FILE
    if not path.is_file():
        raise PredictError(f"{export_dir}: {MANIFEST_FILE} is missing: not an exported model folder "
                           "(run 'pfedsam export'), and not a site model folder (config.yaml + weights.pt) either")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PredictError(f"{path}: not valid JSON ({exc})") from None
    missing = [k for k in _MANIFEST_KEYS if not isinstance(manifest, dict) or k not in manifest]
    if missing:
        raise PredictError(f"{path}: missing key(s) {', '.join(missing)}")
    for name in (ENCODER_FILE, DECODER_FILE):
        f = export_dir / name
        if not f.is_file():
            raise PredictError(f"{f} is missing (listed in {path})")
        expected = manifest["files"].get(name, {}).get("sha256")
        if check_hashes and expected and sha256_file(f) != expected:
            raise PredictError(f"{f}: sha256 differs from {path}: the file was changed or comes from another export")
    return manifest


def _shape_check(shape: list, expected: list, what: str, where: Path, manifest_path: Path) -> None:
    if [int(d) if isinstance(d, int) else d for d in shape] != list(expected):
        raise PredictError(f"{where}: {what} has shape {list(shape)} but {manifest_path} says {list(expected)}: "
                           "the model files and the manifest come from different exports (e.g. another input size)")


class OnnxRunner(Runner):
    """An exported folder run with ONNX Runtime (CPU, or the CUDA execution provider)."""

    engine = "onnx"

    def __init__(self, export_dir: Path, device: str = "cpu", threads: int = 0) -> None:
        import onnxruntime as ort

        from .onnx_export import onnx_session

        m = load_manifest(export_dir)
        self._set_manifest(m, export_dir)
        providers = ["CPUExecutionProvider"]
        if device.startswith("cuda"):
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise PredictError("--device cuda: this onnxruntime has no CUDAExecutionProvider "
                                   "(install onnxruntime-gpu)")
            providers.insert(0, "CUDAExecutionProvider")
        self.device = device
        self.encoder = onnx_session(export_dir / ENCODER_FILE, providers, threads)
        self.decoder = onnx_session(export_dir / DECODER_FILE, providers, threads)
        self.providers = self.encoder.get_providers()
        mpath = export_dir / MANIFEST_FILE
        s = self.image_size
        enc_in = {i.name: i.shape for i in self.encoder.get_inputs()}
        if "images" not in enc_in:
            raise PredictError(f"{export_dir / ENCODER_FILE}: has no 'images' input (inputs: {list(enc_in)})")
        _shape_check(enc_in["images"], [1, 3, s, s], "input 'images'", export_dir / ENCODER_FILE, mpath)
        emb_shape = self.encoder.get_outputs()[0].shape
        dec_in = {i.name: i.shape for i in self.decoder.get_inputs()}
        if "image_embeddings" not in dec_in:
            raise PredictError(f"{export_dir / DECODER_FILE}: has no 'image_embeddings' input")
        _shape_check(dec_in["image_embeddings"], emb_shape, "input 'image_embeddings' (vs the encoder output)",
                     export_dir / DECODER_FILE, export_dir / ENCODER_FILE)
        if (self.prompt == "box") != ("boxes" in dec_in):
            raise PredictError(f"{export_dir / DECODER_FILE}: inputs {list(dec_in)} do not fit prompt mode "
                               f"'{self.prompt}' of {mpath}")
        _shape_check(self.decoder.get_outputs()[0].shape, [1, 1, s, s], "output", export_dir / DECODER_FILE, mpath)

    def _set_manifest(self, m: dict[str, Any], export_dir: Path) -> None:
        self.manifest = m
        self.image_size = int(m["image_size"])
        self.normalization = m["normalization"]
        self.prompt = m["prompt"]
        self.threshold = float(m["threshold"])
        self.backbone = m["backbone"]
        self.mask_convention = m.get("mask_convention", "nonzero")
        source = m.get("source") or {}
        self.source = {"export_dir": str(export_dir), "site": source.get("site"), "round": source.get("round")}

    def embed(self, images: np.ndarray) -> np.ndarray:
        return self.encoder.run(None, {"images": images})[0]

    def decode(self, embedding: np.ndarray, box: np.ndarray | None) -> np.ndarray:
        feeds = {"image_embeddings": embedding}
        if box is not None:
            feeds["boxes"] = box
        return self.decoder.run(None, feeds)[0]


class TensorRTRunner(OnnxRunner):
    """Engines built by ``pfedsam export --format tensorrt`` (UNTESTED here: no TensorRT available)."""

    engine = "tensorrt"

    def __init__(self, export_dir: Path, device: str = "cuda", threads: int = 0) -> None:
        from .tensorrt import TensorRTRunner as Engine
        from .tensorrt import tensorrt_status

        ok, why = tensorrt_status()
        if not ok:
            raise PredictError(f"--engine tensorrt: {why}; use --engine onnx")
        m = load_manifest(export_dir)
        self._set_manifest(m, export_dir)
        section = m.get("tensorrt") or {}
        engines = section.get("engines") or {}
        paths = {}
        for name in (ENCODER_FILE, DECODER_FILE):
            if name not in engines or not (export_dir / engines[name]).is_file():
                raise PredictError(f"{export_dir}: no TensorRT engine for {name} (build it with "
                                   "'pfedsam export --format tensorrt' or the trtexec commands in the manifest)")
            paths[name] = export_dir / engines[name]
        self.device = "cuda"
        self.providers = [f"TensorRT {why}"]
        self.encoder_engine = Engine(paths[ENCODER_FILE])
        self.decoder_engine = Engine(paths[DECODER_FILE])

    def embed(self, images: np.ndarray) -> np.ndarray:
        return next(iter(self.encoder_engine({"images": images}).values()))

    def decode(self, embedding: np.ndarray, box: np.ndarray | None) -> np.ndarray:
        feeds = {"image_embeddings": embedding}
        if box is not None:
            feeds["boxes"] = box
        return next(iter(self.decoder_engine(feeds).values()))


def is_site_model(folder: Path) -> bool:
    return (folder / "config.yaml").is_file() and (folder / "weights.pt").is_file()


def load_runner(model_dir: str | Path, engine: str | None = None, device: str = "cpu", threads: int = 0) -> Runner:
    """An exported folder (manifest.json) or a site model folder, run by the chosen engine.

    ``engine=None``: ``onnx`` for an exported folder, ``torch`` for a site model folder.
    """
    folder = Path(model_dir)
    if not folder.is_dir():
        raise PredictError(f"{folder}: model folder does not exist")
    exported = (folder / MANIFEST_FILE).is_file() or (folder / ENCODER_FILE).is_file()
    if engine is None:
        engine = "torch" if is_site_model(folder) and not exported else "onnx"
    if engine not in ENGINES:
        raise PredictError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    if engine == "torch":
        if not is_site_model(folder):
            raise PredictError(f"{folder}: --engine torch needs a site model folder (config.yaml + weights.pt); "
                               "for an exported folder use --engine onnx")
        return TorchRunner(folder, device)
    if engine == "tensorrt":
        return TensorRTRunner(folder, device, threads)
    return OnnxRunner(folder, device, threads)


# -- outputs ------------------------------------------------------------------------------------------------
PRED_CONTOUR = (255, 255, 0)  # yellow
TRUTH_CONTOUR = (255, 0, 255)  # magenta: the ground truth, drawn over the prediction


def contour(mask: np.ndarray) -> np.ndarray:
    """The one-pixel inner border of a boolean mask (4-neighbourhood)."""
    padded = np.pad(mask, 1, constant_values=False)
    interior = (padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]) & mask
    return mask & ~interior


def overlay(image: np.ndarray, mask: np.ndarray, truth: np.ndarray | None = None, alpha: float = 0.4) -> np.ndarray:
    """The image with the mask tinted green, its contour in yellow and, given, the truth's contour in magenta."""
    out = image.astype(np.float32)
    tint = np.array([0, 255, 0], dtype=np.float32)
    out[mask] = (1 - alpha) * out[mask] + alpha * tint
    out[contour(mask)] = PRED_CONTOUR
    if truth is not None:
        out[contour(truth.astype(bool))] = TRUTH_CONTOUR
    return out.round().clip(0, 255).astype(np.uint8)


def logits_to_mask(logits: np.ndarray, valid_hw: tuple[int, int], orig_hw: tuple[int, int],
                   threshold: float) -> np.ndarray:
    """``(1, 1, S, S)`` logits -> ``H x W`` bool at the original size (crop valid region, bilinear resize)."""
    h, w = valid_hw
    t = torch.from_numpy(np.ascontiguousarray(logits, dtype=np.float32))[:, :, :h, :w]
    t = F.interpolate(t, size=tuple(orig_hw), mode="bilinear", align_corners=False)
    return (t[0, 0] > math.log(threshold / (1.0 - threshold))).numpy()


def _ms(seconds: float) -> float:
    return round(seconds * 1000.0, 3)


def predict(
    model_dir: str | Path,
    images: list[str | Path],
    out_dir: str | Path,
    engine: str | None = None,
    box: str | tuple[float, float, float, float] | None = None,
    box_from_masks: bool = False,
    masks_dir: str | Path | None = None,
    device: str = "cpu",
    threads: int = 0,
    warmup: int = 1,
    runner: Runner | None = None,
) -> dict[str, Any]:
    """Segment ``images``; write masks, overlays, timings.json (and metrics.json with ``masks_dir``).

    Arguments:
      model_dir: an exported folder (manifest.json + ONNX) or a site model folder.
      images: image files and/or folders.
      out_dir: output folder.
      engine: ``torch``, ``onnx``, ``tensorrt`` or None (by folder kind).
      box: x0,y0,x1,y1 in original-image pixels, the same for every image (box-prompt models).
      box_from_masks: box mode: use the tight box around each ground-truth mask (needs ``masks_dir``).
      masks_dir: folder of ground-truth masks named like the images: Dice per image and mean.
      device: ``cpu`` or ``cuda``.
      threads: CPU threads for torch / ONNX Runtime (0 = library default).
      warmup: untimed runs of the encoder and decoder before the first image.
      runner: an already loaded runner (reused across calls; ``model_dir`` is then only reported).
    Returns the summary written to timings.json, plus ``metrics`` when masks are given.
    """
    from ..train.metrics import image_metrics, summarize

    files = collect_images(images)
    masks_path = Path(masks_dir) if masks_dir is not None else None
    if masks_path is not None and not masks_path.is_dir():
        raise PredictError(f"{masks_path}: ground-truth mask folder does not exist")
    if box_from_masks and masks_path is None:
        raise PredictError("--box-from-masks needs --masks (the folder of ground-truth masks)")
    if box is not None and box_from_masks:
        raise PredictError("give either --box or --box-from-masks, not both")
    given_box = parse_box(box) if isinstance(box, str) else (tuple(map(float, box)) if box is not None else None)
    if threads:
        torch.set_num_threads(threads)
    start = time.perf_counter()
    runner = runner or load_runner(model_dir, engine, device, threads)
    load_s = time.perf_counter() - start
    if runner.prompt == "box" and given_box is None and not box_from_masks:
        raise PredictError(f"{model_dir}: the model takes a box prompt: give --box x0,y0,x1,y1 or --box-from-masks")
    if runner.prompt == "none" and (given_box is not None or box_from_masks):
        raise PredictError(f"{model_dir}: the model was exported without prompts (prompt 'none'): drop the box")
    s = runner.image_size
    if given_box is not None:  # the same box for every image: check it against each one up front
        for f in files:
            hw = _header_hw(f)
            if hw is not None:  # unreadable files are reported when they are read
                check_box(given_box, hw, f)

    out = Path(out_dir)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    (out / "overlays").mkdir(parents=True, exist_ok=True)
    for _ in range(max(0, warmup)):
        emb = runner.embed(np.zeros((1, 3, s, s), dtype=np.float32))
        runner.decode(emb, np.array([[0.0, 0.0, s / 2, s / 2]], dtype=np.float32) if runner.prompt == "box" else None)

    rows, metric_rows, skipped = [], [], []
    for f in files:
        try:
            row, metric_row = _predict_one(f, runner, out, given_box, box_from_masks, masks_path, image_metrics)
        except PredictError as exc:  # one bad image must not cost the others their results
            log.warning("skipped %s", exc)
            skipped.append({"image": str(f), "reason": str(exc)})
            continue
        rows.append(row)
        if metric_row is not None:
            metric_rows.append(metric_row)
    if not rows:
        raise PredictError(f"no image could be segmented ({len(skipped)} skipped): "
                           + "; ".join(s["reason"] for s in skipped[:5]))

    def mean(key: str) -> float:
        return float(np.mean([r[key] for r in rows]))

    keys = ("read_preprocess_ms", "encoder_ms", "decoder_ms", "postprocess_ms", "model_ms", "write_ms")
    summary: dict[str, Any] = {
        "engine": runner.engine,
        "device": runner.device,
        "providers": getattr(runner, "providers", None),
        "threads": threads or torch.get_num_threads(),
        "model": runner.source,
        "backbone": runner.backbone,
        "image_size": s,
        "prompt": runner.prompt,
        "box_source": "given" if given_box is not None else ("ground-truth mask" if box_from_masks else None),
        "threshold": runner.threshold,
        "load_s": round(load_s, 3),
        "warmup_runs": warmup,
        "n_images": len(rows),
        "n_skipped": len(skipped),
        "skipped": skipped,
        "mean": {k: round(mean(k), 3) for k in keys},
        "images_per_s_model": 1000.0 / mean("model_ms"),
        "images_per_s_end_to_end": 1000.0 / (mean("model_ms") + mean("read_preprocess_ms") + mean("write_ms")),
        "note": "model_ms = encoder + decoder + post-process (crop, resize to the original size, threshold)",
        "images": rows,
    }
    (out / "timings.json").write_text(json.dumps(summary, indent=1))
    if metric_rows:
        agg = summarize(metric_rows, "one")
        metrics = {"resolution": "original image size", "foreground": f"mask_convention '{runner.mask_convention}'",
                   "empty_rule": "truth and prediction both empty = Dice 1; only one empty = Dice 0",
                   "threshold": runner.threshold, "box_source": summary["box_source"],
                   "mean_dice": agg["dice"], "n": len(metric_rows), "images": metric_rows}
        (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
        summary["metrics"] = metrics
    return summary


def _predict_one(f: Path, runner: Runner, out: Path, given_box, box_from_masks: bool, masks_path: Path | None,
                 image_metrics) -> tuple[dict, dict | None]:
    """Segment one image and write its mask and overlay; PredictError when the image is unusable."""
    s = runner.image_size
    t0 = time.perf_counter()
    image = read_rgb(f)
    orig_hw = (int(image.shape[0]), int(image.shape[1]))
    truth = read_mask(find_mask(masks_path, f.stem, f), orig_hw, runner.mask_convention, f) \
        if masks_path is not None else None
    x, valid_hw = preprocess_image(image, s, runner.normalization)
    box_orig = given_box if given_box is not None else (box_from_mask(truth) if box_from_masks else None)
    box_in = None
    if box_orig is not None:
        check_box(box_orig, orig_hw, f)
        rh, rw = resized_hw(orig_hw[0], orig_hw[1], s)
        sx, sy = rw / orig_hw[1], rh / orig_hw[0]
        x0, y0, x1, y1 = box_orig
        box_in = np.array([[x0 * sx, y0 * sy, x1 * sx, y1 * sy]], dtype=np.float32)
    batch = np.ascontiguousarray(x[None].numpy(), dtype=np.float32)
    t1 = time.perf_counter()
    emb = runner.embed(batch)
    t2 = time.perf_counter()
    logits = runner.decode(emb, box_in)
    t3 = time.perf_counter()
    mask = logits_to_mask(logits, valid_hw, orig_hw, runner.threshold)
    t4 = time.perf_counter()
    Image.fromarray(mask.astype(np.uint8) * 255).save(out / "masks" / f"{f.stem}.png")
    Image.fromarray(overlay(image, mask, truth)).save(out / "overlays" / f"{f.stem}.png")
    t5 = time.perf_counter()
    row = {"image": str(f), "height": orig_hw[0], "width": orig_hw[1],
           "read_preprocess_ms": _ms(t1 - t0), "encoder_ms": _ms(t2 - t1), "decoder_ms": _ms(t3 - t2),
           "postprocess_ms": _ms(t4 - t3), "model_ms": _ms(t4 - t1), "write_ms": _ms(t5 - t4),
           "foreground_fraction": float(mask.mean())}
    if box_orig is not None:
        row["box"] = [float(v) for v in box_orig]
    if truth is None:
        return row, None
    m = image_metrics(torch.from_numpy(mask), torch.from_numpy(truth), orig_hw, hd95=False)
    return row, {"image": str(f), "mask": str(find_mask(masks_path, f.stem, f)), **m}


def _header_hw(path: Path) -> tuple[int, int] | None:
    try:
        with Image.open(path) as im:
            return im.height, im.width
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        return None
