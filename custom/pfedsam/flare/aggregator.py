"""Server: the aggregator of global parameters and the component that writes the run report."""

from __future__ import annotations

import numpy as np
from nvflare.apis.dxo import DXO, DataKind, MetaKey, from_shareable
from nvflare.apis.event_type import EventType
from nvflare.apis.fl_component import FLComponent
from nvflare.apis.fl_constant import ReservedKey
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable
from nvflare.app_common.abstract.aggregator import Aggregator
from nvflare.app_common.abstract.model import ModelLearnableKey
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.app_event_type import AppEventType

from .aggregation import check_contribution, check_weight, outlying_updates, robust_combine, update_norm
from .common import (
    BEST_MODEL_KEY,
    CONFIG_FILE,
    METRICS_KEY,
    NUM_EXAMPLES_KEY,
    ROUND_METRICS,
    WIRE_BYTES_KEY,
    job_config,
    model_facts,
    run_dir,
    state_dir,
)
from .report import RunReport, budget_facts


class ReportWriter(FLComponent):
    """Keeps the RunReport of this job and writes report.json / report.md after every round.

    Arguments:
      config_file (str): the job's YAML (recorded in the report header).
    """

    def __init__(self, config_file: str = CONFIG_FILE) -> None:
        super().__init__()
        self.config_file = config_file
        self.report = RunReport()

    def handle_event(self, event_type: str, fl_ctx: FLContext) -> None:
        if event_type == EventType.START_RUN:
            cfg = job_config(fl_ctx, self.config_file)
            facts = model_facts(fl_ctx, self.config_file)
            self.report = RunReport({
                "weighting": cfg.federation.weighting, "aggregation": cfg.federation.aggregation,
                "min_clients": cfg.federation.min_clients,
                "name": fl_ctx.get_job_id(), "mode": cfg.federation.mode, "backbone": cfg.backbone,
                "rounds": cfg.federation.rounds, "local_steps": cfg.train.local_steps,
                "global_steps": cfg.train.global_steps, "schedule": cfg.train.schedule,
                "kd_weight": cfg.train.kd_weight, "num_experts": cfg.lmoe.num_experts,
                # 'expert_blocks', not 'lmoe_blocks': no local parameter's prefix in what the server writes
                "placement": cfg.lmoe.placement, "expert_blocks": cfg.lmoe.blocks,
                "global_from_embedding": cfg.train.global_from_embedding, "prompt": cfg.prompt,
                "compression": cfg.federation.compression, "global_params": len(facts.global_names),
                "global_bytes_fp32": int(sum(v.nbytes for v in facts.initial_global.values())),
                "data": cfg.data.root or "SYNTHETIC (generated)",
                **budget_facts(cfg),
            })
        elif event_type == AppEventType.ROUND_STARTED:
            self.report.start_round(int(fl_ctx.get_prop(AppConstants.CURRENT_ROUND)))
        elif event_type == AppEventType.ROUND_DONE:
            self.report.end_round(int(fl_ctx.get_prop(AppConstants.CURRENT_ROUND)), True)
            self.write(fl_ctx)

    def write(self, fl_ctx: FLContext) -> None:
        path = self.report.write(run_dir(fl_ctx))
        self.report.write(state_dir(fl_ctx))  # kept after FLARE removes the run folder
        self.log_info(fl_ctx, f"run report written to {path}")


def _wire_bytes(weights: dict) -> int:
    return int(sum(np.asarray(v).nbytes for v in weights.values()))


def _allowed_metrics(metrics: object) -> dict:
    """The allow-listed, numeric part of what a site reported (the report never stores more)."""
    if not isinstance(metrics, dict):
        return {}
    return {k: float(v) for k, v in metrics.items()
            if k in ROUND_METRICS and isinstance(v, (int, float, np.number)) and not isinstance(v, bool)}


class NotEnoughSites(RuntimeError):
    """Fewer than ``federation.min_clients`` contributions were accepted in a round: the run stops."""


