"""Client: one pFedSAM round per ``train`` task, and the final evaluate/export task.

The site's L-MoE lives in the site's own job workspace (``pfedsam_local_state.pt``), written
atomically after every round, so a restarted client resumes it; it is never put into a
result. Results carry only ``trainer.get_global_state()`` and then pass the GlobalOnlyFilter.
"""

from __future__ import annotations

import os
import resource
import time
import traceback
from pathlib import Path

import numpy as np
import yaml
from nvflare.apis.dxo import DXO, DataKind, MetaKey, from_shareable
from nvflare.apis.executor import Executor
from nvflare.apis.fl_constant import ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable, make_reply
from nvflare.apis.signal import Signal
from nvflare.app_common.app_constant import AppConstants

from ..config import PFedSAMConfig
from ..train import SiteTrainer, run_final, run_round
from .common import (
    CONFIG_FILE,
    METRICS_KEY,
    NUM_EXAMPLES_KEY,
    ROUND_METRICS,
    TB_TAGS,
    app_dir,
    check_shipped_code,
    job_config,
    resumed_run_dir,
    state_dir,
)
from .persistor import load_weights, save_weights

LOCAL_STATE_FILE = "pfedsam_local_state.pt"
OWN_GLOBAL_FILE = "pfedsam_own_global.npz"  # mode 'local' only: the site's own copy of G
PERSONAL_FILE = "pfedsam_personal_global.npz"  # mode 'ditto' only: the personal copy v (never sent)
SITE_CONFIG = "pfedsam_site.yaml"  # in the site's startup-kit local/ folder


def site_settings(fl_ctx: FLContext) -> dict:
    """Site-owned settings, never part of the job: ``local/pfedsam_site.yaml`` then env vars.

    Keys: ``data_dir`` (this site's data folder), ``device`` (cpu, cuda, cuda:1, ...),
    ``num_threads``. Env vars ``PFEDSAM_DATA_DIR`` / ``PFEDSAM_DEVICE`` override the file.
    """
    root = Path(fl_ctx.get_engine().get_workspace().get_root_dir())
    settings: dict = {}
    path = root / "local" / SITE_CONFIG
    if path.is_file():
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: expected a mapping with data_dir / device / num_threads")
        unknown = set(loaded) - {"data_dir", "device", "num_threads"}
        if unknown:
            raise ValueError(f"{path}: unknown key(s) {sorted(unknown)}; known: data_dir, device, num_threads")
        settings.update(loaded)
    if os.environ.get("PFEDSAM_DATA_DIR"):
        settings["data_dir"] = os.environ["PFEDSAM_DATA_DIR"]
    if os.environ.get("PFEDSAM_DEVICE"):
        settings["device"] = os.environ["PFEDSAM_DEVICE"]
    return settings


def check_incoming_global(weights: object, expected: list[str]) -> dict:
    """The global parameters the server sent, refused (ValueError) unless complete and finite.

    A poisoned or corrupted global model must never be trained on: the site would carry NaN
    into its L-MoE. The task fails with this message and the site's saved state stays as it was.
    """
    if not isinstance(weights, dict):
        raise ValueError(f"incoming global model is a {type(weights).__name__}, not a dict of arrays")
    missing = sorted(set(expected) - set(weights))
    if missing:
        raise ValueError(f"incoming global model misses {len(missing)} parameter(s), e.g. '{missing[0]}'")
    bad = sorted(k for k, v in weights.items() if not np.isfinite(np.asarray(v, np.float64)).all())
    if bad:
        raise ValueError(f"refusing the incoming global model: NaN/Inf in {len(bad)} parameter(s), e.g. '{bad[0]}'; "
                         "this site's saved L-MoE state is left untouched")
    return weights


