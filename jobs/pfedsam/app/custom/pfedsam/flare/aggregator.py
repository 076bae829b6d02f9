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

from .aggregation import check_contribution, weighted_mean
from .common import CONFIG_FILE, METRICS_KEY, WIRE_BYTES_KEY, job_config, model_facts, run_dir
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
                "name": fl_ctx.get_job_id(), "mode": cfg.federation.mode, "backbone": cfg.backbone,
                "rounds": cfg.federation.rounds, "local_steps": cfg.train.local_steps,
                "global_steps": cfg.train.global_steps, "schedule": cfg.train.schedule,
                "kd_weight": cfg.train.kd_weight, "num_experts": cfg.lmoe.num_experts, "prompt": cfg.prompt,
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
        self.log_info(fl_ctx, f"run report written to {path}")


def _wire_bytes(weights: dict) -> int:
    return int(sum(np.asarray(v).nbytes for v in weights.values()))


class GlobalWeightsAggregator(Aggregator):
    """Weighted mean of the global parameters; every contribution is validated first.

    Weight of a site = the local steps it reports in ``MetaKey.NUM_STEPS_CURRENT_ROUND``.
    Rejected (with the reason logged and reported): a result for another round, unknown or
    local keys, missing keys, a shape or dtype mismatch, NaN/Inf, a non-positive weight. The
    round goes on with the accepted ones; when none is accepted, G stays unchanged.

    Arguments:
      config_file (str): the job's YAML (decides the global and local names).
      report_id (str): id of the ReportWriter component ("" = no report).
    """

    def __init__(self, config_file: str = CONFIG_FILE, report_id: str = "report_writer") -> None:
        super().__init__()
        self.config_file = config_file
        self.report_id = report_id
        self._accepted: dict[str, tuple[dict, float]] = {}

    def _report(self, fl_ctx: FLContext) -> RunReport | None:
        if not self.report_id:
            return None
        component = fl_ctx.get_engine().get_component(self.report_id)
        return component.report if isinstance(component, ReportWriter) else None

    def accept(self, shareable: Shareable, fl_ctx: FLContext) -> bool:
        site = shareable.get_peer_prop(ReservedKey.IDENTITY_NAME, "?")
        current = fl_ctx.get_prop(AppConstants.CURRENT_ROUND)
        contribution_round = shareable.get_cookie(AppConstants.CONTRIBUTION_ROUND)
        reason, weights, steps, metrics, dxo_meta = None, {}, None, {}, {}
        try:
            dxo = from_shareable(shareable)
        except Exception as exc:  # not a DXO at all
            reason = f"result is not a DXO: {exc}"
        else:
            weights = dxo.data or {}
            dxo_meta = dxo.meta or {}
            steps = dxo.get_meta_prop(MetaKey.NUM_STEPS_CURRENT_ROUND)
            metrics = dxo.get_meta_prop(METRICS_KEY) or {}
            if dxo.data_kind != DataKind.WEIGHTS:
                reason = f"expected DataKind.WEIGHTS, got {dxo.data_kind}"
            else:
                model = fl_ctx.get_prop(AppConstants.GLOBAL_MODEL)
                reference = model[ModelLearnableKey.WEIGHTS] if model is not None else {}
                facts = model_facts(fl_ctx, self.config_file)
                reason = check_contribution(weights, reference, facts.local_names, contribution_round, current, steps)
            if reason is None and site in self._accepted:
                reason = "a second result from this site in the same round"
        accepted = reason is None
        if accepted:
            self._accepted[site] = (weights, float(steps))
            self.log_info(fl_ctx, f"round {current}: accepted {site} (weight {steps})")
        else:
            self.log_warning(fl_ctx, f"round {current}: REJECTED contribution from {site}: {reason}")
        report = self._report(fl_ctx)
        if report is not None and current is not None:
            nbytes = dxo_meta.get(WIRE_BYTES_KEY) or _wire_bytes(weights)
            report.add_contribution(int(current), site, list(weights), nbytes, metrics, accepted,
                                    reason, steps if isinstance(steps, (int, float)) else None)
        return accepted

    def aggregate(self, fl_ctx: FLContext) -> Shareable:
        model = fl_ctx.get_prop(AppConstants.GLOBAL_MODEL)
        current = model[ModelLearnableKey.WEIGHTS]
        if not self._accepted:
            self.log_warning(fl_ctx, "no contribution accepted this round: the global model stays unchanged")
            result = dict(current)
        else:
            result = weighted_mean(list(self._accepted.values()))
            sites = ", ".join(f"{s} x{w:g}" for s, (_, w) in sorted(self._accepted.items()))
            self.log_info(fl_ctx, f"aggregated {len(self._accepted)} site(s): {sites}")
        return DXO(data_kind=DataKind.WEIGHTS, data=result).to_shareable()

    def reset(self, fl_ctx: FLContext) -> None:
        self._accepted = {}
