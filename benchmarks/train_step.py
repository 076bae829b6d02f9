"""Seconds per training step with and without the frozen-prefix feature cache.

Not a test: prints a markdown table and writes JSON. Runs SiteTrainer on one synthetic site
(generated into a temp folder) so data loading, augmentation and the optimizer are counted.

    python benchmarks/train_step.py --backbone litemedsam --batch-size 4 --steps 5

The cached rows exclude the one-off cost of filling the cache (reported separately as
seconds per image).

    python benchmarks/train_step.py --compare --threads 2 --repeats 5

``--compare`` measures, in one run and on the same cached batches, the plain float32 path
(every speed lever off: ``PLAIN``) against the default fast path, interleaved (plain, fast,
fast, plain, ...) so that a machine shared with other work slows both alike. It prints a
table with the median and the range over the repeats, the achieved GFLOP/s (FLOPs counted
with ``torch.utils.flop_counter.FlopCounterMode``) and their share of the CPU's peak, and
ends with one JSON line holding ``local_speedup``, ``global_speedup`` and
``cache_fill_speedup`` (fast over plain, images/s; medians of the paired ratios).

    python benchmarks/train_step.py --numerics 0,1,2 --threads 2 --data ../shared/data/polyp/kvasir-seg

``--numerics`` trains the plain and the fast path from each seed with the job's schedule
(``--rounds`` rounds) on one site and compares their validation Dice, paired by seed, with
the spread the seed alone gives.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import statistics
import tempfile
import time
from pathlib import Path

import torch
from latency import cpu_name  # a sibling script: benchmarks/ is on sys.path when run
from torch.utils.flop_counter import FlopCounterMode

from pfedsam.config import load_config
from pfedsam.data.synth import write_synthetic_sites
from pfedsam.train import SiteTrainer, run_round
from pfedsam.train.site import Stream


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


# Every speed lever off: float32, segment_anything's decoder convolutions, float32 cache,
# the cache fill in PyTorch.
PLAIN = ["train.amp=false", "train.fast_decoder=false", "train.cache_dtype=float32", "train.encoder_runtime=torch"]


def peak_gflops(threads: int) -> dict:
    """The CPU's float32 peak: theoretical from its vector width, and a measured sgemm ceiling.

    Theoretical = threads x FLOP/cycle x clock, with 2 FMA pipes per core assumed (Zen 2-4,
    Skylake-SP and later): 32 FLOP/cycle with AVX2+FMA, 64 with AVX-512; the clock is the
    ``cpu MHz`` of /proc/cpuinfo (a VM shows the nominal clock; boost runs higher).
    """
    flags, mhz = "", 0.0
    try:
        text = Path("/proc/cpuinfo").read_text()
        flags = re.search(r"^flags\s*:(.*)$", text, re.M).group(1)
        mhz = float(re.search(r"^cpu MHz\s*:\s*([\d.]+)", text, re.M).group(1))
    except (OSError, AttributeError):
        pass
    per_cycle = 64 if " avx512f" in flags else 32 if " fma" in flags else 8
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return {"flop_per_cycle_per_core": per_cycle, "mhz": mhz,
            "theoretical_gflops": threads * per_cycle * mhz / 1e3,
            "sgemm_2048_gflops": 2 * 2048**3 / best / 1e9}


def _spread(values: list[float]) -> str:
    return f"{statistics.median(values):.3f} ({min(values):.3f}-{max(values):.3f})"


def compare(args: argparse.Namespace, site_dir: Path, tmp: Path) -> dict:
    """Plain float32 path against the default fast path, interleaved; see the module docstring."""
    base = [f"backbone={args.backbone}", f"train.batch_size={args.batch_size}", "train.device=cpu",
            "train.cache=memory", *args.set]
    trainers = {
        "plain": SiteTrainer(load_config(overrides=base + PLAIN), "site-1", site_dir=site_dir, workdir=tmp / "plain"),
        "fast": SiteTrainer(load_config(overrides=base), "site-1", site_dir=site_dir, workdir=tmp / "fast"),
    }
    if args.dice_noise:  # the plain path with another seed: how much Dice moves with the seed alone
        cfg = load_config(overrides=base + PLAIN + [f"train.seed={load_config(overrides=base).train.seed + 1}"])
        trainers["plain_next_seed"] = SiteTrainer(cfg, "site-1", site_dir=site_dir, workdir=tmp / "seed")
    out: dict = {name: {"fill_s_per_image": [], "local_s_per_step": [], "global_s_per_step": []}
                 for name in trainers}
    split = trainers["plain"]._split("train")
    n_fill = min(args.fill_images, len(split))
    images = torch.stack([split.dataset.plain_sample(i)["image"] for i in range(n_fill)])
    for name, tr in trainers.items():  # one-off costs (ONNX export + session, first allocations)
        if name not in ("plain", "fast"):
            continue
        start = time.perf_counter()
        tr.encode_images(images[:1])
        out[name]["fill_first_call_s"] = time.perf_counter() - start
        out[name]["encoder_runtime"], out[name]["amp"] = tr.encoder_runtime, tr.amp
    orders = [("plain", "fast"), ("fast", "plain")]
    for r in range(args.repeats):
        for name in orders[r % 2]:
            start = time.perf_counter()
            trainers[name].encode_images(images)
            out[name]["fill_s_per_image"].append((time.perf_counter() - start) / n_fill)
    for tr in trainers.values():
        tr.warm_cache(("train",))
    phases = {"local": "run_local_phase", "global": "run_global_phase"}
    for phase, method in phases.items():
        for name, tr in trainers.items():
            getattr(tr, method)(1)  # warm-up step
            with FlopCounterMode(display=False) as counter:
                getattr(tr, method)(1)
            out[name][f"{phase}_gflop_per_step"] = counter.get_total_flops() / 1e9
    for r in range(args.repeats):
        for phase, method in phases.items():
            for name in orders[r % 2] + tuple(n for n in trainers if n not in ("plain", "fast")):
                # each repeat reads on in the phase's stream, as consecutive rounds do
                stream = Stream(phase, round=r + 1, start=(2 + r * args.steps) * args.batch_size)
                res = getattr(trainers[name], method)(args.steps, stream=stream)
                out[name][f"{phase}_s_per_step"].append(res["seconds"] / res["steps"])
    # Numerics: the same seed, the same batches and steps, each path's validation Dice.
    for name, tr in trainers.items():
        out[name]["val_dice"] = {w: tr.evaluate("val", w)["dice"] for w in ("personalized", "global")}
    speed = {}
    pairs = (("local", "local_s_per_step"), ("global", "global_s_per_step"), ("cache_fill", "fill_s_per_image"))
    for key, per in pairs:
        ratios = [p / f for p, f in zip(out["plain"][per], out["fast"][per], strict=True)]
        speed[f"{key}_speedup"] = statistics.median(ratios)
        speed[f"{key}_speedup_range"] = [min(ratios), max(ratios)]
    speed["mean_phase_speedup"] = (speed["local_speedup"] + speed["global_speedup"]) / 2
    speed["val_dice"] = {name: r["val_dice"] for name, r in out.items()}
    return {"paths": out, "speedups": speed}


def numerics(args: argparse.Namespace, site_dir: Path, tmp: Path) -> dict:
    """Validation Dice of the plain and the fast path trained from the same seed, for several seeds.

    Each (seed, path) trains one site with the job's schedule (``--rounds`` x (local, global)
    phases of the job's step counts, fresh batches every round) and is then scored on the
    validation split. The fast path is equivalent when its paired difference to the plain
    path is within the spread that changing the seed alone gives.
    """
    seeds = [int(x) for x in args.numerics.split(",")]
    base = [f"backbone={args.backbone}", f"train.batch_size={args.batch_size}", "train.device=cpu",
            "train.cache=disk", f"data.max_train={args.max_train}", f"data.max_eval={args.max_eval}",
            f"federation.rounds={args.rounds}", *args.set]
    caches = {"plain": tmp / "cache-plain", "fast": args.cache_dir or tmp / "cache-fast"}
    rows: dict[str, list[dict]] = {"plain": [], "fast": []}
    for seed in seeds:
        for name in ("plain", "fast"):
            cfg = load_config(overrides=[*base, *(PLAIN if name == "plain" else []), f"train.seed={seed}",
                                         f"train.cache_dir={caches[name]}"])
            tr = SiteTrainer(cfg, site_dir.name, site_dir=site_dir, workdir=tmp / f"{name}-{seed}")
            tr.warm_cache(("train", "val"))
            start = time.perf_counter()
            for r in range(args.rounds):  # the job's own round, without its per-round evaluation
                run_round(tr, r, evaluate=False)
            dice = {w: tr.evaluate("val", w)["dice"] for w in ("personalized", "global")}
            rows[name].append({"seed": seed, **dice, "train_s": time.perf_counter() - start})
            print(f"seed {seed} {name}: val Dice personalized {dice['personalized']:.4f}, "
                  f"global {dice['global']:.4f}", flush=True)
    return {"seeds": seeds, "rounds": args.rounds, "rows": rows, "summary": paired_summary(rows)}


def paired_summary(rows: dict[str, list[dict]]) -> dict[str, dict[str, float]]:
    """Per model (personalized, global): means of both paths, fast - plain paired by seed, the plain spread."""
    summary = {}
    for w in ("personalized", "global"):
        plain, fast = [r[w] for r in rows["plain"]], [r[w] for r in rows["fast"]]
        diff = [f - p for f, p in zip(fast, plain, strict=True)]
        summary[w] = {"plain_mean": statistics.mean(plain), "fast_mean": statistics.mean(fast),
                      "diff_mean": statistics.mean(diff), "diff_abs_max": max(abs(d) for d in diff),
                      "seed_spread_plain": max(plain) - min(plain)}
    return summary


def print_compare(result: dict) -> None:
    peak = result["peak"]
    bs = result["batch_size"]
    print(f"\nCPU: {result['cpu']}, {result['threads']} threads, torch {result['torch']}; "
          f"{result['backbone']}, batch {bs}, {result['steps']} steps x {result['repeats']} repeats, interleaved")
    print(f"peak float32: {peak['theoretical_gflops']:.0f} GFLOP/s theoretical ({peak['flop_per_cycle_per_core']} "
          f"FLOP/cycle/core x {peak['mhz']:.0f} MHz), {peak['sgemm_2048_gflops']:.0f} GFLOP/s measured sgemm 2048\n")
    print("| path | local s/step | global s/step | images/s (local, global) | GFLOP/s (local, global) "
          "| % of theoretical peak | cache fill s/image |")
    print("|---|---|---|---|---|---|---|")
    for name, r in result["paths"].items():
        if name not in ("plain", "fast"):
            continue
        loc, glo = statistics.median(r["local_s_per_step"]), statistics.median(r["global_s_per_step"])
        gl = r["local_gflop_per_step"] / loc
        gg = r["global_gflop_per_step"] / glo
        share = [100 * g / peak["theoretical_gflops"] for g in (gl, gg)]
        label = "plain float32 (all levers off)" if name == "plain" else "fast (defaults)"
        print(f"| {label} | {_spread(r['local_s_per_step'])} | {_spread(r['global_s_per_step'])} | "
              f"{bs / loc:.2f}, {bs / glo:.2f} | {gl:.0f}, {gg:.0f} | {share[0]:.0f}%, {share[1]:.0f}% | "
              f"{_spread(r['fill_s_per_image'])} ({r['encoder_runtime']}) |")
    s = result["speedups"]
    print(f"\nspeed-up fast/plain (median of paired repeats, range): local {s['local_speedup']:.2f}x "
          f"({s['local_speedup_range'][0]:.2f}-{s['local_speedup_range'][1]:.2f}), global "
          f"{s['global_speedup']:.2f}x ({s['global_speedup_range'][0]:.2f}-{s['global_speedup_range'][1]:.2f}), "
          f"cache fill {s['cache_fill_speedup']:.2f}x ({s['cache_fill_speedup_range'][0]:.2f}-"
          f"{s['cache_fill_speedup_range'][1]:.2f})")
    steps = 2 + result["steps"] * result["repeats"]
    print(f"\nvalidation Dice after {steps} local + {steps} global steps on the same batches (personalized / global):")
    for name, d in s["val_dice"].items():
        print(f"  {name}: {d['personalized']:.4f} / {d['global']:.4f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="litemedsam")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    parser.add_argument("--set", action="append", default=[], help="extra config overrides")
    parser.add_argument("--caches", default="memory,none", help="rows to measure: memory (prefix cache) and/or none")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON file (default results/benchmarks/train_step.json, numerics.json with --numerics)")
    parser.add_argument("--compare", action="store_true", help="plain float32 path vs the default fast path")
    parser.add_argument("--repeats", type=int, default=5, help="--compare: interleaved repeats")
    parser.add_argument("--fill-images", type=int, default=4, help="--compare: images per cache-fill timing")
    parser.add_argument("--data", type=Path, default=None, help="a site folder (default: one synthetic site)")
    parser.add_argument("--numerics", default="", metavar="SEEDS",
                        help="train plain and fast paths from each of these seeds (e.g. 0,1,2) and compare val Dice")
    parser.add_argument("--rounds", type=int, default=6, help="--numerics: rounds of the job's local + global steps")
    parser.add_argument("--max-train", type=int, default=100, help="--numerics: training images")
    parser.add_argument("--max-eval", type=int, default=100, help="--numerics: validation images")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="--numerics: the fast path's feature cache (e.g. the polyp benchmark's)")
    parser.add_argument("--dice-noise", action="store_true",
                        help="--compare: also train the plain path with seed+1 (Dice spread from the seed alone)")
    args = parser.parse_args()
    if args.out is None:  # --numerics must not overwrite the speed measurement
        args.out = Path("results/benchmarks") / ("numerics.json" if args.numerics else "train_step.json")
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_synthetic_sites(tmp / "data", sites=1, per_site=24, seed=0)
        if args.numerics:
            site = args.data or tmp / "data" / "site-1"
            result = {"backbone": args.backbone, "batch_size": args.batch_size, "data": str(site),
                      "max_train": args.max_train, "max_eval": args.max_eval, "threads": torch.get_num_threads(),
                      "cpu": cpu_name(), "torch": torch.__version__, "plain": PLAIN, "overrides": args.set}
            result.update(numerics(args, site, tmp))
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(result, indent=1))
            print("\n| val Dice | plain (mean over seeds) | fast | fast - plain (mean, largest) "
                  "| plain: spread over seeds |")
            print("|---|---|---|---|---|")
            for w, r in result["summary"].items():
                print(f"| {w} | {r['plain_mean']:.4f} | {r['fast_mean']:.4f} | {r['diff_mean']:+.4f}, "
                      f"{r['diff_abs_max']:.4f} | {r['seed_spread_plain']:.4f} |")
            print(f"written to {args.out}")
            print(json.dumps({"numerics": result["summary"], "seeds": result["seeds"]}))
            return
        if args.compare:
            site = args.data or tmp / "data" / "site-1"
            result = {"backbone": args.backbone, "batch_size": args.batch_size, "steps": args.steps,
                      "repeats": args.repeats, "threads": torch.get_num_threads(), "cpu": cpu_name(),
                      "torch": torch.__version__, "overrides": args.set, "plain": PLAIN, "data": str(site),
                      "peak": peak_gflops(torch.get_num_threads())}
            result.update(compare(args, site, tmp))
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(result, indent=1))
            print_compare(result)
            print(f"written to {args.out}")
            print(json.dumps({**result["speedups"], "cpu": result["cpu"], "threads": result["threads"]}))
            return
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