def allowed_metrics(metrics: dict) -> dict[str, float]:
    """The round metrics as sent: exactly the allow-listed names (ROUND_METRICS), as floats.

    A name the executor emits but the table lacks is an error here, at the site, instead of a
    result the site's own GlobalOnlyFilter would block.
    """
    unknown = sorted(set(metrics) - set(ROUND_METRICS))
    if unknown:
        raise KeyError(f"metric(s) {unknown} are not in ROUND_METRICS (pfedsam/flare/common.py); add them there")
    return {k: float(v) for k, v in metrics.items()}


class PFedSAMExecutor(Executor):
    """Runs the site's part of pFedSAM.

    Arguments:
      config_file (str): the job's YAML in the app's config folder.
      train_task (str): task name of a federated round.
      final_task (str): task name of the final evaluation and export.
      log_writer_id (str): id of a TBWriter component for analytics ("" = none).
    """

    def __init__(self, config_file: str = CONFIG_FILE, train_task: str = "train", final_task: str = "final_eval",
                 log_writer_id: str = "log_writer") -> None:
        super().__init__()
        self.config_file = config_file
        self.train_task = train_task
        self.final_task = final_task
        self.log_writer_id = log_writer_id
        self.trainer: SiteTrainer | None = None
        self.cfg: PFedSAMConfig | None = None
        self._keep_dir: Path | None = None
        self._round: int | None = None

    # -- setup -------------------------------------------------------------------------------------------
    def _trainer(self, fl_ctx: FLContext) -> SiteTrainer:
        if self.trainer is None:
            self.log_info(fl_ctx, check_shipped_code(fl_ctx))
            cfg = job_config(fl_ctx, self.config_file)
            settings = site_settings(fl_ctx)
            if "device" in settings:
                cfg.train.device = str(settings["device"])
            if "num_threads" in settings:
                cfg.train.num_threads = int(settings["num_threads"])
            site = fl_ctx.get_identity_name()
            data_dir = settings.get("data_dir")
            self.trainer = SiteTrainer(cfg, site, site_dir=data_dir, workdir=app_dir(fl_ctx) / "work")
            self._keep_dir = state_dir(fl_ctx)
            self.cfg = cfg
            if self.trainer.skipped:
                self.log_warning(fl_ctx, f"skipped {len(self.trainer.skipped)} bad file(s): "
                                         f"{[str(b.path) for b in self.trainer.skipped][:5]}")
            self.log_info(fl_ctx, f"site {site}: data {self.trainer.site_dir}, device {self.trainer.device}, "
                                  f"{self.trainer.num_train_images} training images")
            start = time.perf_counter()
            self.trainer.warm_cache()
            self.log_info(fl_ctx, f"prefix feature cache filled in {time.perf_counter() - start:.1f} s")
        return self.trainer

    def _log(self, fl_ctx: FLContext, scalars: dict[str, float], step: int) -> None:
        writer = fl_ctx.get_engine().get_component(self.log_writer_id) if self.log_writer_id else None
        if writer is None:
            return
        for tag, value in scalars.items():
            if tag in TB_TAGS and isinstance(value, (int, float)) and np.isfinite(value):
                writer.add_scalar(tag, float(value), global_step=step)

    # -- tasks -------------------------------------------------------------------------------------------
    def execute(self, task_name: str, shareable: Shareable, fl_ctx: FLContext, abort_signal: Signal) -> Shareable:
        if task_name not in (self.train_task, self.final_task):
            return make_reply(ReturnCode.TASK_UNKNOWN)
        try:
            if task_name == self.train_task:
                return self._train(shareable, fl_ctx, abort_signal)
            return self._final(shareable, fl_ctx, abort_signal)
        except Exception as exc:  # report, never crash the client process
            self.log_error(fl_ctx, f"{task_name} failed: {exc}\n{traceback.format_exc()}")
            return make_reply(ReturnCode.EXECUTION_EXCEPTION)

    def _load_round_state(self, trainer: SiteTrainer, incoming: dict, fl_ctx: FLContext, rnd: int) -> None:
        self._round = rnd
        folder = app_dir(fl_ctx)
        own = folder / OWN_GLOBAL_FILE
        if self.cfg.federation.mode == "local" and own.is_file():
            trainer.set_global_state(load_weights(own))  # local-only baseline: the server's average is ignored
        else:
            trainer.set_global_state(check_incoming_global(incoming, trainer.global_names()))
        # this job's own state; the copy under pfedsam_state/ is read only by a job resuming this one
        if trainer.load_local_state(folder / LOCAL_STATE_FILE, before_round=rnd):
            self.log_info(fl_ctx, f"resumed this site's L-MoE state (round {trainer.loaded_state_round})")
        elif self.cfg.federation.resume_from:  # first round of a resumed job: the old job's L-MoE
            old_dir = resumed_run_dir(fl_ctx, self.cfg.federation.resume_from)
            candidates = [old_dir / LOCAL_STATE_FILE, old_dir / folder.name / LOCAL_STATE_FILE]
            if not any(trainer.load_local_state(c, before_round=rnd) for c in candidates):
                raise FileNotFoundError(f"federation.resume_from: no saved L-MoE state at this site "
                                        f"(looked for {candidates[0]} and {candidates[1]})")
            self.log_info(fl_ctx, f"resumed this site's L-MoE state from {old_dir} "
                                  f"(round {trainer.loaded_state_round})")
        for note in getattr(trainer, "state_notes", []):
            self.log_warning(fl_ctx, f"skipped a saved L-MoE state: {note}")

    def _personal(self, trainer: SiteTrainer, fl_ctx: FLContext) -> dict | None:
        """Ditto's personal copy of the global parameters from the last round; None otherwise or at first."""
        path = app_dir(fl_ctx) / PERSONAL_FILE
        return load_weights(path) if self.cfg.federation.mode == "ditto" and path.is_file() else None

    def _save_site_state(self, trainer: SiteTrainer, personal: dict | None, folder: Path) -> None:
        """What stays at the site between tasks: the L-MoE and, for Ditto, the personal copy.

        Saved with the round it completed, the previous version kept as a backup, and a copy in
        the site's resume folder outside the job; a non-finite state is refused (the task fails,
        the previous good state stays).
        """
        rnd = getattr(self, "_round", None)
        trainer.save_local_state(folder / LOCAL_STATE_FILE, rnd)
        if self._keep_dir is not None:
            trainer.save_local_state(self._keep_dir / LOCAL_STATE_FILE, rnd)
        if personal is not None:
            save_weights(folder / PERSONAL_FILE, personal, backup=True)

    def _result_meta(self, trainer: SiteTrainer, steps: int, metrics: dict) -> dict:
        """The DXO meta of a train result: FedAvg weights and the allow-listed metrics only."""
        return {
            MetaKey.NUM_STEPS_CURRENT_ROUND: int(steps),
            NUM_EXAMPLES_KEY: int(trainer.num_train_images),
            MetaKey.INITIAL_METRICS: {"val_dice_personalized": float(metrics["val_dice_personalized"])},
            METRICS_KEY: allowed_metrics(metrics),
        }

    def _train(self, shareable: Shareable, fl_ctx: FLContext, abort_signal: Signal) -> Shareable:
        trainer = self._trainer(fl_ctx)
        cfg = self.cfg
        site = fl_ctx.get_identity_name()
        rnd = int(shareable.get_header(AppConstants.CURRENT_ROUND, 0))
        dxo = from_shareable(shareable)
        self._load_round_state(trainer, dxo.data, fl_ctx, rnd)
        result = run_round(trainer, rnd, self._personal(trainer, fl_ctx), abort=lambda: abort_signal.triggered)
        if abort_signal.triggered:
            return make_reply(ReturnCode.TASK_ABORTED)
        folder = app_dir(fl_ctx)
        self._save_site_state(trainer, result.personal, folder)
        weights = trainer.get_global_state()
        if cfg.federation.mode == "local":
            save_weights(folder / OWN_GLOBAL_FILE, weights)
        val = result.val
        metrics = {"val_dice_personalized": val["personalized"]["dice"], "val_dice_global": val["global"]["dice"],
                   "val_hd95_personalized": val["personalized"]["hd95"], "val_hd95_global": val["global"]["hd95"],
                   "round_seconds": result.seconds, "train_steps": result.steps, "train_images": result.images}
        for phase, res in result.phases.items():
            metrics.update({f"{phase}_{k}": v for k, v in res.items() if k != "seconds"})
        busy = sum(res["seconds"] for res in result.phases.values())
        metrics["train_images_per_s"] = result.images / busy if busy > 0 else 0.0
        # this site process's peak resident memory so far (Linux reports KiB)
        metrics["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        self._log(fl_ctx, metrics, rnd)
        self.log_info(fl_ctx, f"{site} round {rnd}: val Dice personalized {metrics['val_dice_personalized']:.4f} "
                              f"global {metrics['val_dice_global']:.4f}, {result.steps} steps "
                              f"({result.images} images), {result.seconds:.1f} s")
        if cfg.federation.keep_round_states:  # audit trail, stays at the site
            save_weights(folder / "sent" / f"round_{rnd}.npz", weights)
            trainer.save_local_state(folder / "local_states" / f"round_{rnd}.pt")
        meta = self._result_meta(trainer, result.global_steps, metrics)
        out = DXO(data_kind=DataKind.WEIGHTS, data=weights, meta=meta)
        return out.to_shareable()

    def _final(self, shareable: Shareable, fl_ctx: FLContext, abort_signal: Signal) -> Shareable:
        trainer = self._trainer(fl_ctx)
        cfg = self.cfg
        site = fl_ctx.get_identity_name()
        self._load_round_state(trainer, from_shareable(shareable).data, fl_ctx, cfg.federation.rounds)
        final = run_final(trainer, self._personal(trainer, fl_ctx))
        self._save_site_state(trainer, final.personal, app_dir(fl_ctx))
        results: dict = {"global": final.val["global"], "personalized": final.val["personalized"],
                         "final_steps": final.steps}
        folder = app_dir(fl_ctx) / "personalized_model"
        with trainer.global_swapped(final.personal):  # Ditto's personalized model is its personal copy
            trainer.save_model(folder, {"round": cfg.federation.rounds - 1,  # the last round's G(T)
                                        "rounds": cfg.federation.rounds, "mode": cfg.federation.mode})
        results["export"] = "none"
        if cfg.federation.export_format == "onnx":
            try:
                from ..export import export_onnx  # export sits below flare; lazy: onnx loads only to export

                export_onnx(folder, app_dir(fl_ctx) / "export")
                results["export"] = "onnx"
            except Exception as exc:  # training results still count when export fails
                results["export"] = "failed"  # the reason stays in this site's log
                self.log_error(fl_ctx, f"ONNX export failed: {exc}\n{traceback.format_exc()}")
        self._log(fl_ctx, {f"test_dice_{w}": results[w]["dice"] for w in ("personalized", "global")},
                  cfg.federation.rounds)
        if final.lr_scale is not None:  # the search stays in this site's log: its scores are not sent
            tried = ", ".join(f"{k:g}: {v:.4f}" for k, v in final.val_by_lr_scale.items())
            self.log_info(fl_ctx, f"{site} final personalization: lr scale {final.lr_scale:g} kept "
                                  f"(validation Dice by scale {tried})")
        self.log_info(fl_ctx, f"{site} final test Dice personalized {results['personalized']['dice']:.4f} "
                              f"global {results['global']['dice']:.4f}; model in {folder}")
        return DXO(data_kind=DataKind.METRICS, data=results).to_shareable()
