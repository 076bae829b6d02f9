"""Inference latency of a personalized model: PyTorch vs ONNX Runtime (CPU), or on a GPU with --cuda.

Not a test: prints a markdown table and writes JSON. Batch 1, ``--warmup`` untimed runs then
``--runs`` timed runs (engines interleaved round-robin, so background load on a shared machine
hits every engine alike) of the image encoder (site experts included) and the mask decoder on a
random preprocessed image; the exported ONNX files come from ``pfedsam.export.export_model``
(written to a temp folder). Backbones without a checkpoint are randomly initialised: fine for
timing, meaningless for masks. SAM ViT-B at 1024 takes about 17 s per image on a 2-core CPU,
so ``--image-size`` sets the vit_* input side (litemedsam is always 256); the table says
which size each row used.

    python benchmarks/latency.py --backbones litemedsam vit_b --image-size 256 --warmup 1 --runs 3
    python benchmarks/latency.py --cuda --backbones litemedsam vit_b --image-size 1024

``--cuda`` compares PyTorch eager fp32, eager bf16 autocast, ``torch.compile`` + bf16 and ONNX
Runtime's CUDA execution provider (when that onnxruntime build has it) and names the card.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from pfedsam.config import load_config, resolved_image_size
from pfedsam.export.onnx_export import DECODER_FILE, ENCODER_FILE, export_model, onnx_session
from pfedsam.model import build_pfedsam


def cpu_name() -> str:
    """The CPU's model name with its family and model numbers (a VM often shows only "AMD EPYC",
    while e.g. family 25 model 1 (Zen 3) and model 17 (Zen 4, with bf16) differ in speed and arithmetic)."""
    info: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            info.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    name = info.get("model name") or platform.processor() or platform.machine()
    return f"{name} (family {info['cpu family']} model {info['model']})" if "cpu family" in info else name


Engine = tuple[str, Callable[[], object], Callable[[], object], Callable[[], None]]  # label, encode, decode, sync


def time_interleaved(engines: list[Engine], warmup: int, runs: int) -> dict[str, tuple[list[float], list[float]]]:
    """Warm every engine up, then time them round-robin: on a shared, noisy machine each engine sees
    the same background load, so the comparison stays fair even when the absolute numbers move."""
    for _, enc, dec, sync in engines:
        for _ in range(warmup):
            enc()
            dec()
        sync()
    times: dict[str, tuple[list[float], list[float]]] = {label: ([], []) for label, *_ in engines}
    for _ in range(runs):
        for label, enc, dec, sync in engines:
            for fn, bucket in ((enc, times[label][0]), (dec, times[label][1])):
                start = time.perf_counter()
                fn()
                sync()
                bucket.append(time.perf_counter() - start)
    return times


def row(backbone: str, size: int, engine: str, enc: list[float], dec: list[float]) -> dict:
    e, d = statistics.median(enc) * 1000, statistics.median(dec) * 1000
    best = (min(enc) + min(dec)) * 1000
    return {"backbone": backbone, "image_size": size, "engine": engine, "encoder_ms": e, "decoder_ms": d,
            "total_ms": e + d, "best_total_ms": best, "images_per_s": 1000.0 / (e + d), "runs": len(enc),
            "encoder_ms_all": [t * 1000 for t in enc], "decoder_ms_all": [t * 1000 for t in dec]}


def torch_engines(model, images, device: str, cuda: bool) -> list[Engine]:
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    modes = [("torch eager fp32", None, False)]
    if cuda:
        modes += [("torch eager bf16", torch.bfloat16, False), ("torch.compile bf16", torch.bfloat16, True)]
    engines: list[Engine] = []
    for name, dtype, compiled in modes:
        def encode(x, dtype=dtype):
            ctx = torch.autocast("cuda", dtype=dtype) if dtype is not None else nullcontext()
            with torch.no_grad(), ctx:
                return model.embed_from_prefix(model.encode_prefix(x), use_experts=True)

        def decode(e, dtype=dtype):
            ctx = torch.autocast("cuda", dtype=dtype) if dtype is not None else nullcontext()
            with torch.no_grad(), ctx:
                return model.decode(e)

        enc_fn, dec_fn = (torch.compile(encode), torch.compile(decode)) if compiled else (encode, decode)
        emb = enc_fn(images)
        engines.append((f"{name} ({device})", lambda f=enc_fn: f(images), lambda f=dec_fn, e=emb: f(e), sync))
    return engines


def onnx_engines(folder: Path, images: np.ndarray, threads: int, cuda: bool) -> list[Engine]:
    import onnxruntime as ort

    providers = ["CPUExecutionProvider"]
    label = "onnxruntime CPU"
    if cuda:
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            print("onnxruntime has no CUDAExecutionProvider here: ONNX Runtime CUDA row skipped")
            return []
        providers, label = ["CUDAExecutionProvider", "CPUExecutionProvider"], "onnxruntime CUDA EP"
    enc = onnx_session(folder / ENCODER_FILE, providers, threads)
    dec = onnx_session(folder / DECODER_FILE, providers, threads)
    if cuda and enc.get_providers()[0] != "CUDAExecutionProvider":
        print("onnxruntime could not start the CUDA execution provider: row skipped")
        return []
    emb = enc.run(None, {"images": images})[0]
    return [(f"{label} {ort.__version__}", lambda: enc.run(None, {"images": images}),
             lambda: dec.run(None, {"image_embeddings": emb}), lambda: None)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbones", nargs="+", default=["litemedsam", "vit_b"])
    parser.add_argument("--image-size", type=int, default=256, help="input side for vit_* (litemedsam: 256)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="CPU threads for torch and ONNX Runtime (0 = default)")
    parser.add_argument("--cuda", action="store_true", help="GPU: eager fp32 / bf16 / torch.compile / ORT CUDA EP")
    parser.add_argument("--set", action="append", default=[], help="extra config overrides, e.g. lmoe.placement=blocks")
    parser.add_argument("--out", type=Path, default=Path("results/latency.json"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.cuda and not torch.cuda.is_available():
        raise SystemExit("--cuda: no CUDA device visible to torch")
    device = torch.device("cuda" if args.cuda else "cpu")
    card = torch.cuda.get_device_name(0) if args.cuda else cpu_name()
    threads = args.threads or torch.get_num_threads()  # the same thread count for torch and ONNX Runtime
    rows: list[dict] = []
    for backbone in args.backbones:
        overrides = [f"backbone={backbone}", "prompt=none", *args.set]
        if backbone.startswith("vit_"):
            overrides.append(f"image_size={args.image_size}")
        cfg = load_config(overrides=overrides)
        size = resolved_image_size(cfg)
        model = build_pfedsam(cfg).eval()
        images = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0))
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            export_model(model, cfg, tmp, verify=False)
            print(f"{backbone} @ {size}: exported in {time.perf_counter() - start:.1f} s")
            model = model.to(device)
            engines = onnx_engines(Path(tmp), images.numpy(), threads, args.cuda)
            engines += torch_engines(model, images.to(device), device.type, args.cuda)
            times = time_interleaved(engines, args.warmup, args.runs)
        rows += [row(backbone, size, label, *times[label]) for label, *_ in engines]
        del model, engines
        if args.cuda:
            torch.cuda.empty_cache()
    env = {"device": card, "cuda": args.cuda, "threads": threads,
           "torch": torch.__version__, "python": platform.python_version(), "warmup": args.warmup,
           "runs": args.runs, "batch": 1,
           "statistic": "median of the timed runs (best_total_ms: sum of the minima); engines timed round-robin",
           "overrides": args.set, "weights": "litemedsam: pretrained; vit_*: random init (timing only)"}
    print(f"\nDevice: {card}; threads {env['threads']}; batch 1; median of {args.runs} runs after "
          f"{args.warmup} warm-up\n")
    print("| backbone | input | engine | encoder ms | decoder ms | total ms | best total ms | images/s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['backbone']} | {r['image_size']} | {r['engine']} | {r['encoder_ms']:.1f} | "
              f"{r['decoder_ms']:.1f} | {r['total_ms']:.1f} | {r['best_total_ms']:.1f} | {r['images_per_s']:.2f} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"env": env, "rows": rows}, indent=1))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
