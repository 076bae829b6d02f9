"""Benchmark: pFedSAM against baselines on the same sites, splits, backbone, step budget and seeds.

Every federated row is a job variant (``pfedsam job list``) run by ``engine.federate``: the
job's own round, final personalization and aggregation rules, all sites in one process (see
``benchmarks/engine.py`` and its test against the FLARE simulator). Each centre is scored on
its whole test split at every image's original resolution: Dice, HD95, Dice over the frames
that contain a polyp, and the share of empty frames where something was predicted. Each row also
stores every image's predicted area, so the report can apply the size rule for frames without a
polyp (``metrics.size_rule_threshold``, chosen per run and centre on validation) to every row alike.

    python benchmarks/run.py --search --methods pfedsam,fedavg,fedprox,ditto,local-plain,local
    python benchmarks/run.py --seeds 0,1,2 --methods pfedsam,fedavg,local-plain,local,ditto,centralized
    python benchmarks/run.py --methods zero-shot,fedavg-ft,fedrep,fedprox,pfedsam-nokd,pfedsam-nolmoe,pfedsam-joint
    python benchmarks/run.py --methods '' --unseen all
    python benchmarks/run.py --methods pfedsam --variant train.local_steps=4,train.global_steps=20
    python benchmarks/run.py --report-only

(``benchmarks/polyp.sh`` makes all of these calls.) Every run is stored in
``--out/results.json`` under ``method|prompt|seed|setting`` as soon as it finishes, and is
not run again (``--force`` reruns), so a long benchmark resumes run by run across sessions.
A federated run also saves its state after every round (``work/<row>/rounds.pt``, dropped once
the row is recorded): killed mid-run, the same command goes on after the last finished round
and gives the uninterrupted run's numbers; the row lists the rounds it resumed at and its wall
time adds up its parts. A checkpoint of other code, settings, packages or another CPU or
precision is refused, not mixed into the row.

Fair tuning (``--search``): each main method is run at seed 0 with the learning rates of what
it trains scaled by 0.3, 1 and 3 (while the best scale is the largest or smallest tried, one
more rung of 0.03, 0.1, ..., 10, 30 beyond it), then its own knob (KD weight, FedProx mu, Ditto
lambda) at two more values with the best scale; the setting with the best mean validation Dice (after
the final personalization, mean over centres) is the method's setting. Rows of other
methods reuse a reference method's setting (ablations: pFedSAM's; FedAvg+FT, FedRep and
centralized: FedAvg's). A row whose method has no finished search runs the default setting
and is labelled "untuned".

Design variants (``--variant``, dotted ``key=value`` pairs of the job's settings): each listed
method runs at its chosen setting with these overrides on top, stored as ``setting+variant``.
A variant must spend the same optimizer steps per site as the method's own setting (one budget
for every method). Variant rows never enter the main table; their own table compares each
with the row it varies on validation (paired over validation images, same seed).

Unseen centres (``--unseen``): for each left-out centre, pFedSAM and FedAvg are trained on the
other centres; the left-out centre is scored with both global models, after a fresh L-MoE
is adapted on pFedSAM's global model, and after FedAvg's global model is fine-tuned there:
both adaptations get the local phase's steps of a whole run (rounds x local steps + final steps),
each with the learning rate best on the centre's validation split, searched as every method's
(0.3, 1, 3, extended one rung at a time while the best is at an edge).
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine import federate  # noqa: E402
from latency import cpu_name  # noqa: E402
from stats import interval_text, mean_std_text, paired_difference, verdict  # noqa: E402

from pfedsam.config import PFedSAMConfig, load_config  # noqa: E402
from pfedsam.data import discover_sites, load_split  # noqa: E402
from pfedsam.jobs import VARIANTS, variant_config  # noqa: E402
from pfedsam.model import ParamKind, build_pfedsam  # noqa: E402
from pfedsam.train import SiteTrainer, plan_steps, run_final, run_round  # noqa: E402
from pfedsam.train.encoder_runtime import bf16_autocast, resolve_runtime  # noqa: E402
from pfedsam.train.metrics import apply_size_rule, size_rule_empties, size_rule_threshold  # noqa: E402
from pfedsam.train.rounds import has_one_model, lr_scale_nearness  # noqa: E402
from pfedsam.train.site import select_device  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]  # the repository: its jobs/ and results/ (the code is the installed package)
MAIN_JOB = ROOT / "jobs" / "pfedsam"
BASE = load_config(MAIN_JOB / "app" / "config" / "pfedsam.yaml")

# Rows in table order. "local-plain": each site trains its own decoder, no experts; "local": the
# same with an L-MoE and pFedSAM's decoupled schedule; "fedrep": shared body, personal mask head.
FEDERATED = ["local-plain", "local", "fedavg", "fedprox", "fedavg-ft", "ditto", "fedrep", "pfedsam",
             "pfedsam-nokd", "pfedsam-nolmoe", "pfedsam-joint"]
ORDER = ["zero-shot", *FEDERATED, "centralized"]
BASELINES = ["local-plain", "local", "fedavg", "fedprox", "fedavg-ft", "ditto", "fedrep", "centralized"]
# The tuning search: the learning-rate scales every searched method tries, then its own knob. While the
# best scale is at the edge of those tried, the search goes one rung further along the ladder (the optimum
# must lie inside the range searched, for every method alike).
LR_LADDER = (0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0)
LR_SCALES = LR_LADDER[2:5]  # 0.3, 1, 3: where every search starts
KNOBS: dict[str, tuple[str, tuple[float, ...]] | None] = {
    "pfedsam": ("kd_weight", (0.3, 3.0)), "fedprox": ("prox_mu", (0.001, 0.1)),
    "ditto": ("ditto_lambda", (0.03, 0.3)), "fedavg": None, "local-plain": None, "local": None,
}
SETTING_OF = {"pfedsam-nokd": "pfedsam", "pfedsam-nolmoe": "pfedsam", "pfedsam-joint": "pfedsam",
              "fedavg-ft": "fedavg", "fedrep": "fedavg", "centralized": "fedavg"}
OVERLAY_METHODS = ("pfedsam", "fedavg", "ditto", "local-plain")
BUDGET_KEYS = ("data_root", "backbone", "checkpoint", "image_size", "batch_size", "rounds", "local_steps",
               "global_steps", "final_steps", "max_train", "max_eval", "device")
PROTOCOL = 3  # 3: in-process job rounds, whole test splits at original resolution, per-image scores
SCORING = ("each image at its original resolution (logits of the valid region resized back, then thresholded); "
           "truth and prediction both empty: Dice 1, HD95 0; exactly one empty: Dice 0, HD95 = the image's "
           "diagonal; 'polyp Dice' = mean Dice over frames whose truth is not empty; 'empty FP' = share of "
           "empty frames with a non-empty prediction")


# -- settings -------------------------------------------------------------------------------------------
def budget(args: argparse.Namespace) -> dict:
    return {k: str(getattr(args, k)) for k in BUDGET_KEYS}


def settings(args: argparse.Namespace, seed: int, prompt: str) -> dict:
    """YAML overrides shared by every row: data, budget, seed, prompt, one feature cache."""
    return {
        "backbone": args.backbone, "checkpoint": args.checkpoint, "image_size": args.image_size,
        "data": {"root": str(args.data_root), "max_train": args.max_train, "max_eval": args.max_eval, "sites": {}},
        "train": {"cache": "disk", "cache_dir": str(args.cache_dir or args.out / "feature_cache"),
                  "local_steps": args.local_steps, "global_steps": args.global_steps, "final_steps": args.final_steps,
                  "batch_size": args.batch_size, "seed": seed, "device": args.device,
                  "num_threads": os.cpu_count() or 1},  # sites run one after another: all cores
        "federation": {"rounds": args.rounds, "min_clients": 1, "export_format": "none", "wait_after_min_s": 0},
        "prompt": prompt,
        "eval": {"hd95": True, "resolution": "original"},
    }


def tag_of(setting: dict) -> str:
    """A setting's key in results.json, e.g. ``lr=1`` or ``lr=1,kd_weight=3``."""
    return ",".join(f"{k}={v:g}" for k, v in setting.items())


def parse_overrides(text: str, option: str = "--variant") -> dict[str, object]:
    """``"train.kd_weight=0,lmoe.hidden=64"`` -> ``{"train.kd_weight": 0, "lmoe.hidden": 64}``; ``default`` -> {}.
    A list is one value: ``train.final_lr_scales=[0.3,1,3]``. ``option`` is the flag an error names."""
    if text.strip() == "default":
        return {}
    out: dict[str, object] = {}
    for part in re.split(r",(?![^\[]*\])", text):  # not the commas of a list: train.final_lr_scales=[0.3,1,3]
        key, sep, value = part.partition("=")
        key = key.strip()
        if not sep or not key or "." not in key:
            raise ValueError(f"{option} {text!r}: expected dotted key=value pairs (e.g. train.kd_weight=0), "
                             f"got {part!r}")
        out[key] = yaml.safe_load(value)
    return out


def variant_tag(variant: dict[str, object]) -> str:
    """The text ``parse_overrides`` reads back (a list without spaces: ``[0.3,1,3]``)."""
    def text(v: object) -> str:
        return "[" + ",".join(f"{x:g}" for x in v) + "]" if isinstance(v, list) else str(v)
    return ",".join(f"{k}={text(v)}" for k, v in variant.items()) or "default"


def row_tag(setting: dict, variant: dict | None = None) -> str:
    """A run's setting in its results.json key: ``lr=3``, or ``lr=3+train.local_steps=4,...`` for a variant."""
    return tag_of(setting) + (f"+{variant_tag(variant)}" if variant else "")


def nested(variant: dict[str, object]) -> dict[str, dict]:
    """Dotted keys -> the nested overrides ``make_config`` merges (one level: ``section.key``)."""
    out: dict[str, dict] = {}
    for key, value in variant.items():
        section, _, name = key.partition(".")
        out.setdefault(section, {})[name] = value
    return out


