"""Benchmark: pFedSAM against baselines on the same sites, splits, backbone, budget and seed.

Every federated method is a job variant (``pfedsam job list``) run through the FLARE
simulator with one client per site (named after the site folder). Two rows need no
federation: ``zero-shot`` (the pretrained backbone with ground-truth box prompts, a
reference) and ``centralized`` (one model trained on the pooled training images of all
sites with the same total number of steps, a ceiling). All rows share one disk cache of the
frozen encoder's features, keyed by image content, backbone and preprocessing.

    python benchmarks/run.py --data-root ../shared/data/polyp --out results/polyp

writes ``results.json``, ``results.md`` and PNG plots into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "custom"))

from pfedsam.config import load_config  # noqa: E402
from pfedsam.data import discover_sites, load_split  # noqa: E402
from pfedsam.jobs import make_variant  # noqa: E402
from pfedsam.model import ParamKind, build_pfedsam  # noqa: E402
from pfedsam.train import SiteTrainer  # noqa: E402

FEDERATED = ["local", "fedavg", "fedavg-ft", "fedprox", "pfedsam", "pfedsam-nokd", "pfedsam-nolmoe", "pfedsam-joint"]


def settings(args: argparse.Namespace, sites: list[str]) -> dict:
    return {
        "data": {"root": str(args.data_root), "max_train": args.max_train, "max_eval": args.max_eval,
                 "sites": {}},
        "train": {"cache": "disk", "cache_dir": str(args.out / "feature_cache"), "local_steps": args.local_steps,
                  "global_steps": args.global_steps, "seed": args.seed, "device": args.device},
        "federation": {"rounds": args.rounds, "min_clients": len(sites), "export_format": "none",
                       "wait_after_min_s": 0},
        "prompt": args.prompt,
        "eval": {"hd95": True},
    }


def run_federated(method: str, args: argparse.Namespace, sites: list[str]) -> dict:
    job = make_variant(method, args.out / "jobs", ROOT / "jobs" / "pfedsam", extra=settings(args, sites))
    ws = args.out / "workspaces" / method
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "nvflare.cli", "simulator", str(job), "-w", str(ws), "-c", ",".join(sites),
         "-t", str(args.threads)],
        capture_output=True, text=True, cwd=args.out,
    )
    wall = time.perf_counter() - start
    (args.out / "logs").mkdir(parents=True, exist_ok=True)
    (args.out / "logs" / f"{method}.log").write_text(proc.stdout + proc.stderr)
    report_path = ws / "server" / "simulate_job" / "report.json"
    if proc.returncode != 0 or not report_path.is_file():
        return {"method": method, "error": f"simulator exit {proc.returncode}; see logs/{method}.log"}
    report = json.loads(report_path.read_text())
    per_site = {s: {"dice": r["personalized"]["dice"], "hd95": r["personalized"]["hd95"],
                    "global_dice": r["global"]["dice"]} for s, r in report["final"].items() if "personalized" in r}
    rounds = report["rounds"]
    bytes_per_round = [np.mean([c["bytes_received"] for c in e["sites"].values()]) for e in rounds]
    curve = [float(np.mean([c["metrics"].get("val_dice_personalized", np.nan) for c in e["sites"].values()]))
             for e in rounds]
    return {"method": method, "per_site": per_site, "wall_s": wall,
            "round_wall_s": float(np.mean([e["wall_time_s"] for e in rounds])),
            "bytes_per_round_per_site": float(np.mean(bytes_per_round)) if method != "local" else 0.0,
            "val_dice_curve": curve,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}


def _trainer(args: argparse.Namespace, site: str, overrides: list[str], workdir: Path) -> SiteTrainer:
    cfg = load_config(overrides=[
        f"prompt={args.prompt}", f"data.max_train={args.max_train}", f"data.max_eval={args.max_eval}",
        "train.cache=disk", f"train.cache_dir={args.out / 'feature_cache'}", f"train.seed={args.seed}",
        f"train.device={args.device}", *overrides,
    ])
    return SiteTrainer(cfg, site, site_dir=args.data_root / site, workdir=workdir)


def run_zero_shot(args: argparse.Namespace, sites: list[str]) -> dict:
    """The pretrained backbone, no training, ground-truth box prompts (a reference, not a method)."""
    per_site = {}
    for site in sites:
        t = _trainer(args, site, ["prompt=box"], args.out / "work" / "zero-shot")
        r = t.evaluate("test", "global")
        per_site[site] = {"dice": r["dice"], "hd95": r["hd95"], "global_dice": r["dice"]}
    return {"method": "zero-shot (box prompt)", "per_site": per_site, "bytes_per_round_per_site": 0.0}


def run_centralized(args: argparse.Namespace, sites: list[str]) -> dict:
    """One model on the pooled training images (symlinks in a temp folder), same total steps."""
    with tempfile.TemporaryDirectory() as tmp:
        pooled = Path(tmp) / "pooled"
        (pooled / "images").mkdir(parents=True)
        (pooled / "masks").mkdir()
        split = {"train": [], "val": [], "test": []}
        for site in sites:
            s = load_split(args.data_root / site, seed=args.seed)
            for name, limit in (("train", args.max_train), ("val", args.max_eval)):
                for i in s[name][:limit] if limit else s[name]:
                    for sub in ("images", "masks"):
                        src = next((args.data_root / site / sub).glob(f"{i}.*"))
                        os.symlink(src, pooled / sub / f"{site}__{src.name}")
                    split[name].append(f"{site}__{i}")
        split["test"] = split["val"][:1]  # the per-site test splits are evaluated below
        (pooled / "split.json").write_text(json.dumps(split))
        start = time.perf_counter()
        cfg_over = ["lmoe.num_experts=0", "train.kd_weight=0"]
        pool = SiteTrainer(load_config(overrides=[
            f"prompt={args.prompt}", "train.cache=disk", f"train.cache_dir={args.out / 'feature_cache'}",
            f"train.seed={args.seed}", f"train.device={args.device}", *cfg_over]), "pooled", site_dir=pooled,
            workdir=args.out / "work" / "centralized")
        pool.run_global_phase(args.rounds * args.global_steps * len(sites))
        state = pool.get_global_state()
        per_site = {}
        for site in sites:
            t = _trainer(args, site, cfg_over, args.out / "work" / "centralized")
            t.set_global_state(state)
            r = t.evaluate("test", "global")
            per_site[site] = {"dice": r["dice"], "hd95": r["hd95"], "global_dice": r["dice"]}
    return {"method": "centralized (pooled)", "per_site": per_site, "wall_s": time.perf_counter() - start,
            "bytes_per_round_per_site": float("nan")}


def full_finetune_bytes() -> dict:
    """Bytes one site would send per round: full fine-tuning FedAvg vs pFedSAM's global part."""
    out = {}
    for backbone, size in (("litemedsam", 256), ("vit_b", 1024), ("vit_l", 1024), ("vit_h", 1024)):
        model = build_pfedsam(load_config(overrides=[f"backbone={backbone}", f"image_size={size}"]))
        counts = model.registry.counts(model)["params"]
        total = sum(counts.values())
        glob = counts[ParamKind.GLOBAL.value]
        out[backbone] = {"full_fp32": 4 * total, "full_fp16": 2 * total, "pfedsam_fp32": 4 * glob,
                         "pfedsam_fp16": 2 * glob}
        del model
    return out