class GlobalWeightsAggregator(Aggregator):
    """Robust, bounded aggregation of the global parameters; every contribution is validated first.

    Weight of a site (``federation.weighting``): the training examples it used
    (``pfedsam_num_examples`` in the DXO meta), 1 (``uniform``) or its optimizer steps
    (``MetaKey.NUM_STEPS_CURRENT_ROUND``); a finite positive integer, equal to what the site
    declared at its first accepted round. Rejected, with the reason logged and reported: a result
    for another round, unknown or local keys, missing keys, a shape or dtype mismatch, NaN/Inf,
    a bad or changed weight, an update whose norm exceeds ``federation.max_update_ratio`` x the
    median of the other sites'. The accepted ones are combined by ``federation.aggregation``
    (weighted mean, trimmed mean, median). Sites that sent nothing are recorded as missing; with
    fewer than ``federation.min_clients`` accepted the run ends with NotEnoughSites (G unchanged).
    The best global model is chosen on accepted contributions' validation Dice only.

    Arguments:
      config_file (str): the job's YAML (decides the global and local names).
      report_id (str): id of the ReportWriter component ("" = no report).
    """

    def __init__(self, config_file: str = CONFIG_FILE, report_id: str = "report_writer") -> None:
        super().__init__()
        self.config_file = config_file
        self.report_id = report_id
        self._accepted: dict[str, tuple[dict, float]] = {}
        self._metrics: dict[str, dict] = {}
        self._declared: dict[str, int] = {}  # site -> weight declared at its first accepted round
        self._answered: set[str] = set()
        self._last_median_norm: float | None = None
        self._best: float | None = None

    def _report(self, fl_ctx: FLContext) -> RunReport | None:
        if not self.report_id:
            return None
        component = fl_ctx.get_engine().get_component(self.report_id)
        return component.report if isinstance(component, ReportWriter) else None

    def site_weight(self, dxo: DXO, fed) -> tuple[object, str]:
        """The raw weight a result claims under ``federation.weighting`` and its name."""
        if fed.weighting == "uniform":
            return 1, "uniform weight"
        if fed.weighting == "steps":
            return dxo.get_meta_prop(MetaKey.NUM_STEPS_CURRENT_ROUND), "step count"
        return dxo.get_meta_prop(NUM_EXAMPLES_KEY), "example count"

    def accept(self, shareable: Shareable, fl_ctx: FLContext) -> bool:
        site = shareable.get_peer_prop(ReservedKey.IDENTITY_NAME, "?")
        self._answered.add(site)
        current = fl_ctx.get_prop(AppConstants.CURRENT_ROUND)
        contribution_round = shareable.get_cookie(AppConstants.CONTRIBUTION_ROUND)
        fed = job_config(fl_ctx, self.config_file).federation
        reason, weights, steps, weight, metrics, dxo_meta = None, {}, None, None, {}, {}
        try:
            dxo = from_shareable(shareable)
        except Exception as exc:  # not a DXO at all
            reason = f"result is not a DXO: {exc}"
        else:
            weights = dxo.data or {}
            dxo_meta = dxo.meta or {}
            steps = dxo.get_meta_prop(MetaKey.NUM_STEPS_CURRENT_ROUND)
            metrics = _allowed_metrics(dxo.get_meta_prop(METRICS_KEY))
            if dxo.data_kind != DataKind.WEIGHTS:
                reason = f"expected DataKind.WEIGHTS, got {dxo.data_kind}"
            else:
                model = fl_ctx.get_prop(AppConstants.GLOBAL_MODEL)
                reference = model[ModelLearnableKey.WEIGHTS] if model is not None else {}
                facts = model_facts(fl_ctx, self.config_file)
                reason = check_contribution(weights, reference, facts.local_names, contribution_round, current, steps)
                if reason is None:
                    weight, what = self.site_weight(dxo, fed)
                    reason = check_weight(weight, self._declared.get(site), what)
            if reason is None and site in self._accepted:
                reason = "a second result from this site in the same round"
        accepted = reason is None
        if accepted:
            self._declared.setdefault(site, int(weight))
            self._accepted[site] = (weights, float(weight))
            self._metrics[site] = metrics
            self.log_info(fl_ctx, f"round {current}: accepted {site} (weight {int(weight)})")
        else:
            self.log_warning(fl_ctx, f"round {current}: REJECTED contribution from {site}: {reason}")
        report = self._report(fl_ctx)
        if report is not None and current is not None:
            nbytes = dxo_meta.get(WIRE_BYTES_KEY) or _wire_bytes(weights)
            report.add_contribution(int(current), site, list(weights), nbytes if isinstance(nbytes, int) else 0,
                                    metrics, accepted, reason,
                                    steps if isinstance(steps, (int, float)) and not isinstance(steps, bool) else None)
            if accepted:
                report.set_weight(int(current), site, int(weight))
        return accepted

    def _reject_outliers(self, reference: dict, fed, report: RunReport | None, rnd: int, fl_ctx: FLContext) -> None:
        norms = {site: update_norm(w, reference) for site, (w, _) in self._accepted.items()}
        for site, reason in outlying_updates(norms, fed.max_update_ratio, self._last_median_norm).items():
            self.log_warning(fl_ctx, f"round {rnd}: REJECTED contribution from {site}: {reason}")
            del self._accepted[site]
            self._metrics.pop(site, None)
            if report is not None:
                report.reject(rnd, site, reason)
        kept = [norms[s] for s in self._accepted]
        if kept:
            self._last_median_norm = float(np.median(kept))

    def _record_missing(self, report: RunReport | None, rnd: int, fl_ctx: FLContext) -> list[str]:
        """Sites of the federation that sent no result this round (dead, timed out, disconnected)."""
        clients = sorted(c.name for c in fl_ctx.get_engine().get_clients())
        already = set(report.data["rounds"][-1]["sites"]) if report is not None and report.data["rounds"] else set()
        missing = [c for c in clients if c not in self._answered and c not in already]
        for site in missing:
            self.log_warning(fl_ctx, f"round {rnd}: no result from {site} (dead, disconnected or timed out)")
            if report is not None:
                report.add_missing(rnd, site, "no result before the task timeout (site dead, disconnected or too slow)")
        return missing

    def _select_best(self, reference: dict, rnd: int, report: RunReport | None, fl_ctx: FLContext) -> None:
        """Best G(t) by the accepted sites' weighted personalized validation Dice on it."""
        scores = [(self._metrics[s].get("val_dice_personalized"), w) for s, (_, w) in self._accepted.items()]
        scores = [(d, w) for d, w in scores if d is not None and np.isfinite(d)]
        if not scores:
            return
        score = float(sum(d * w for d, w in scores) / sum(w for _, w in scores))
        if self._best is not None and score <= self._best:
            return
        if not all(np.isfinite(v).all() for v in reference.values()):
            return
        self._best = score
        fl_ctx.set_prop(BEST_MODEL_KEY, dict(reference), private=True, sticky=False)
        self.fire_event(AppEventType.GLOBAL_BEST_MODEL_AVAILABLE, fl_ctx)
        if report is not None:
            report.data["best"] = {"round": rnd, "val_dice_personalized": score, "sites": sorted(self._accepted)}

    def aggregate(self, fl_ctx: FLContext) -> Shareable:
        model = fl_ctx.get_prop(AppConstants.GLOBAL_MODEL)
        current = model[ModelLearnableKey.WEIGHTS]
        rnd = int(fl_ctx.get_prop(AppConstants.CURRENT_ROUND) or 0)
        fed = job_config(fl_ctx, self.config_file).federation
        report = self._report(fl_ctx)
        self._reject_outliers(current, fed, report, rnd, fl_ctx)
        missing = self._record_missing(report, rnd, fl_ctx)
        if len(self._accepted) < fed.min_clients:
            message = (f"round {rnd}: only {len(self._accepted)} contribution(s) accepted, federation.min_clients is "
                       f"{fed.min_clients} (missing: {missing or 'none'}; see report.json for each rejection); "
                       "the run stops with the global model of the previous round")
            if report is not None:
                report.data["stopped"] = message
                writer = fl_ctx.get_engine().get_component(self.report_id)
                writer.write(fl_ctx)
            self.log_error(fl_ctx, message)
            raise NotEnoughSites(message)
        self._select_best(current, rnd, report, fl_ctx)
        result = robust_combine(list(self._accepted.values()), fed.aggregation, fed.trim_fraction)
        sites = ", ".join(f"{s} x{w:g}" for s, (_, w) in sorted(self._accepted.items()))
        self.log_info(fl_ctx, f"aggregated ({fed.aggregation}) {len(self._accepted)} site(s): {sites}")
        return DXO(data_kind=DataKind.WEIGHTS, data=result).to_shareable()

    def reset(self, fl_ctx: FLContext) -> None:
        self._accepted, self._metrics, self._answered = {}, {}, set()
