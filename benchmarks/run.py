"""Benchmark: pFedSAM against baselines on the same sites, splits, backbone, budget and seed.

Every federated method is a job variant (``pfedsam job list``) run through the FLARE
simulator with one client per site (named after the site folder). Two rows need no
federation: ``zero-shot`` (the pretrained backbone with ground-truth box prompts, a
reference) and ``centralized`` (one model trained on the pooled training images of all
sites with the same total number of global steps, a ceiling). All rows share one disk cache
of the frozen encoder's features, keyed by image content, backbone and preprocessing.

    python benchmarks/run.py --data-root ../shared/data/polyp --out results/polyp

Rows accumulate in ``--out/results.json`` keyed by (method, prompt, seed): a row already
there with the same budget is not run again (``--force`` reruns it), so the main table, the
extra seeds, the box-prompt table and the unseen-site experiment can be separate calls
(``benchmarks/polyp.sh`` makes all of them). Every call rewrites ``results.md`` and the plots.

Unseen sites (``--unseen a,b,c``): for each listed centre, pFedSAM is trained on all other
centres; the left-out centre is then scored with the global model, after a short local
adaptation of a fresh L-MoE (distilled from that global model), and, for comparison, after
fine-tuning the global parameters themselves for the same number of steps.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
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
from pfedsam.jobs import make_variant, variant_config  # noqa: E402
from pfedsam.model import ParamKind, build_pfedsam  # noqa: E402
from pfedsam.train import SiteTrainer, plan_steps, run_final, run_round  # noqa: E402

MAIN_JOB = ROOT / "jobs" / "pfedsam"
FEDERATED = ["pfedsam", "fedavg", "local", "ditto", "fedavg-ft", "fedprox", "pfedsam-nokd", "pfedsam-nolmoe",
             "pfedsam-joint"]
BUDGET_KEYS = ("data_root", "backbone", "checkpoint", "image_size", "batch_size", "rounds", "local_steps",
               "global_steps", "final_steps", "max_train", "max_eval", "device")
PROTOCOL = 2  # 2: a fresh batch stream every round, one step budget for all methods (rows of 1 are not comparable)
EMPTY_MASK_RULE = ("truth and prediction both empty: Dice 1, HD95 0; exactly one empty: Dice 0, HD95 = the "
                   "diagonal of the image's valid (unpadded) region at model resolution")


def budget(args: argparse.Namespace) -> dict:
    return {k: str(getattr(args, k)) for k in BUDGET_KEYS}


def settings(args: argparse.Namespace, sites: list[str], seed: int, prompt: str) -> dict:
    """YAML overrides shared by every row: data, budget, seed, prompt, one feature cache."""
    return {
        "backbone": args.backbone, "checkpoint": args.checkpoint, "image_size": args.image_size,
        "data": {"root": str(args.data_root), "max_train": args.max_train, "max_eval": args.max_eval, "sites": {}},
        "train": {"cache": "disk", "cache_dir": str(args.out / "feature_cache"), "local_steps": args.local_steps,
                  "global_steps": args.global_steps, "final_steps": args.final_steps,
                  "batch_size": args.batch_size, "seed": seed,
                  "device": args.device, "num_threads": args.site_threads},
        "federation": {"rounds": args.rounds, "min_clients": len(sites), "export_format": "none",
                       "wait_after_min_s": 0},
        "prompt": prompt,
        "eval": {"hd95": True},
    }


def simulate(method: str, tag: str, args: argparse.Namespace, sites: list[str], seed: int, prompt: str) -> dict:
    """Run job variant ``method`` in the simulator; returns the server report and process facts."""
    job = make_variant(method, args.out / "jobs" / tag, MAIN_JOB, extra=settings(args, sites, seed, prompt))
    ws = args.out / "workspaces" / tag
    log = args.out / "logs" / f"{tag}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "nvflare.cli", "simulator", str(job), "-w", str(ws), "-c", ",".join(sites),
           "-t", str(min(args.threads, len(sites)))]
    start = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=args.out)
    facts = {"wall_s": time.perf_counter() - start, "workspace": str(ws)}
    report_path = ws / "server" / "simulate_job" / "report.json"
    if proc.returncode != 0 or not report_path.is_file():
        raise RuntimeError(f"simulator exit {proc.returncode}; see {log}")
    return {"report": json.loads(report_path.read_text()), **facts}


def run_federated(method: str, args: argparse.Namespace, sites: list[str], seed: int, prompt: str) -> dict:
    run = simulate(method, f"{method}-{prompt}-s{seed}", args, sites, seed, prompt)
    report = run.pop("report")
    missing = sorted(set(sites) - {s for s, r in report["final"].items() if "personalized" in r})
    if missing:
        raise RuntimeError(f"no final result from {missing}; see logs/{method}-{prompt}-s{seed}.log")
    per_site = {s: {"dice": r["personalized"]["dice"], "hd95": r["personalized"]["hd95"],
                    "global_dice": r["global"]["dice"], "global_hd95": r["global"]["hd95"]}
                for s, r in report["final"].items()}
    rounds = report["rounds"]
    sent = [c["bytes_received"] for e in rounds for c in e["sites"].values()]

    rss = np.array([c["metrics"].get("peak_rss_mb", np.nan) for e in rounds for c in e["sites"].values()])

    def site_mean(key: str) -> list[float]:
        return [float(np.mean([c["metrics"][key] for c in e["sites"].values() if key in c["metrics"]]))
                for e in rounds]

    job = report["job"]
    return {"per_site": per_site, **run, "protocol": PROTOCOL,
            "steps_per_site": job.get("steps_per_site"), "images_per_site": job.get("images_per_site"),
            "round_wall_s": float(np.mean([e["wall_time_s"] for e in rounds])),
            # mode 'local' sends the same bytes (FLARE needs a result) but the server ignores them
            "bytes_per_round_per_site": float(np.mean(sent)) if method != "local" else 0.0,
            "val_dice_curve": site_mean("val_dice_personalized"),
            "train_images_per_s": float(np.mean(site_mean("train_images_per_s"))),
            "peak_site_rss_mb": float(np.nanmax(rss)) if np.isfinite(rss).any() else None}


def trainer_for(method: str, args: argparse.Namespace, site: str, seed: int, prompt: str, workdir: Path,
                site_dir: Path | None = None, all_images: bool = False) -> SiteTrainer:
    """An in-process site with exactly the settings job variant ``method`` would use."""
    cfg = variant_config(method, MAIN_JOB, settings(args, [site], seed, prompt))
    cfg.train.num_threads = os.cpu_count() or 1  # in-process rows run alone: all cores
    if all_images:  # the pooled site: already limited per centre
        cfg.data.max_train = cfg.data.max_eval = 0
    return SiteTrainer(cfg, site, site_dir=site_dir or args.data_root / site, workdir=workdir)


def score(trainer: SiteTrainer, which: str = "global") -> dict:
    r = trainer.evaluate("test", which)
    return {"dice": r["dice"], "hd95": r["hd95"]}


def run_zero_shot(args: argparse.Namespace, sites: list[str], seed: int, prompt: str) -> dict:
    """The pretrained backbone, no training, ground-truth box prompts (a reference, not a method)."""
    per_site = {}
    for site in sites:
        t = trainer_for("fedavg", args, site, seed, "box", args.out / "work" / "zero-shot")
        per_site[site] = {**score(t), "global_dice": None}
    return {"per_site": per_site, "bytes_per_round_per_site": 0.0}


def run_centralized(args: argparse.Namespace, sites: list[str], seed: int, prompt: str) -> dict:
    """One model on the pooled training images (symlinks in a temp folder): all sites' steps, same rounds."""
    with tempfile.TemporaryDirectory() as tmp:
        pooled = Path(tmp) / "pooled"
        (pooled / "images").mkdir(parents=True)
        (pooled / "masks").mkdir()
        split: dict[str, list[str]] = {"train": [], "val": [], "test": []}
        for site in sites:
            s = load_split(args.data_root / site, seed=seed)
            for name, limit in (("train", args.max_train), ("val", args.max_eval)):
                for i in s[name][:limit] if limit else s[name]:
                    for sub in ("images", "masks"):
                        src = next((args.data_root / site / sub).glob(f"{i}.*"))
                        os.symlink(src, pooled / sub / f"{site}__{src.name}")
                    split[name].append(f"{site}__{i}")
        split["test"] = [split["val"].pop()]  # unused: the per-site test splits are scored below
        (pooled / "split.json").write_text(json.dumps(split))
        start = time.perf_counter()
        pool = trainer_for("fedavg", args, "pooled", seed, prompt, args.out / "work" / "centralized", pooled, True)
        n = len(sites)  # the pooled model gets the steps of all sites together
        t = pool.cfg.train
        t.local_steps, t.global_steps, t.final_steps = n * t.local_steps, n * t.global_steps, n * t.final_steps
        plan = plan_steps(pool.cfg)
        results = [run_round(pool, rnd, evaluate=False) for rnd in range(pool.cfg.federation.rounds)]
        state = pool.get_global_state()
        wall = time.perf_counter() - start
    per_site = {}
    for site in sites:
        t = trainer_for("fedavg", args, site, seed, prompt, args.out / "work" / "centralized")
        t.set_global_state(state)
        per_site[site] = {**score(t), "global_dice": None}
    busy = sum(p["seconds"] for r in results for p in r.phases.values())
    return {"per_site": per_site, "wall_s": wall, "bytes_per_round_per_site": float("nan"), "protocol": PROTOCOL,
            "steps_per_site": plan.total_steps / n, "images_per_site": plan.total_images / n,
            "train_images_per_s": sum(r.images for r in results) / busy}


