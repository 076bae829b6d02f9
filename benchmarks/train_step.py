"""Seconds per training step with and without the frozen-prefix feature cache.

Not a test: prints a markdown table and writes JSON. Runs SiteTrainer on one synthetic site
(generated into a temp folder) so data loading, augmentation and the optimizer are counted.

    python benchmarks/train_step.py --backbone litemedsam --batch-size 4 --steps 5

The cached rows exclude the one-off cost of filling the cache (reported separately as
seconds per image).
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from pfedsam.config import load_config
from pfedsam.data.synth import write_synthetic_sites
from pfedsam.train import SiteTrainer


def measure(cfg_overrides: list[str], site_dir: Path, steps: int, workdir: Path) -> dict:
    cfg = load_config(overrides=cfg_overrides)
    trainer = SiteTrainer(cfg, "site-1", site_dir=site_dir, workdir=workdir)
    out: dict = {"cache": cfg.train.cache}
    if trainer.cache.enabled:
        start = time.perf_counter()
        trainer.warm_cache(("train",))
        n = len(trainer.datasets["train"])
        out["cache_fill_s_per_image"] = (time.perf_counter() - start) / n
    for phase, run in (("local", trainer.run_local_phase), ("global", trainer.run_global_phase)):
        run(1)  # warm-up step (allocations, first autograd graph)
        res = run(steps)
        out[f"{phase}_s_per_step"] = res["seconds"] / res["steps"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="litemedsam")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    parser.add_argument("--set", action="append", default=[], help="extra config overrides")
    parser.add_argument("--caches", default="memory,none", help="rows to measure: memory (prefix cache) and/or none")
    parser.add_argument("--out", type=Path, default=Path("results/benchmarks/train_step.json"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_synthetic_sites(tmp / "data", sites=1, per_site=24, seed=0)
        base = [f"backbone={args.backbone}", f"train.batch_size={args.batch_size}", "train.device=cpu", *args.set]
        rows = {}
        for cache in args.caches.split(","):
            rows[cache] = measure(base + [f"train.cache={cache}"], tmp / "data" / "site-1", args.steps,
                                  tmp / f"work-{cache}")
    result = {"backbone": args.backbone, "batch_size": args.batch_size, "steps": args.steps,
              "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
              "torch": torch.__version__, "overrides": args.set, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"| {args.backbone}, batch {args.batch_size}, {result['threads']} threads | local phase s/step "
          "| global phase s/step | training images/s (local, global) |")
    print("|---|---|---|---|")
    for cache, r in rows.items():
        label = "prefix cache on" if cache != "none" else "no cache (full encoder every step)"
        ips = [args.batch_size / r[f"{ph}_s_per_step"] for ph in ("local", "global")]
        print(f"| {label} | {r['local_s_per_step']:.3f} | {r['global_s_per_step']:.3f} | "
              f"{ips[0]:.2f}, {ips[1]:.2f} |")
    if "cache_fill_s_per_image" in rows.get("memory", {}):
        print(f"\none-off cache fill: {rows['memory']['cache_fill_s_per_image']:.3f} s per image")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
