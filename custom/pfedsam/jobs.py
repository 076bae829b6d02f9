"""FLARE job folders from one source: the job definition in ``jobs/pfedsam`` plus the installed package.

A job folder holds FLARE's configuration (``meta.json``, ``app/config/config_fed_*.json``) and
the run settings (``app/config/pfedsam.yaml``), never a committed copy of the code. Every FLARE
argument that has a meaning in the YAML (rounds, start round, minimum sites, waits, timeouts)
and the task names are written into the JSON by :func:`sync_job` (called by ``pfedsam job
make`` and ``pfedsam job sync``): what a FLARE reader sees in ``config_fed_server.json`` is
what runs, and the server workflows refuse to start when the JSON and the YAML disagree.

Where the code comes from (``code`` of :func:`make_variant`):

* ``installed`` (default): the ``pfedsam-flare`` package installed on every participant.
  ``app/custom`` holds only a README; FLARE treats a job with an ``app/custom`` folder as
  bring-your-own-code, which skips the site's class allow-list (the default list, also the
  simulator's, has no pfedsam class) and needs the submitter's ``byoc`` right.
* ``bundle``: a copy of the installed package in ``app/custom/pfedsam`` with its version and
  digest in ``app/custom/pfedsam_bundle.json``, for sites that accept custom code and do not
  install the package; a participant whose imported pfedsam differs refuses to run.
* ``none``: no ``app/custom`` at all, for sites that allow no custom code: each one installs
  the same wheel and lists ``pfedsam.flare.`` in its ``local/resources.json`` class allow-list.

Variants (baselines, ablations, the tiny test job) are the same job with a few YAML keys changed.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import yaml

from . import __version__
from .config import PFedSAMConfig, config_from_dict, dump_config, merge_overrides, task_timeout

PACKAGE_DIR = Path(__file__).resolve().parent
CONFIG_NAME = "pfedsam.yaml"
BUNDLE_FILE = "pfedsam_bundle.json"  # in app/custom: version and digest of the bundled package
CUSTOM_README = "README.md"  # in app/custom of an 'installed' job: why the folder holds no code
CODE_MODES = ("installed", "bundle", "none")
ALLOW_LIST_PREFIX = "pfedsam.flare."  # what a site without custom code adds to its class_allow_list
TRAIN_TASK = "train"
FINAL_TASK = "final_eval"
SAG_ID = "scatter_and_gather"  # workflow ids in config_fed_server.json
FINAL_ID = "final_evaluation"
EXECUTOR_ID = "executor"  # executor id in config_fed_client.json

# name -> YAML overrides applied to the main job's settings
VARIANTS: dict[str, dict[str, Any]] = {
    "pfedsam": {},
    "pfedsam-tiny": {"backbone": "tiny", "federation": {"rounds": 2, "min_clients": 2, "wait_after_min_s": 0},
                     "train": {"local_steps": 3, "global_steps": 3, "final_steps": 3},
                     "data": {"synthetic_sites": 2, "synthetic_per_site": 16}},
    "fedavg": {"federation": {"mode": "fedavg"}, "lmoe": {"num_experts": 0}, "train": {"kd_weight": 0.0}},
    "fedavg-ft": {"federation": {"mode": "fedavg", "final_finetune": True}, "lmoe": {"num_experts": 0},
                  "train": {"kd_weight": 0.0}},
    "fedprox": {"federation": {"mode": "fedavg"}, "lmoe": {"num_experts": 0},
                "train": {"kd_weight": 0.0, "prox_mu": 0.01}},
    "ditto": {"federation": {"mode": "ditto"}, "lmoe": {"num_experts": 0}, "train": {"kd_weight": 0.0}},
    "local": {"federation": {"mode": "local"}},  # each site alone, with its L-MoE (pFedSAM's schedule)
    "local-plain": {"federation": {"mode": "local"}, "lmoe": {"num_experts": 0}, "train": {"kd_weight": 0.0}},
    # FedRep-style: shared body (LoRA + decoder transformer), personal head (see decoder_head)
    "fedrep": {"decoder_head": "local", "lmoe": {"num_experts": 0}, "train": {"kd_weight": 0.0}},
    "pfedsam-nokd": {"train": {"kd_weight": 0.0}},
    # without experts the personalized model is the global model: nothing to distil into, so KD is off too
    "pfedsam-nolmoe": {"lmoe": {"num_experts": 0}, "train": {"kd_weight": 0.0}},
    "pfedsam-joint": {"train": {"schedule": "joint"}},
}

_CUSTOM_README_TEXT = """\
# No code here on purpose