def overrides_of(setting: dict) -> dict:
    """YAML overrides of a setting: ``lr`` scales both learning rates, other keys are ``train.*``."""
    train = {k: float(v) for k, v in setting.items() if k != "lr"}
    scale = float(setting.get("lr", 1.0))
    train.update(lr_global=BASE.train.lr_global * scale, lr_local=BASE.train.lr_local * scale)
    return {"train": train}


def knob_grid(method: str, best_lr: float) -> list[dict]:
    """The settings the search tries for ``method`` after its learning rate: its knob's values at ``best_lr``."""
    knob = KNOBS.get(method)
    return [] if knob is None else [{"lr": best_lr, knob[0]: v} for v in knob[1]]


def best_setting(tried: dict[str, tuple[float, dict]]) -> tuple[float, dict]:
    """The (val Dice, setting) with the best validation Dice; a tie goes to the one nearest the defaults."""
    def nearness(setting: dict) -> float:
        return lr_scale_nearness(setting["lr"]) - (len(setting) - 1)  # each changed knob counts as further

    return max(tried.values(), key=lambda v: (v[0], nearness(v[1])))


def edge_step(tried: dict[str, tuple[float, dict]]) -> float | None:
    """The lr scale to try next when the best one so far is the largest or smallest tried; else None.

    Arguments:
      tried: tag -> (validation Dice, setting) of the learning-rate points run so far.
    """
    lrs = sorted(setting["lr"] for _, setting in tried.values())
    best = best_setting(tried)[1]["lr"]
    rung = LR_LADDER.index(best)
    if best == lrs[-1] and rung + 1 < len(LR_LADDER):
        return LR_LADDER[rung + 1]
    if best == lrs[0] and rung > 0:
        return LR_LADDER[rung - 1]
    return None


def search_lr(run: Callable[[dict], float]) -> dict[str, tuple[float, dict]]:
    """The learning-rate part of every search: ``LR_SCALES``, extended along ``LR_LADDER`` while the best
    is at an edge. ``run({"lr": scale})`` returns that point's validation Dice; returns tag -> (Dice, setting)."""
    tried: dict[str, tuple[float, dict]] = {}

    def attempt(lr: float) -> None:
        tried[tag_of({"lr": lr})] = (run({"lr": lr}), {"lr": lr})

    for lr in LR_SCALES:
        attempt(lr)
    while (lr := edge_step(tried)) is not None:
        attempt(lr)
    return tried


def search(method: str, run: Callable[[dict], float]) -> dict:
    """One method's tuning search; ``run(setting)`` returns that run's validation Dice (recorded or new).

    The lr scales (extended along ``LR_LADDER`` while the best is at an edge), then the method's knob at
    the best scale. Returns the ``results["tuned"]`` entry: the chosen tag and setting and every point tried.
    """
    tried = search_lr(run)
    for setting in knob_grid(method, best_setting(tried)[1]["lr"]):
        tried[tag_of(setting)] = (run(setting), setting)
    val, setting = best_setting(tried)
    return {"tag": tag_of(setting), "setting": setting, "val_dice": val,
            "tried": {t: v for t, (v, _) in tried.items()}}


def pending_lr(tuned: dict) -> float | None:
    """The lr scale a recorded search still has to try (one recorded before the ladder rule), or None."""
    lr_points = {t: (v, {"lr": float(t.removeprefix("lr="))})
                 for t, v in tuned.get("tried", {}).items() if "," not in t}
    return edge_step(lr_points) if lr_points else None


def tuned_record(results: dict, method: str) -> dict | None:
    """The recorded search whose setting rows of ``method`` use (its own, or its reference method's)."""
    return results.get("tuned", {}).get(SETTING_OF.get(method, method))


def adopt_tuned(results: dict, source: Path) -> list[str]:
    """Take, from another results.json, the search records of methods ``results`` has not searched.

    A budget study (more rounds, say) reruns rows at the settings that the protocol's own search chose,
    instead of searching again; each record taken says where it came from (``from``). Returns the
    methods taken.
    """
    try:
        tuned = json.loads(source.read_text())["tuned"]
        taken = {m: {**record, "setting": dict(record["setting"]), "from": str(source)}
                 for m, record in tuned.items() if m not in results["tuned"]}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"--tuned-from {source}: no search records to take ({type(exc).__name__}: {exc})") from exc
    results["tuned"].update(taken)
    return list(taken)


def chosen_setting(results: dict, method: str) -> tuple[dict, bool]:
    """(the setting a row of ``method`` runs with, whether it came from a finished search)."""
    tuned = tuned_record(results, method)
    if tuned is None:
        return {"lr": 1.0}, False
    setting = dict(tuned["setting"])
    cfg = variant_config(method if method in ORDER[1:-1] else "fedavg", MAIN_JOB, {})
    if "kd_weight" in setting and cfg.train.kd_weight == 0:  # an ablation without KD keeps it off
        del setting["kd_weight"]
    return setting, True


def make_config(method: str, args: argparse.Namespace, seed: int, prompt: str, setting: dict, **extra):
    """The settings of job variant ``method`` for this benchmark, one setting of the search and ``extra``."""
    merged = settings(args, seed, prompt)
    for part in (overrides_of(setting), extra):
        for key, value in part.items():
            merged[key] = {**merged.get(key, {}), **value} if isinstance(value, dict) else value
    return variant_config(method, MAIN_JOB, merged)


def variant_of(method: str, args: argparse.Namespace, seed: int, prompt: str, setting: dict, variant: dict,
               option: str = "--variant"):
    """``make_config`` with a design variant's dotted overrides on top; refused, naming ``option``, if a key is
    not the job's or if it changes the budget."""
    try:
        cfg = make_config(method, args, seed, prompt, setting, **nested(variant))
    except ValueError as exc:
        raise ValueError(f"{option} {variant_tag(variant)}: {exc}") from exc
    own, plan = plan_steps(make_config(method, args, seed, prompt, setting)), plan_steps(cfg)
    if (plan.total_steps, plan.total_images) != (own.total_steps, own.total_images):
        raise ValueError(f"{option} {variant_tag(variant)}: {plan.total_steps} optimizer steps and "
                         f"{plan.total_images} images per site, but {method}'s budget is {own.total_steps} and "
                         f"{own.total_images}; keep both equal (e.g. move steps between the phases)")
    return cfg


# Where and with what a run executed, not what it trained: left out of a row's recorded settings.
MACHINE_KEYS = ("data.root", "data.synthetic_dir", "train.cache_dir", "train.cache_max_gb", "train.device",
                "train.num_threads", "checkpoint")


def flat_settings(cfg: PFedSAMConfig) -> dict[str, object]:
    """A resolved config as ``{"section.key": value}``, without ``MACHINE_KEYS``: what a row trained."""
    out: dict[str, object] = {}
    for key, value in cfg.to_dict().items():
        if isinstance(value, dict):  # one level of sections, as in the YAML
            out.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            out[key] = value
    return {k: v for k, v in out.items() if k not in MACHINE_KEYS}


CODE_DEFAULTS = flat_settings(PFedSAMConfig())  # what a key meant before a row's code had it


def settings_of(method: str, args: argparse.Namespace, seed: int, prompt: str, setting: dict,
                variant: dict | None = None) -> dict[str, object]:
    """The settings row ``method`` trains with (zero-shot and centralized: FedAvg's site settings)."""
    if method in FEDERATED:
        return flat_settings(variant_of(method, args, seed, prompt, setting, variant or {}))
    return flat_settings(make_config("fedavg", args, seed, "box" if method == "zero-shot" else prompt, setting))


def inert_keys(settings: dict[str, object]) -> set[str]:
    """Keys that cannot change what a row trains: where the L-MoE goes in a model without experts;
    whether the global passes read a second cached embedding when the cache already holds it (no
    experts, or experts on the embedding); when the local phase starts in a model with nothing
    personal (no experts, no local head, not Ditto)."""
    if settings.get("lmoe.num_experts") != 0:
        return {"train.global_from_embedding"} if settings.get("lmoe.placement") == "neck" else set()
    inert = {k for k in settings if k.startswith("lmoe.") and k != "lmoe.num_experts"} | {"train.global_from_embedding"}
    if settings.get("decoder_head") != "local" and settings.get("federation.mode") != "ditto":
        inert.add("train.local_start")
    return inert


def as_recorded(recorded: dict[str, object]) -> dict[str, object]:
    """A row's settings with each key added to the code after it was recorded at its code default: the
    project's rule for a new key is a default that keeps the old behaviour."""
    return {**{k: v for k, v in CODE_DEFAULTS.items() if k not in recorded}, **recorded}


def changed_keys(recorded: dict[str, object], now: dict[str, object]) -> list[str]:
    """Keys whose value differs between a recorded row (``as_recorded``) and what the job resolves to now;
    ``inert_keys`` of both are not counted, nor keys the code no longer has."""
    recorded = as_recorded(recorded)
    skip = inert_keys(recorded) & inert_keys(now)
    return [k for k in sorted(recorded.keys() & now.keys() - skip)
            if json.dumps(recorded[k], default=str) != json.dumps(now[k], default=str)]


def changed_settings(recorded: dict[str, object], now: dict[str, object]) -> list[str]:
    """``changed_keys`` with both values, for an error message."""
    return [f"{k}: recorded {recorded[k]!r}, now {now[k]!r}" if k in recorded else
            f"{k}: not recorded (the code default {CODE_DEFAULTS[k]!r}), now {now[k]!r}"
            for k in changed_keys(recorded, now)]


def setting_of_tag(tag: str) -> dict[str, float]:
    """The setting part of a row's tag as ``tag_of`` wrote it: ``lr=3,kd_weight=0.3+...`` -> {lr: 3, kd_weight: 0.3}."""
    part = tag.partition("+")[0]
    return {k: float(v) for k, _, v in (x.partition("=") for x in part.split(","))} if part else {}


