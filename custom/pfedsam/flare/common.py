"""What every FLARE component of this job shares: the job's YAML and the server's model facts."""

from __future__ import annotations

import json
import threading
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
_PHASES = ("local", "personal", "joint", "concurrent", "global")
_PHASE_STATS = ("steps", "images", "loss", "seg", "kd", "balance", "prox", "local_loss")
ROUND_METRICS: dict[str, type] = {
    "val_dice_personalized": float, "val_dice_global": float, "val_hd95_personalized": float,
    "val_hd95_global": float, "round_seconds": float, "train_steps": float, "train_images": float,
    "train_images_per_s": float, "peak_rss_mb": float,
    **{f"{phase}_{stat}": float for phase in _PHASES for stat in _PHASE_STATS},
}
FINAL_MODELS = ("global", "personalized")  # final result: {model: {stat: number}} + the export status
# summarize()'s keys; any number passes, NaN included (empty_fp of a site without empty frames, hd95 off)
FINAL_STATS: dict[str, type] = {"n": float, "n_empty": float, "dice": float, "hd95": float, "n_fg": float,
                                "dice_fg": float, "empty_fp": float}
FINAL_STATUS: dict[str, tuple[str, ...]] = {"export": ("onnx", "none", "failed")}
FINAL_NUMBERS: dict[str, type] = {"final_steps": float}
TB_TAGS = frozenset(ROUND_METRICS) | {f"test_dice_{m}" for m in FINAL_MODELS}  # scalars sent to TensorBoard


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


class ModelFacts:
    """The registry's verdict for this job's model: which names are global/local, and G(0).

    The names come from a weight-less build (``build_pfedsam(cfg, weights=False)``): a site's
    filters need only them. ``initial_global`` (the server's persistor and report) builds the
    real model on first use.
    """

    def __init__(self, cfg: PFedSAMConfig) -> None:
        self.cfg = cfg
        skeleton = build_pfedsam(cfg, weights=False)
        self.global_names = frozenset(skeleton.registry.names(ParamKind.GLOBAL))
        self.local_names = frozenset(skeleton.registry.names(ParamKind.LOCAL))
        self._initial: dict[str, np.ndarray] | None = None
        self._lock = threading.Lock()

    @property
    def initial_global(self) -> dict[str, np.ndarray]:
        with self._lock:
            if self._initial is None:
                model = build_pfedsam(self.cfg)
                self._initial = {k: v.float().numpy() for k, v in global_state(model).items()}
                if set(self._initial) != self.global_names:
                    raise RuntimeError("the weight-less and the real model disagree on the global names")
            return self._initial


_FACTS: dict[tuple[str, str], ModelFacts] = {}
_LOCK = threading.Lock()


def model_facts(fl_ctx: FLContext, config_file: str = CONFIG_FILE) -> ModelFacts:
    """The job's ModelFacts, built once per process (names without weights; G(0) when first asked)."""
    key = (fl_ctx.get_job_id(), config_file)
    with _LOCK:
        if key not in _FACTS:
            _FACTS[key] = ModelFacts(job_config(fl_ctx, config_file))
        return _FACTS[key]


def check_shipped_code(fl_ctx: FLContext) -> str:
    """Fail when the pfedsam this process imports differs from the code the job bundles (``jobs.check_code``)."""
    from .. import jobs

    custom = Path(fl_ctx.get_engine().get_workspace().get_app_custom_dir(fl_ctx.get_job_id()))
    return jobs.check_code(custom)


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