def _adapt(method: str, lr_key: str, lrs: list[float], glob: dict, args: argparse.Namespace, centre: str,
           seed: int, prompt: str, steps: int, work: Path) -> dict:
    """The final personalization of ``method`` at ``centre`` from ``glob`` with ``steps`` steps, once per
    learning rate; the one best on the validation split is scored on test."""
    tried = {}
    for lr in lrs:
        t = trainer_for(method, args, centre, seed, prompt, work)
        setattr(t.cfg.train, lr_key, lr)
        t.cfg.train.final_steps = steps
        t.set_global_state(glob)
        final = run_final(t, split="val")
        tried[lr] = (final.val["personalized"]["dice"], t, final.personal)
    best = max(tried, key=lambda lr: tried[lr][0])
    _, t, personal = tried[best]
    with t.global_swapped(personal):
        test = t.evaluate("test", "personalized")
    return {"dice": test["dice"], lr_key: best, "val_dice_by_lr": {str(k): v[0] for k, v in tried.items()}}


def run_unseen(centre: str, args: argparse.Namespace, sites: list[str], seed: int, prompt: str) -> dict:
    """Train pFedSAM on every other centre, then score ``centre`` before and after local adaptation.

    Both adaptations (a fresh L-MoE distilled from the global model; fine-tuning the global part
    itself, as FedAvg + fine-tune would) get the same steps: what a participating site's
    personal part trains in the whole run. Each uses the learning rate, of three, that is best
    on the centre's validation split.
    """
    train_sites = [s for s in sites if s != centre]
    run = simulate("pfedsam", f"unseen-{centre}-{prompt}-s{seed}", args, train_sites, seed, prompt)
    seen = {s: r["personalized"]["dice"] for s, r in run.pop("report")["final"].items() if "personalized" in r}
    glob = dict(np.load(Path(run["workspace"]) / "server" / "simulate_job" / "global_model.npz"))
    steps = args.rounds * args.local_steps + args.final_steps
    out = {"train_sites": train_sites, "adapt_steps": steps, **run, "protocol": PROTOCOL,
           "seen_sites_mean_dice": float(np.mean(list(seen.values())))}
    work = args.out / "work" / f"unseen-{centre}"
    t = trainer_for("pfedsam", args, centre, seed, prompt, work)
    t.set_global_state(glob)
    out["global"] = score(t, "global")
    out["fresh_lmoe"] = _adapt("pfedsam", "lr_local", [3e-4, 1e-3, 3e-3], glob, args, centre, seed, prompt,
                               steps, work)
    out["finetune_global"] = _adapt("fedavg-ft", "lr_global", [3e-5, 1e-4, 3e-4], glob, args, centre, seed,
                                    prompt, steps, work)
    return out


