"""Server workflows: the federated rounds, then the final evaluation phase (sized in the JSON, from the YAML)."""

from __future__ import annotations

import inspect

from nvflare.apis.client import Client
from nvflare.apis.dxo import DXO, DataKind, from_shareable
from nvflare.apis.fl_constant import ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable
from nvflare.app_common.abstract.model import ModelLearnableKey
from nvflare.app_common.abstract.response_processor import ResponseProcessor
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.workflows.broadcast_and_process import BroadcastAndProcess
from nvflare.app_common.workflows.scatter_and_gather import ScatterAndGather

from .. import jobs
from ..config import PFedSAMConfig
from .aggregator import ReportWriter
from .common import (
    CONFIG_FILE,
    check_shipped_code,
    completed_rounds,
    job_config,
    resumed_run_dir,
    run_dir,
)
from .persistor import GLOBAL_FILE, load_weights


def _given_args(cls: type, kwargs: dict) -> dict:
    """The constructor arguments FLARE built ``cls`` with: the JSON's ``args`` over the signature's defaults."""
    params = inspect.signature(cls.__init__).parameters
    return {**{k: p.default for k, p in params.items() if p.default is not inspect.Parameter.empty}, **kwargs}


def check_settings(fl_ctx: FLContext, config_file: str, component: str, args: dict) -> PFedSAMConfig:
    """Raise ValueError when a workflow's JSON arguments disagree with the job's YAML; return the config.

    ``pfedsam job make`` / ``pfedsam job sync`` write the YAML's rounds, minimum sites, waits,
    timeouts and task names into config_fed_server.json (``jobs.flare_settings``): the JSON is
    what runs, and a hand edit of either file must not leave the two telling different stories.
    """
    cfg = job_config(fl_ctx, config_file)
    wrong = jobs.settings_mismatch(cfg, component, args)
    if wrong:
        raise ValueError(f"config_fed_server.json workflow '{component}' disagrees with {config_file}: "
                         f"{'; '.join(wrong)}. Regenerate the JSON from the YAML: pfedsam job sync --job JOB_FOLDER")
    return cfg


class PFedSAMScatterAndGather(ScatterAndGather):
    """ScatterAndGather that checks its JSON arguments against the job's YAML before the first round.

    Rounds, start round, min_clients, waits, timeout and task name are ScatterAndGather's own
    constructor arguments, written into the JSON from the YAML by ``pfedsam job make``; nothing
    is changed at run time. With ``federation.resume_from`` the server also checks that the
    resumed job completed exactly ``federation.start_round`` rounds.

    Arguments:
      config_file (str): the job's YAML in the app's config folder.
      **kwargs: ScatterAndGather's arguments (num_rounds, start_round, min_clients, ...).
    """

    def __init__(self, config_file: str = CONFIG_FILE, **kwargs) -> None:
        super().__init__(**kwargs)
        self.config_file = config_file
        self.flare_args = _given_args(ScatterAndGather, kwargs)

    def start_controller(self, fl_ctx: FLContext) -> None:
        self.log_info(fl_ctx, check_shipped_code(fl_ctx))
        fed = check_settings(fl_ctx, self.config_file, jobs.SAG_ID, self.flare_args).federation
        if fed.resume_from:  # the round numbering continues where the interrupted job stopped
            done = completed_rounds(resumed_run_dir(fl_ctx, fed.resume_from))
            if done != fed.start_round:
                left = f"the job then runs the remaining {fed.rounds - done}" if done < fed.rounds else \
                    f"it already finished all {fed.rounds} rounds"
                raise ValueError(f"federation.resume_from: job '{fed.resume_from}' completed {done} round(s) but "
                                 f"federation.start_round is {fed.start_round}; set federation.start_round: {done} "
                                 f"({left})")
        super().start_controller(fl_ctx)


class FinalEvaluation(ResponseProcessor):
    """Sends the final global model to every site; collects test metrics into the run report.

    Arguments:
      report_id (str): id of the ReportWriter component.
    """

    def __init__(self, report_id: str = "report_writer") -> None:
        super().__init__()
        self.report_id = report_id

    def _report(self, fl_ctx: FLContext):
        component = fl_ctx.get_engine().get_component(self.report_id)
        return component if isinstance(component, ReportWriter) else None

    def create_task_data(self, task_name: str, fl_ctx: FLContext) -> Shareable:
        model = fl_ctx.get_prop(AppConstants.GLOBAL_MODEL)
        weights = model[ModelLearnableKey.WEIGHTS] if model is not None else load_weights(run_dir(fl_ctx) / GLOBAL_FILE)
        return DXO(data_kind=DataKind.WEIGHTS, data=weights).to_shareable()

    def process_client_response(self, client: Client, task_name: str, response: Shareable, fl_ctx: FLContext) -> bool:
        writer = self._report(fl_ctx)
        if response.get_return_code() != ReturnCode.OK:
            self.log_error(fl_ctx, f"{client.name}: final evaluation failed ({response.get_return_code()})")
            if writer:
                writer.report.add_final(client.name, {"error": str(response.get_return_code())})
            return True  # recorded; one failing site must not abort the others' final results
        results = from_shareable(response).data
        if writer:
            writer.report.add_final(client.name, results)
        return True

    def final_process(self, fl_ctx: FLContext) -> bool:
        writer = self._report(fl_ctx)
        if writer:
            writer.write(fl_ctx)
        return True


class PFedSAMBroadcast(BroadcastAndProcess):
    """BroadcastAndProcess that checks its JSON arguments (min responses, wait, timeout) against the YAML.

    Arguments:
      config_file (str): the job's YAML in the app's config folder.
      **kwargs: BroadcastAndProcess's arguments (processor, task_name, min_responses_required, ...).
    """

    def __init__(self, config_file: str = CONFIG_FILE, **kwargs) -> None:
        super().__init__(**kwargs)
        self.config_file = config_file
        self.flare_args = _given_args(BroadcastAndProcess, kwargs)

    def start_controller(self, fl_ctx: FLContext) -> None:
        check_settings(fl_ctx, self.config_file, jobs.FINAL_ID, self.flare_args)
        super().start_controller(fl_ctx)
