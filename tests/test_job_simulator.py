"""End to end: the tiny job variant through `nvflare simulator` (2 sites, 2 rounds)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pfedsam.config import load_config, local_start_round
from pfedsam.jobs import make_variant
from pfedsam.model import ParamKind, build_pfedsam

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sim")
    # The job's own precision (bf16 on CPUs with native bf16): the exactness tests below hold in it
    # because the decoder's LayerNorm gradients do not depend on the thread count (model/norm.py).
    job = make_variant("pfedsam-tiny", tmp / "jobs", ROOT / "jobs" / "pfedsam", extra={
        "federation": {"keep_round_states": True, "export_format": "none"},
        "data": {"synthetic_dir": str(tmp / "synthetic")},
    })
    ws = tmp / "ws"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "nvflare.cli", "simulator", str(job), "-w", str(ws), "-n", "2", "-t", "2"],
        cwd=tmp, env=env, capture_output=True, text=True, timeout=600,
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    return job, ws, log


def test_job_completes_with_report(tiny_run):
    _, ws, log = tiny_run
    report = json.loads((ws / "server" / "simulate_job" / "report.json").read_text())
    assert [r["round"] for r in report["rounds"]] == [0, 1]
    for entry in report["rounds"]:
        assert set(entry["sites"]) == {"site-1", "site-2"}
        assert all(c["accepted"] for c in entry["sites"].values())
        assert entry["wall_time_s"] > 0
    assert set(report["final"]) == {"site-1", "site-2"}
    for r in report["final"].values():
        assert 0.0 <= r["personalized"]["dice"] <= 1.0 and 0.0 <= r["global"]["dice"] <= 1.0
    assert (ws / "server" / "simulate_job" / "report.md").is_file()
    assert "Traceback" not in log


def test_only_global_names_were_received(tiny_run):
    job, ws, _ = tiny_run
    model = build_pfedsam(load_config(job / "app" / "config" / "pfedsam.yaml"))
    global_names, local_names = set(model.registry.names(ParamKind.GLOBAL)), set(model.registry.names(ParamKind.LOCAL))
    assert local_names
    report = json.loads((ws / "server" / "simulate_job" / "report.json").read_text())
    for entry in report["rounds"]:
        for c in entry["sites"].values():
            assert set(c["param_names"]) == global_names
            assert not set(c["param_names"]) & local_names


def test_local_state_changed_between_rounds(tiny_run):
    _, ws, _ = tiny_run
    for site in ("site-1", "site-2"):
        folder = ws / site / "simulate_job" / f"app_{site}"
        r0 = torch.load(folder / "local_states" / "round_0.pt", weights_only=True)["local"]
        r1 = torch.load(folder / "local_states" / "round_1.pt", weights_only=True)["local"]
        assert r0.keys() == r1.keys()
        assert any(not torch.equal(r0[k], r1[k]) for k in r0)
        assert (folder / "pfedsam_local_state.pt").is_file()


def test_global_is_weighted_mean_of_what_sites_sent(tiny_run):
    _, ws, _ = tiny_run
    report = json.loads((ws / "server" / "simulate_job" / "report.json").read_text())
    for entry in report["rounds"]:
        rnd = entry["round"]
        sent, steps = {}, {}
        for site in ("site-1", "site-2"):
            with np.load(ws / site / "simulate_job" / f"app_{site}" / "sent" / f"round_{rnd}.npz") as data:
                sent[site] = {k: data[k] for k in data.files}
            steps[site] = entry["sites"][site]["weight"]  # FedAvg weight: the examples it used
        with np.load(ws / "server" / "simulate_job" / "global_rounds" / f"round_{rnd}.npz") as data:
            aggregated = {k: data[k] for k in data.files}
        total = sum(steps.values())
        assert set(aggregated) == set(sent["site-1"])
        for name, value in aggregated.items():
            expected = sum(sent[s][name].astype(np.float64) * steps[s] / total for s in sent)
            np.testing.assert_allclose(value, expected, rtol=1e-5, atol=1e-6)


def _numbers(report: dict) -> dict:
    """What a user reads off a report, to its printed precision (4 decimals)."""
    out = {}
    for entry in report["rounds"]:
        for site, c in entry["sites"].items():
            m = c["metrics"]
            out[(entry["round"], site)] = (c["num_steps"], m["train_steps"], round(m["val_dice_personalized"], 4),
                                           round(m["val_dice_global"], 4),
                                           round(m["local_loss"], 4) if "local_loss" in m else None)  # no local phase
    for site, r in report["final"].items():
        out[("final", site)] = (round(r["personalized"]["dice"], 4), round(r["global"]["dice"], 4))
    return out


def test_report_does_not_depend_on_simulator_threads(tiny_run, tmp_path):
    """-t 1 re-creates each client per task, -t 2 keeps both alive: the same job gives the same numbers."""
    job, ws, _ = tiny_run
    proc = subprocess.run(
        [sys.executable, "-m", "nvflare.cli", "simulator", str(job), "-w", str(tmp_path / "ws"), "-n", "2", "-t", "1"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    one = json.loads((tmp_path / "ws" / "server" / "simulate_job" / "report.json").read_text())
    two = json.loads((ws / "server" / "simulate_job" / "report.json").read_text())
    assert _numbers(one) == _numbers(two)
    assert one["job"]["steps_per_site"] == two["job"]["steps_per_site"] == 2 * (3 + 3) + 3


def test_in_process_engine_reproduces_the_simulator(tiny_run, tmp_path):
    """The benchmark's engine (all sites in one process) gives the simulator's numbers for the same job."""
    import importlib.util

    from pfedsam.jobs import read_job_config
    from pfedsam.train import SiteTrainer

    spec = importlib.util.spec_from_file_location("bench_engine", ROOT / "benchmarks" / "engine.py")
    engine = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = engine  # its dataclasses look their module up there
    spec.loader.exec_module(engine)
    job, ws, _ = tiny_run
    cfg = read_job_config(job)
    fed = engine.federate(lambda s: SiteTrainer(cfg, s, workdir=tmp_path / s), ["site-1", "site-2"], log=lambda m: None)
    report = json.loads((ws / "server" / "simulate_job" / "report.json").read_text())
    ours, theirs = {}, {}
    for entry, mine in zip(report["rounds"], fed.rounds, strict=True):
        for site, c in entry["sites"].items():
            m = c["metrics"]
            theirs[(entry["round"], site)] = (m["train_steps"], round(m["val_dice_personalized"], 4),
                                              round(m["val_dice_global"], 4))
            v = mine[site]["val"]
            ours[(entry["round"], site)] = (mine[site]["steps"], round(v["personalized"]["dice"], 4),
                                            round(v["global"]["dice"], 4))
    for site, r in report["final"].items():
        theirs[("final", site)] = (round(r["personalized"]["dice"], 4), round(r["global"]["dice"], 4))
        v = fed.final[site]["val"]
        ours[("final", site)] = (round(v["personalized"]["dice"], 4), round(v["global"]["dice"], 4))
    assert ours == theirs
    assert fed.rejected == []


def test_tensorboard_events_written(tiny_run):
    _, ws, _ = tiny_run
    events = list((ws / "server" / "simulate_job" / "tb_events").rglob("events.out.tfevents.*"))
    assert len(events) >= 2


def test_fp16_compression_halves_the_bytes(tmp_path):
    job = make_variant("pfedsam-tiny", tmp_path / "jobs", ROOT / "jobs" / "pfedsam", extra={
        "federation": {"rounds": 1, "compression": "fp16", "export_format": "none"},
        "data": {"synthetic_dir": str(tmp_path / "synthetic")},
    })
    ws = tmp_path / "ws"
    proc = subprocess.run(
        [sys.executable, "-m", "nvflare.cli", "simulator", str(job), "-w", str(ws), "-n", "2", "-t", "2"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    report = json.loads((ws / "server" / "simulate_job" / "report.json").read_text())
    fp32_bytes = report["job"]["global_bytes_fp32"]
    for c in report["rounds"][0]["sites"].values():
        assert c["accepted"]
        assert c["bytes_received"] == fp32_bytes // 2


def _simulate(job: Path, ws: Path, cwd: Path, env: dict | None = None) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "nvflare.cli", "simulator", str(job), "-w", str(ws), "-n", "2", "-t", "2"],
        cwd=cwd, capture_output=True, text=True, timeout=600, env=env,
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    return log


def test_resume_from_an_interrupted_job(tmp_path):
    """A job stopped after round 0 is continued by a new job: last global, same round count, own L-MoE."""
    common = {"data": {"synthetic_dir": str(tmp_path / "synthetic")}}
    first = make_variant("pfedsam-tiny", tmp_path / "a", ROOT / "jobs" / "pfedsam", extra={
        **common, "federation": {"rounds": 1, "export_format": "none"}})
    _simulate(first, tmp_path / "ws1", tmp_path)
    ws, archive = tmp_path / "ws2", tmp_path / "old_job"
    for part in ("server", "site-1", "site-2"):  # the interrupted job's run folders, one per participant
        shutil.copytree(tmp_path / "ws1" / part / "simulate_job", archive / part)
    second = make_variant("pfedsam-tiny", tmp_path / "b", ROOT / "jobs" / "pfedsam", extra={
        **common, "federation": {"rounds": 2, "export_format": "none", "resume_from": str(archive), "start_round": 1}})
    log = _simulate(second, ws, tmp_path)
    report = json.loads((ws / "server" / "simulate_job" / "report.json").read_text())
    assert [r["round"] for r in report["rounds"]] == [1]
    assert "old_job/server/global_model.npz" in log
    assert log.count("resumed this site's L-MoE state from") == 2
    old = dict(np.load(archive / "server" / "global_model.npz"))
    saved = sorted((ws / "server" / "simulate_job" / "global_rounds").glob("*.npz"))
    assert [p.name for p in saved] == ["round_1.npz"]
    new = dict(np.load(saved[0]))
    assert any(not np.array_equal(old[k], new[k]) for k in old)  # training went on from there


def test_ditto_keeps_a_personal_copy_that_never_leaves_the_site(tmp_path):
    """Ditto: each site trains a personal copy of the global parameters; only G's update is sent.
    The final copy's learning rate is chosen at each site (train.final_lr_scales): its search stays there."""
    job = make_variant("pfedsam-tiny", tmp_path / "jobs", ROOT / "jobs" / "pfedsam", extra={
        "federation": {"mode": "ditto", "keep_round_states": True, "export_format": "none"},
        "lmoe": {"num_experts": 0}, "train": {"kd_weight": 0.0, "final_lr_scales": [0.5, 2.0]},
        "data": {"synthetic_dir": str(tmp_path / "synthetic")},
    })
    ws = tmp_path / "ws"
    log = _simulate(job, ws, tmp_path)
    report = json.loads((ws / "server" / "simulate_job" / "report.json").read_text())
    assert report["job"]["mode"] == "ditto"
    assert "lr_scale" not in json.dumps(report["final"]) and "Traceback" not in log
    for site in ("site-1", "site-2"):
        assert re.search(rf"{site} final personalization: lr scale (0\.5|2) kept \(validation Dice by scale "
                         r"0\.5: [0-9.]+, 2: [0-9.]+\)", log), site
    for site in ("site-1", "site-2"):
        folder = ws / site / "simulate_job" / f"app_{site}"
        with np.load(folder / "pfedsam_personal_global.npz") as data:
            personal = {k: data[k] for k in data.files}
        with np.load(folder / "sent" / "round_1.npz") as data:
            sent = {k: data[k] for k in data.files}
        assert personal.keys() == sent.keys()
        assert any(not np.array_equal(personal[k], sent[k]) for k in sent), "personal copy equals what was sent"
        saved = torch.load(folder / "personalized_model" / "weights.pt", weights_only=True)["global"]
        for k, v in personal.items():  # the personalized model is the personal copy
            np.testing.assert_array_equal(saved[k].float().numpy(), v)
        start = local_start_round(load_config(job / "app" / "config" / "pfedsam.yaml"))
        assert 0 < start < len(report["rounds"])  # the job's train.local_start: the copy waits, then trains
        for e in report["rounds"]:
            c = e["sites"][site]
            assert c["accepted"] and (c["metrics"].get("personal_steps", 0) > 0) == (e["round"] >= start), e["round"]