def full_finetune_bytes() -> dict:
    """Bytes one site would send per round: full fine-tuning FedAvg vs pFedSAM's global part."""
    out = {}
    for backbone, size in (("litemedsam", 256), ("vit_b", 1024), ("vit_l", 1024), ("vit_h", 1024)):
        model = build_pfedsam(load_config(path=MAIN_JOB / "app" / "config" / "pfedsam.yaml",
                                          overrides=[f"backbone={backbone}", f"image_size={size}"]))
        counts = model.registry.counts(model)["params"]
        total = sum(counts.values())
        glob = counts[ParamKind.GLOBAL.value]
        out[backbone] = {"full_fp32": 4 * total, "full_fp16": 2 * total, "pfedsam_fp32": 4 * glob,
                         "pfedsam_fp16": 2 * glob}
        del model
    return out


# -- report ---------------------------------------------------------------------------------------------
def _rows(results: dict, prompt: str, seed: int | None = None) -> list[tuple[str, dict]]:
    order = ["zero-shot", *FEDERATED, "centralized"]
    rows = []
    for key, r in results["rows"].items():
        method, row_prompt, row_seed = key.split("|")
        if (row_prompt == prompt or method == "zero-shot") and (seed is None or row_seed == f"seed{seed}"):
            rows.append((method, r))
    return sorted(rows, key=lambda kr: order.index(kr[0]) if kr[0] in order else len(order))


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None or not np.isfinite(x) else format(x, spec)


