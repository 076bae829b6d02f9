"""Would a site that keeps its experts only where its own validation split says they help do better?

An analysis of one recorded pFedSAM row, not a row. ``run.py`` saves seed 0's site models (G(T)
plus the site's L-MoE) under ``OUT/work/models/<method>-<tag>/<site>``; each is scored on
validation and test with the experts on (personalized) and off (G(T) alone). A site keeps its
experts where its validation Dice is higher with them, and the test scores of the models so
chosen are paired, over test images, with keeping the experts everywhere and with dropping them
everywhere (``stats.paired_difference``). The result is printed and written to
``OUT/experts_kept.json`` under the row's key.

    python benchmarks/experts_kept.py --out results/polyp-48rounds \\
        --row "pfedsam|none|seed0|lr=3,kd_weight=0.3+lora.encoder_blocks=1,train.global_from_embedding=False"
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from stats import interval_text, paired_difference  # noqa: E402

from pfedsam.model.checkpoint import read_site_model  # noqa: E402
from pfedsam.train import SiteTrainer  # noqa: E402

WAYS = {"on": "personalized", "off": "global"}  # experts on / off, as SiteTrainer.evaluate names them


def score_site(model_dir: Path, site: str, site_dir: Path) -> dict[str, list[float]]:
    """Per-image Dice of one saved site model on ``val`` and ``test``, experts on and off.

    Arguments:
      model_dir: a site model folder (``config.yaml``, ``weights.pt``) written by ``run.py``.
      site: the site's name; site_dir: its data folder (images, masks, split.json).
    Returns ``{"val_on": [...], "val_off": [...], "test_on": [...], "test_off": [...]}``.
    """
    cfg, saved = read_site_model(model_dir)
    with tempfile.TemporaryDirectory() as work:
        trainer = SiteTrainer(cfg, site, site_dir=site_dir, workdir=Path(work))
        trainer.set_global_state(saved["global"])
        trainer.set_local_state(saved["local"])
        return {f"{split}_{way}": [float(i["dice"]) for i in trainer.evaluate(split, which, per_image=True)["images"]]
                for split in ("val", "test") for way, which in WAYS.items()}


def experts_kept(out: Path, row: str, data_root: Path) -> dict:
    """Score every site of ``row`` (a key of ``out/results.json``) with and without its experts and
    keep them where validation says so; returns the per-site scores, the choices and the test means."""
    results = json.loads((out / "results.json").read_text())
    if row not in results["runs"]:
        raise KeyError(f"{out / 'results.json'} has no row '{row}'")
    method, _, seed, tag = row.split("|", 3)
    if seed != "seed0":
        raise ValueError(f"--row {row}: run.py saves site models for seed 0 only")
    sites = results["sites"]
    scores = {s: score_site(out / "work" / "models" / f"{method}-{tag}" / s, s, data_root / s) for s in sites}
    kept = {s: bool(np.mean(scores[s]["val_on"]) > np.mean(scores[s]["val_off"])) for s in sites}
    chosen = {s: [scores[s]["test_on" if kept[s] else "test_off"]] for s in sites}
    fixed = {way: {s: [scores[s][f"test_{way}"]] for s in sites} for way in WAYS}
    return {
        "sites": {s: {"kept": kept[s], **{k: float(np.mean(v)) for k, v in scores[s].items()},
                      "images": scores[s]} for s in sites},
        "test_mean": {"chosen": float(np.mean([np.mean(chosen[s][0]) for s in sites])),
                      **{way: float(np.mean([np.mean(fixed[way][s][0]) for s in sites])) for way in WAYS}},
        "chosen_minus": {way: paired_difference(chosen, fixed[way]) for way in WAYS},
    }


def markdown(result: dict) -> str:
    """The per-site table and the two paired differences."""
    lines = ["| site | val images | val, experts on | val, off | test, on | test, off | kept |",
             "|---|---|---|---|---|---|---|"]
    for s, r in result["sites"].items():
        lines.append(f"| {s} | {len(r['images']['val_on'])} | {r['val_on']:.3f} | {r['val_off']:.3f} | "
                     f"{r['test_on']:.3f} | {r['test_off']:.3f} | {'yes' if r['kept'] else 'no'} |")
    m = result["test_mean"]
    lines += ["", f"Test mean: chosen on validation {m['chosen']:.3f}, experts everywhere {m['on']:.3f}, "
              f"nowhere {m['off']:.3f}.",
              f"Chosen minus experts everywhere: {interval_text(result['chosen_minus']['on'])}; "
              f"minus nowhere: {interval_text(result['chosen_minus']['off'])}."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="a benchmark folder (results.json, work/models)")
    parser.add_argument("--row", required=True, help="the row's key in results.json (seed 0)")
    parser.add_argument("--data-root", type=Path, default=Path("../shared/data/polyp"))
    args = parser.parse_args(argv)
    result = experts_kept(args.out, args.row, args.data_root)
    print(markdown(result))
    path = args.out / "experts_kept.json"
    stored = json.loads(path.read_text()) if path.exists() else {}
    stored[args.row] = result
    path.write_text(json.dumps(stored, indent=1))


if __name__ == "__main__":
    main()