def markdown(results: dict) -> str:
    rows = results["rows"]
    sites = results["sites"]
    head = "| method | " + " | ".join(sites) + " | mean Dice | mean HD95 | MB/round/site | s/round |"
    lines = [head, "|" + "---|" * (len(sites) + 5)]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['method']} | " + " | ".join("-" for _ in sites) + f" | error: {r['error']} | | | |")
            continue
        dice = [r["per_site"].get(s, {}).get("dice", float("nan")) for s in sites]
        hd = [r["per_site"].get(s, {}).get("hd95", float("nan")) for s in sites]
        mb = r.get("bytes_per_round_per_site", float("nan")) / 1e6
        lines.append(f"| {r['method']} | " + " | ".join(f"{d:.3f}" for d in dice)
                     + f" | **{np.nanmean(dice):.3f}** | {np.nanmean(hd):.1f} | {mb:.2f} | "
                     + f"{r.get('round_wall_s', float('nan')):.0f} |")
    comm = ["", "| backbone | full FT fp32 MB | full FT fp16 MB | pFedSAM fp32 MB | pFedSAM fp16 MB |",
            "|---|---|---|---|---|"]
    for b, v in results["communication"].items():
        comm.append(f"| {b} | {v['full_fp32'] / 1e6:.1f} | {v['full_fp16'] / 1e6:.1f} | "
                    f"{v['pfedsam_fp32'] / 1e6:.2f} | {v['pfedsam_fp16'] / 1e6:.2f} |")
    return "\n".join(lines + comm) + "\n"


