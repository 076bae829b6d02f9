"""What every FLARE component of this job shares: the job's YAML and the server's model facts."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from nvflare.apis.fl_context import FLContext

from ..config import PFedSAMConfig, load_config
from ..model import ParamKind, build_pfedsam, global_state

CONFIG_FILE = "pfedsam.yaml"
METRICS_KEY = "pfedsam_metrics"  # DXO meta key of the per-round metrics a site reports
FP16_KEY = "pfedsam_fp16"  # DXO meta key naming the arrays quantized to float16 on the wire
WIRE_BYTES_KEY = "pfedsam_wire_bytes"  # DXO meta key: array bytes as received, before dequantizing


_CODE_CHECKED: set[str] = set()


def job_config(fl_ctx: FLContext, config_file: str = CONFIG_FILE) -> PFedSAMConfig:
    """The job's run settings, read from this app's config folder.

    The first call of a job in a process also checks that the imported pfedsam is the code the
    job bundles (if it bundles any): every component reads the settings first, so a mismatch is
    reported before other code misreads them.
    """
    if fl_ctx.get_job_id() not in _CODE_CHECKED:
        check_shipped_code(fl_ctx)
        _CODE_CHECKED.add(fl_ctx.get_job_id())
    workspace = fl_ctx.get_engine().get_workspace()
    path = Path(workspace.get_app_config_dir(fl_ctx.get_job_id())) / config_file
    return load_config(path)


def run_dir(fl_ctx: FLContext) -> Path:
    """This job's run folder on this participant (server: where report.json goes)."""
    return Path(fl_ctx.get_engine().get_workspace().get_run_dir(fl_ctx.get_job_id()))


def app_dir(fl_ctx: FLContext) -> Path:
    return Path(fl_ctx.get_engine().get_workspace().get_app_dir(fl_ctx.get_job_id()))


@dataclass(frozen=True)
class ModelFacts:
    """The registry's verdict for this job's model: which names are global/local, initial G(0)."""

    global_names: frozenset[str]
    local_names: frozenset[str]
    initial_global: dict[str, np.ndarray]


_FACTS: dict[tuple[str, str], ModelFacts] = {}
_LOCK = threading.Lock()


def model_facts(fl_ctx: FLContext, config_file: str = CONFIG_FILE) -> ModelFacts:
    """Build the job's model once per process and keep what the filters and aggregator need."""
    key = (fl_ctx.get_job_id(), config_file)
    with _LOCK:
        if key not in _FACTS:
            cfg = job_config(fl_ctx, config_file)
            model = build_pfedsam(cfg)
            _FACTS[key] = ModelFacts(
                global_names=frozenset(model.registry.names(ParamKind.GLOBAL)),
                local_names=frozenset(model.registry.names(ParamKind.LOCAL)),
                initial_global={k: v.float().numpy() for k, v in global_state(model).items()},
            )
        return _FACTS[key]


def check_shipped_code(fl_ctx: FLContext) -> str:
    """Fail when the pfedsam this process imports differs from the code the job bundles (``jobs.check_code``)."""
    from .. import jobs

    custom = Path(fl_ctx.get_engine().get_workspace().get_app_custom_dir(fl_ctx.get_job_id()))
    return jobs.check_code(custom)


def resumed_run_dir(fl_ctx: FLContext, resume_from: str) -> Path:
    """The run folder of an earlier job on this participant.

    ``resume_from`` is a job id (its folder ``<workspace root>/<job id>`` on every participant),
    or an absolute path to an archive holding one such folder per participant, named
    ``server`` for the server and by site name for the sites.
    """
    if Path(resume_from).is_absolute():
        name = "server" if fl_ctx.get_engine().get_workspace().site_name in ("server", "simulator_server") \
            else fl_ctx.get_identity_name()
        folder = Path(resume_from) / name
    else:
        folder = Path(fl_ctx.get_engine().get_workspace().get_run_dir(resume_from))
    if not folder.is_dir():
        raise FileNotFoundError(f"federation.resume_from: no run folder {folder} of '{resume_from}' here")
    return folder


def completed_rounds(server_run_dir: Path) -> int:
    """Rounds an earlier job finished, from the per-round global files its persistor kept."""
    done = [int(p.stem.split("_")[1]) for p in (server_run_dir / "global_rounds").glob("round_*.npz")]
    return max(done) + 1 if done else 0
