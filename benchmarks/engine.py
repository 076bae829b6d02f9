"""A whole federation in one process, with the FLARE job's round, final task and aggregation rules.

The benchmark's rows need every site's per-image test scores and many runs on two cores;
starting a FLARE simulator per run costs process start-up, a model load per task and a cache
reload per site, and its results carry only scalars. This engine runs exactly what the job
runs, in one process: each site is a ``SiteTrainer`` kept alive between rounds (as in POC and
production), a round is ``run_round``, the final task ``run_final``, and the server's step is
the aggregator's own functions from ``pfedsam.flare.aggregation`` (validation, the update-norm
bound, ``robust_combine`` weighted by ``federation.weighting``).
``tests/test_job_simulator.py`` checks that it reproduces the simulator's report of the tiny job.

A run given a ``checkpoint`` file writes it after every round and, started again, goes on after
the last round it holds: a row longer than what is left of a session (FedAvg + LoRA at 48
rounds: 103 min on two Xeon cores, docs/results.md) survives the end of its process. Every round's
batches and augmentation are seeded by (seed, site, phase, round) alone and each phase builds a
fresh optimizer, so what a site carries into the next round is its local parameters, Ditto's
personal copy and the server's state: a resumed run gives the uninterrupted run's numbers to the
bit (``tests/test_benchmark.py``, tiny synthetic sites).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from pfedsam.config import PFedSAMConfig
from pfedsam.flare.aggregation import check_contribution, outlying_updates, robust_combine, update_norm
from pfedsam.model.checkpoint import atomic_torch_save
from pfedsam.train import SiteTrainer, run_final, run_round


@dataclass
class Federation:
    """The result of one in-process run.

    Arguments:
      trainers (dict): site -> its SiteTrainer after the final personalization (model = G(T) + its
        personal part; Ditto's personal copy in ``personal``).
      personal (dict): site -> Ditto's personal copy (None for other methods).
      global_state (dict): G(T), the model every site received last.
      rounds (list): per round, site -> {"val": {personalized, global}, "steps", "images", "seconds"}.
      final (dict): site -> {"val": scores of ``final_split`` (with each image's, ``images``), "steps", "seconds"}.
      rejected (list): (round, site, reason) of contributions the aggregation rules refused.
      globals (list): G(0), G(1), ..., G(T) when ``federate(keep_globals=True)``, else empty.
      seconds (float): wall time of the whole run, the time of every interrupted part included.
      resumed_at (list): the round each later part of an interrupted run started from (empty: one part).
    """

    trainers: dict[str, SiteTrainer]
    personal: dict[str, dict | None]
    global_state: dict[str, np.ndarray]
    rounds: list[dict] = field(default_factory=list)
    final: dict[str, dict] = field(default_factory=dict)
    rejected: list[tuple[int, str, str]] = field(default_factory=list)
    globals: list[dict[str, np.ndarray]] = field(default_factory=list)
    seconds: float = 0.0
    resumed_at: list[int] = field(default_factory=list)


def _leaves_mapped(obj: object, leaf: Callable[[object], object]) -> object:
    """``obj`` with ``leaf`` applied to everything that is not a dict, list or tuple."""
    if isinstance(obj, dict):
        return {k: _leaves_mapped(v, leaf) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_leaves_mapped(v, leaf) for v in obj)
    return leaf(obj)


def _saveable(obj: object) -> object:
    """Arrays as tensors and numpy scalars as Python numbers: what ``torch.load(weights_only=True)`` reads."""
    return _leaves_mapped(obj, lambda v: torch.from_numpy(v) if isinstance(v, np.ndarray)
                          else v.item() if isinstance(v, np.generic) else v)


def _restored(obj: object) -> object:
    """The inverse of ``_saveable``: tensors back to the numpy arrays the engine keeps."""
    return _leaves_mapped(obj, lambda v: v.numpy() if isinstance(v, torch.Tensor) else v)


def load_rounds(path: Path, fingerprint: dict) -> dict | None:
    """The state a checkpointed run saved after its last finished round; None when ``path`` does not exist.

    A file written by another run (``fingerprint``: the row, its settings, code and machine, as the
    caller defines them) is refused with the keys that differ: resuming it would mix two runs in one row.
    """
    if not path.is_file():
        return None
    try:
        saved = _restored(torch.load(path, map_location="cpu", weights_only=True))
    except Exception as exc:
        raise ValueError(f"{path}: unreadable round checkpoint ({type(exc).__name__}: {exc}); delete it to "
                         "start the run over") from exc
    if differ := differences(saved.get("fingerprint", {}), fingerprint):
        raise ValueError(f"{path} holds rounds of another run ({'; '.join(differ)}); delete it to start the run over")
    return saved


def differences(was: dict, now: dict, prefix: str = "") -> list[str]:
    """``key: was X, now Y`` for every leaf that differs between two nested dicts."""
    out = []
    for key in sorted({*was, *now}):
        a, b = was.get(key), now.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: was {a!r}, now {b!r}")
    return out


def site_weight(trainer: SiteTrainer, steps: int) -> float:
    """The aggregation weight a site's result claims under ``federation.weighting`` (as the aggregator)."""
    how = trainer.cfg.federation.weighting
    return 1.0 if how == "uniform" else float(steps if how == "steps" else trainer.num_train_images)


def aggregate(contributions: dict[str, tuple[dict, float]], reference: dict, cfg: PFedSAMConfig, local_names: set,
              rnd: int, last_median: float | None) -> tuple[dict, list[tuple[int, str, str]], float | None]:
    """The server's step: refuse invalid or outlying contributions, combine the rest (PFedSAMAggregator's rules).

    Returns (new global state, rejections, median accepted update norm).
    """
    fed = cfg.federation
    rejected, kept = [], {}
    for site, (weights, w) in contributions.items():
        reason = check_contribution(weights, reference, local_names, rnd, rnd, 1)
        if reason:
            rejected.append((rnd, site, reason))
        else:
            kept[site] = (weights, w)
    norms = {s: update_norm(w, reference) for s, (w, _) in kept.items()}
    for site, reason in outlying_updates(norms, fed.max_update_ratio, last_median).items():
        rejected.append((rnd, site, reason))
        del kept[site]
    if len(kept) < fed.min_clients:
        raise RuntimeError(f"round {rnd}: only {len(kept)} contribution(s) accepted, federation.min_clients is "
                           f"{fed.min_clients}: {rejected}")
    median = float(np.median([norms[s] for s in kept])) if kept else last_median
    return robust_combine(list(kept.values()), fed.aggregation, fed.trim_fraction), rejected, median


def federate(make_trainer: Callable[[str], SiteTrainer], sites: list[str], final_split: str = "test",
             log: Callable[[str], None] = print, evaluate: bool = True, keep_globals: bool = False,
             checkpoint: Path | None = None, fingerprint: dict | None = None) -> Federation:
    """Run every round and the final personalization of one job at all ``sites``, in this process.

    Arguments:
      make_trainer: site -> its SiteTrainer (settings, data folder, work folder).
      sites: the participating sites, in a fixed order.
      final_split: the split ``run_final`` scores (``test``; ``val`` when choosing settings).
      log: where progress lines go.
      evaluate: score every round and run the final personalization; False only trains the
        rounds (``benchmarks/screen.py`` needs just the global trajectory).
      keep_globals: keep every round's global model in ``Federation.globals``.
      checkpoint: a file to save the run's state to after every round and to resume from (None: none).
      fingerprint: what identifies the run in ``checkpoint``; a file of another run is refused.
    """
    start = time.perf_counter()
    trainers = {s: make_trainer(s) for s in sites}
    for s, t in trainers.items():
        fill = t.warm_cache()
        if fill["computed"]:
            log(f"{s}: cache filled, {fill['computed']} images in {fill['seconds']:.0f} s")
    cfg = trainers[sites[0]].cfg
    if cfg.federation.compression != "none":
        raise ValueError("the in-process engine sends weights uncompressed; use federation.compression: none")
    mode = cfg.federation.mode
    glob = trainers[sites[0]].get_global_state()  # G(0): every site builds the same model from the seed
    own = {s: None for s in sites}  # mode 'local': each site's own copy of the global part
    personal: dict[str, dict | None] = {s: None for s in sites}
    out = Federation(trainers, personal, glob, globals=[glob] if keep_globals else [])
    local_names = set(trainers[sites[0]].local_names())
    last_median, first, spent = None, 0, 0.0
    fingerprint = fingerprint or {}
    if checkpoint is not None and (saved := load_rounds(checkpoint, fingerprint)) is not None:
        first, spent, glob, last_median = saved["next_round"], saved["seconds"], saved["global"], saved["last_median"]
        own.update(saved["own"])
        personal.update(saved["personal"])
        for s, t in trainers.items():
            t.set_local_state(saved["local"][s])
        out.rounds, out.rejected, out.globals = saved["rounds"], saved["rejected"], saved["globals"]
        out.resumed_at = [*saved["resumed_at"], first]
        log(f"resumed after round {first - 1} from {checkpoint} ({spent:.0f} s spent before)")
    for rnd in range(first, cfg.federation.rounds):
        contributions, entry = {}, {}
        for s, t in trainers.items():
            t.set_global_state(own[s] if own[s] is not None else glob)
            res = run_round(t, rnd, personal[s], evaluate=evaluate)
            personal[s] = res.personal
            weights = t.get_global_state()
            if mode == "local":
                own[s] = weights
            contributions[s] = (weights, site_weight(t, res.global_steps))
            entry[s] = {"val": res.val, "steps": res.steps, "images": res.images, "seconds": res.seconds,
                        "busy_s": sum(p["seconds"] for p in res.phases.values())}
        out.rounds.append(entry)
        if mode != "local":  # the server's average is ignored by local-only sites: skip computing it
            glob, rejected, last_median = aggregate(contributions, glob, cfg, local_names, rnd, last_median)
            out.rejected += rejected
        if keep_globals:
            out.globals.append(glob)
        if checkpoint is not None:
            atomic_torch_save(_saveable({
                "fingerprint": fingerprint, "next_round": rnd + 1, "seconds": spent + time.perf_counter() - start,
                "global": glob, "own": own, "personal": personal, "last_median": last_median,
                "local": {s: t.get_local_state() for s, t in trainers.items()}, "rounds": out.rounds,
                "rejected": out.rejected, "globals": out.globals, "resumed_at": out.resumed_at}), checkpoint)
        score = (f"mean val Dice personalized {np.mean([e['val']['personalized']['dice'] for e in entry.values()]):.4f}"
                 if evaluate else "trained")
        log(f"round {rnd}: {score} ({spent + time.perf_counter() - start:.0f} s)")
    for s, t in trainers.items() if evaluate else ():
        t.set_global_state(own[s] if own[s] is not None else glob)
        res = run_final(t, personal[s], split=final_split, per_image=True)
        personal[s] = res.personal
        out.final[s] = {"val": res.val, "steps": res.steps, "seconds": res.seconds,
                        "lr_scale": res.lr_scale, "val_by_lr_scale": res.val_by_lr_scale}
    out.global_state, out.seconds = glob, spent + time.perf_counter() - start
    return out
