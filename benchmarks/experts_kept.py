"""Would a site that keeps its experts only where its own validation split says they help do better?

An analysis of recorded pFedSAM rows, not a row. Each site's model is scored on validation and
test with the experts on (personalized) and off (G(T) alone). Rows recorded since ``run.py``
keeps G(T)'s per-image validation scores hold all four; an older row is read from an earlier
analysis's record in ``OUT/experts_kept.json`` where one matches it, or else seed 0's saved site
models (G(T) plus the site's L-MoE, ``OUT/work/models/<method>-<tag>/<site>``) are scored again.
A site keeps its experts where its validation Dice is higher with them, and the test scores of
the models so chosen are paired, over test images with the seeds pooled, with keeping the experts
everywhere and with dropping them everywhere (``stats.paired_difference``). The result is printed
and written to ``OUT/experts_kept.json`` under the rows' keys.

    python benchmarks/experts_kept.py --out results/polyp-48rounds \\
        --row "pfedsam|none|seed0|lr=3,kd_weight=0.3+lora.encoder_blocks=1,train.global_from_embedding=False"

``--row`` may be given once per seed of one setting.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from stats import interval_text, paired_difference  # noqa: E402

from pfedsam.model.checkpoint import read_site_model  # noqa: E402
from pfedsam.train import SiteTrainer  # noqa: E402

WAYS = {"on": "personalized", "off": "global"}  # experts on / off, as SiteTrainer.evaluate names them


@contextmanager
def site_model_trainer(model_dir: Path, site: str, site_dir: Path) -> Iterator[tuple[SiteTrainer, dict, dict]]:
    """A ``SiteTrainer`` on ``site_dir`` holding a saved site model (G(T) and the site's L-MoE), in a
    temporary work folder. Yields the trainer, the saved states (``read_site_model``'s) and the L-MoE
    state the trainer was built with (the seeded fresh experts every site starts from)."""
    cfg, saved = read_site_model(model_dir)
    with tempfile.TemporaryDirectory() as work:
        trainer = SiteTrainer(cfg, site, site_dir=site_dir, workdir=Path(work))
        fresh = trainer.get_local_state()
        trainer.set_global_state(saved["global"])
        trainer.set_local_state(saved["local"])
        yield trainer, saved, fresh


def scores_on_off(trainer: SiteTrainer, splits: tuple[str, ...] = ("val", "test")) -> dict[str, list[float]]:
    """Per-image Dice of the trainer's model on ``splits``, experts on and off: ``{"val_on": [...], ...}``."""
    return {f"{split}_{way}": [float(i["dice"]) for i in trainer.evaluate(split, which, per_image=True)["images"]]
            for split in splits for way, which in WAYS.items()}


def score_site(model_dir: Path, site: str, site_dir: Path) -> dict[str, list[float]]:
    """Per-image Dice of one saved site model on ``val`` and ``test``, experts on and off.

    Arguments:
      model_dir: a site model folder (``config.yaml``, ``weights.pt``) written by ``run.py``.
      site: the site's name; site_dir: its data folder (images, masks, split.json).
    Returns ``{"val_on": [...], "val_off": [...], "test_on": [...], "test_off": [...]}``.
    """
    with site_model_trainer(model_dir, site, site_dir) as (trainer, _, _):
        return scores_on_off(trainer)


def stored_scores(site_row: dict) -> dict[str, list[float]] | None:
    """The four per-image score lists of one site of a recorded row, or None where the row has no
    G(T) validation scores (recorded before ``run.py`` kept them)."""
    glob = site_row.get("global") or {}
    if "val_images" not in glob:
        return None
    return {"val_on": site_row["val_images"], "val_off": glob["val_images"],
            "test_on": site_row["images"], "test_off": glob["images"]}


def earlier_scores(out: Path, row: str, per_site: dict) -> dict[str, dict[str, list[float]]] | None:
    """The per-image scores an earlier analysis recorded for ``row`` in ``OUT/experts_kept.json`` (from the
    site models, which a new checkout lacks), or None. A record counts only where its personalized test
    scores are the row's in results.json, image for image: a row run again since does not match."""
    path = out / "experts_kept.json"
    if not path.exists():
        return None

    def same_row(recorded: list[float], row_images: list[float]) -> bool:
        return len(recorded) == len(row_images) and np.allclose(recorded, row_images, rtol=0, atol=1e-6)

    for entry in json.loads(path.read_text()).values():
        sites = entry.get("rows", {}).get(row, {}).get("sites", {})
        if sorted(sites) == sorted(per_site) and all(
                same_row(sites[s]["images"]["test_on"], per_site[s]["images"]) for s in sites):
            return {s: sites[s]["images"] for s in sites}  # score_site's four lists, as experts_kept wrote them
    return None


def row_scores(out: Path, results: dict, row: str, data_root: Path) -> dict[str, dict]:
    """Per site of ``row``: the four per-image score lists (``score_site``'s keys) and where they came from."""
    if row not in results["runs"]:
        raise KeyError(f"{out / 'results.json'} has no row '{row}'")
    method, _, seed, tag = row.split("|", 3)
    per_site = results["runs"][row].get("per_site")
    if not per_site:
        raise ValueError(f"row '{row}' of {out / 'results.json'} has no scores (an error row?)")
    scores = {s: stored_scores(per_site[s]) for s in results["sites"]}
    if all(v is not None for v in scores.values()):
        return {s: {**v, "source": "results.json"} for s, v in scores.items()}
    earlier = earlier_scores(out, row, per_site)
    if earlier is not None:
        return {s: {**v, "source": "experts_kept.json"} for s, v in earlier.items()}
    if seed != "seed0":
        raise ValueError(f"row '{row}' was recorded without G(T)'s validation scores, and run.py saves "
                         "site models for seed 0 only: nothing to score it with")
    return {s: {**score_site(out / "work" / "models" / f"{method}-{tag}" / s, s, data_root / s),
                "source": "site models"} for s in results["sites"]}


def experts_kept(out: Path, rows: list[str], data_root: Path) -> dict:
    """Score every site of ``rows`` (keys of ``out/results.json``, seeds of one setting) with and without
    its experts and keep them where validation says so; returns, per row, the per-site scores and choices,
    and over the rows the test means and the chosen models' paired differences, seeds pooled."""
    if len(set(rows)) != len(rows):
        raise ValueError(f"a row was given more than once: {rows}")
    results = json.loads((out / "results.json").read_text())
    sites = results["sites"]
    per_row, chosen = {}, {s: [] for s in sites}
    fixed = {way: {s: [] for s in sites} for way in WAYS}
    for row in rows:
        scores = row_scores(out, results, row, data_root)
        kept = {s: bool(np.mean(scores[s]["val_on"]) > np.mean(scores[s]["val_off"])) for s in sites}
        for s in sites:
            chosen[s].append(scores[s]["test_on" if kept[s] else "test_off"])
            for way in WAYS:
                fixed[way][s].append(scores[s][f"test_{way}"])
        per_row[row] = {"sites": {s: {"kept": kept[s], "source": scores[s].pop("source"),
                                      **{k: float(np.mean(v)) for k, v in scores[s].items()},
                                      "images": scores[s]} for s in sites}}
    return {
        "rows": per_row,
        "test_mean": {"chosen": float(np.mean([np.mean(chosen[s]) for s in sites])),
                      **{way: float(np.mean([np.mean(fixed[way][s]) for s in sites])) for way in WAYS}},
        "chosen_minus": {way: paired_difference(chosen, fixed[way]) for way in WAYS},
    }


def markdown(result: dict) -> str:
    """The per-site table (means over the rows, and in how many rows the site kept its experts) and the
    two paired differences."""
    rows = list(result["rows"].values())
    lines = ["| site | val images | val, experts on | val, off | test, on | test, off | kept |",
             "|---|---|---|---|---|---|---|"]
    for s in rows[0]["sites"]:
        r = [row["sites"][s] for row in rows]
        mean = {k: np.mean([x[k] for x in r]) for k in ("val_on", "val_off", "test_on", "test_off")}
        kept = sum(x["kept"] for x in r)
        kept_text = ("yes" if kept else "no") if len(r) == 1 else f"{kept} of {len(r)}"
        lines.append(f"| {s} | {len(r[0]['images']['val_on'])} | {mean['val_on']:.3f} | {mean['val_off']:.3f} | "
                     f"{mean['test_on']:.3f} | {mean['test_off']:.3f} | {kept_text} |")
    m = result["test_mean"]
    lines += ["", f"Rows: {len(rows)}. Test mean: chosen on validation {m['chosen']:.3f}, experts everywhere "
              f"{m['on']:.3f}, nowhere {m['off']:.3f}.",
              f"Chosen minus experts everywhere: {interval_text(result['chosen_minus']['on'])}; "
              f"minus nowhere: {interval_text(result['chosen_minus']['off'])}."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="a benchmark folder (results.json, work/models)")
    parser.add_argument("--row", required=True, action="append", dest="rows",
                        help="a row's key in results.json; once per seed of one setting to pool them")
    parser.add_argument("--data-root", type=Path, default=Path("../shared/data/polyp"))
    args = parser.parse_args(argv)
    result = experts_kept(args.out, args.rows, args.data_root)
    print(markdown(result))
    path = args.out / "experts_kept.json"
    stored = json.loads(path.read_text()) if path.exists() else {}
    stored[" + ".join(args.rows)] = result
    path.write_text(json.dumps(stored, indent=1))


if __name__ == "__main__":
    main()