This job runs the `pfedsam-flare` package installed on every participant
(`pip install` of the same version everywhere). The folder exists because FLARE treats a job
with an `app/custom` folder as bring-your-own-code: that skips each site's class allow-list
(whose default, also in the simulator, lists no pfedsam class) and needs the submitter's `byoc`
right. Other routes: `pfedsam job make NAME --out DIR --bundle-code` (the package travels in
this folder) or `--no-custom` (no folder; every site allow-lists `pfedsam.flare.`).
See docs/deploy.md.
"""


def package_digest(folder: Path = PACKAGE_DIR) -> str:
    """sha256 over a package's .py files (relative path + content): identifies the code that runs."""
    h = hashlib.sha256()
    for path in sorted(Path(folder).rglob("*.py")):
        if "__pycache__" in path.parts:
            continue
        h.update(path.relative_to(folder).as_posix().encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def flare_settings(cfg: PFedSAMConfig) -> dict[str, dict[str, Any]]:
    """The FLARE arguments these run settings imply, by where they go in the job folder.

    Keys: ``meta`` (meta.json), the workflow ids ``scatter_and_gather`` and ``final_evaluation``
    (their ``args`` in config_fed_server.json; public constructor arguments of FLARE's
    ScatterAndGather and BroadcastAndProcess) and ``executor`` (its ``args`` and ``tasks`` in
    config_fed_client.json). The one place that maps the YAML onto FLARE.
    """
    fed = cfg.federation
    return {
        "meta": {"min_clients": fed.min_clients},
        SAG_ID: {"num_rounds": fed.rounds - fed.start_round, "start_round": fed.start_round,
                 "min_clients": fed.min_clients, "wait_time_after_min_received": fed.wait_after_min_s,
                 "train_timeout": task_timeout(cfg), "train_task_name": TRAIN_TASK},
        FINAL_ID: {"task_name": FINAL_TASK, "min_responses_required": fed.min_clients,
                   "wait_time_after_min_received": fed.wait_after_min_s, "timeout": task_timeout(cfg)},
        EXECUTOR_ID: {"train_task": TRAIN_TASK, "final_task": FINAL_TASK},
    }


def settings_mismatch(cfg: PFedSAMConfig, component: str, args: dict[str, Any]) -> list[str]:
    """Where ``args`` (a component's arguments as FLARE built it) disagree with the YAML; [] if none."""
    return [f"{key} is {args.get(key)!r}, the YAML makes it {want!r}"
            for key, want in flare_settings(cfg)[component].items() if args.get(key) != want]


def read_job_config(job: Path) -> PFedSAMConfig:
    """The validated run settings of a job folder."""
    path = Path(job) / "app" / "config" / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{job} is not a pfedsam job folder: no app/config/{CONFIG_NAME}")
    return config_from_dict(yaml.safe_load(path.read_text()) or {}, str(path))


def _by_id(items: list[dict], wanted: str, path: Path) -> dict:
    for item in items:
        if item.get("id") == wanted:
            return item
    raise ValueError(f"{path}: no component with id '{wanted}'")


def _write_if_changed(path: Path, old: str, data: dict) -> None:
    # untouched files keep their hand-written layout (the committed job stays readable)
    if json.loads(old) != data:
        path.write_text(json.dumps(data, indent=2) + "\n")


def sync_job(job_dir: str | Path) -> Path:
    """Write the YAML's FLARE settings (flare_settings) into meta.json and the server/client JSON."""
    job = Path(job_dir)
    settings = flare_settings(read_job_config(job))
    meta_path = job / "meta.json"
    text = meta_path.read_text()
    meta = json.loads(text)
    meta.update(settings["meta"])
    _write_if_changed(meta_path, text, meta)
    server_path = job / "app" / "config" / "config_fed_server.json"
    text = server_path.read_text()
    server = json.loads(text)
    for wid in (SAG_ID, FINAL_ID):
        _by_id(server.get("workflows", []), wid, server_path)["args"].update(settings[wid])
    _write_if_changed(server_path, text, server)
    client_path = job / "app" / "config" / "config_fed_client.json"
    text = client_path.read_text()
    client = json.loads(text)
    entry = next((e for e in client.get("executors", []) if e.get("executor", {}).get("id") == EXECUTOR_ID), None)
    if entry is None:
        raise ValueError(f"{client_path}: no executor with id '{EXECUTOR_ID}'")
    entry["tasks"] = [TRAIN_TASK, FINAL_TASK]
    entry["executor"]["args"].update(settings[EXECUTOR_ID])
    _write_if_changed(client_path, text, client)
    return job


def bundle_package(dest_custom: Path) -> dict[str, str]:
    """Copy the imported package into ``dest_custom/pfedsam`` (real files) with its version and digest."""
    target = Path(dest_custom) / "pfedsam"
    if target.is_symlink() or target.is_file():
        target.unlink()
    elif target.exists():
        shutil.rmtree(target)
    shutil.copytree(PACKAGE_DIR, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    record = {"package": "pfedsam-flare", "version": __version__, "digest": package_digest(target),
              "built_from": str(PACKAGE_DIR)}
    (Path(dest_custom) / BUNDLE_FILE).write_text(json.dumps(record, indent=1) + "\n")
    return record


def check_code(custom_dir: Path, imported_dir: Path = PACKAGE_DIR) -> str:
    """Compare the pfedsam this process imports with the copy a job bundles; raise RuntimeError if they differ.

    FLARE appends ``app/custom`` to ``sys.path``, so an installed package of the same name shadows a
    bundle: without this check a site would silently run other code than the job was built with.
    Returns a line for the log saying which code runs.
    """
    from . import __version__ as version

    custom_dir = Path(custom_dir)
    record_path = custom_dir / BUNDLE_FILE
    shipped = custom_dir / "pfedsam"
    if not record_path.is_file() and not shipped.is_dir():
        return f"pfedsam {version} from {imported_dir} (installed; the job bundles no code)"
    digest = package_digest(imported_dir)
    if record_path.is_file():
        record = json.loads(record_path.read_text())
        want, want_version = record.get("digest"), record.get("version")
    else:  # a hand-made bundle without a record: compare the files
        want, want_version = package_digest(shipped), "?"
    if digest != want:
        same_folder = shipped.is_dir() and shipped.resolve() == Path(imported_dir).resolve()
        why = ("the bundled files were changed after `pfedsam job make`" if same_folder else
               f"an installed pfedsam {version} at {imported_dir} shadows the bundle; uninstall it "
               "(pip uninstall pfedsam-flare) or install the job's version on this site")
        raise RuntimeError(f"this job bundles pfedsam {want_version} (digest {str(want)[:12]}) but this process "
                           f"imports pfedsam {version} (digest {digest[:12]}) from {imported_dir}: {why}")
    return f"pfedsam {version} from {imported_dir} (digest {digest[:12]}, same as the job's bundle)"


def variant_config(name: str, source: str | Path, extra: dict[str, Any] | None = None) -> PFedSAMConfig:
    """The settings of job variant ``name``: the ``source`` job's YAML + the variant's + ``extra``."""
    if name not in VARIANTS:
        raise ValueError(f"unknown job variant '{name}'; choose one of {', '.join(VARIANTS)}")
    path = Path(source) / "app" / "config" / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{source} is not a pfedsam job folder: no app/config/{CONFIG_NAME} "
                                "(--job names the main job folder, jobs/pfedsam in the repository)")
    raw = yaml.safe_load(path.read_text()) or {}
    raw = merge_overrides(merge_overrides(raw, VARIANTS[name]), extra or {})
    return config_from_dict(raw, f"variant {name}")


def make_variant(name: str, out_dir: str | Path, source: str | Path, extra: dict[str, Any] | None = None,
                 code: str = "installed") -> Path:
    """Write job ``name`` (a VARIANTS entry) into ``out_dir/name`` from the ``source`` job folder.

    Arguments:
      name: a key of VARIANTS.
      out_dir: parent folder of the new job folder (replaced if it exists).
      source: the main job folder (``jobs/pfedsam``).
      extra: more YAML overrides on top of the variant's (e.g. data.root for a benchmark).
      code: where the sites get the code: ``installed``, ``bundle`` or ``none`` (see the module doc).
    """
    if code not in CODE_MODES:
        raise ValueError(f"code must be one of {', '.join(CODE_MODES)}, got {code!r}")
    cfg = variant_config(name, source, extra)
    source = Path(source)
    target = Path(out_dir) / name
    if target.resolve() == source.resolve():
        raise ValueError(f"--out {out_dir} would overwrite the source job {source}")
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__", "custom"))
    cfg_path = target / "app" / "config" / CONFIG_NAME
    header = f"# Generated by `pfedsam job make {name}` from {source.name}: do not edit, regenerate.\n"
    cfg_path.write_text(header + dump_config(cfg))
    meta_path = target / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["name"] = name
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    sync_job(target)
    custom = target / "app" / "custom"
    if code == "bundle":
        bundle_package(custom)
    elif code == "installed":
        custom.mkdir(parents=True, exist_ok=True)
        (custom / CUSTOM_README).write_text(_CUSTOM_README_TEXT)
    return target