def test_bundled_job_runs_without_the_installed_package(tmp_path):
    """--bundle-code: every participant imports the job's own copy when no pfedsam is installed."""
    job = make_variant("pfedsam-tiny", tmp_path / "jobs", ROOT / "jobs" / "pfedsam", code="bundle", extra={
        "federation": {"rounds": 1, "export_format": "none"}, "data": {"synthetic_dir": str(tmp_path / "synthetic")}})
    # Hide every installed pfedsam (editable .pth entry, PYTHONPATH) in each process the simulator starts;
    # FLARE appends the job's app/custom to sys.path after this ran.
    hide = tmp_path / "hide"
    hide.mkdir()
    (hide / "sitecustomize.py").write_text(
        "import os, sys\n"
        "sys.path[:] = [p for p in sys.path if not os.path.isfile(os.path.join(p or '.', 'pfedsam', '__init__.py'))]\n")
    env = {**os.environ, "PYTHONPATH": str(hide)}
    probe = subprocess.run([sys.executable, "-c", "import pfedsam"], env=env, cwd=tmp_path, capture_output=True)
    assert probe.returncode != 0, "pfedsam is still importable: the test would not show the bundle running"
    log = _simulate(job, tmp_path / "ws", tmp_path, env=env)
    for part, app in (("server", "app_server"), ("site-1", "app_site-1"), ("site-2", "app_site-2")):
        assert f"{part}/simulate_job/{app}/custom/pfedsam (digest" in log, f"{part} did not run the bundled code"
    report = json.loads((tmp_path / "ws" / "server" / "simulate_job" / "report.json").read_text())
    assert set(report["final"]) == {"site-1", "site-2"}
