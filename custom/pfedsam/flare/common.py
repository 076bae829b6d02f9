"""What every FLARE component of this job shares: the job's YAML and the server's model facts."""

from __future__ import annotations

import json
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
BEST_MODEL_KEY = "pfedsam_best_global"  # fl_ctx prop: global parameters the aggregator selected as best
NUM_EXAMPLES_KEY = "pfedsam_num_examples"  # DXO meta key: training examples the site used (FedAvg weight)

# -- the metric allow-list: exactly what the executor emits, nothing else ---------------------------------
# One table for the filters (GlobalOnlyFilter, MetricsOnlyFilter), the server's report and TensorBoard.
# A name that is not here never leaves a site; code that emits a new metric adds its name here.
_PHASES = ("local", "personal", "joint", "global")
_PHASE_STATS = ("steps", "images", "loss", "seg", "kd", "balance", "prox")
ROUND_METRICS: dict[str, type] = {
    "val_dice_personalized": float, "val_dice_global": float, "val_hd95_personalized": float,
    "val_hd95_global": float, "round_seconds": float, "train_steps": float, "train_images": float,
    "train_images_per_s": float, "peak_rss_mb": float,
    **{f"{phase}_{stat}": float for phase in _PHASES for stat in _PHASE_STATS},
}
FINAL_MODELS = ("global", "personalized")  # final result: {model: {stat: number}} + the export status
FINAL_STATS: dict[str, type] = {"n": float, "n_empty": float, "dice": float, "hd95": float}
FINAL_STATUS: dict[str, tuple[str, ...]] = {"export": ("onnx", "none", "failed")}
FINAL_NUMBERS: dict[str, type] = {"final_steps": float}
TB_TAGS = frozenset(ROUND_METRICS) | {f"test_dice_{m}" for m in FINAL_MODELS}  # scalars sent to TensorBoard


def job_config(fl_ctx: FLContext, config_file: str = CONFIG_FILE) -> PFedSAMConfig:
    """The job's run settings, read from this app's config folder."""
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
    """Fail when an installed pfedsam shadows a *different* copy shipped in the job's app/custom.

    FLARE appends app/custom to sys.path, so an installed package of the same name wins. When it
    is the same code (the editable install of the repo the job came from) that is harmless; when
    it differs, a site would silently run other code than the job was built with.
    """
    from .. import jobs

    imported = Path(jobs.PACKAGE_DIR)
    shipped = Path(fl_ctx.get_engine().get_workspace().get_app_custom_dir(fl_ctx.get_job_id())) / "pfedsam"
    if not shipped.is_dir() or shipped.resolve() == imported.resolve():
        return f"pfedsam from {imported}"
    if jobs.package_digest(imported) != jobs.package_digest(shipped):
        raise RuntimeError(
            f"the pfedsam package installed at {imported} differs from the copy shipped with this job "
            f"({shipped}) and shadows it; uninstall it (pip uninstall pfedsam-flare) or install the job's version"
        )
    return f"pfedsam from {imported} (same code as the job's copy)"


STATE_DIRNAME = "pfedsam_state"
PROGRESS_FILE = "progress.json"


def state_dir(fl_ctx: FLContext, job_id: str | None = None) -> Path:
    """``<this participant's workspace root>/pfedsam_state/<job id>``: resume state kept outside the
    job's run folder, which FLARE deletes when a job ends (also when a site process was killed)."""
    root = Path(fl_ctx.get_engine().get_workspace().get_root_dir())
    return root / STATE_DIRNAME / (job_id or fl_ctx.get_job_id())


def resumed_run_dir(fl_ctx: FLContext, resume_from: str) -> Path:
    """The saved state of an earlier job on this participant.

    ``resume_from`` is a job id: its resume folder ``<workspace root>/pfedsam_state/<job id>``
    (written every round, kept after the job ends), else its run folder ``<workspace root>/<job id>``
    if FLARE still has it. Or an absolute path to an archive holding one run folder per
    participant, named ``server`` for the server and by site name for the sites.
    """
    if Path(resume_from).is_absolute():
        name = "server" if fl_ctx.get_engine().get_workspace().site_name in ("server", "simulator_server") \
            else fl_ctx.get_identity_name()
        folder = Path(resume_from) / name
    else:
        if resume_from == fl_ctx.get_job_id():
            raise ValueError(f"federation.resume_from: '{resume_from}' is this job's own id")
        kept = state_dir(fl_ctx, resume_from)
        folder = kept if kept.is_dir() else Path(fl_ctx.get_engine().get_workspace().get_run_dir(resume_from))
    if not folder.is_dir():
        raise FileNotFoundError(f"federation.resume_from: no saved state of '{resume_from}' here "
                                f"(looked for {state_dir(fl_ctx, resume_from)} and {folder})")
    return folder


def completed_rounds(server_run_dir: Path) -> int:
    """Rounds an earlier job finished: its resume folder's progress.json, else its per-round files."""
    progress = server_run_dir / PROGRESS_FILE
    if progress.is_file():
        return int(json.loads(progress.read_text())["completed_rounds"])
    done = [int(p.stem.split("_")[1]) for p in (server_run_dir / "global_rounds").glob("round_*.npz")]
    return max(done) + 1 if done else 0
