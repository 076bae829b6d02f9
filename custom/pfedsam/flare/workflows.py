"""Server workflows: federated rounds sized by the job's YAML, then the final evaluation phase."""

from __future__ import annotations

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

from ..config import task_timeout
from .aggregator import ReportWriter
from .common import CONFIG_FILE, completed_rounds, job_config, resumed_run_dir, run_dir
from .persistor import GLOBAL_FILE, load_weights


class PFedSAMScatterAndGather(ScatterAndGather):
    """ScatterAndGather whose rounds, min_clients and waits come from the job's YAML (one settings file).

    Arguments:
      config_file (str): the job's YAML; ``federation.rounds``, ``min_clients``, ``wait_after_min_s``,
        ``task_timeout_s`` override the JSON arguments of the same meaning.
      **kwargs: passed on to ScatterAndGather (aggregator_id, persistor_id, ...).
    """

    def __init__(self, config_file: str = CONFIG_FILE, **kwargs) -> None:
        super().__init__(**kwargs)
        self.config_file = config_file

    def start_controller(self, fl_ctx: FLContext) -> None:
        fed = job_config(fl_ctx, self.config_file).federation
        self._num_rounds = fed.rounds
        if fed.resume_from:  # continue the interrupted job's round numbering up to the same total
            self._start_round = completed_rounds(resumed_run_dir(fl_ctx, fed.resume_from))
            self._num_rounds = fed.rounds - self._start_round
            if self._num_rounds <= 0:
                raise ValueError(f"job '{fed.resume_from}' already finished all {fed.rounds} rounds")
        self._min_clients = fed.min_clients
        self._wait_time_after_min_received = fed.wait_after_min_s
        self._train_timeout = task_timeout(job_config(fl_ctx, self.config_file))
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
    """BroadcastAndProcess that waits for ``federation.min_clients`` responses (from the YAML)."""

    def __init__(self, config_file: str = CONFIG_FILE, **kwargs) -> None:
        super().__init__(**kwargs)
        self.config_file = config_file

    def start_controller(self, fl_ctx: FLContext) -> None:
        fed = job_config(fl_ctx, self.config_file).federation
        self.min_responses_required = fed.min_clients
        self.wait_time_after_min_received = fed.wait_after_min_s
        self.timeout = task_timeout(job_config(fl_ctx, self.config_file))
        super().start_controller(fl_ctx)