def retag(results: dict, args: argparse.Namespace) -> list[tuple[str, str]]:
    """Rename the rows of job variants after the job's defaults changed, so every key says what its
    row trained; returns the (old, new) keys.

    A row whose recorded settings differ from what its key gives with today's job gets the differing
    keys, with their recorded values, added to its variant part (``lr=3`` recorded with the former
    default placement -> ``lr=3+lmoe.placement=neck``). Then each row's variant part drops what only
    restates today's job (``+lmoe.placement=blocks`` once blocks is the default), for all seeds of a
    row together and only where the shorter key is free. The recorded settings are never touched;
    a key that would not reproduce them, or two rows on one key, is an error and nothing is renamed.
    """
    runs, renamed = results["runs"], []
    out: dict[str, dict] = {}

    def now(key: str) -> dict[str, object]:
        m, p, s, tag = key.split("|")
        variant = parse_overrides(tag.partition("+")[2]) if "+" in tag else {}
        return settings_of(m, args, int(s.removeprefix("seed")), p, setting_of_tag(tag), variant)

    for key, r in runs.items():
        m, p, s, tag = key.split("|")
        if m in VARIANTS and r.get("settings") and (diff := changed_keys(r["settings"], now(key))):
            variant = parse_overrides(tag.partition("+")[2]) if "+" in tag else {}
            recorded = as_recorded(r["settings"])  # what differs, less what the row's own design makes inert
            added = {k: recorded[k] for k in diff if k not in inert_keys(recorded)}
            key = f"{m}|{p}|{s}|{row_tag(setting_of_tag(tag), {**variant, **added})}"
        out.setdefault(key, [])
        out[key].append(r)
    if clash := [k for k, rows in out.items() if len(rows) > 1]:
        raise ValueError(f"retag: more than one row would be named {clash}; nothing renamed")
    rows = {k: v[0] for k, v in out.items()}
    shorter: dict[str, str] = {}
    for (m, p, tag), group in grouped_runs({"runs": rows}).items():
        if m in VARIANTS and "+" in tag:
            changes = dict(design_changes(m, tag))
            variant = {k: v for k, v in parse_overrides(tag.partition("+")[2]).items() if k in changes}
            short = row_tag(setting_of_tag(tag), variant)
            keys = {f"{m}|{p}|seed{s}|{tag}": f"{m}|{p}|seed{s}|{short}" for s, _ in group}
            if short != tag and not set(keys.values()) & (rows.keys() | set(shorter.values())):
                shorter |= keys
    rows = {shorter.get(k, k): v for k, v in rows.items()}
    old_keys = {id(r): k for k, r in runs.items()}
    for key, r in rows.items():
        if old_keys[id(r)] != key:
            if diff := changed_keys(r["settings"], now(key)):
                raise ValueError(f"retag: {key} would not reproduce the recorded settings ({', '.join(diff)}); "
                                 "nothing renamed")
            renamed.append((old_keys[id(r)], key))
    results["runs"] = rows
    # A search record (``tuned``) keeps its chosen setting and the tags it tried then; where its chosen
    # row was renamed, it says with which variant of today's job that search ran.
    for method, record in results.get("tuned", {}).items():
        for old, new in renamed:
            m, p, s, tag = new.split("|")
            was = old.split("|")[3].partition("+")
            if (m, p, s) == (method, "none", "seed0") and (was[0], was[2]) == (
                    record["tag"], record.get("searched_with", "")):
                record["searched_with"] = tag.partition("+")[2]
    return renamed


CODE_DIRS = ("custom", "jobs", "benchmarks")  # a row's recorded code is dirty when these differ from its commit
CODE_PATHSPECS = tuple(f":(top){d}" for d in CODE_DIRS)  # the same folders from anywhere in the repository
# What a checkpoint may resume with: the package, the job and the benchmark modules run.py loads (a test keeps
# this list equal to run.py's imports). The other scripts under benchmarks/ (screen.py, experts_kept.py, ...)
# do not run in a row, so editing them leaves its checkpoint valid.
ROW_CODE = ("custom", "jobs", "benchmarks/run.py", "benchmarks/engine.py", "benchmarks/stats.py",
            "benchmarks/latency.py")


def _git(root: Path, *args: str) -> str:
    """``git args`` in ``root``: its stripped output, or "" when git fails there."""
    out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=30)
    return out.stdout.strip() if out.returncode == 0 else ""


def code_version(root: Path = Path(__file__).parent) -> str:
    """The commit a row ran (``-dirty`` when the code, the job or the benchmark differed from it), or
    ``unknown`` outside git: a change of arithmetic (say, a faster decoder path) can then be told
    apart from a change of seed. Edits to docs or results do not count."""
    try:
        commit = _git(root, "rev-parse", "--short=12", "HEAD")
        dirty = _git(root, "status", "--porcelain", "--untracked-files=no", "--", *CODE_PATHSPECS)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (commit + ("-dirty" if dirty else "")) if commit else "unknown"


def code_tree(root: Path = Path(__file__).parent) -> str:
    """What a round checkpoint may be resumed with: the git objects of ``ROW_CODE`` plus a digest of their
    uncommitted changes. Unlike ``code_version`` a results or docs commit, or an edit to a script a row
    does not import, leaves it as it was, so a row resumes across such commits; ``unknown`` outside git."""
    try:
        trees = _git(root, "rev-parse", *(f"HEAD:{d}" for d in ROW_CODE))
        diff = _git(root, "diff", "HEAD", "--", *(f":(top){d}" for d in ROW_CODE))
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if not trees:
        return "unknown"
    return " ".join(t[:12] for t in trees.split()) + (f" +{hashlib.sha256(diff.encode()).hexdigest()[:12]}"
                                                      if diff else "")


# Packages whose versions can change a row's numbers (kernels, the ONNX cache fill, augmentation, resizing).
# requirements.txt leaves most of them open, and a row from another machine and install left the earlier rows'
# trajectory from round 1 on (docs/results.md): every row records what it ran with, requirements-lock.txt pins it.
NUMERIC_PACKAGES = ("torch", "torchvision", "onnxruntime", "onnx", "numpy", "monai", "scipy", "pillow", "timm")


def package_versions(names: tuple[str, ...] = NUMERIC_PACKAGES) -> dict[str, str]:
    """Installed version of each package in ``names`` ("not installed" where it is absent)."""
    out = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def machine_of(settings: dict[str, object], device: str) -> dict[str, object]:
    """Where a row ran and in what arithmetic: ``train.amp`` means bf16 only where the hardware has it,
    so the same settings give float32 rows on one CPU and bf16 rows on another. Also what filled the
    feature cache (ONNX Runtime or PyTorch) and the versions of the packages that shape the numbers."""
    dev = select_device(device)
    bf16, _ = bf16_autocast(bool(settings.get("train.amp", True)), dev)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else cpu_name()
    fill, _ = resolve_runtime(str(settings.get("train.encoder_runtime", "auto")),
                              str(settings.get("backbone", "litemedsam")), dev)
    return {"device": name, "precision": "bf16" if bf16 else "float32", "cache_fill": fill,
            "packages": package_versions()}


# -- scoring --------------------------------------------------------------------------------------------
def test_scores(trainer: SiteTrainer, personal: dict | None, which: str = "personalized") -> dict:
    """Whole-test-split scores at original resolution, with the per-image Dice for paired statistics."""
    with trainer.global_swapped(personal if which == "personalized" else None):
        r = trainer.evaluate("test", which, per_image=True)
    images = r.pop("images")
    return {**r, "images": float32_scores(i["dice"] for i in images), "ids": [i["id"] for i in images],
            **size_rule_inputs(images)}


def float32_scores(values: Iterable[float]) -> list[float]:
    """Per-image scores as the shortest decimals that read back as the same float32 values.

    The scores are computed in float32; written as doubles they took about twice the room in results.json,
    which holds about a hundred rows of a thousand images each.
    """
    return [float(str(np.float32(v))) for v in values]


def size_rule_inputs(images: list[dict], prefix: str = "") -> dict[str, list]:
    """What the size rule needs besides the per-image Dice: predicted areas and empty truths."""
    return {f"{prefix}pred_area": [round(i["pred_area"], 7) for i in images],
            f"{prefix}truth_empty": [bool(i["truth_empty"]) for i in images]}


def site_row(trainer: SiteTrainer, personal: dict | None, val: dict, with_global: bool = True,
             global_state: dict | None = None, val_global: dict | None = None) -> dict:
    """Test scores of a site's model (and of the global one), with ``val``, its validation result
    (``evaluate(..., per_image=True)``): the mean, and per image what pairs variants and chooses the size rule.
    ``global_state``: G(T) where the site's own global parameters no longer hold it (FedAvg + fine-tune).
    ``val_global``: G(T)'s validation result, kept with its test scores (whether a site should keep its
    experts is read off the two validation scores, ``benchmarks/experts_kept.py``)."""
    row = test_scores(trainer, personal, "personalized")
    row["val_dice"] = val["dice"]
    row["val_images"] = float32_scores(i["dice"] for i in val["images"])
    row.update(size_rule_inputs(val["images"], "val_"))
    if with_global:  # one model only (no personal part): its scores serve as both
        if global_state is not None:
            g = test_scores(trainer, global_state, "personalized")  # G(T) swapped in for the fine-tuned weights
        else:
            g = row if has_one_model(trainer, personal) else test_scores(trainer, None, "global")
        # the size rule's inputs stay with the personalized row: only it has validation areas to choose on
        row["global"] = {k: v for k, v in g.items()
                         if k not in ("ids", "truth_empty", "pred_area") and not k.startswith("val_")}
        if val_global is not None:
            row["global"].update(val_dice=val_global["dice"],
                                 val_images=float32_scores(i["dice"] for i in val_global["images"]))
    return row


# -- rows -----------------------------------------------------------------------------------------------
ROUND_CHECKPOINT = "rounds.pt"  # a federated row's state after its last finished round, in its work folder


def row_key(method: str, prompt: str, seed: int, tag: str) -> str:
    """A row's key in results.json (and in its round checkpoint's fingerprint)."""
    return f"{method}|{prompt}|seed{seed}|{tag}"


def work_dir(args: argparse.Namespace, method: str, prompt: str, seed: int, tag: str) -> Path:
    """The folder of one federated row's sites and its round checkpoint (gitignored, never committed)."""
    return args.out / "work" / f"{method}-{prompt}-s{seed}-{tag}"


