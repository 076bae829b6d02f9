"""Export layer: ONNX export vs PyTorch parity, predict end to end, TensorRT fallback, bad inputs."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pfedsam.cli import main as pfedsam_main
from pfedsam.config import load_config
from pfedsam.data.transforms import preprocess_image
from pfedsam.export import PredictError, export_onnx, load_runner, predict
from pfedsam.export.onnx_export import DECODER_FILE, ENCODER_FILE, MANIFEST_FILE, onnx_session
from pfedsam.export.tensorrt import tensorrt_status
from pfedsam.model import build_pfedsam
from pfedsam.model.checkpoint import load_site_model, save_site_model

torch.set_num_threads(1)

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
KVASIR = DATA / "polyp" / "kvasir-seg"
TRT_OK, TRT_WHY = tensorrt_status()

# backbone, prompt, config overrides: covers LoRA inside the encoder (merged before export), the L-MoE
# on the neck and inside blocks, image- and token-level routing, decoder LoRA, both prompt modes.
PARITY_CASES = [
    ("tiny", "none", ["lora.encoder_blocks=2", "lmoe.placement=blocks", "lmoe.routing=token"]),
    ("tiny", "box", ["lora.encoder_blocks=1", "decoder=lora"]),
    ("litemedsam", "none", ["lora.encoder_blocks=1"]),
    ("litemedsam", "box", []),
]


def make_site_model(folder: Path, backbone: str, prompt: str, overrides: list[str], scale: float = 0.02) -> Path:
    """A personalized site model whose adapters are NOT at their zero init (else the test is trivial)."""
    cfg = load_config(overrides=[f"backbone={backbone}", f"prompt={prompt}", *overrides])
    model = build_pfedsam(cfg)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("up.weight") or name.endswith("up.bias") or "router" in name or (
                    "lora_" in name and name.endswith("_B")):
                p.copy_(torch.randn(p.shape, generator=g) * scale)
    return save_site_model(model, cfg, folder, {"site": "site-7", "round": 5})


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """(backbone, prompt) -> (site model folder, exported folder); each exported once per module."""
    root = tmp_path_factory.mktemp("export")
    made: dict[tuple[str, str], tuple[Path, Path]] = {}

    def get(backbone: str, prompt: str) -> tuple[Path, Path]:
        if (backbone, prompt) not in made:
            overrides = next(o for b, p, o in PARITY_CASES if (b, p) == (backbone, prompt))
            site = make_site_model(root / f"{backbone}-{prompt}-model", backbone, prompt, overrides)
            out = root / f"{backbone}-{prompt}-onnx"
            export_onnx(site, out, verify=backbone == "tiny")  # litemedsam is checked below, on another input
            made[(backbone, prompt)] = (site, out)
        return made[(backbone, prompt)]

    return get


def structured_image(side: int) -> np.ndarray:
    """A deterministic non-square uint8 RGB image with a bright blob (the padding is exercised too)."""
    h, w = side, int(side * 0.8)
    yy, xx = np.mgrid[0:h, 0:w]
    blob = ((yy - h * 0.45) ** 2 + (xx - w * 0.55) ** 2) < (0.2 * side) ** 2
    rng = np.random.default_rng(0)
    img = np.stack([80 + 60 * xx / w, 60 + 40 * yy / h, 90 + 0 * xx], -1) + 90 * blob[..., None]
    return (img + rng.normal(0, 8, img.shape)).clip(0, 255).astype(np.uint8)


@pytest.mark.parametrize("backbone,prompt,overrides", PARITY_CASES, ids=[f"{b}-{p}" for b, p, _ in PARITY_CASES])
def test_onnx_matches_pytorch(exports, backbone, prompt, overrides):
    site, out = exports(backbone, prompt)
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    model, cfg, _ = load_site_model(site)
    size = model.image_size
    assert manifest["image_size"] == size and manifest["prompt"] == prompt and manifest["backbone"] == backbone
    assert manifest["opset"] == 17 and manifest["source"] == {"site": "site-7", "round": 5,
                                                              "meta": {"site": "site-7", "round": 5}}
    assert set(manifest["files"]) == {ENCODER_FILE, DECODER_FILE}
    if manifest["verification"] is not None:  # recorded by the export itself (random input)
        assert manifest["verification"]["logits_max_abs_diff"] < 1e-3
        assert manifest["verification"]["mask_agreement"] > 0.999

    x, valid = preprocess_image(structured_image(size), size, manifest["normalization"])
    x = x[None]
    box = torch.tensor([[0.3 * valid[1], 0.2 * valid[0], 0.8 * valid[1], 0.7 * valid[0]]])
    with torch.no_grad():
        ref = model(x, box if prompt == "box" else None).numpy()
    enc, dec = onnx_session(out / ENCODER_FILE, threads=1), onnx_session(out / DECODER_FILE, threads=1)
    feeds = {"image_embeddings": enc.run(None, {"images": x.numpy()})[0]}
    if prompt == "box":
        feeds["boxes"] = box.numpy()
    got = dec.run(None, feeds)[0]
    assert got.shape == ref.shape == (1, 1, size, size)
    diff = float(np.abs(got - ref).max())
    agreement = float(((got > 0) == (ref > 0)).mean())
    print(f"{backbone}/{prompt}: max |logit diff| {diff:.2e} (|logits| up to {np.abs(ref).max():.2f}), "
          f"mask agreement {agreement:.6f}")
    assert diff < 1e-3
    assert agreement > 0.999
    # the experts are really in the encoder graph: switching them off changes the PyTorch output
    with torch.no_grad():
        plain = model(x, box if prompt == "box" else None, use_experts=False).numpy()
    assert np.abs(plain - ref).max() > 100 * max(diff, 1e-7)


def _kvasir_three() -> list[Path]:
    if not (KVASIR / "images").is_dir() or not (KVASIR / "masks").is_dir():
        pytest.skip(f"real data absent: {KVASIR} (the shared data folder beside the repository)")
    return sorted((KVASIR / "images").iterdir())[:3]


def test_predict_end_to_end_kvasir(exports, tmp_path, capsys):
    images = _kvasir_three()
    site, exported = exports("litemedsam", "box")
    out_onnx = tmp_path / "onnx"
    rc = pfedsam_main(["predict", "--model", str(exported), "--images", *map(str, images), "--out", str(out_onnx),
                       "--masks", str(KVASIR / "masks"), "--box-from-masks", "--threads", "1", "--warmup", "0"])
    assert rc == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "| mean (3) |" in printed and "original image resolution" in printed
    metrics = json.loads((out_onnx / "metrics.json").read_text())
    timings = json.loads((out_onnx / "timings.json").read_text())
    assert metrics["n"] == 3 and metrics["resolution"] == "original image size"
    assert timings["engine"] == "onnx" and len(timings["images"]) == 3 and timings["images_per_s_model"] > 0
    # pretrained LiteMedSAM with a ground-truth box (lightly perturbed adapters): high Dice
    assert metrics["mean_dice"] > 0.8, metrics
    for img in images:
        with Image.open(img) as im:
            size = im.size
        for sub in ("masks", "overlays"):
            with Image.open(out_onnx / sub / f"{img.stem}.png") as written:
                assert written.size == size
    # the PyTorch engine on the site model folder gives the same masks
    out_torch = tmp_path / "torch"
    summary = predict(site, images, out_torch, engine="torch", masks_dir=KVASIR / "masks", box_from_masks=True,
                      threads=1, warmup=0)
    assert summary["engine"] == "torch"
    for img in images:
        a = np.asarray(Image.open(out_onnx / "masks" / f"{img.stem}.png"))
        b = np.asarray(Image.open(out_torch / "masks" / f"{img.stem}.png"))
        assert (a == b).mean() > 0.999
    assert abs(summary["metrics"]["mean_dice"] - metrics["mean_dice"]) < 1e-2


@pytest.mark.skipif(not TRT_OK, reason=f"TensorRT engines not testable: {TRT_WHY}")
def test_tensorrt_engines_match_onnxruntime(exports, tmp_path):  # pragma: no cover - no TensorRT here
    _, exported = exports("tiny", "box")
    out = tmp_path / "trt"
    shutil.copytree(exported, out)
    from pfedsam.export.tensorrt import build_engines

    section = build_engines(out, [ENCODER_FILE, DECODER_FILE], precision="fp32")
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    manifest["tensorrt"] = section
    (out / MANIFEST_FILE).write_text(json.dumps(manifest))
    image = tmp_path / "img.png"
    Image.fromarray(structured_image(64)).save(image)
    a = predict(out, [image], tmp_path / "p_onnx", engine="onnx", box="5,5,40,50", warmup=0)
    b = predict(out, [image], tmp_path / "p_trt", engine="tensorrt", box="5,5,40,50", warmup=0)
    ma = np.asarray(Image.open(tmp_path / "p_onnx" / "masks" / "img.png"))
    mb = np.asarray(Image.open(tmp_path / "p_trt" / "masks" / "img.png"))
    assert a["n_images"] == b["n_images"] == 1 and (ma == mb).mean() > 0.999


@pytest.mark.skipif(TRT_OK, reason="TensorRT is installed: the no-TensorRT fallback does not apply")
def test_export_tensorrt_without_library_prints_trtexec_and_writes_onnx(exports, tmp_path, capsys):
    site, _ = exports("tiny", "none")
    out = tmp_path / "trt"
    rc = pfedsam_main(["export", "--model", str(site), "--out", str(out), "--format", "tensorrt",
                       "--prompt", "box", "--no-verify"])
    captured = capsys.readouterr()
    assert rc == 1
    assert "TensorRT is not installed" in captured.err
    for name in (ENCODER_FILE, DECODER_FILE):
        assert (out / name).is_file()
        assert f"trtexec --onnx={out / name} --saveEngine={out / name.replace('.onnx', '.plan')}" in captured.out
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    assert manifest["prompt"] == "box" and manifest["prompt_trained"] == "none"  # --prompt overrides the config
    assert manifest["tensorrt"]["status"] == "not built" and len(manifest["tensorrt"]["trtexec"]) == 2
    with pytest.raises(PredictError, match="TensorRT is not installed"):
        load_runner(out, engine="tensorrt")


@pytest.fixture()
def tiny_box(exports, tmp_path):
    """A private copy of the tiny box-prompt export (tests below break it) and a good 64x48 image."""
    _, exported = exports("tiny", "box")
    folder = tmp_path / "exported"
    shutil.copytree(exported, folder)
    image = tmp_path / "good.png"
    Image.fromarray(structured_image(64)).save(image)
    return folder, image


def _predict_error(args: list[str], capsys) -> str:
    rc = pfedsam_main(["predict", *args])
    err = capsys.readouterr().err
    assert rc == 2, err
    return err


def test_predict_tiny_ok_and_box_scaling(tiny_box, tmp_path):
    folder, image = tiny_box
    summary = predict(folder, [image], tmp_path / "out", box="2,3,40,50", warmup=0)
    assert summary["engine"] == "onnx" and summary["box_source"] == "given"
    with Image.open(tmp_path / "out" / "masks" / "good.png") as m:
        assert m.size == (51, 64)  # original W x H, not the model's 64 x 64 frame


def test_predict_skips_a_bad_image_and_writes_the_rest(tiny_box, tmp_path):
    folder, good = tiny_box
    bad = tmp_path / "broken.png"
    bad.write_text("this is not an image")
    summary = predict(folder, [good, bad], tmp_path / "out", box="2,3,40,50", warmup=0)
    assert summary["n_images"] == 1 and summary["n_skipped"] == 1
    assert summary["skipped"][0]["image"] == str(bad) and "cannot read the image" in summary["skipped"][0]["reason"]
    assert (tmp_path / "out" / "masks" / "good.png").is_file()
    assert json.loads((tmp_path / "out" / "timings.json").read_text())["n_skipped"] == 1


def test_bad_inputs_name_the_file(tiny_box, tmp_path, capsys):
    folder, good = tiny_box
    out = str(tmp_path / "out")
    bad = tmp_path / "broken.png"
    bad.write_text("this is not an image")
    err = _predict_error(["--model", str(folder), "--images", str(bad), "--out", out, "--box", "1,1,9,9"], capsys)
    assert str(bad) in err and "cannot read the image" in err

    two = tmp_path / "two_channel.png"
    Image.fromarray(np.zeros((20, 30, 2), dtype=np.uint8), mode="LA").save(two)
    err = _predict_error(["--model", str(folder), "--images", str(two), "--out", out, "--box", "1,1,9,9"], capsys)
    assert str(two) in err and "2 channels" in err

    err = _predict_error(["--model", str(folder), "--images", str(good), "--out", out, "--box", "0,0,200,10"], capsys)
    assert str(good) in err and "outside the image" in err

    err = _predict_error(["--model", str(folder), "--images", str(good), "--out", out], capsys)
    assert "box prompt" in err

    missing = tmp_path / "nope.png"
    err = _predict_error(["--model", str(folder), "--images", str(missing), "--out", out, "--box", "1,1,9,9"], capsys)
    assert str(missing) in err

    masks = tmp_path / "masks"
    masks.mkdir()
    Image.fromarray(np.zeros((10, 10), dtype=np.uint8)).save(masks / "good.png")
    err = _predict_error(["--model", str(folder), "--images", str(good), "--out", out, "--masks", str(masks),
                          "--box-from-masks"], capsys)
    assert str(masks / "good.png") in err and "51x64" in err


def test_bad_model_folders(tiny_box, tmp_path, capsys):
    folder, good = tiny_box
    out = str(tmp_path / "out")
    args = ["--images", str(good), "--out", out, "--box", "1,1,9,9"]
    manifest_path = folder / MANIFEST_FILE
    manifest = json.loads(manifest_path.read_text())

    manifest_path.write_text(json.dumps({**manifest, "image_size": 128}))  # exported for another input size
    err = _predict_error(["--model", str(folder), *args], capsys)
    assert ENCODER_FILE in err and "[1, 3, 64, 64]" in err and "[1, 3, 128, 128]" in err

    manifest_path.write_text(json.dumps(manifest))
    (folder / DECODER_FILE).write_bytes((folder / DECODER_FILE).read_bytes() + b"x")
    err = _predict_error(["--model", str(folder), *args], capsys)
    assert DECODER_FILE in err and "sha256" in err

    (folder / DECODER_FILE).unlink()
    err = _predict_error(["--model", str(folder), *args], capsys)
    assert f"{folder / DECODER_FILE} is missing" in err

    manifest_path.unlink()
    err = _predict_error(["--model", str(folder), *args], capsys)
    assert MANIFEST_FILE in err and "missing" in err

    err = _predict_error(["--model", str(tmp_path / "absent"), *args], capsys)
    assert "does not exist" in err


def test_export_rejects_a_folder_that_is_not_a_site_model(tmp_path, capsys):
    rc = pfedsam_main(["export", "--model", str(tmp_path), "--out", str(tmp_path / "x")])
    assert rc == 2 and "config.yaml is missing" in capsys.readouterr().err


def test_merged_lora_restores_the_model(tmp_path):
    from pfedsam.export.onnx_export import merged_lora
    from pfedsam.model import LoRALinear

    site = make_site_model(tmp_path / "m", "tiny", "none", ["lora.encoder_blocks=2"])
    model, _, _ = load_site_model(site)
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
        with merged_lora(model):
            assert not any(isinstance(m, LoRALinear) for m in model.modules())
            merged = model(x)
        again = model(x)
    assert sum(isinstance(m, LoRALinear) for m in model.modules()) == 2
    assert torch.allclose(ref, merged, atol=1e-5) and torch.equal(ref, again)
    assert math.isfinite(float(ref.abs().max()))


def test_overlays_draw_the_ground_truth_when_masks_are_given(tiny_box, tmp_path):
    from pfedsam.export.inference import TRUTH_CONTOUR, contour, overlay

    folder, image = tiny_box
    w, h = Image.open(image).size
    truth = np.zeros((h, w), dtype=bool)
    truth[10:30, 8:20] = True
    (tmp_path / "gt").mkdir()
    Image.fromarray(truth.astype(np.uint8) * 255).save(tmp_path / "gt" / "good.png")
    magenta = np.array(TRUTH_CONTOUR, dtype=np.uint8)
    for masks, drawn in ((None, False), (tmp_path / "gt", True)):
        out = tmp_path / f"out-{drawn}"
        predict(folder, [image], out, box="2,3,40,50", masks_dir=masks, warmup=0)
        pixels = np.asarray(Image.open(out / "overlays" / "good.png").convert("RGB"))
        on_border = np.all(pixels[contour(truth)] == magenta, axis=-1)
        assert on_border.all() if drawn else not on_border.any()
    plain = np.zeros((4, 4, 3), dtype=np.uint8)
    assert not np.all(overlay(plain, np.zeros((4, 4), bool)) == magenta, axis=-1).any()
