"""Server-side persistence of the global parameters (the only model state the server has)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from nvflare.apis.event_type import EventType
from nvflare.apis.fl_context import FLContext
from nvflare.app_common.abstract.model import ModelLearnable, ModelLearnableKey, make_model_learnable
from nvflare.app_common.abstract.model_persistor import ModelPersistor
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.app_event_type import AppEventType

from ..fileio import atomic_write
from .common import (
    BEST_MODEL_KEY,
    CONFIG_FILE,
    PROGRESS_FILE,
    job_config,
    model_facts,
    resumed_run_dir,
    run_dir,
    state_dir,
)

GLOBAL_FILE = "global_model.npz"
BEST_FILE = "best_global_model.npz"


def save_weights(path: Path, weights: dict[str, np.ndarray], backup: bool = False) -> None:
    """Atomic .npz write (a crash never leaves a half-written model); NaN/Inf is refused (ValueError)."""
    bad = [k for k, v in weights.items() if not np.isfinite(np.asarray(v)).all()]
    if bad:
        raise ValueError(f"refusing to save parameters with NaN/Inf in {len(bad)} array(s), e.g. '{bad[0]}' ({path})")
    atomic_write(path, lambda tmp: np.savez(tmp, **weights), suffix=".npz", backup=backup)


def load_weights(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as data:
        return {k: data[k] for k in data.files}


class GlobalModelPersistor(ModelPersistor):
    """Holds G(t): builds G(0) from the job's YAML, saves G after every round and the best one.

    Files in the server's run folder: ``global_model.npz`` (latest), ``global_rounds/round_N.npz``
    (G after round N, for audits and tests) and ``best_global_model.npz`` (best by the accepted
    sites' personalized validation Dice, chosen by GlobalWeightsAggregator). A copy of the latest
    G and the number of completed rounds also go to ``<workspace>/pfedsam_state/<job id>/``,
    which outlives the run folder, for ``federation.resume_from``. Nothing non-finite is saved.

    Arguments:
      config_file (str): the job's YAML in the app's config folder.
      keep_rounds (bool): also keep G after every round.
    """

    def __init__(self, config_file: str = CONFIG_FILE, keep_rounds: bool = True) -> None:
        super().__init__()
        self.config_file = config_file
        self.keep_rounds = keep_rounds

    def load_model(self, fl_ctx: FLContext) -> ModelLearnable:
        resume = job_config(fl_ctx, self.config_file).federation.resume_from
        latest = (resumed_run_dir(fl_ctx, resume) if resume else run_dir(fl_ctx)) / GLOBAL_FILE
        if resume and not latest.is_file():
            raise FileNotFoundError(f"federation.resume_from: job '{resume}' saved no {GLOBAL_FILE}")
        if latest.is_file():  # continue from the last saved global parameters
            self.log_info(fl_ctx, f"resuming global parameters from {latest}")
            weights = load_weights(latest)
        else:
            weights = dict(model_facts(fl_ctx, self.config_file).initial_global)
        return make_model_learnable(weights, {})

    def save_model(self, model: ModelLearnable, fl_ctx: FLContext) -> None:
        weights = model[ModelLearnableKey.WEIGHTS]
        folder = run_dir(fl_ctx)
        save_weights(folder / GLOBAL_FILE, weights)
        rnd = fl_ctx.get_prop(AppConstants.CURRENT_ROUND)
        if self.keep_rounds and rnd is not None:
            save_weights(folder / "global_rounds" / f"round_{rnd}.npz", weights)
        if rnd is not None:  # the resume copy, outside the run folder FLARE removes when the job ends
            keep = state_dir(fl_ctx)
            save_weights(keep / GLOBAL_FILE, weights, backup=True)
            atomic_write(keep / PROGRESS_FILE, lambda tmp: Path(tmp).write_text(
                json.dumps({"completed_rounds": int(rnd) + 1})))

    def handle_event(self, event_type: str, fl_ctx: FLContext) -> None:
        if event_type == AppEventType.GLOBAL_BEST_MODEL_AVAILABLE:
            best = fl_ctx.get_prop(BEST_MODEL_KEY)  # set by GlobalWeightsAggregator: accepted sites only
            if best is not None:
                save_weights(run_dir(fl_ctx) / BEST_FILE, best)
        elif event_type == EventType.START_RUN:
            model_facts(fl_ctx, self.config_file)  # fail early on a bad config