def table(results: dict, prompt: str, seed: int) -> list[str]:
    sites = results["sites"]
    head = ("| method | " + " | ".join(sites) + " | **mean Dice** | mean HD95 | mean global Dice | MB/round/site "
            "| s/round | train img/s/site | peak site RSS MB | steps/site | images/site |")
    lines = [head, "|" + "---|" * (len(sites) + 10)]
    for method, r in _rows(results, prompt, seed):
        if "error" in r:
            lines.append(f"| {method} | " + " | ".join("-" for _ in sites) + f" | error: {r['error']} |||||||")
            continue
        dice = [r["per_site"][s]["dice"] for s in sites]
        hd = [r["per_site"][s]["hd95"] for s in sites]
        gd = [r["per_site"][s].get("global_dice") for s in sites]
        gmean = float(np.mean(gd)) if None not in gd else None
        lines.append(f"| {method} | " + " | ".join(f"{d:.3f}" for d in dice)
                     + f" | **{np.mean(dice):.3f}** | {np.mean(hd):.1f} | {_fmt(gmean, '.3f')} | "
                     + f"{_fmt(r.get('bytes_per_round_per_site', float('nan')) / 1e6, '.2f')} | "
                     + f"{_fmt(r.get('round_wall_s'), '.0f')} | {_fmt(r.get('train_images_per_s'), '.1f')} | "
                     + f"{_fmt(r.get('peak_site_rss_mb'), '.0f')} | {_fmt(r.get('steps_per_site'), '.0f')} | "
                     + f"{_fmt(r.get('images_per_site'), '.0f')} |")
    return lines


def seeds_table(results: dict, prompt: str) -> list[str]:
    by_method: dict[str, list[float]] = {}
    for method, r in _rows(results, prompt):
        if "per_site" in r:
            by_method.setdefault(method, []).append(float(np.mean([v["dice"] for v in r["per_site"].values()])))
    lines = ["| method | seeds | mean Dice (mean +- std over seeds) | per seed |", "|---|---|---|---|"]
    for method, vals in by_method.items():
        if len(vals) > 1:
            lines.append(f"| {method} | {len(vals)} | {np.mean(vals):.3f} +- {np.std(vals, ddof=1):.3f} | "
                         + ", ".join(f"{v:.3f}" for v in vals) + " |")
    return lines if len(lines) > 2 else []


def unseen_table(results: dict) -> list[str]:
    if not results.get("unseen"):
        return []
    lines = ["| left-out centre | global model | + fresh L-MoE (local adaptation) | + fine-tune global part "
             "| adapt steps | seen centres' mean personalized Dice |", "|---|---|---|---|---|---|"]
    for centre, u in results["unseen"].items():
        if "error" in u:
            lines.append(f"| {centre} | error: {u['error']} |||||")
            continue
        lines.append(f"| {centre} | {u['global']['dice']:.3f} | {u['fresh_lmoe']['dice']:.3f} | "
                     f"{u['finetune_global']['dice']:.3f} | {u['adapt_steps']} | {u['seen_sites_mean_dice']:.3f} |")
    return lines


def markdown(results: dict) -> str:
    out = [f"# Benchmark: {results['dataset']}", "", f"Budget: {json.dumps(results['budget'])}",
           f"Hardware: {json.dumps(results['hardware'])}", f"Empty masks: {results['empty_mask_rule']}", "",
           "## Main table (prompt-free, seed 0; Dice of each site's personalized model on its test split)", "",
           *table(results, "none", 0)]
    if seeds := seeds_table(results, "none"):
        out += ["", "## Seeds (prompt-free)", "", *seeds]
    if any(m != "zero-shot" for m, _ in _rows(results, "box")):
        out += ["", "## Box prompts (seed 0)", "", *table(results, "box", 0)]
    if unseen := unseen_table(results):
        out += ["", "## Unseen centres (test Dice of the left-out centre)", "", *unseen]
    out += ["", "## Communication per round per site (exact, from parameter counts)", "",
            "| backbone | full FT fp32 MB | full FT fp16 MB | pFedSAM fp32 MB | pFedSAM fp16 MB |",
            "|---|---|---|---|---|"]
    for b, v in results["communication"].items():
        out.append(f"| {b} | {v['full_fp32'] / 1e6:.1f} | {v['full_fp16'] / 1e6:.1f} | "
                   f"{v['pfedsam_fp32'] / 1e6:.2f} | {v['pfedsam_fp16'] / 1e6:.2f} |")
    return "\n".join(out) + "\n"