def run_method(method: str, args: argparse.Namespace, sites: list[str], seed: int, prompt: str,
               setting: dict, variant: dict | None = None, *, key: str, work: Path) -> dict:
    """One federated run of job variant ``method`` at all ``sites``, scored on val (selection) and test.

    Arguments:
      variant: dotted overrides on top of ``setting`` (``--variant``); it must keep the budget.
      key: the row's key in results.json (``row_key``), which its round checkpoint must hold.
      work: the row's folder (``work_dir``): its sites' files and its round checkpoint.
    """
    cfg = variant_of(method, args, seed, prompt, setting, variant or {})
    tag = row_tag(setting, variant)  # for the log and the saved models' folder
    settings_now = flat_settings(cfg)
    fingerprint = {"row": key, "sites": list(sites), "settings": settings_now,
                   "code": code_tree(), "machine": machine_of(settings_now, args.device)}
    fed = federate(lambda s: SiteTrainer(cfg, s, site_dir=args.data_root / s, workdir=work / s), sites,
                   final_split="val", log=lambda m: print(f"  [{method} s{seed} {tag}] {m}", flush=True),
                   checkpoint=work / ROUND_CHECKPOINT, fingerprint=fingerprint)
    has_global = method not in ("fedrep",)  # FedRep's body alone has no head: no global model to score
    # FedAvg + fine-tune fine-tunes each site's global parameters in place: its G(T) is the server's last state
    g_state = fed.global_state if cfg.federation.final_finetune else None
    per_site = {}
    for s, t in fed.trainers.items():
        final = fed.final[s]  # its val: G(T) scored before the final personalization, the site's model after
        per_site[s] = site_row(t, fed.personal[s], final["val"]["personalized"], has_global, g_state,
                               final["val"]["global"])
        if final["lr_scale"] is not None:  # train.final_lr_scales: the scale kept, each tried
            per_site[s]["final_lr_scale"] = final["lr_scale"]
            per_site[s]["val_dice_by_final_lr_scale"] = {f"{k:g}": v for k, v in final["val_by_lr_scale"].items()}
        if seed == 0 and method in OVERLAY_METHODS:
            with t.global_swapped(fed.personal[s]):
                t.save_model(args.out / "work" / "models" / f"{method}-{tag}" / s)
    busy = sum(e["busy_s"] for entry in fed.rounds for e in entry.values())
    images = sum(e["images"] for entry in fed.rounds for e in entry.values())
    plan = plan_steps(cfg)
    n_global = sum(v.size for v in fed.global_state.values())
    return {
        "per_site": per_site, "val_dice": float(np.mean([r["val_dice"] for r in per_site.values()])),
        "val_curve": [float(np.mean([e["val"]["personalized"]["dice"] for e in entry.values()]))
                      for entry in fed.rounds],
        "val_curve_global": [float(np.mean([e["val"]["global"]["dice"] for e in entry.values()]))
                             for entry in fed.rounds],
        "steps_per_site": plan.total_steps, "images_per_site": plan.total_images,
        "train_images_per_s": images / busy if busy else None, "wall_s": fed.seconds,
        "bytes_per_round_per_site": 0.0 if method.startswith("local") else 4.0 * n_global,
        "rejected": [list(r) for r in fed.rejected],
        **({"resumed_at_rounds": fed.resumed_at} if fed.resumed_at else {}),
    }


def run_zero_shot(args: argparse.Namespace, sites: list[str], seed: int, prompt: str, setting: dict) -> dict:
    """The pretrained backbone, no training, ground-truth box prompts (a reference, not a method)."""
    cfg = make_config("fedavg", args, seed, "box", setting)
    per_site = {}
    for s in sites:
        t = SiteTrainer(cfg, s, site_dir=args.data_root / s, workdir=args.out / "work" / "zero-shot" / s)
        per_site[s] = site_row(t, None, t.evaluate("val", "global", per_image=True), with_global=False)
    return {"per_site": per_site, "val_dice": float(np.mean([r["val_dice"] for r in per_site.values()])),
            "bytes_per_round_per_site": 0.0, "steps_per_site": 0, "images_per_site": 0}


def run_centralized(args: argparse.Namespace, sites: list[str], seed: int, prompt: str, setting: dict) -> dict:
    """One model on the pooled training images (symlinks in a temp folder) with all sites' steps together."""
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
        split["test"] = [split["val"].pop()]  # unused (a split may not be empty): each centre's test split is scored
        (pooled / "split.json").write_text(json.dumps(split))
        n = len(sites)  # the pooled model gets the steps of all sites together
        cfg = make_config("fedavg", args, seed, prompt, setting,
                          train={"local_steps": n * args.local_steps, "global_steps": n * args.global_steps,
                                 "final_steps": n * args.final_steps},
                          data={"max_train": 0, "max_eval": 0})  # already limited per centre
        start = time.perf_counter()
        pool = SiteTrainer(cfg, "pooled", site_dir=pooled, workdir=args.out / "work" / "centralized")
        pool.warm_cache(("train", "val"))
        results = [run_round(pool, rnd, evaluate=False) for rnd in range(cfg.federation.rounds)]
        final = run_final(pool, split="val")  # nothing personal: the last round trained the final share
        state = pool.get_global_state()
        wall = time.perf_counter() - start
        plan = plan_steps(cfg)
    site_cfg = make_config("fedavg", args, seed, prompt, setting)
    per_site = {}
    for s in sites:
        t = SiteTrainer(site_cfg, s, site_dir=args.data_root / s, workdir=args.out / "work" / "centralized" / s)
        t.set_global_state(state)
        per_site[s] = site_row(t, None, t.evaluate("val", "global", per_image=True), with_global=False)
    busy = sum(p["seconds"] for r in results for p in r.phases.values())
    return {"per_site": per_site, "val_dice": float(np.mean([r["val_dice"] for r in per_site.values()])),
            "pooled_val_dice": final.val["global"]["dice"], "wall_s": wall, "bytes_per_round_per_site": None,
            "steps_per_site": plan.total_steps / n, "images_per_site": plan.total_images / n,
            "train_images_per_s": sum(r.images for r in results) / busy if busy else None}


def _adapt(method: str, lr_key: str, glob: dict, args: argparse.Namespace, centre: str, seed: int, prompt: str,
           steps: int) -> dict:
    """The final personalization of ``method`` at ``centre`` from ``glob`` with ``steps`` steps, at the
    learning-rate scales of every search (``search_lr``: extended while the best is at an edge); the one
    best on the centre's validation split is scored on test."""
    adapted: dict[float, tuple[SiteTrainer, dict]] = {}

    def adapt(setting: dict) -> float:
        scale = setting["lr"]
        cfg = make_config(method, args, seed, prompt, setting, train={"final_steps": steps})
        t = SiteTrainer(cfg, centre, site_dir=args.data_root / centre,
                        workdir=args.out / "work" / f"unseen-{centre}" / f"{method}-{scale:g}")
        t.set_global_state(glob)
        final = run_final(t, split="val")
        adapted[scale] = (t, final.personal)
        return final.val["personalized"]["dice"]

    tried = search_lr(adapt)
    t, personal = adapted[best_setting(tried)[1]["lr"]]
    return {**{k: v for k, v in test_scores(t, personal).items() if k != "ids"}, lr_key: getattr(t.cfg.train, lr_key),
            "val_dice_by_lr_scale": {f"{setting['lr']:g}": v for v, setting in tried.values()}}


def run_unseen(centre: str, args: argparse.Namespace, sites: list[str], seed: int, prompt: str,
               results: dict) -> dict:
    """pFedSAM and FedAvg trained on every other centre, then ``centre`` scored before and after adaptation."""
    train_sites = [s for s in sites if s != centre]
    out: dict = {"train_sites": train_sites, "seed": seed}
    steps = args.rounds * args.local_steps + args.final_steps
    out["adapt_steps"] = steps
    globs = {}
    for method in ("pfedsam", "fedavg"):
        setting, tuned = chosen_setting(results, method)
        cfg = make_config(method, args, seed, prompt, setting)
        work = args.out / "work" / f"unseen-{centre}" / method
        fed = federate(lambda s, cfg=cfg, work=work: SiteTrainer(cfg, s, site_dir=args.data_root / s,
                                                                  workdir=work / s), train_sites,
                       log=lambda m, method=method: print(f"  [unseen {centre} {method}] {m}", flush=True))
        globs[method] = fed.global_state
        out[f"{method}_setting"] = {"tag": tag_of(setting), "tuned": tuned}
        out[f"{method}_seen_mean_dice"] = float(np.mean([f["val"]["personalized"]["dice"]
                                                         for f in fed.final.values()]))
        t = SiteTrainer(make_config(method, args, seed, prompt, setting), centre,
                        site_dir=args.data_root / centre, workdir=work / centre)
        t.set_global_state(fed.global_state)
        out[f"{method}_global"] = {k: v for k, v in test_scores(t, None, "global").items() if k != "ids"}
    out["pfedsam_fresh_lmoe"] = _adapt("pfedsam", "lr_local", globs["pfedsam"], args, centre, seed, prompt, steps)
    out["fedavg_finetuned"] = _adapt("fedavg-ft", "lr_global", globs["fedavg"], args, centre, seed, prompt, steps)
    return out


def full_finetune_bytes() -> dict:
    """Bytes one site would send per round: full fine-tuning FedAvg vs pFedSAM's global part."""
    out = {}
    for backbone, size in (("litemedsam", 256), ("vit_b", 1024), ("vit_l", 1024), ("vit_h", 1024)):
        model = build_pfedsam(load_config(path=MAIN_JOB / "app" / "config" / "pfedsam.yaml",
                                          overrides=[f"backbone={backbone}", f"image_size={size}"]), weights=False)
        counts = model.registry.counts(model)["params"]
        total = sum(counts.values())
        glob = counts[ParamKind.GLOBAL.value]
        out[backbone] = {"full_fp32": 4 * total, "full_fp16": 2 * total, "pfedsam_fp32": 4 * glob,
                         "pfedsam_fp16": 2 * glob}
        del model
    return out


