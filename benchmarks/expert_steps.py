"""Do a site's experts need more steps? A saved site model's L-MoE trained on, against its frozen G(T).

An analysis of one saved site model (``run.py`` saves seed 0's, ``OUT/work/models/<method>-<tag>/<site>``),
not a row. It scores the model as saved, experts on and off, on the splits asked for; then each arm
loads the saved global parameters G(T) and either the saved experts or fresh ones (zero-initialised up
projections: the model starts as G(T) exactly), runs the local phase (seg + KD from G(T), only the
L-MoE trains) in chunks of steps at a learning-rate scale, and scores validation after each chunk.
A fit that fails to carry (training Dice up, test down) and a failed fit (training Dice down too)
read differently here. Results are printed and written to ``OUT/expert_steps.json`` under the model
folder's name; a later run on the same model adds its arms to that record (``merge_record``).

    python benchmarks/expert_steps.py --model "results/polyp-alltrain/work/models/<method>-<tag>/kvasir-seg" \\
        --data-root ../shared/data/polyp --out results/polyp-alltrain --splits train,val,test \\
        --arm saved,1,16+32 --arm saved,1/3,16+32 --arm fresh,1,16+48
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from fractions import Fraction
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from experts_kept import scores_on_off, site_model_trainer  # noqa: E402

from pfedsam.train.site import Stream  # noqa: E402

SPLITS = ("train", "val", "test")
STARTS = ("saved", "fresh")
# Batches of a stream no row reads, the same for every arm: arms differ only in where they start.
PROBE_STREAM = ("diag", 99)


def parse_arm(text: str) -> tuple[str, float, list[int]]:
    """``START,SCALE,CHUNKS``: ``saved`` or ``fresh`` experts, a learning-rate scale (``0.5``, ``1/3``),
    and the steps of each chunk joined by ``+`` (validation is scored after each)."""
    parts = text.split(",")
    if len(parts) != 3:
        raise ValueError(f"--arm {text!r}: expected START,SCALE,CHUNKS, e.g. saved,1,16+32")
    start, scale_text, chunks_text = parts
    if start not in STARTS:
        raise ValueError(f"--arm {text!r}: START must be one of {STARTS}, got {start!r}")
    try:
        scale = float(Fraction(scale_text))
        chunks = [int(c) for c in chunks_text.split("+")]
    except (ValueError, ZeroDivisionError) as e:
        raise ValueError(f"--arm {text!r}: SCALE must be a number or a fraction and CHUNKS integers "
                         f"joined by '+' ({e})") from None
    if scale <= 0 or any(c <= 0 for c in chunks):
        raise ValueError(f"--arm {text!r}: the scale and every chunk must be positive")
    return start, scale, chunks


def expert_steps(model_dir: Path, site_dir: Path, splits: list[str], arms: list[tuple[str, float, list[int]]]) -> dict:
    """Scores of the saved model on ``splits`` (experts on and off), then each arm's validation Dice
    after each chunk with the chunk's mean training losses. See the module docstring.

    Arguments:
      model_dir: a site model folder (``config.yaml``, ``weights.pt``); its name is the site's.
      site_dir: the site's data folder (images, masks, split.json).
      splits: which of train, val, test to score the saved model on.
      arms: ``parse_arm``'s tuples.
    """
    out: dict = {"model": str(model_dir), "saved": {}, "arms": []}
    with site_model_trainer(model_dir, model_dir.name, site_dir) as (trainer, saved, fresh):
        if not trainer.model.has_local:
            raise ValueError(f"{model_dir} has no local part (L-MoE) to train")
        for name, dice in scores_on_off(trainer, tuple(splits)).items():
            out["saved"][name] = float(np.mean(dice))
            print(f"saved model, {name}: {np.mean(dice):.3f} ({len(dice)} images)", flush=True)
        for start, scale, chunks in arms:
            trainer.set_global_state(saved["global"])
            trainer.set_local_state(saved["local"] if start == "saved" else fresh)
            arm = {"start": start, "lr_scale": scale, "chunks": []}
            done = 0
            for n in chunks:
                t0, stream = time.perf_counter(), Stream(*PROBE_STREAM, done * trainer.cfg.train.batch_size)
                with trainer.lr_scaled(scale):
                    stats = trainer.run_local_phase(steps=n, stream=stream)
                done += n
                val = float(trainer.evaluate("val", "personalized")["dice"])
                arm["chunks"].append({"steps": done, "val": val, "seconds": time.perf_counter() - t0,
                                      **{k: float(stats[k]) for k in ("loss", "seg", "kd") if k in stats}})
                print(f"{start} experts, lr x{scale:.3g}, +{done} steps: val {val:.3f}, training loss "
                      f"{stats['loss']:.3f}", flush=True)
            out["arms"].append(arm)
    return out


def merge_record(stored: dict | None, new: dict, where: str) -> dict:
    """``new`` added to an earlier record of the same model: its saved scores join the stored ones, an arm
    run again (same start, scale and chunks) takes its earlier result's place, other arms are appended.

    The saved scores tell the models apart: the two runs must share a split (``--splits val`` by
    default), and a shared split scored differently (beyond 1e-4, more than a rescoring of one model
    moves) means another model under the same name. Both are refused with an error naming ``where``.
    """
    if stored is None:
        return new
    stored_saved, new_saved = stored.get("saved", {}), new.get("saved", {})
    shared = [split for split in new_saved if split in stored_saved]
    if not shared:
        raise ValueError(f"{where}: this run scores {sorted(new_saved)} and the stored record {sorted(stored_saved)}; "
                         "with no split in common it cannot tell the models apart: add one to --splits")
    for split in shared:
        if abs(stored_saved[split] - new_saved[split]) > 1e-4:
            raise ValueError(f"{where}: the stored record scores {split} {stored_saved[split]:.6f}, this model "
                             f"{new_saved[split]:.6f}: another model under the same name; write to another --out")

    def arm_key(arm: dict) -> tuple:
        return arm["start"], arm["lr_scale"], tuple(c["steps"] for c in arm["chunks"])

    rerun = {arm_key(a): a for a in new.get("arms", [])}
    arms = [rerun.pop(arm_key(a), a) for a in stored.get("arms", [])]
    return {**stored, **{k: v for k, v in new.items() if k not in ("saved", "arms")},
            "saved": {**stored_saved, **new_saved}, "arms": arms + list(rerun.values())}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="a saved site model folder (named after its site)")
    parser.add_argument("--data-root", type=Path, default=Path("../shared/data/polyp"))
    parser.add_argument("--out", type=Path, required=True, help="where expert_steps.json goes (the row's folder)")
    parser.add_argument("--splits", default="val", help="comma list of train, val, test to score the saved model on")
    parser.add_argument("--arm", action="append", default=[], dest="arms", help="START,SCALE,CHUNKS (repeatable)")
    args = parser.parse_args(argv)
    splits = [s for s in args.splits.split(",") if s]
    if bad := [s for s in splits if s not in SPLITS]:
        parser.error(f"--splits: {bad} not among {SPLITS}")
    try:
        arms = [parse_arm(a) for a in args.arms]
    except ValueError as e:
        parser.error(str(e))
    result = expert_steps(args.model, args.data_root / args.model.name, splits, arms)
    path = args.out / "expert_steps.json"
    stored = json.loads(path.read_text()) if path.exists() else {}
    key = f"{args.model.parent.name}/{args.model.name}"
    stored[key] = merge_record(stored.get(key), result, f"{path} [{key!r}]")
    path.write_text(json.dumps(stored, indent=1))
    print(f"written to {path}")


if __name__ == "__main__":
    main()
