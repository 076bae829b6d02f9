"""Screen designs of pFedSAM's local part on validation, at about a third of a full run's cost.

In the decoupled schedule the global phase trains with the experts off and reads its own
batch stream, so the global trajectory G(0), G(1), ..., G(T) does not depend on anything the
local phase does (the L-MoE's size, placement, routing, learning rate, KD settings). A screen
therefore trains that trajectory once per (seed, learning-rate scale, budget), keeps it, and
for each variant replays only the local phases and the final personalization at every site
against it. The personalized models are exactly those a full ``run.py`` pFedSAM run with the
same settings would reach (``tests/test_screen.py`` checks this on a tiny job), for the cost of
the local steps alone. Only validation is scored: a screen chooses, ``run.py`` then reports the
chosen setting on test with seeds and intervals.

    python benchmarks/screen.py --variant default --variant train.kd_gate=teacher_dice \\
        --variant train.kd_weight=0 --variant lmoe.hidden=128,lmoe.num_experts=8

Each variant is ``key=value`` pairs (dotted keys of the job's settings, comma-separated) or
``default``. A variant that changes what the global phase trains (``lora.*``, ``decoder``,
``train.lr_global``, the budget) is refused: it needs a trajectory of its own, i.e. a full run.
A screen has a local phase in every round (``train.local_start: 0``, whatever the job sets):
with a later start the early rounds' local steps would train the global model, so the
trajectory would depend on the schedule; ``train.local_start`` itself is screened by full runs.
``--base key=value,...`` sets a design every variant builds on, global keys included (say the
encoder LoRA, ``lora.encoder_blocks=1,train.global_from_embedding=false``): the trajectory is
then trained with it, under its own file, and its screens form their own table. A base must
keep the budget (as ``run.py --variant`` must) and may not set ``train.local_start``.
Results go to ``OUT/screen.json`` and ``OUT/screen.md`` (paired bootstrap intervals over
validation images against ``default``); the trajectory is kept under ``OUT/work/screen/``.
Budget options (``--rounds``, ``--max-train`` ...) are ``run.py``'s, with the same defaults.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as bench  # noqa: E402  (benchmarks/run.py: settings, budget and scoring of the benchmark)
from engine import federate  # noqa: E402
from stats import interval_text, verdict  # noqa: E402

from pfedsam.data import discover_sites  # noqa: E402
from pfedsam.train import SiteTrainer, run_final, run_round  # noqa: E402

# Settings that change the global phase or the data it sees: a variant may not touch them.
GLOBAL_KEYS = ("lora.", "decoder", "backbone", "checkpoint", "image_size", "prompt", "data.", "federation.",
               "train.lr_global", "train.global_steps", "train.local_steps", "train.final_steps", "train.batch_size",
               "train.seed", "train.prox_mu", "train.schedule", "train.grad_clip", "train.weight_decay",
               "train.local_start", "train.batch_dice")
# A screen's schedule: a local phase in every round (see the module's docstring).
SCREEN_TRAIN = {"local_start": 0.0}


def parse_variant(text: str) -> dict[str, object]:
    """``run.py``'s ``--variant`` syntax, refusing keys that change the global trajectory."""
    out = bench.parse_overrides(text)
    if bad := [key for key in out if key.startswith(GLOBAL_KEYS)]:
        raise ValueError(f"--variant {text!r}: {bad[0]} changes the global trajectory; run it with run.py --variant")
    return out


def parse_base(text: str, args: argparse.Namespace, seed: int, lr: float) -> dict[str, object]:
    """``--base``: dotted overrides every variant builds on; global keys are allowed, the budget must hold."""
    base = bench.parse_overrides(text, option="--base")
    if "train.local_start" in base:
        raise ValueError(f"--base {text!r}: a screen has a local phase in every round "
                         "(train.local_start is screened by run.py)")
    bench.variant_of("pfedsam", args, seed, args.prompt, {"lr": lr}, base, option="--base")
    return base


def with_train(design: dict[str, object], **train: object) -> dict[str, dict]:
    """``design``'s nested overrides with ``train`` keys set on top (the phase a screen runs)."""
    overrides = bench.nested(design)
    overrides["train"] = {**overrides.get("train", {}), **train}
    return overrides


def trajectory(args: argparse.Namespace, sites: list[str], seed: int, lr: float,
               base: dict[str, object] | None = None) -> list[dict[str, np.ndarray]]:
    """G(0..T) of pFedSAM at this budget, seed, lr scale and base design: trained once (global phases only),
    then reused."""
    base = base or {}
    ident = [bench.budget(args), sites, seed, lr] + ([base] if base else [])  # files kept before --base: same key
    key = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:12]
    path = args.out / "work" / "screen" / f"trajectory-seed{seed}-lr{lr:g}-{key}.pt"
    if path.is_file():
        return torch.load(path, weights_only=False)
    cfg = bench.make_config("pfedsam", args, seed, args.prompt, {"lr": lr},
                            **with_train(base, local_steps=0, final_steps=0, **SCREEN_TRAIN))
    work = args.out / "work" / "screen" / f"trajectory-s{seed}"
    fed = federate(lambda s: SiteTrainer(cfg, s, site_dir=args.data_root / s, workdir=work / s), sites,
                   evaluate=False, keep_globals=True, log=lambda m: print(f"  [trajectory s{seed}] {m}", flush=True))
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(fed.globals, path.with_suffix(".tmp"))
    path.with_suffix(".tmp").replace(path)
    return fed.globals