# -- report ---------------------------------------------------------------------------------------------
def grouped_runs(results: dict) -> dict[tuple[str, str, str], list[tuple[int, dict]]]:
    """Recorded runs by row, (method, prompt, setting tag) -> (seed, run) in seed order (errors left out)."""
    groups: dict[tuple[str, str, str], list[tuple[int, dict]]] = {}
    for key, r in results["runs"].items():
        m, p, s, tag = key.split("|")
        if "per_site" in r:
            groups.setdefault((m, p, tag), []).append((int(s.removeprefix("seed")), r))
    return {k: sorted(v, key=lambda x: x[0]) for k, v in groups.items()}


def main_runs(results: dict, method: str, prompt: str = "none") -> list[dict]:
    """The runs of ``method`` with its chosen setting, one per seed, in seed order (errors left out)."""
    tag = tag_of(chosen_setting(results, method)[0])
    runs = [sr for (m, p, t), rows in grouped_runs(results).items()
            if m == method and (p == prompt or m == "zero-shot") and t == tag for sr in rows]
    return [r for _, r in sorted(runs, key=lambda x: x[0])]


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None or not np.isfinite(x) else format(x, spec)


def _site_mean(r: dict, key: str, sites: list[str], which: str | None = None) -> float:
    vals = [(r["per_site"][s][which] if which else r["per_site"][s]).get(key) for s in sites]
    vals = [v for v in vals if v is not None and np.isfinite(v)]
    return float(np.mean(vals)) if vals else float("nan")


def main_table(results: dict, prompt: str = "none") -> list[str]:
    """Per centre and mean: mean +- std over seeds of the personalized test Dice, then the other scores."""
    sites = results["sites"]
    lines = ["| method | setting | seeds | " + " | ".join(sites) + " | **mean Dice** | polyp Dice | empty FP "
             "| HD95 | global Dice |", "|" + "---|" * (len(sites) + 8)]
    for method in ORDER:
        runs = main_runs(results, method, prompt)
        if not runs:
            continue
        setting, tuned = chosen_setting(results, method)
        cells = [mean_std_text([r["per_site"][s]["dice"] for r in runs]) for s in sites]
        mean = mean_std_text([_site_mean(r, "dice", sites) for r in runs])
        other = [float(np.nanmean([_site_mean(r, k, sites) for r in runs])) for k in ("dice_fg", "empty_fp", "hd95")]
        glob = [_site_mean(r, "dice", sites, "global") for r in runs if all(r["per_site"][s].get("global")
                                                                             for s in sites)]
        record = tuned_record(results, method)
        pending = pending_lr(record) if record else None
        label = "-" if method == "zero-shot" else tag_of(setting) + (
            " (untuned)" if not tuned else f" (search open: lr={pending:g} to run)" if pending else "") + (
            f" (searched with {record['searched_with']})" if record and record.get("searched_with") else "")
        lines.append(f"| {method} | {label} | {len(runs)} | " + " | ".join(cells)
                     + f" | **{mean}** | {other[0]:.3f} | {_fmt(other[1], '.3f')} | "
                     + f"{other[2]:.1f} | {_fmt(float(np.mean(glob)) if glob else None, '.3f')} |")
    return lines


def pooled_images(runs: list[dict], sites: list[str], scores: str = "images") -> dict[str, list[list[float]]]:
    """Centre -> per run (seed), the per-image test scores (``val_images``: validation): what
    ``paired_difference`` pools over seeds."""
    return {s: [r["per_site"][s][scores] for r in runs] for s in sites}


def per_image_scores(results: dict, method: str, prompt: str = "none") -> dict[str, list[list[float]]] | None:
    runs = main_runs(results, method, prompt)
    return pooled_images(runs, results["sites"]) if runs else None


def minus_rows(ref: dict[str, list[list[float]]], n_ref: int, results: dict, prompt: str = "none",
               skip: str | None = None) -> list[str]:
    """``ref`` minus each main-table row but ``skip``: seeds, mean with its paired interval, reading, per centre."""
    lines = []
    for method in [m for m in ORDER if m != skip]:
        other = per_image_scores(results, method, prompt)
        if other is None:
            continue
        overall = paired_difference(ref, other)
        cells = [interval_text(paired_difference({s: ref[s]}, {s: other[s]})) for s in results["sites"]]
        lines.append(f"| {method} | {n_ref} / {len(main_runs(results, method, prompt))} | "
                     f"**{interval_text(overall)}** | {verdict(overall)} | " + " | ".join(cells) + " |")
    return lines


def interval_table(results: dict, prompt: str = "none", reference: str = "pfedsam") -> list[str]:
    """pFedSAM minus each baseline: mean over centres with a paired bootstrap 95% interval, and per centre."""
    ref = per_image_scores(results, reference, prompt)
    if ref is None:
        return []
    sites = results["sites"]
    rows = minus_rows(ref, len(main_runs(results, reference, prompt)), results, prompt, skip=reference)
    return ["| pFedSAM minus | seeds (pFedSAM / other) | **mean difference [95% CI]** | reading | "
            + " | ".join(sites) + " |", "|" + "---|" * (len(sites) + 4), *rows] if rows else []


def search_table(results: dict) -> list[str]:
    lines = ["| method | setting | val Dice (seed 0, mean over centres) | test Dice | chosen |",
             "|---|---|---|---|---|"]
    for method in ORDER:
        tuned = results.get("tuned", {}).get(method)
        for key, r in results["runs"].items():
            m, p, s, tag = key.split("|")
            if m == method and p == "none" and s == "seed0" and "per_site" in r and r.get("search"):
                chosen = "yes" if tuned and (tuned["tag"], tuned.get("searched_with", "")) == (
                    tag.partition("+")[0], tag.partition("+")[2]) else ""
                lines.append(f"| {method} | {tag} | {r['val_dice']:.3f} | "
                             f"{_site_mean(r, 'dice', results['sites']):.3f} | {chosen} |")
    return lines if len(lines) > 2 else []


def row_minus_row(a: dict, b: dict, sites: list[str], scores: str) -> dict[str, float]:
    """Paired difference of two recorded rows of one seed over their per-image ``scores`` at ``sites``."""
    return paired_difference({c: [a["per_site"][c][scores]] for c in sites},
                             {c: [b["per_site"][c][scores]] for c in sites})


def variant_table(results: dict) -> list[str]:
    """Each design variant against the row it varies (same method, prompt, seed, setting), on validation."""
    lines = ["| method | setting | variant | seed | val Dice | minus its base on val [95% CI] | reading | test Dice | "
             "minus its base on test [95% CI] |", "|---|---|---|---|---|---|---|---|---|"]
    sites = results["sites"]
    for key, r in results["runs"].items():
        m, p, s, tag = key.split("|")
        if "+" not in tag or "per_site" not in r:
            continue
        base_tag, var = tag.split("+", 1)
        base = results["runs"].get(f"{m}|{p}|{s}|{base_tag}", {})
        diff, reading, on_test = "no base row", "", ""
        if "per_site" in base:
            on_test = interval_text(row_minus_row(r, base, sites, "images"))  # reported, not read: validation decides
            diff = f"{r['val_dice'] - base['val_dice']:+.3f} (no per-image val scores in the base row)"
            if all("val_images" in x["per_site"][c] for x in (r, base) for c in sites):
                d = row_minus_row(r, base, sites, "val_images")
                diff, reading = interval_text(d), verdict(d)
        lines.append(f"| {m} | {base_tag} | {var} | {s.removeprefix('seed')} | {r['val_dice']:.3f} | {diff} | "
                     f"{reading} | {_site_mean(r, 'dice', sites):.3f} | {on_test} |")
    return lines if len(lines) > 2 else []


def variant_interval_table(results: dict) -> list[str]:
    """Each design variant (seeds pooled) minus each main-table row on test, paired over test images.

    For the record only: a variant is chosen against its base on validation (``variant_table``); this
    shows where the chosen one stands against the baselines, with the same statistics as the main table.
    """
    sites = results["sites"]
    lines = []
    for (m, p, tag), rows in grouped_runs(results).items():
        if "+" in tag:  # a design variant
            runs = [r for _, r in rows]
            ref = pooled_images(runs, sites)
            lines += [f"| {m} {tag} |{row[1:]}" for row in minus_rows(ref, len(runs), results, p)]
    return ["| variant | minus | seeds (variant / other) | **mean difference [95% CI]** | reading | "
            + " | ".join(sites) + " |", "|" + "---|" * (len(sites) + 5), *lines] if lines else []


def size_ruled(site: dict) -> tuple[list[float], float] | None:
    """A site's per-image test Dice under the size rule chosen on its own validation split, and the
    threshold; None for a row recorded before the rule's inputs were stored."""
    if not all(k in site for k in ("val_images", "val_pred_area", "val_truth_empty", "pred_area", "truth_empty")):
        return None
    threshold = size_rule_threshold(site["val_images"], site["val_pred_area"], site["val_truth_empty"])
    return apply_size_rule(site["images"], site["pred_area"], site["truth_empty"], threshold), threshold


def empty_fp_under_rule(site: dict, threshold: float) -> float:
    """Share of a site's frames without a polyp still predicted non-empty under the rule (NaN: none)."""
    kept = [not size_rule_empties(a, threshold)
            for a, empty in zip(site["pred_area"], site["truth_empty"], strict=True) if empty]
    return float(np.mean(kept)) if kept else float("nan")