def plots(results: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(m, r) for m, r in _rows(results, "none", 0) if "per_site" in r]
    sites = results["sites"]
    fig, ax = plt.subplots(figsize=(13, 4))
    width = 0.8 / max(len(rows), 1)
    for k, (method, r) in enumerate(rows):
        ax.bar(np.arange(len(sites)) + k * width, [r["per_site"][s]["dice"] for s in sites], width, label=method)
    ax.set_xticks(np.arange(len(sites)) + 0.4 - width / 2, sites)
    ax.set_ylabel("test Dice (personalized)")
    ax.legend(fontsize=7, ncol=4)
    fig.tight_layout()
    fig.savefig(out / "dice_per_site.png", dpi=100)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 4))
    for method, r in rows:
        if r.get("val_dice_curve"):
            ax.plot(range(len(r["val_dice_curve"])), r["val_dice_curve"], marker="o", label=method)
    ax.set_xlabel("round")
    ax.set_ylabel("mean val Dice (personalized, after the local phase)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "dice_over_rounds.png", dpi=100)
    plt.close(fig)


def overlays(results: dict, args: argparse.Namespace, methods: list[str], per_site: int = 2) -> None:
    """image | ground truth | each method's personalized prediction, for the first test images."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    from pfedsam.export.predict import predict, read_rgb

    rows = dict(_rows(results, "none", 0))
    methods = [m for m in methods if "workspace" in rows.get(m, {})]
    if not methods:
        return
    sites = results["sites"]
    fig, axes = plt.subplots(len(sites) * per_site, 2 + len(methods),
                             figsize=(2.2 * (2 + len(methods)), 2.2 * len(sites) * per_site), squeeze=False)
    for i, site in enumerate(sites):
        ids = load_split(args.data_root / site)["test"][:per_site]
        images = [next((args.data_root / site / "images").glob(f"{x}.*")) for x in ids]
        preds = {}
        for m in methods:
            model = Path(rows[m]["workspace"]) / site / "simulate_job" / f"app_{site}" / "personalized_model"
            dest = args.out / "overlays" / m / site
            predict(model, images, dest, engine="torch", masks_dir=args.data_root / site / "masks", warmup=0)
            preds[m] = dest
        for j, img in enumerate(images):
            ax_row = axes[i * per_site + j]
            gt = np.array(Image.open(next((args.data_root / site / "masks").glob(f"{img.stem}.*"))))
            ax_row[0].imshow(read_rgb(img))
            ax_row[0].set_ylabel(f"{site}\n{img.stem}", fontsize=6)
            ax_row[1].imshow(gt > 0, cmap="gray")
            for k, m in enumerate(methods):
                ax_row[2 + k].imshow(Image.open(preds[m] / "overlays" / f"{img.stem}.png"))
            for k, name in enumerate(["image", "ground truth", *methods]):
                ax_row[k].set_xticks([])
                ax_row[k].set_yticks([])
                if i == 0 and j == 0:
                    ax_row[k].set_title(name, fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out / "overlays.png", dpi=90)
    plt.close(fig)


def load_results(args: argparse.Namespace, sites: list[str]) -> dict:
    path = args.out / "results.json"
    if path.is_file():
        results = json.loads(path.read_text())
        stored = {**budget(parse_args([])), **results.get("budget", {})}  # keys added later: their defaults
        stored["data_root"] = results.get("budget", {}).get("data_root")
        if results.get("protocol") != PROTOCOL:
            sys.exit(f"{path} holds rows of training protocol {results.get('protocol', 1)} (replayed batches, "
                     f"unequal budgets), not comparable with protocol {PROTOCOL}; use another --out or move it")
        if stored != budget(args) or results.get("sites") != sites:
            sys.exit(f"{path} holds rows of another budget or site list ({results.get('budget')}); "
                     "use another --out or delete it")
        return results
    return {"dataset": args.data_root.name, "sites": sites, "budget": budget(args), "protocol": PROTOCOL,
            "hardware": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                         "sites_at_once": args.threads, "torch_threads_per_site": args.site_threads,
                         "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},
            "empty_mask_rule": EMPTY_MASK_RULE, "rows": {}, "unseen": {}, "communication": full_finetune_bytes()}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", type=Path, default=ROOT.parent / "shared" / "data" / "polyp",
                        help="one folder per site, or 'synthetic' for the main job's generated sites")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "polyp")
    parser.add_argument("--methods", default=",".join(["zero-shot", *FEDERATED, "centralized"]),
                        help="comma list; '' for none (e.g. with --unseen only)")
    parser.add_argument("--seeds", default="0", help="comma list of seeds; every method runs once per seed")
    parser.add_argument("--unseen", default="", help="comma list of centres for the leave-one-out experiment")
    parser.add_argument("--backbone", default="litemedsam")
    parser.add_argument("--checkpoint", default=None, help="SAM checkpoint (vit_b/l/h need the official file)")
    parser.add_argument("--image-size", type=int, default=0, help="model input side (0 = the backbone's own)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--local-steps", type=int, default=6)
    parser.add_argument("--global-steps", type=int, default=10)
    parser.add_argument("--final-steps", type=int, default=6, help="final personalization steps (every method)")
    parser.add_argument("--max-train", type=int, default=24, help="training images per site (0 = all)")
    parser.add_argument("--max-eval", type=int, default=16, help="val and test images per site (0 = all)")
    parser.add_argument("--prompt", default="none", choices=["none", "box"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2, help="simulator client threads (sites run at once)")
    parser.add_argument("--site-threads", type=int, default=1,
                        help="torch CPU threads per site process (threads x site-threads <= cores avoids "
                             "oversubscription; 0 = torch default)")
    parser.add_argument("--force", action="store_true", help="rerun rows already in results.json")
    parser.add_argument("--report-only", action="store_true", help="only rewrite results.md and the plots")
    return parser.parse_args(argv)


def main() -> None:
    args = parse_args()
    if str(args.data_root) == "synthetic":  # the generated SYNTHETIC sites of the main job (made on first use)
        from pfedsam.data.resolve import synthetic_root

        args.data_root = synthetic_root(load_config(MAIN_JOB / "app" / "config" / "pfedsam.yaml"))
    if not args.data_root.is_dir():
        sys.exit(f"--data-root {args.data_root} not found (the real data lives in ../shared/data)")
    args.out = args.out.resolve()
    args.data_root = args.data_root.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    sites = discover_sites(args.data_root)
    unknown = [c for c in filter(None, args.unseen.split(",")) if c not in sites]
    if unknown:
        sys.exit(f"--unseen: {unknown} not among the sites {sites}")
    results = load_results(args, sites)

    def save() -> None:
        (args.out / "results.json").write_text(json.dumps(results, indent=1, default=float))

    runners = {"zero-shot": run_zero_shot, "centralized": run_centralized}
    jobs = [] if args.report_only else [
        (m, s) for s in map(int, args.seeds.split(",")) for m in filter(None, args.methods.split(","))]
    for method, seed in jobs:
        key = f"{method}|{'box' if method == 'zero-shot' else args.prompt}|seed{seed}"
        if key in results["rows"] and "error" not in results["rows"][key] and not args.force:
            print(f"{key}: already in results.json", flush=True)
            continue
        start = time.perf_counter()
        try:
            if method in runners:
                row = runners[method](args, sites, seed, args.prompt)
            else:
                row = run_federated(method, args, sites, seed, args.prompt)
        except Exception as exc:  # one failed row must not lose the others
            row = {"error": str(exc)}
        row.setdefault("wall_s", time.perf_counter() - start)
        results["rows"][key] = row
        save()
        print(f"{key}: {'ERROR ' + row['error'] if 'error' in row else 'done'} in {row['wall_s']:.0f} s", flush=True)
    for centre in filter(None, [] if args.report_only else args.unseen.split(",")):
        if centre in results["unseen"] and "error" not in results["unseen"][centre] and not args.force:
            continue
        try:
            results["unseen"][centre] = run_unseen(centre, args, sites, int(args.seeds.split(",")[0]), args.prompt)
        except Exception as exc:
            results["unseen"][centre] = {"error": str(exc)}
        save()
        print(f"unseen {centre}: done", flush=True)
    save()
    (args.out / "results.md").write_text(markdown(results))
    plots(results, args.out)
    overlays(results, args, ["pfedsam", "fedavg", "ditto", "local"])
    print(markdown(results))


if __name__ == "__main__":
    main()