def replay(args: argparse.Namespace, sites: list[str], seed: int, lr: float, variant: dict[str, object],
           globs: list[dict[str, np.ndarray]], trainers: dict[str, SiteTrainer] | None = None,
           base: dict[str, object] | None = None) -> dict:
    """Every site's local phases and final personalization of one variant (on ``base``) against ``globs``,
    scored on val.

    ``trainers``, when given, receives each site's trainer afterwards (its model: G(T) + the L-MoE).
    """
    # local phases only: G comes from globs (a variant holds no global key, so it cannot undo this)
    overrides = with_train({**(base or {}), **variant}, global_steps=0, **SCREEN_TRAIN)
    cfg = bench.make_config("pfedsam", args, seed, args.prompt, {"lr": lr}, **overrides)
    rounds = cfg.federation.rounds
    if len(globs) != rounds + 1:
        raise ValueError(f"the trajectory holds {len(globs)} global models, {rounds} rounds need {rounds + 1}")
    work = args.out / "work" / "screen" / f"replay-s{seed}"
    per_site, start = {}, time.perf_counter()
    for s in sites:
        t = SiteTrainer(cfg, s, site_dir=args.data_root / s, workdir=work / s)
        for rnd in range(rounds):
            t.set_global_state(globs[rnd])
            run_round(t, rnd, evaluate=False)
        t.set_global_state(globs[rounds])
        final = run_final(t, split="val", per_image=True)
        scores = final.val["personalized"]
        if trainers is not None:
            trainers[s] = t
        per_site[s] = {"dice": scores["dice"], "global_dice": final.val["global"]["dice"],
                       "empty_fp": scores.get("empty_fp"), "images": [i["dice"] for i in scores["images"]]}
        print(f"  [{bench.variant_tag(variant)} s{seed}] {s}: val Dice {scores['dice']:.4f} "
              f"(global {final.val['global']['dice']:.4f})", flush=True)
    return {"val_dice": float(np.mean([r["dice"] for r in per_site.values()])),
            "global_val_dice": float(np.mean([r["global_dice"] for r in per_site.values()])),
            "per_site": per_site, "wall_s": time.perf_counter() - start}


def markdown(screen: dict) -> str:
    """One table per (seed, lr): each variant's mean val Dice, per centre, and its difference to ``default``."""
    sites = screen["sites"]
    lines = ["# Screen of pFedSAM's local part (validation only)", "",
             "Generated by `benchmarks/screen.py`; budget: " + json.dumps(screen["budget"]), ""]
    groups: dict[str, dict[str, dict]] = {}
    for key, r in screen["runs"].items():
        group, tag = key.rsplit("|", 1)
        groups.setdefault(group, {})[tag] = r
    for group, runs in groups.items():
        base = runs.get("default")
        lines += [f"## {group.replace('|', ', ')}", "",
                  "| variant | mean val Dice | minus default [95% CI] | reading | " + " | ".join(sites)
                  + " | empty FP | min |", "|" + "---|" * (len(sites) + 6)]
        for tag, r in runs.items():
            if base is not None and tag != "default":
                d = bench.row_minus_row(r, base, sites, "images")
                diff = interval_text(d)
                reading = verdict(d)
            else:
                diff, reading = "", ""
            fps = [r["per_site"][s]["empty_fp"] for s in sites if r["per_site"][s]["empty_fp"] is not None
                   and not np.isnan(r["per_site"][s]["empty_fp"])]
            fp = f"{np.mean(fps):.3f}" if fps else "-"
            lines.append(f"| {tag} | **{r['val_dice']:.3f}** | {diff} | {reading} | "
                         + " | ".join(f"{r['per_site'][s]['dice']:.3f}" for s in sites)
                         + f" | {fp} | {r['wall_s'] / 60:.0f} |")
        g = next(iter(runs.values()))["global_val_dice"]
        lines += ["", f"The global model G(T) these variants share: mean val Dice {g:.3f}.", ""]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", action="append", default=[], help="key=value[,key=value] or 'default'")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=1.0, help="lr scale of the trajectory (and of lr_local)")
    parser.add_argument("--base", default="default",
                        help="key=value[,key=value]: the design every variant builds on (global keys allowed)")
    own, rest = parser.parse_known_args(argv)
    args = bench.parse_args(rest)
    args.out, args.data_root = args.out.resolve(), args.data_root.resolve()
    if not args.data_root.is_dir():
        sys.exit(f"--data-root {args.data_root} not found (the real data lives in ../shared/data)")
    try:
        variants = [parse_variant(v) for v in own.variant or ["default"]]
        base = parse_base(own.base, args, own.seed, own.lr)
    except ValueError as exc:
        sys.exit(str(exc))
    sites = discover_sites(args.data_root)
    path = args.out / "screen.json"
    screen = json.loads(path.read_text()) if path.is_file() else {
        "sites": sites, "budget": bench.budget(args), "protocol": bench.PROTOCOL, "runs": {}}
    if screen["budget"] != bench.budget(args) or screen["sites"] != sites:
        sys.exit(f"{path} holds screens of another budget or site list ({screen['budget']}); use another --out")
    globs = None
    group = f"seed{own.seed}|lr={own.lr:g}" + (f"|base={bench.variant_tag(base)}" if base else "")
    for variant in variants:
        key = f"{group}|{bench.variant_tag(variant)}"
        if key in screen["runs"] and not args.force:
            print(f"{key}: already in {path.name}", flush=True)
            continue
        globs = globs if globs is not None else trajectory(args, sites, own.seed, own.lr, base)
        print(f"{key}: replaying", flush=True)
        screen["runs"][key] = replay(args, sites, own.seed, own.lr, variant, globs, base=base)
        path.with_suffix(".tmp").write_text(json.dumps(screen, indent=1, default=float))
        path.with_suffix(".tmp").replace(path)
        (args.out / "screen.md").write_text(markdown(screen))
        print(f"{key}: val Dice {screen['runs'][key]['val_dice']:.4f}", flush=True)
    print(markdown(screen))


if __name__ == "__main__":
    main()