def size_rule_table(results: dict) -> list[str]:
    """Every row with runs that stored the rule's inputs: test Dice of those runs without and with the size rule.

    The rule is post hoc and the same for every row: per run and centre, the area threshold best on
    that run's validation split empties smaller predictions on its test split (``metrics.size_rule_threshold``).
    """
    sites = results["sites"]
    lines = []
    for (m, _prompt, tag), rows in grouped_runs(results).items():
        # runs recorded before the rule's inputs were stored are left out; the seeds column says so
        per_run = [(r, {c: size_ruled(r["per_site"][c]) for c in sites}) for _, r in rows]
        per_run = [(r, by_site) for r, by_site in per_run if all(by_site.values())]
        if not per_run:
            continue
        runs = [r for r, _ in per_run]
        ruled = {c: [by_site[c] for _, by_site in per_run] for c in sites}
        seeds = f"{len(runs)}" + (f" of {len(rows)}" if len(runs) < len(rows) else "")
        with_rule = {c: [dice for dice, _ in ruled[c]] for c in sites}
        mean_with = np.mean([np.mean([np.mean(with_rule[c][k]) for c in sites]) for k in range(len(runs))])
        empty_fp = [fp for c in sites for r, (_, t) in zip(runs, ruled[c], strict=True)
                    if np.isfinite(fp := empty_fp_under_rule(r["per_site"][c], t))]
        change = interval_text(paired_difference(with_rule, pooled_images(runs, sites)))
        thresholds = " / ".join(f"{np.mean([t for _, t in ruled[c]]):.4f}" for c in sites)
        lines.append(f"| {m} | {tag} | {seeds} | {np.mean([_site_mean(r, 'dice', sites) for r in runs]):.3f} | "
                     f"**{mean_with:.3f}** | {change} | {_fmt(float(np.mean(empty_fp)) if empty_fp else None, '.3f')}"
                     f" | {thresholds} |")
    return ["| method | setting | seeds | mean Dice | **with the size rule** | rule minus none [95% CI] | "
            "empty FP with the rule | threshold per centre (" + " / ".join(sites) + "; mean over seeds) |",
            "|---|---|---|---|---|---|---|---|", *lines] if lines else []


def ran_on(rows: list[tuple[int, dict]]) -> tuple[str, str] | None:
    """The (CPU, precision) every run of a row recorded, or None when they differ or one did not record it."""
    where = {(r["machine"]["device"], r["machine"]["precision"]) if r.get("machine") else None for _, r in rows}
    return where.pop() if len(where) == 1 and None not in where else None


@functools.cache  # pairs every row with every other: read the job's YAML once per (method, tag)
def design_changes(method: str, tag: str) -> tuple[tuple[str, str], ...]:
    """The overrides in the variant part of ``tag`` (after ``+``) that change the job's settings of
    ``method``, as (key, value) texts in the tag's order; ``lr=3+train.amp=True`` -> () (bf16 is the default)."""
    variant = parse_overrides(tag.partition("+")[2]) if "+" in tag else {}
    own = variant_config(method, MAIN_JOB, {}).to_dict() if method in VARIANTS else {}
    # key by key against the job's value: a run's overrides may hold only with its budget (e.g. 12 rounds)
    return tuple((k, str(v)) for k, v in variant.items()
                 if own.get(k.partition(".")[0], {}).get(k.partition(".")[2], object()) != v)


def labels_only(method: str, tag: str) -> bool:
    """True when the variant part of ``tag`` sets only what the job already sets, e.g.
    ``lr=3+train.amp=True``: such a row is the method's own design, labelled by how it ran."""
    return "+" in tag and method in VARIANTS and not design_changes(method, tag)


def same_machine_table(results: dict) -> list[str]:
    """pFedSAM's rows (its design at the chosen setting, and its design variants; seeds pooled) minus
    every other method's row recorded on the same CPU in the same precision (its chosen setting, or a
    variant of it), and each variant minus pFedSAM's own design (chosen setting, variant that only
    labels it) run there; paired over test images.

    The main and variant tables pair rows whatever they ran on; this one pairs like with like only.
    """
    sites, groups = results["sites"], grouped_runs(results)
    lines = []
    for (m, p, tag), rows in groups.items():
        where = ran_on(rows)
        if not m.startswith("pfedsam") or where is None or (
                "+" not in tag and tag != tag_of(chosen_setting(results, m)[0])):
            continue
        ref = pooled_images([r for _, r in rows], sites)
        changes_design = "+" in tag and not labels_only(m, tag)
        for (m2, p2, tag2), rows2 in groups.items():
            own_design = m2 == m and changes_design and ("+" not in tag2 or labels_only(m2, tag2))
            if (m2.startswith("pfedsam") and not own_design) or p2 != p or ran_on(rows2) != where \
                    or m2 not in ORDER or tag2.split("+")[0] != tag_of(chosen_setting(results, m2)[0]):
                continue
            other = pooled_images([r for _, r in rows2], sites)
            overall = paired_difference(ref, other)
            cells = [interval_text(paired_difference({s: ref[s]}, {s: other[s]})) for s in sites]
            lines.append(f"| {m} {tag} | {m2} {tag2} | {where[0]}, {where[1]} | {len(rows)} / {len(rows2)} | "
                         f"**{interval_text(overall)}** | {verdict(overall)} | " + " | ".join(cells) + " |")
    return ["| variant | minus | ran on, precision | seeds (variant / other) | **mean difference [95% CI]** | "
            "reading | " + " | ".join(sites) + " |", "|" + "---|" * (len(sites) + 6), *lines] if lines else []


JOB_DESIGN = "the job's design"


def one_change_table(results: dict) -> list[str]:
    """Each pFedSAM design change alone: a design variant minus the nearest design it extends (its
    changes less the ones named), both run on the same CPU in the same precision at the same setting,
    seeds pooled; on validation, which decides, and on test."""
    sites, groups = results["sites"], grouped_runs(results)
    lines = []
    for (m, p, tag), rows in groups.items():
        where, mine = ran_on(rows), set(design_changes(m, tag))
        if not m.startswith("pfedsam") or where is None or not mine:
            continue
        bases = {key: set(design_changes(m, key[2])) for key, rows2 in groups.items()
                 if key[:2] == (m, p) and key[2].split("+")[0] == tag.split("+")[0] and ran_on(rows2) == where}
        bases = {key: theirs for key, theirs in bases.items() if theirs < mine}
        nearest = max(map(len, bases.values()), default=-1)
        for key, theirs in bases.items():
            if len(theirs) != nearest:
                continue
            runs, base_runs = [r for _, r in rows], [r for _, r in groups[key]]
            cells = []
            for scores in ("val_images", "images"):
                if all(scores in r["per_site"][c] for r in (*runs, *base_runs) for c in sites):
                    d = paired_difference(pooled_images(runs, sites, scores), pooled_images(base_runs, sites, scores))
                    cells += [f"**{interval_text(d)}**" if scores == "val_images" else interval_text(d), verdict(d)]
                else:
                    cells += ["no per-image scores in a row", ""]
            change = ",".join(f"{k}={v}" for k, v in design_changes(m, tag) if (k, v) not in theirs)
            base = ",".join(f"{k}={v}" for k, v in design_changes(m, key[2]) if (k, v) in theirs)
            lines.append(f"| {m} | {change} | {base or JOB_DESIGN} | {where[0]}, {where[1]} | "
                         f"{len(runs)} / {len(base_runs)} | " + " | ".join(cells) + " |")
    return ["| method | change | on top of | ran on, precision | seeds (with / without) | **val: with minus without "
            "[95% CI]** | reading (decides) | test: with minus without [95% CI] | reading |",
            "|---|---|---|---|---|---|---|---|---|", *lines] if lines else []


def machine_text(machine: dict | None) -> str:
    if not machine:
        return "not recorded"
    return f"{machine['device']}, {machine['precision']}" + (" (stamped afterwards)" if machine.get("stamped") else "")


def budget_table(results: dict) -> list[str]:
    lines = ["| method | setting | seed | steps/site | images/site | train img/s | wall time (min) | "
             "MB/round/site | rejected updates | ran on, precision |", "|---|---|---|---|---|---|---|---|---|---|"]
    for key, r in sorted(results["runs"].items(), key=lambda kr: (ORDER.index(kr[0].split("|")[0])
                                                                   if kr[0].split("|")[0] in ORDER else 99, kr[0])):
        m, p, s, tag = key.split("|")
        if "error" in r:
            lines.append(f"| {m} | {tag} | {s.removeprefix('seed')} | error: {r['error']} |||||||")
            continue
        mb = r.get("bytes_per_round_per_site")
        lines.append(f"| {m} | {tag} | {s.removeprefix('seed')} | {_fmt(r.get('steps_per_site'), '.0f')} | "
                     f"{_fmt(r.get('images_per_site'), '.0f')} | {_fmt(r.get('train_images_per_s'), '.1f')} | "
                     f"{_fmt(r.get('wall_s', float('nan')) / 60, '.1f')} | "
                     f"{_fmt(None if mb is None else mb / 1e6, '.2f')} | {len(r.get('rejected', []))} | "
                     f"{machine_text(r.get('machine'))} |")
    return lines


def last_third_start(rounds: int) -> int:
    """The round that starts the last third of ``rounds`` (issue 11's flatness criterion measures from it)."""
    return rounds - 1 - rounds // 3


def last_third_gain(curve: Sequence[float] | np.ndarray, span: int = 1) -> float | None:
    """Validation Dice gained over the last third of the rounds (issue 11's flatness criterion).

    Arguments:
      curve: mean validation Dice after each round.
      span: rounds averaged at each end; with 3, one noisy round cannot decide the criterion alone.

    Returns the last round(s) minus the round(s) a third of the rounds before, or None when the curve is
    too short for ``span`` rounds at each end of a disjoint last third.
    """
    n = len(curve)
    if n // 3 < span:
        return None
    start = last_third_start(n)
    return float(np.mean(curve[n - span:]) - np.mean(curve[start - span + 1:start + 1]))


def mean_curve(runs: list[dict]) -> np.ndarray | None:
    """The validation curve averaged over the seeds' runs (None when a run has none or lengths differ)."""
    curves = [r.get("val_curve") or [] for r in runs]
    if not curves or not curves[0] or any(len(c) != len(curves[0]) for c in curves):
        return None
    return np.mean(np.asarray(curves, dtype=float), axis=0)


def convergence_table(results: dict) -> list[str]:
    """Whether each main row's seed-averaged validation curve has flattened: under one point gained over the
    last third of the rounds, at the last round and in three-round means (round-to-round noise is 2-4 points)."""
    lines = ["| method | seeds | rounds | val Dice at the last third's start | at the last round | gain (points) "
             "| gain, three-round means (points) | flattened (both under 1 point) |", "|---" * 8 + "|"]
    for method in ORDER:
        runs = main_runs(results, method)
        if (curve := mean_curve(runs)) is None:
            continue
        n, gain, gain3 = len(curve), last_third_gain(curve), last_third_gain(curve, span=3)
        flat = "-" if gain is None or gain3 is None else "yes" if max(gain, gain3) < 0.01 else "no"
        start = last_third_start(n)
        lines.append(f"| {method} | {len(runs)} | {n} | {curve[start]:.3f} (round {start}) "
                     f"| {curve[-1]:.3f} | {_fmt(None if gain is None else 100 * gain, '+.1f')} "
                     f"| {_fmt(None if gain3 is None else 100 * gain3, '+.1f')} | {flat} |")
    return lines if len(lines) > 2 else []


