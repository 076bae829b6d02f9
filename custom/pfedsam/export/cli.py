"""``pfedsam export`` and ``pfedsam predict`` subcommands (registered by ``pfedsam.cli``)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .names import DECODER_FILE, ENCODER_FILE, ENGINES, MANIFEST_FILE, OPSET, PROMPTS


def _update_manifest(out: Path, section: dict) -> None:
    path = out / MANIFEST_FILE
    manifest = json.loads(path.read_text())
    manifest["tensorrt"] = section
    path.write_text(json.dumps(manifest, indent=1, default=str))


def cmd_export(args: argparse.Namespace) -> int:
    """Export a site model to ONNX (and TensorRT engines when TensorRT is installed)."""
    from .onnx_export import export_onnx
    from .tensorrt import build_engines, tensorrt_status, trtexec_commands

    manifest = export_onnx(args.model, args.out, prompt=args.prompt, opset=args.opset, verify=not args.no_verify)
    out = Path(args.out)
    print(f"wrote {out / ENCODER_FILE}, {out / DECODER_FILE} and {out / MANIFEST_FILE} "
          f"({manifest['backbone']}, {manifest['image_size']}x{manifest['image_size']}, prompt {manifest['prompt']}, "
          f"opset {manifest['opset']})")
    v = manifest.get("verification")
    if v:
        print(f"ONNX Runtime vs PyTorch (random input): embedding max |diff| {v['embedding_max_abs_diff']:.3g}, "
              f"mask logits max |diff| {v['logits_max_abs_diff']:.3g}, thresholded masks agree on "
              f"{100 * v['mask_agreement']:.4f}% of pixels")
    if args.format != "tensorrt":
        return 0
    onnx_files = [ENCODER_FILE, DECODER_FILE]
    commands = trtexec_commands(out, onnx_files)
    ok, why = tensorrt_status()
    if not ok:
        _update_manifest(out, {"status": "not built", "reason": why, "trtexec": commands})
        print(f"pfedsam export: {why}.\nThe ONNX files are written; build the TensorRT engines on a machine with "
              "TensorRT (all input shapes are static, so no optimization profile is needed; for fp16 on "
              "TensorRT 11 convert the ONNX to fp16 first, e.g. with onnxconverter_common or ModelOpt AutoCast):",
              file=sys.stderr)
        for cmd in commands:
            print(cmd)
        return 1
    section = build_engines(out, onnx_files, precision=args.precision)
    section["trtexec"] = commands
    _update_manifest(out, section)
    print(f"built TensorRT {section['tensorrt']} engines ({section['precision']}): "
          + ", ".join(str(out / e) for e in section["engines"].values()))
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    """Segment images; write masks, overlays, timings (and Dice with --masks)."""
    from .inference import predict

    summary = predict(args.model, args.images, args.out, engine=args.engine, box=args.box,
                      box_from_masks=args.box_from_masks, masks_dir=args.masks, device=args.device,
                      threads=args.threads, warmup=args.warmup)
    print(f"{summary['n_images']} image(s) with {summary['engine']} on {summary['device']}: "
          f"{summary['mean']['model_ms']:.1f} ms per image (encoder {summary['mean']['encoder_ms']:.1f}, "
          f"decoder {summary['mean']['decoder_ms']:.1f}), {summary['images_per_s_model']:.2f} images/s; "
          f"masks and overlays in {args.out}")
    for item in summary.get("skipped", []):
        print(f"SKIPPED {item['reason']}", file=sys.stderr)
    metrics = summary.get("metrics")
    if metrics:
        print("| image | Dice |\n|---|---|")
        for row in metrics["images"]:
            print(f"| {Path(row['image']).name} | {row['dice']:.4f} |")
        print(f"| mean ({metrics['n']}) | {metrics['mean_dice']:.4f} |")
        print("(Dice at the original image resolution)")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``export`` and ``predict`` to the ``pfedsam`` command."""
    p = subparsers.add_parser("export", help="export a site model to ONNX (+ TensorRT engines when available)",
                              description=cmd_export.__doc__)
    p.add_argument("--model", type=Path, required=True, help="site model folder (config.yaml + weights.pt)")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--format", choices=("onnx", "tensorrt"), default="onnx",
                   help="onnx (default) or tensorrt (ONNX + engines; needs TensorRT, else prints trtexec commands)")
    p.add_argument("--prompt", choices=PROMPTS, default=None, help="decoder prompt mode (default: the model config's)")
    p.add_argument("--opset", type=int, default=OPSET, help=f"ONNX opset (default {OPSET})")
    p.add_argument("--precision", choices=("fp16", "fp32"), default="fp16", help="TensorRT engine precision")
    p.add_argument("--no-verify", action="store_true", help="skip the ONNX Runtime vs PyTorch check")
    p.set_defaults(func=cmd_export)

    p = subparsers.add_parser("predict", help="segment images with a site model or an exported model",
                              description=cmd_predict.__doc__)
    p.add_argument("--model", type=Path, required=True, help="exported folder (manifest.json) or site model folder")
    p.add_argument("--images", nargs="+", required=True, help="image files and/or folders")
    p.add_argument("--out", type=Path, required=True, help="output folder (masks/, overlays/, timings.json)")
    p.add_argument("--engine", choices=ENGINES, default=None,
                   help="default: onnx for an exported folder, torch for a site model folder")
    p.add_argument("--box", help="x0,y0,x1,y1 in original-image pixels (box-prompt models; same for every image)")
    p.add_argument("--box-from-masks", action="store_true",
                   help="box-prompt models: use the tight box around each ground-truth mask (needs --masks)")
    p.add_argument("--masks", type=Path, help="folder of ground-truth masks (same file stem): Dice per image")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0 = library default)")
    p.add_argument("--warmup", type=int, default=1, help="untimed warm-up runs before the first image")
    p.set_defaults(func=cmd_predict)