def plots(results: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in results["rows"] if "per_site" in r]
    sites = results["sites"]
    fig, ax = plt.subplots(figsize=(12, 4))
    width = 0.8 / max(len(rows), 1)
    for k, r in enumerate(rows):
        ax.bar(np.arange(len(sites)) + k * width, [r["per_site"].get(s, {}).get("dice", 0) for s in sites],
               width, label=r["method"])
    ax.set_xticks(np.arange(len(sites)) + 0.4 - width / 2, sites)
    ax.set_ylabel("test Dice (personalized)")
    ax.legend(fontsize=7, ncol=4)
    fig.tight_layout()
    fig.savefig(out / "dice_per_site.png", dpi=100)
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
        if r.get("val_dice_curve"):
            ax.plot(range(len(r["val_dice_curve"])), r["val_dice_curve"], marker="o", label=r["method"])
    ax.set_xlabel("round")
    ax.set_ylabel("mean val Dice (personalized, start of round)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "dice_over_rounds.png", dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", type=Path, default=ROOT.parent / "shared" / "data" / "polyp")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "polyp")
    parser.add_argument("--methods", default=",".join(["zero-shot", *FEDERATED, "centralized"]))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--local-steps", type=int, default=8)
    parser.add_argument("--global-steps", type=int, default=12)
    parser.add_argument("--max-train", type=int, default=32, help="training images per site (0 = all)")
    parser.add_argument("--max-eval", type=int, default=24, help="val and test images per site (0 = all)")
    parser.add_argument("--prompt", default="none", choices=["none", "box"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2, help="simulator client threads")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not args.data_root.is_dir():
        sys.exit(f"data root {args.data_root} not found (the real data lives in ../shared/data)")
    args.out = args.out.resolve()
    args.data_root = args.data_root.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(2)
    sites = discover_sites(args.data_root)
    results = {"dataset": args.data_root.name, "sites": sites, "settings": {k: str(v) for k, v in vars(args).items()},
               "hardware": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},
               "empty_mask_rule": "both empty: Dice 1, HD95 0; one empty: Dice 0, HD95 = valid-region diagonal",
               "rows": [], "communication": full_finetune_bytes()}
    for method in args.methods.split(","):
        start = time.perf_counter()
        if method == "zero-shot":
            row = run_zero_shot(args, sites)
        elif method == "centralized":
            row = run_centralized(args, sites)
        else:
            row = run_federated(method, args, sites)
        row.setdefault("wall_s", time.perf_counter() - start)
        results["rows"].append(row)
        (args.out / "results.json").write_text(json.dumps(results, indent=1, default=float))
        print(f"{method}: done in {row['wall_s']:.0f} s", flush=True)
    (args.out / "results.md").write_text(markdown(results))
    plots(results, args.out)
    print(markdown(results))


if __name__ == "__main__":
    main()