def results_json(obj: Any, level: int = 0) -> str:
    """``json.dumps(obj, indent=1)`` with each list of plain values on one line.

    The per-image score lists make up most of results.json; one value per line more than
    doubled its size in git. Values are written exactly as ``json.dumps`` writes them.
    """
    pad = " " * (level + 1)
    if isinstance(obj, dict) and obj:
        items = [f"{pad}{json.dumps(str(k))}: {results_json(v, level + 1)}" for k, v in obj.items()]
    elif isinstance(obj, (list, tuple)) and any(isinstance(x, (dict, list, tuple)) for x in obj):
        items = [pad + results_json(v, level + 1) for v in obj]
    else:
        return json.dumps(obj, default=float, separators=(",", ": "))
    open_, close = ("{", "}") if isinstance(obj, dict) else ("[", "]")
    return open_ + "\n" + ",\n".join(items) + "\n" + " " * level + close


PER_IMAGE_SCORES = ("images", "val_images")


def store_test_ids(results: dict, row: dict) -> None:
    """Move each site's test image ids out of ``row`` into ``results["test_ids"]``, once per site.

    Every row scores the same whole test split in the same order, which is what pairs rows image by
    image; keeping the order once (instead of in each of a hundred rows) also checks it. Raises
    ValueError, leaving ``row`` unchanged, when a site's order differs from the stored one.
    """
    stored = results.setdefault("test_ids", {})
    sites = row.get("per_site", {})
    for site, r in sites.items():
        if "ids" in r and stored.get(site, r["ids"]) != r["ids"]:
            raise ValueError(f"site {site!r}: the test split lists other images, or in another order, than the "
                             "earlier rows of results.json (did its split.json change?); the rows cannot be "
                             "paired image by image, so use another --out")
    for site, r in sites.items():
        if "ids" in r:
            stored[site] = r.pop("ids")


def compact_results(results: dict) -> dict:
    """Bring results.json written before the compact form to it, in place: test ids once per site
    (``store_test_ids``), per-image scores at float32 precision (``float32_scores``), in the runs and in
    the leave-one-out entries alike. Idempotent."""
    scored: list[dict] = []  # every dict that may hold per-image scores
    for row in results.get("runs", {}).values():
        store_test_ids(results, row)
        for r in row.get("per_site", {}).values():
            scored += [r, r.get("global") or {}]
    for entry in results.get("unseen", {}).values():
        scored += [part for part in entry.values() if isinstance(part, dict)]
    for part in scored:
        for key in PER_IMAGE_SCORES:
            if key in part:
                part[key] = float32_scores(part[key])
    return results


def unseen_table(results: dict) -> list[str]:
    """Leave-one-out: per left-out centre the four scores and each adaptation's lr, then their mean."""
    if not results.get("unseen"):
        return []
    def lr_text(adapted: dict) -> str:  # the chosen scale; flagged while its search stopped at an edge
        tried = {k: (v, {"lr": float(k)}) for k, v in adapted["val_dice_by_lr_scale"].items()}
        pending = edge_step(tried)
        return f"{best_setting(tried)[1]['lr']:g}" + (f" (search open: {pending:g} to run)" if pending else "")

    lines = ["| left-out centre | pFedSAM global | + fresh L-MoE adapted | FedAvg global | FedAvg fine-tuned "
             "| adapt steps | lr scale (L-MoE / fine-tune) | fresh L-MoE minus FedAvg fine-tuned |",
             "|---|---|---|---|---|---|---|---|"]
    for centre, u in results["unseen"].items():
        if "error" in u:
            lines.append(f"| {centre} | error: {u['error']} |||||||")
            continue
        a, b = u["pfedsam_fresh_lmoe"], u["fedavg_finetuned"]
        d = paired_difference({centre: [a["images"]]}, {centre: [b["images"]]})
        lines.append(f"| {centre} | {u['pfedsam_global']['dice']:.3f} | {a['dice']:.3f} | "
                     f"{u['fedavg_global']['dice']:.3f} | {b['dice']:.3f} | {u['adapt_steps']} | "
                     f"{lr_text(a)} / {lr_text(b)} | {interval_text(d)} |")
    done = {c: u for c, u in results["unseen"].items() if "error" not in u}
    if len(done) > 1:  # every centre weighs the same, as in the main table
        def mean(key: str) -> str:
            return f"{np.mean([u[key]['dice'] for u in done.values()]):.3f}"

        d = paired_difference({c: [u["pfedsam_fresh_lmoe"]["images"]] for c, u in done.items()},
                              {c: [u["fedavg_finetuned"]["images"]] for c, u in done.items()})
        lines.append(f"| **mean of {len(done)}** | {mean('pfedsam_global')} | {mean('pfedsam_fresh_lmoe')} | "
                     f"{mean('fedavg_global')} | {mean('fedavg_finetuned')} | | | **{interval_text(d)}** |")
    return lines


def taken_settings_text(results: dict) -> list[str]:
    """Which methods' settings came from another results.json's search (``--tuned-from``), not from here."""
    taken: dict[str, list[str]] = {}
    for method, record in results.get("tuned", {}).items():
        if "from" in record:
            taken.setdefault(record["from"], []).append(f"{method} {record['tag']}")
    return [f"Settings chosen by the search recorded in `{source}` (not searched at this budget): "
            f"{', '.join(methods)}.\n" for source, methods in taken.items()]


def markdown(results: dict) -> str:
    out = [f"# Benchmark: {results['dataset']}", "",
           "Generated by `benchmarks/run.py` from `results.json` (every number below is a run recorded there).", "",
           f"Budget: `{json.dumps(results['budget'])}`", "", f"Hardware: `{json.dumps(results['hardware'])}`", "",
           f"Scoring: {results['scoring']}", "", *taken_settings_text(results),
           "## Main table (prompt-free; personalized test Dice, whole test splits, mean +- std over seeds)", "",
           *main_table(results)]
    if ci := interval_table(results):
        out += ["", "## pFedSAM against each row (paired bootstrap over test images, seeds pooled)", "", *ci]
    if search := search_table(results):
        out += ["", "## Tuning search (seed 0; chosen by validation Dice)", "", *search]
    if variants := variant_table(results):
        out += ["", "## Design variants (chosen on validation; not in the main table)", "", *variants]
    if against := variant_interval_table(results):
        out += ["", "## Design variants against each main row (test, paired bootstrap, seeds pooled; for the record)",
                "", *against]
    if alike := same_machine_table(results):
        out += ["", "## Design variants against rows run on the same CPU in the same precision (test, paired "
                "bootstrap, seeds pooled)", "", *alike]
    if changes := one_change_table(results):
        out += ["", "## Each design change alone (same CPU, same precision, seeds pooled; validation decides)",
                "", *changes]
    if flat := convergence_table(results):
        out += ["", "## Has training flattened? (seed-averaged validation curves, issue 11's criterion)", "", *flat]
    if unseen := unseen_table(results):
        out += ["", "## Unseen centres (test Dice of the left-out centre)", "", *unseen]
    if rule := size_rule_table(results):
        out += ["", "## The size rule for frames without a polyp (post hoc, every row alike; chosen on validation)",
                "", *rule]
    out += ["", "## Every run: budget and cost", "", *budget_table(results)]
    out += ["", "## Communication per round per site (exact, from parameter counts)", "",
            "| backbone | full FT fp32 MB | full FT fp16 MB | pFedSAM fp32 MB | pFedSAM fp16 MB |",
            "|---|---|---|---|---|"]
    for b, v in results["communication"].items():
        out.append(f"| {b} | {v['full_fp32'] / 1e6:.1f} | {v['full_fp16'] / 1e6:.1f} | "
                   f"{v['pfedsam_fp32'] / 1e6:.2f} | {v['pfedsam_fp16'] / 1e6:.2f} |")
    return "\n".join(out) + "\n"


def row_colour(k: int) -> tuple[str, bool]:
    """The k-th plotted row's colour, and whether the 10-colour cycle has wrapped (such rows get a hatch or a
    dashed line, so no two rows look the same in a legend)."""
    return f"C{k % 10}", k >= 10


