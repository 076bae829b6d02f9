"""One round and the final personalization at a site, and the step budget they spend.

The single implementation that the FLARE executor, ``pfedsam train`` and the benchmark's
in-process rows call. ``plan_steps`` decides the budget once: every method spends
``rounds * (local_steps + global_steps) + final_steps`` optimizer steps per site; a method
without a personal part (no L-MoE, not Ditto) spends its local share in its global phase and
the final share in its last round's global phase (or, with ``federation.final_finetune``,
fine-tuning the global parameters after the last round).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from ..config import PFedSAMConfig, local_start_round, personal_phase
from .site import SiteTrainer, Stream

# Phases that train the global parameters that are sent (their steps are the round's "global steps").
GLOBAL_PHASES = ("global", "joint", "concurrent")
Phases = tuple[tuple[str, int], ...]


@dataclass(frozen=True)
class StepPlan:
    """Optimizer steps per site of one run, phase by phase.

    Arguments:
      rounds (tuple): for each round, its phases in order as (phase, steps).
      final (tuple): the final personalization's phases, run against the last global model.
      batch_size (int): images per step.
    """

    rounds: tuple[Phases, ...]
    final: Phases
    batch_size: int

    @property
    def total_steps(self) -> int:
        return sum(n for phases in (*self.rounds, self.final) for _, n in phases)

    @property
    def total_images(self) -> int:
        return self.total_steps * self.batch_size

    def start(self, phase: str, rnd: int) -> int:
        """Samples ``phase`` drew in rounds before ``rnd`` (``rnd = rounds``: before the final phases)."""
        return self.batch_size * sum(n for phases in self.rounds[:rnd] for p, n in phases if p == phase)

    def summary(self) -> dict:
        """Steps and images per site, as the report and the benchmark print them."""
        return {
            "steps_per_round": [dict(phases) for phases in self.rounds],
            "final_steps": dict(self.final),
            "total_steps": self.total_steps,
            "total_images": self.total_images,
            "batch_size": self.batch_size,
        }


def plan_steps(cfg: PFedSAMConfig) -> StepPlan:
    """The phases and optimizer steps of every round and of the final personalization.

    Arguments:
      cfg: the run settings (``train.local_steps/global_steps/final_steps``, ``federation.rounds``).
    """
    t, rounds = cfg.train, cfg.federation.rounds
    per_round = t.local_steps + t.global_steps
    part = personal_phase(cfg)
    if part is not None:
        one = ((t.schedule, per_round),) if part == "local" and t.schedule in ("joint", "concurrent") else (
            (part, t.local_steps), ("global", t.global_steps))
        plan = [one] * rounds
        final: Phases = ((part, t.final_steps),)
        # rounds before the local phase starts (train.local_start) train the global parameters only
        plan[:local_start_round(cfg)] = [(("global", per_round),)] * local_start_round(cfg)
    elif cfg.federation.final_finetune:
        plan = [(("global", per_round),)] * rounds
        final = (("finetune", t.final_steps),)
    else:  # nothing to personalize: the final share goes into the last global phase
        plan = [(("global", per_round),)] * (rounds - 1) + [(("global", per_round + t.final_steps),)]
        final = ()
    return StepPlan(tuple(plan), final, t.batch_size)


@dataclass
class RoundResult:
    """What one round at a site produced.

    Arguments:
      phases (dict): phase -> its stats (steps, images, losses, seconds).
      val (dict): ``personalized`` / ``global`` -> validation metrics, taken after the personal
        phases and before the global phase (the personalized model is G(t) + what it just learned).
      personal (dict|None): Ditto's personal copy after the round (None for other methods).
      seconds (float): wall time of the round at the site.
      lr_scale (float|None): the final personalization's learning-rate scale the site kept
        (``train.final_lr_scales``; None without that search).
      val_by_lr_scale (dict): validation Dice of each scale the search tried.
    """

    phases: dict[str, dict] = field(default_factory=dict)
    val: dict[str, dict] = field(default_factory=dict)
    personal: dict[str, np.ndarray] | None = None
    seconds: float = 0.0
    lr_scale: float | None = None
    val_by_lr_scale: dict[float, float] = field(default_factory=dict)

    @property
    def steps(self) -> int:
        return int(sum(p["steps"] for p in self.phases.values()))

    @property
    def global_steps(self) -> int:
        return int(sum(p["steps"] for name, p in self.phases.items() if name in GLOBAL_PHASES))

    @property
    def images(self) -> int:
        return int(sum(p["images"] for p in self.phases.values()))


def _run_phase(
    trainer: SiteTrainer, phase: str, steps: int, personal: dict | None, stream: Stream,
    abort: Callable[[], bool] | None,
) -> tuple[dict, dict | None]:
    if phase == "local":
        return trainer.run_local_phase(steps, abort, stream), personal
    if phase == "personal":
        personal = trainer.get_global_state() if personal is None else personal  # G(t) on the first round
        personal, stats = trainer.run_personal_phase(personal, steps, abort, stream)
        return stats, personal
    if phase in ("global", "finetune"):
        return trainer.run_global_phase(steps, abort, stream), personal
    if phase == "joint":
        return trainer.run_joint_phase(steps, abort, stream), personal
    if phase == "concurrent":
        return trainer.run_concurrent_phase(steps, abort, stream), personal
    raise ValueError(f"unknown phase {phase!r}")


def has_one_model(trainer: SiteTrainer, personal: dict | None = None) -> bool:
    """True when the personalized model is the global one: no L-MoE or local head, no Ditto copy."""
    return personal is None and not trainer.model.has_local


def evaluate_both(trainer: SiteTrainer, split: str, personal: dict | None = None,
                  per_image: bool = False) -> dict[str, dict]:
    """Metrics of the personalized model (Ditto: its personal copy) and of the global model on ``split``.

    A site without a personal part (no L-MoE or local head, not Ditto) has one model: it is
    scored once and the scores are reported under both names. ``per_image`` adds each
    image's scores (``images``), as ``SiteTrainer.evaluate`` does.
    """
    out = {"global": trainer.evaluate(split, "global", per_image=per_image)}
    if has_one_model(trainer, personal):
        out["personalized"] = dict(out["global"])
        return out
    with trainer.global_swapped(personal):
        out["personalized"] = trainer.evaluate(split, "personalized", per_image=per_image)
    return out


def run_round(
    trainer: SiteTrainer, rnd: int, personal: dict | None = None, abort: Callable[[], bool] | None = None,
    evaluate: bool = True,
) -> RoundResult:
    """One round at a site, from the global parameters G(t) already loaded into ``trainer``.

    Arguments:
      trainer: the site (its model holds G(t) and its own L-MoE).
      rnd: the round number t (seeds this round's batches; 0 <= t < federation.rounds).
      personal: Ditto's personal copy from the previous round (None: G(t), or not Ditto).
      abort: returns True when the task should stop (checked every step).
      evaluate: score the validation split (False for rows that only train, e.g. pooled data).
    Afterwards the model holds G_i(t+1), the update to send.
    """
    plan = plan_steps(trainer.cfg)
    if not 0 <= rnd < len(plan.rounds):
        raise ValueError(f"round {rnd} is outside this job's {len(plan.rounds)} rounds (federation.rounds)")
    out = RoundResult()
    start = time.perf_counter()
    for phase, steps in plan.rounds[rnd]:
        if phase == "global" and evaluate:
            out.val = evaluate_both(trainer, "val", personal)
        stream = Stream(phase, rnd, plan.start(phase, rnd))
        out.phases[phase], personal = _run_phase(trainer, phase, steps, personal, stream, abort)
        if abort is not None and abort():
            break
    if evaluate and not out.val:  # no global phase (joint, concurrent): score after training
        out.val = evaluate_both(trainer, "val", personal)
    out.personal, out.seconds = personal, time.perf_counter() - start
    return out


def run_final(
    trainer: SiteTrainer, personal: dict | None = None, split: str = "test",
    abort: Callable[[], bool] | None = None, per_image: bool = False,
) -> RoundResult:
    """The final personalization against the last global model G(T), then scores on ``split``.

    The L-MoE (or Ditto's copy) was last trained against G(T-1); this step trains it against
    G(T), the global model it is paired with from now on. ``val`` of the result holds the
    scores on ``split``: the global model before, the personalized model after.

    Arguments:
      trainer: the site, its model holding G(T) and its own L-MoE.
      personal: Ditto's personal copy (None otherwise).
      split: where to score (``test``; ``val`` when choosing settings).
      abort: returns True when the task should stop.
      per_image: also keep each image's scores (``images``) in ``val``.
    """
    plan = plan_steps(trainer.cfg)
    out = RoundResult()
    start = time.perf_counter()
    if not plan.final:  # nothing trains after the last round: the two models are scored as they are now
        scores = evaluate_both(trainer, split, personal, per_image)
    else:
        scores = {"global": trainer.evaluate(split, "global", per_image=per_image)}
        if trainer.cfg.train.final_lr_scales:
            personal = _final_lr_search(trainer, plan, personal, abort, out)
        else:
            out.phases, personal = _final_phases(trainer, plan, personal, abort)
        with trainer.global_swapped(personal):
            scores["personalized"] = trainer.evaluate(split, "personalized", per_image=per_image)
    out.val, out.personal, out.seconds = scores, personal, time.perf_counter() - start
    return out


def _final_phases(trainer: SiteTrainer, plan: StepPlan, personal: dict | None,
                  abort: Callable[[], bool] | None) -> tuple[dict[str, dict], dict | None]:
    rounds, phases = len(plan.rounds), {}
    for phase, steps in plan.final:
        stream = Stream(phase, rounds, plan.start(phase, rounds))  # the same batches on every call
        phases[phase], personal = _run_phase(trainer, phase, steps, personal, stream, abort)
    return phases, personal


def lr_scale_nearness(scale: float) -> float:
    """How near a learning-rate scale is to 1 (0 at 1, lower further away on a log scale): the tie-break
    wherever a validation split chooses between scales, so that a tie keeps the configured rate."""
    return -abs(float(np.log(scale)))


def _final_lr_search(trainer: SiteTrainer, plan: StepPlan, personal: dict | None,
                     abort: Callable[[], bool] | None, out: RoundResult) -> dict | None:
    """The final phases once per ``train.final_lr_scales`` from the same start; the site keeps the one best
    on its validation split (a tie: the scale nearest 1) and records each scale's Dice in ``out``."""
    # Loading a state copies it into the model, so neither these snapshots nor ``personal`` change.
    glob, local = trainer.get_global_state(), trainer.get_local_state()
    best: tuple | None = None
    for scale in trainer.cfg.train.final_lr_scales:
        trainer.set_global_state(glob)
        trainer.set_local_state(local)
        with trainer.lr_scaled(scale):
            phases, kept = _final_phases(trainer, plan, personal, abort)
        with trainer.global_swapped(kept):
            dice = trainer.evaluate("val", "personalized")["dice"]
        out.val_by_lr_scale[float(scale)] = dice
        rank = (dice, lr_scale_nearness(scale))
        if best is None or rank > best[0]:
            best = (rank, scale, phases, kept, trainer.get_global_state(), trainer.get_local_state())
        if abort is not None and abort():
            break
    _, out.lr_scale, out.phases, kept, glob, local = best
    trainer.set_global_state(glob)
    trainer.set_local_state(local)
    return kept
