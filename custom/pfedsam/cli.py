"""pfedsam command line: info, config, synth, train (one site alone), job (FLARE job folders), export, predict.

Each subcommand imports what it needs when it runs (torch, onnx, nvflare), so ``--help`` is fast.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from .config import ConfigError, config_table_markdown, dump_config, load_config


def _load(args: argparse.Namespace) -> object:
    overrides = list(getattr(args, "set", None) or [])
    if getattr(args, "backbone", None):
        overrides.insert(0, f"backbone={args.backbone}")
    return load_config(args.config, overrides)


def cmd_info(args: argparse.Namespace) -> int:
    """Parameter counts and bytes by kind, as the registry decides them."""
    from .model import ParamKind, build_pfedsam

    cfg = _load(args)
    model = build_pfedsam(cfg)
    counts = model.registry.counts(model)
    total_bytes = sum(counts["bytes"].values())
    out = {"backbone": cfg.backbone, "decoder": cfg.decoder, "params": counts["params"], "bytes": counts["bytes"],
           "global_fraction_of_bytes": counts["bytes"]["global"] / total_bytes}
    if args.names:
        out["names"] = {k.value: model.registry.names(k) for k in (ParamKind.GLOBAL, ParamKind.LOCAL)}
    if args.json:
        print(json.dumps(out, indent=1))
    else:
        print(f"backbone {cfg.backbone} (decoder: {cfg.decoder})")
        for kind in ("frozen", "global", "local"):
            print(f"  {kind:7s} {counts['params'][kind]:>12,d} params {counts['bytes'][kind] / 1e6:>10.2f} MB")
        print(f"  global share of bytes: {100 * out['global_fraction_of_bytes']:.2f}%")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    if args.markdown:
        print(config_table_markdown())
    else:
        print(dump_config(_load(args)), end="")
    return 0


def cmd_synth(args: argparse.Namespace) -> int:
    from .data.synth import write_synthetic_sites

    summary = write_synthetic_sites(args.out, sites=args.sites, per_site=args.per_site,
                                    image_size=args.size, seed=args.seed)
    print(f"wrote SYNTHETIC data ({args.sites} sites x {args.per_site} images) to {args.out}")
    if args.json:
        print(json.dumps(summary, indent=1, default=str))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    """Train one site alone (no federation): the same rounds and final personalization as a FLARE site."""
    from .train import SiteTrainer, plan_steps, run_final, run_round

    cfg = _load(args)
    trainer = SiteTrainer(cfg, args.site, site_dir=args.data, workdir=args.out)
    plan = plan_steps(cfg)
    print(f"[{args.site}] budget: {plan.total_steps} steps ({plan.total_images} images) per site")
    history = []
    personal = None
    for rnd in range(cfg.federation.rounds):
        result = run_round(trainer, rnd, personal)
        personal = result.personal
        ev = result.val
        history.append({"round": rnd, "phases": result.phases, "val": ev, "seconds": result.seconds})
        print(f"[{args.site}] round {rnd}: val Dice personalized {ev['personalized']['dice']:.4f} "
              f"global {ev['global']['dice']:.4f}, {result.steps} steps ({result.seconds:.1f} s)")
    final = run_final(trainer, personal)
    test = final.val
    with trainer.global_swapped(final.personal):
        trainer.save_model(Path(args.out) / "model", {"round": cfg.federation.rounds - 1,
                                                      "rounds": cfg.federation.rounds})
    result = {"site": args.site, "budget": plan.summary(), "history": history,
              "final": {"phases": final.phases, "test": test, "lr_scale": final.lr_scale,
                        "val_dice_by_lr_scale": {f"{k:g}": v for k, v in final.val_by_lr_scale.items()}},
              "skipped_files": [str(b.path) for b in trainer.skipped]}
    (Path(args.out) / "train_report.json").write_text(json.dumps(result, indent=1))
    print(f"[{args.site}] test Dice personalized {test['personalized']['dice']:.4f} "
          f"global {test['global']['dice']:.4f}; model in {Path(args.out) / 'model'}")
    return 0


def cmd_job(args: argparse.Namespace) -> int:
    """Write a job's FLARE settings from its YAML, list the variants, or write variant job folders."""
    from .config import merge_overrides, parse_override
    from .jobs import VARIANTS, make_variant, sync_job

    if args.action == "sync":
        print(f"wrote the FLARE settings of {sync_job(args.job)} from its {args.job / 'app/config/pfedsam.yaml'}")
        return 0
    if args.action == "list":
        for name, override in VARIANTS.items():
            print(f"{name:16s} {json.dumps(override)}")
        return 0
    if not args.variants:
        raise ValueError("'job make' needs at least one variant name (see 'pfedsam job list')")
    extra: dict = {}
    for text in args.set or []:
        extra = merge_overrides(extra, parse_override(text))
    code = "bundle" if args.bundle_code else "none" if args.no_custom else "installed"
    for name in args.variants:
        print(f"wrote {make_variant(name, args.out, args.job, extra, code=code)} (code: {code})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pfedsam", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="log INFO messages (default: warnings only)")
    sub = parser.add_subparsers(dest="command", required=True)

    def with_config(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", type=Path, help="YAML run settings (default: built-in defaults)")
        p.add_argument("--set", action="append", metavar="KEY=VALUE",
                       help="override a config key, e.g. --set train.local_steps=5 (repeatable)")

    p = sub.add_parser("info", help="parameter counts and bytes by kind (frozen/global/local)")
    with_config(p)
    p.add_argument("--backbone", help="override the config's backbone")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--names", action="store_true", help="also list global and local parameter names")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("config", help="print the full config (defaults + file + overrides) as YAML")
    with_config(p)
    p.add_argument("--markdown", action="store_true", help="print the reference table of every key instead")
    p.set_defaults(func=cmd_config)

    p = sub.add_parser("synth", help="write the deterministic SYNTHETIC multi-site data set")
    p.add_argument("--out", type=Path, required=True, help="output folder (one subfolder per site)")
    p.add_argument("--sites", type=int, default=4, help="number of sites (default 4)")
    p.add_argument("--per-site", type=int, default=60, help="images per site (default 60)")
    p.add_argument("--size", type=int, default=256, help="image side in pixels (default 256)")
    p.add_argument("--seed", type=int, default=0, help="generator seed (default 0)")
    p.add_argument("--json", action="store_true", help="also print the per-site summary as JSON")
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("train", help="train one site alone (local phase + global phase per round)")
    with_config(p)
    p.add_argument("--site", required=True, help="site name (folder under data.root, or synthetic site-N)")
    p.add_argument("--data", type=Path, help="the site's data folder (overrides data.root)")
    p.add_argument("--out", type=Path, required=True, help="output folder (model, report, cache)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("job", help="FLARE job folders: write settings from the YAML, list or make variants",
                       description="sync: write the YAML's rounds, min_clients, waits, timeouts and task names into "
                                   "meta.json and config_fed_*.json. list: the variants. make: write variant job "
                                   "folders (code from the installed package, or bundled with --bundle-code).")
    p.add_argument("action", choices=["sync", "list", "make"], help="what to do")
    p.add_argument("variants", nargs="*", help="variant names for 'make' (see 'pfedsam job list')")
    p.add_argument("--job", type=Path, default=Path("jobs/pfedsam"),
                   help="the main job folder: source of 'make', target of 'sync' (default jobs/pfedsam)")
    p.add_argument("--out", type=Path, default=Path("build/jobs"),
                   help="where 'make' writes job folders, one per variant (default build/jobs)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="extra config override for 'make', e.g. --set federation.rounds=5 (repeatable)")
    code = p.add_mutually_exclusive_group()
    code.add_argument("--bundle-code", action="store_true",
                      help="'make': copy the installed package into app/custom with its version and digest "
                           "(for sites that accept custom code; a site importing other code refuses to run)")
    code.add_argument("--no-custom", action="store_true",
                      help="'make': no app/custom folder (sites without custom code: the installed wheel and "
                           "'pfedsam.flare.' in each site's class_allow_list)")
    p.set_defaults(func=cmd_job)

    from .export.cli import register  # light: the export code itself is imported when a command runs

    register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return int(args.func(args) or 0)
    except (ConfigError, FileNotFoundError, ValueError, RuntimeError) as exc:
        print(f"pfedsam {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