def plots(results: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(m, main_runs(results, m)) for m in ORDER]
    rows = [(m, runs) for m, runs in rows if runs]
    if not rows:
        return
    sites = results["sites"]
    fig, ax = plt.subplots(figsize=(13, 4))
    width = 0.8 / len(rows)
    for k, (method, runs) in enumerate(rows):
        means = [np.mean([r["per_site"][s]["dice"] for r in runs]) for s in sites]
        stds = [np.std([r["per_site"][s]["dice"] for r in runs]) for s in sites]
        colour, past_cycle = row_colour(k)
        ax.bar(np.arange(len(sites)) + k * width, means, width, yerr=stds, label=method, color=colour,
               hatch="//" if past_cycle else None)
    ax.set_xticks(np.arange(len(sites)) + 0.4 - width / 2, sites)
    ax.set_ylabel("test Dice (personalized, original resolution)")
    ax.legend(fontsize=7, ncol=4)
    fig.tight_layout()
    fig.savefig(out / "dice_per_site.png", dpi=100)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(7, 4))
    for k, (method, runs) in enumerate(rows):
        if (curve := mean_curve(runs)) is not None:
            colour, past_cycle = row_colour(k)
            ax.plot(range(len(curve)), curve, marker="o", color=colour, linestyle="--" if past_cycle else "-",
                    label=f"{method} ({len(runs)} seed{'s' * (len(runs) > 1)})")
    ax.set_xlabel("round")
    ax.set_ylabel("mean val Dice (personalized, averaged over seeds)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "dice_over_rounds.png", dpi=100)
    plt.close(fig)


def overlays(results: dict, args: argparse.Namespace, per_site: int = 2) -> None:
    """image | ground truth | each method's personalized prediction, for the first test images."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    from pfedsam.export.inference import predict, read_rgb

    models = {m: args.out / "work" / "models" / f"{m}-{tag_of(chosen_setting(results, m)[0])}"
              for m in OVERLAY_METHODS}
    methods = [m for m, p in models.items() if p.is_dir()]
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
            dest = args.out / "work" / "overlays" / m / site
            predict(models[m] / site, images, dest, engine="torch", masks_dir=args.data_root / site / "masks",
                    warmup=0)
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


# -- driver ---------------------------------------------------------------------------------------------
def load_results(args: argparse.Namespace, sites: list[str]) -> dict:
    path = args.out / "results.json"
    if path.is_file():
        try:
            results = compact_results(json.loads(path.read_text()))
        except ValueError as exc:
            sys.exit(f"{path}: {exc}")
        if results.get("protocol") != PROTOCOL:
            sys.exit(f"{path} holds runs of benchmark protocol {results.get('protocol', 1)}, not comparable with "
                     f"protocol {PROTOCOL} (whole test splits, original resolution); use another --out or move it")
        stored = {**budget(parse_args([])), **results.get("budget", {})}  # keys added later: their defaults
        stored["data_root"] = results.get("budget", {}).get("data_root")
        if stored != budget(args) or results.get("sites") != sites:
            sys.exit(f"{path} holds runs of another budget or site list ({results.get('budget')}); "
                     "use another --out or delete it")
        return results
    return {"dataset": args.data_root.name, "sites": sites, "budget": budget(args), "protocol": PROTOCOL,
            "hardware": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                         "torch": torch.__version__,
                         "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},
            "scoring": SCORING, "runs": {}, "tuned": {}, "unseen": {}, "communication": full_finetune_bytes()}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", type=Path, default=ROOT.parent / "shared" / "data" / "polyp",
                        help="one folder per site, or 'synthetic' for the main job's generated sites")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "polyp")
    parser.add_argument("--methods", default="pfedsam", help=f"comma list of {', '.join(ORDER)}; '' for none")
    parser.add_argument("--seeds", default="0", help="comma list of seeds; every method runs once per seed")
    parser.add_argument("--search", action="store_true",
                        help="run the tuning search (seed 0) of the listed methods and record their settings")
    parser.add_argument("--unseen", default="", help="comma list of centres (or 'all') for leave-one-out")
    parser.add_argument("--backbone", default="litemedsam")
    parser.add_argument("--checkpoint", default=None, help="SAM checkpoint (vit_b/l/h need the official file)")
    parser.add_argument("--image-size", type=int, default=0, help="model input side (0 = the backbone's own)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--local-steps", type=int, default=8)
    parser.add_argument("--global-steps", type=int, default=16)
    parser.add_argument("--final-steps", type=int, default=16, help="final personalization steps (every method)")
    parser.add_argument("--max-train", type=int, default=100, help="training images per site (0 = all)")
    parser.add_argument("--max-eval", type=int, default=0,
                        help="val and test images per site (0 = all; anything else is for smoke runs only)")
    parser.add_argument("--prompt", default="none", choices=["none", "box"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="encoder feature cache (default: OUT/feature_cache; keyed by content, shareable)")
    parser.add_argument("--tuned-from", type=Path, default=None,
                        help="another results.json whose searches choose the settings of methods not searched "
                             "here (a budget study without a new search); recorded as each setting's 'from'")
    parser.add_argument("--variant", default="",
                        help="design variant: dotted key=value pairs on top of each method's chosen setting")
    parser.add_argument("--force", action="store_true", help="rerun runs already in results.json")
    parser.add_argument("--report-only", action="store_true", help="only rewrite results.md and the plots")
    parser.add_argument("--retag", action="store_true",
                        help="after the job's defaults changed: rename rows so each key says what its row trained "
                             "(recorded settings unchanged), then rewrite the report")
    parser.add_argument("--no-overlays", action="store_true", help="skip overlays.png")
    return parser.parse_args(argv)


def main() -> None:
    args = parse_args()
    if str(args.data_root) == "synthetic":  # the generated SYNTHETIC sites of the main job (made on first use)
        from pfedsam.data.resolve import synthetic_root

        args.data_root = synthetic_root(BASE)
    if not args.data_root.is_dir():
        sys.exit(f"--data-root {args.data_root} not found (the real data lives in ../shared/data)")
    args.out = args.out.resolve()
    args.data_root = args.data_root.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    sites = discover_sites(args.data_root)
    methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in methods if m not in ORDER]
    if unknown:
        sys.exit(f"--methods: unknown {unknown}; choose from {ORDER}")
    if args.search and (bad := [m for m in methods if m not in KNOBS]):
        sys.exit(f"--search: {bad} have no search (searched: {list(KNOBS)}); their rows reuse {SETTING_OF}")
    centres = sites if args.unseen == "all" else [c for c in args.unseen.split(",") if c]
    if bad := [c for c in centres if c not in sites]:
        sys.exit(f"--unseen: {bad} not among the sites {sites}")
    results = load_results(args, sites)
    if args.tuned_from:
        try:
            taken = adopt_tuned(results, args.tuned_from)
        except ValueError as exc:
            sys.exit(str(exc))
        print(f"settings taken from {args.tuned_from}: {', '.join(taken) or 'none (every method has its own)'}",
              flush=True)
    seeds = [int(s) for s in args.seeds.split(",")]
    try:
        variant = parse_overrides(args.variant) if args.variant else None
    except ValueError as exc:
        sys.exit(str(exc))
    if variant is not None and (args.search or not variant or {"zero-shot", "centralized"} & set(methods)):
        sys.exit("--variant: give key=value pairs, without --search, for federated methods only")
    for method in methods if variant else ():  # refuse before any run, not as an error row in results.json
        try:
            variant_of(method, args, seeds[0], args.prompt, chosen_setting(results, method)[0], variant)
        except (ValueError, KeyError, TypeError) as exc:
            sys.exit(f"{exc}")

    def save() -> None:
        tmp = args.out / "results.json.tmp"
        tmp.write_text(results_json(results))
        tmp.replace(args.out / "results.json")  # never a half-written file
        (args.out / "results.md").write_text(markdown(results))
        plots(results, args.out)  # a long benchmark shows its curves as runs land

    def run(method: str, seed: int, setting: dict, search: bool = False, variant: dict | None = None) -> dict:
        prompt = "box" if method == "zero-shot" else args.prompt
        tag = row_tag(setting, variant)
        key = row_key(method, prompt, seed, tag)
        old = results["runs"].get(key)
        now = settings_of(method, args, seed, prompt, setting, variant)
        if old is not None and "error" not in old and not args.force:
            if changed := changed_settings(old.get("settings", {}), now):
                sys.exit(f"{key} in {args.out / 'results.json'} was recorded with other settings than the job now "
                         f"gives ({'; '.join(changed)}): jobs/pfedsam or the method's definition changed since. "
                         "Rerun it with --force (the old row is replaced), or use another --out")
            print(f"{key}: already in results.json", flush=True)
            old["search"] = old.get("search") or search
            return old
        print(f"{key}: running", flush=True)
        work = work_dir(args, method, prompt, seed, tag)
        rounds_file = work / ROUND_CHECKPOINT
        if args.force:  # a forced rerun starts over, not from the rounds of the row it replaces
            rounds_file.unlink(missing_ok=True)
        start, code = time.perf_counter(), code_version()  # what the row runs, before anything is edited
        try:
            runner = {"zero-shot": run_zero_shot, "centralized": run_centralized}.get(method)
            row = (runner(args, sites, seed, prompt, setting) if runner
                   else run_method(method, args, sites, seed, prompt, setting, variant, key=key, work=work))
        except Exception as exc:  # one failed run must not lose the others
            import traceback

            traceback.print_exc()
            row = {"error": f"{type(exc).__name__}: {exc}"}
        try:
            store_test_ids(results, row)
        except ValueError as exc:  # kept, with its data, as an error row: it cannot be paired with the others
            row["error"] = str(exc)
        row.setdefault("wall_s", time.perf_counter() - start)
        row["search"], row["settings"] = search, now
        row["machine"] = machine_of(now, args.device)
        row["code"] = code
        results["runs"][key] = row
        save()
        if "error" not in row:  # recorded: its rounds are no longer needed (an error row resumes when rerun)
            rounds_file.unlink(missing_ok=True)
        print(f"{key}: {'ERROR ' + row['error'] if 'error' in row else 'done'} in {row['wall_s']:.0f} s", flush=True)
        return row

    if args.retag:
        try:
            renamed = retag(results, args)
        except ValueError as exc:
            sys.exit(str(exc))
        print("\n".join(f"{old} -> {new}" for old, new in renamed) or "retag: every key already says what its row "
              "trained", flush=True)
        save()
        return
    if not args.report_only:
        if args.search:
            for method in methods:
                tuned = search(method, lambda setting, m=method: run(m, 0, setting, search=True).get("val_dice", -1))
                results["tuned"][method] = tuned
                save()
                print(f"{method}: chose {tuned['tag']} (val Dice {tuned['val_dice']:.4f})", flush=True)
        else:
            for seed in seeds:
                for method in methods:
                    run(method, seed, chosen_setting(results, method)[0], variant=variant)
        for centre in centres:
            u = results["unseen"].get(centre)
            if u is not None and "error" not in u and not args.force:
                continue
            try:
                results["unseen"][centre] = run_unseen(centre, args, sites, seeds[0], args.prompt, results)
                results["unseen"][centre]["machine"] = machine_of(
                    settings_of("pfedsam", args, seeds[0], args.prompt, chosen_setting(results, "pfedsam")[0]),
                    args.device)
            except Exception as exc:
                results["unseen"][centre] = {"error": f"{type(exc).__name__}: {exc}"}
            save()
            print(f"unseen {centre}: done", flush=True)
    save()
    if not args.no_overlays:
        overlays(results, args)
    print(markdown(results))


if __name__ == "__main__":
    main()
