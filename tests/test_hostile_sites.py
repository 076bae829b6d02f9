"""A federation that survives faulty and hostile sites (issue 12), tried as an attacker would.

One simulator run of the tiny job with 5 sites: two honest ones of different sizes and three
that misbehave, each in its own way (tests/hostile_executor.py): an unbounded / grown
aggregation weight, huge values plus a false perfect Dice, local values smuggled as metrics by a
site whose process then dies in round 2. The other defects are tested on the components: the
aggregation rules, a poisoned global model at a site, the state files, the metric allow-list.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pfedsam.config import ConfigError, load_config, task_timeout
from pfedsam.data.synth import write_synthetic_sites
from pfedsam.flare.aggregation import check_weight, outlying_updates, robust_combine, update_norm
from pfedsam.flare.executor import allowed_metrics, check_incoming_global
from pfedsam.jobs import make_variant
from pfedsam.train import SiteTrainer

ROOT = Path(__file__).resolve().parents[1]
HONEST = ("site-1", "site-2")
ROLES = {"site-3": "weights", "site-4": "huge", "site-5": "meta"}
ROUNDS = 3


# -- aggregation rules, no FLARE --------------------------------------------------------------------------
@pytest.mark.parametrize("weight,declared,words", [
    (float("inf"), None, "finite"), (float("nan"), None, "finite"), (0, None, "positive"), (-3, None, "positive"),
    (2.5, None, "integer"), (True, None, "positive integer"), ("12", None, "positive integer"),
    (None, None, "got None"),
    (12000, 12, "above the 12"), (11, 12, "changed from the 12"),
])
def test_check_weight_rejects(weight, declared, words):
    reason = check_weight(weight, declared, "example count")
    assert reason is not None and words in reason, reason


@pytest.mark.parametrize("weight,declared", [(12, None), (12, 12), (12.0, 12), (np.int64(7), 7), (1, None)])
def test_check_weight_accepts(weight, declared):
    assert check_weight(weight, declared) is None


def _site(value: float, n: int = 6) -> dict:
    return {"a": np.full(n, value, np.float32), "b": np.full((2, 2), -value, np.float32)}


@pytest.mark.parametrize("norms,ratio,fallback,flagged", [
    ({"s1": 1.0, "s2": 1.2, "s3": 1e30}, 100, None, {"s3"}),
    ({"s1": 1.0, "s2": 1e30}, 100, None, {"s2"}),  # two sites: each compared with the OTHER one
    ({"s1": 1.0, "s2": 50.0, "s3": 1.1}, 100, None, set()),
    ({"s1": 1.0, "s2": 1e30}, 0, None, set()),  # 0 = no bound
    ({"s1": 1e6}, 100, 1.0, {"s1"}),  # alone: compared with an earlier round's median
    ({"s1": math.inf, "s2": 1.0}, 100, None, {"s1"}),
])
def test_outlying_updates(norms, ratio, fallback, flagged):
    assert set(outlying_updates(norms, ratio, fallback)) == flagged


def test_update_norm_overflow_is_inf_not_nan():
    ref = _site(0.0)
    assert update_norm(_site(1.0), ref) == pytest.approx(math.sqrt(6 + 4))
    assert update_norm({"a": np.full(6, 1e200), "b": np.zeros((2, 2))}, ref) == math.inf


@pytest.mark.parametrize("rule,expected_a", [
    ("mean", (1 * 10 + 3 * 30 + 1e6 * 1) / 5),  # weighted by 1, 3, 1: the bad site pulls the mean
    ("median", 30.0),
    ("trimmed_mean", 30.0),  # 3 sites, one dropped per end: the middle one
])
def test_robust_combine_with_one_bad_site(rule, expected_a):
    contributions = [(_site(10.0), 1.0), (_site(30.0), 3.0), (_site(1e6), 1.0)]
    out = robust_combine(contributions, rule, 0.2)
    np.testing.assert_allclose(out["a"], expected_a, rtol=1e-6)
    assert out["a"].dtype == np.float32


def test_weighted_mean_of_sites_of_different_sizes():
    """FedAvg weights by examples: a site with 30 images counts 3x one with 10."""
    out = robust_combine([(_site(1.0), 10.0), (_site(5.0), 30.0)], "mean")
    np.testing.assert_allclose(out["a"], (10 * 1 + 30 * 5) / 40)


# -- config edge cases --------------------------------------------------------------------------------------
@pytest.mark.parametrize("text,words", [
    ("train:\n  lr_global: .nan\n", "finite"),
    ("train:\n  lr_local: .inf\n", "finite"),
    ("train:\n  local_steps: 3\n  local_steps: 5\n", "duplicate key 'local_steps'"),
    ("federation:\n  rounds: 2\nfederation:\n  rounds: 3\n", "duplicate key 'federation'"),
    ("federation:\n  weighting: votes\n", "federation.weighting"),
    ("federation:\n  aggregation: max\n", "federation.aggregation"),
    ("federation:\n  trim_fraction: 0.5\n", "trim_fraction"),
])
def test_config_rejects(tmp_path, text, words):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=words) as err:
        load_config(path)
    assert str(path) in str(err.value)


def test_default_task_timeout_is_finite_and_scales_with_work():
    small = load_config(overrides=["train.local_steps=1", "train.global_steps=1"])
    big = load_config(overrides=["train.local_steps=100", "train.global_steps=100"])
    assert 0 < task_timeout(small) < task_timeout(big) < math.inf
    assert task_timeout(load_config(overrides=["federation.task_timeout_s=7"])) == 7


# -- the site: poisoned global model, state files, metric allow-list ----------------------------------------
@pytest.fixture(scope="module")
def trainer(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("site")
    cfg = load_config(overrides={"backbone": "tiny", "train": {"device": "cpu", "num_threads": 1, "cache": "none"},
                                 "data": {"synthetic_dir": str(tmp / "synthetic"), "synthetic_sites": 2,
                                          "synthetic_per_site": 8}})
    return SiteTrainer(cfg, "site-1", workdir=tmp / "work")


@pytest.mark.parametrize("poison", ["nan", "inf", "missing"])
def test_site_refuses_a_poisoned_global_model(trainer, poison):
    weights = trainer.get_global_state()
    name = sorted(weights)[0]
    if poison == "missing":
        del weights[name]
    else:
        weights[name] = np.full_like(weights[name], float(poison))
    with pytest.raises(ValueError, match="misses" if poison == "missing" else "NaN/Inf"):
        check_incoming_global(weights, trainer.global_names())


def test_site_never_saves_a_non_finite_state_and_keeps_the_last_good_one(trainer, tmp_path):
    path = tmp_path / "pfedsam_local_state.pt"
    good = trainer.get_local_state()
    trainer.save_local_state(path, 0)
    trainer.save_local_state(path, 1)
    with torch.no_grad():  # trained into NaN (set_local_state itself refuses NaN)
        for name, param in trainer.model.named_parameters():
            if name in good:
                param.fill_(float("nan"))
    with pytest.raises(ValueError, match="non-finite"):
        trainer.save_local_state(path, 2)
    assert torch.load(path, weights_only=True)["round"] == 1  # untouched
    assert trainer.load_local_state(path, before_round=2)
    for k, v in trainer.get_local_state().items():
        np.testing.assert_array_equal(v, good[k])


def test_state_of_a_round_already_trained_is_skipped_for_its_backup(trainer, tmp_path):
    """A resumed round r must start from the state of round r-1, never train round r twice."""
    path = tmp_path / "state.pt"
    before = trainer.get_local_state()
    trainer.save_local_state(path, 3)
    trainer.set_local_state({k: v + 1.0 for k, v in before.items()})
    trainer.save_local_state(path, 4)  # round 4 trained, then the job died before the server aggregated it
    assert trainer.load_local_state(path, before_round=4)
    assert trainer.loaded_state_round == 3
    np.testing.assert_array_equal(trainer.get_local_state()[sorted(before)[0]], before[sorted(before)[0]])
    with pytest.raises(ValueError, match="no usable L-MoE state"):
        trainer.load_local_state(path, before_round=3)


def test_a_corrupt_state_file_falls_back_to_the_backup(trainer, tmp_path):
    path = tmp_path / "state.pt"
    trainer.save_local_state(path, 0)
    trainer.save_local_state(path, 1)
    path.write_bytes(b"torn write")
    assert trainer.load_local_state(path, before_round=2) and trainer.loaded_state_round == 0
    assert any("unreadable" in n for n in trainer.state_notes)


def test_executor_metrics_are_exactly_the_allow_list():
    assert allowed_metrics({"val_dice_global": 1, "local_kd": 0.5}) == {"val_dice_global": 1.0, "local_kd": 0.5}
    with pytest.raises(KeyError, match="ROUND_METRICS"):
        allowed_metrics({"val_dice_global": 1.0, "lmoe_0": 0.3})


# -- one simulator run with seven sites -------------------------------------------------------------------
@pytest.fixture(scope="module")
def hostile_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hostile")
    data = tmp / "data"
    write_synthetic_sites(data, sites=5, per_site=12, image_size=64, seed=0)
    split_file = data / "site-2" / "split.json"  # site-2 is smaller: half of its training images
    split = json.loads(split_file.read_text())
    split["train"] = split["train"][: len(split["train"]) // 2]
    split_file.write_text(json.dumps(split))
    job = make_variant("pfedsam-tiny", tmp / "jobs", ROOT / "jobs" / "pfedsam", extra={
        "data": {"root": str(data)},
        "federation": {"rounds": ROUNDS, "min_clients": 2, "keep_round_states": True, "export_format": "none",
                       "wait_after_min_s": 45, "task_timeout_s": 75},
    })
    shutil.copy(ROOT / "tests" / "hostile_executor.py", job / "app" / "custom" / "hostile_executor.py")
    client_cfg = job / "app" / "config" / "config_fed_client.json"
    cfg = json.loads(client_cfg.read_text())
    executor = cfg["executors"][0]["executor"]
    executor["path"] = "hostile_executor.HostileExecutor"
    executor["args"]["roles"] = ROLES
    client_cfg.write_text(json.dumps(cfg, indent=1))
    ws = tmp / "ws"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    sites = ",".join([*HONEST, *ROLES])
    proc = subprocess.run(
        # one thread per site: each site keeps one process for the job (as in POC and production)
        [sys.executable, "-m", "nvflare.cli", "simulator", str(job), "-w", str(ws), "-c", sites, "-t", "5"],
        cwd=tmp, env=env, capture_output=True, text=True, timeout=1200,
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]
    report = json.loads((ws / "server" / "simulate_job" / "report.json").read_text())
    return ws, report, log


def _npz(path: Path) -> dict:
    with np.load(path) as data:
        return {k: data[k] for k in data.files}


def test_hostile_run_finishes_all_rounds_with_every_honest_site(hostile_run):
    _, report, _ = hostile_run
    assert [r["round"] for r in report["rounds"]] == list(range(ROUNDS))
    for entry in report["rounds"]:
        for site in HONEST:
            assert entry["sites"][site]["accepted"], (entry["round"], site, entry["sites"][site]["reason"])
    assert set(HONEST) <= set(report["final"])


def test_weight_is_example_count_and_may_not_grow(hostile_run):
    _, report, _ = hostile_run
    r0 = report["rounds"][0]["sites"]
    assert r0["site-2"]["weight"] < r0["site-1"]["weight"]  # sites of different sizes
    assert r0["site-3"]["accepted"] and r0["site-3"]["weight"] == r0["site-1"]["weight"]
    one, two = report["rounds"][1]["sites"]["site-3"], report["rounds"][2]["sites"]["site-3"]
    assert not one["accepted"] and "positive integer, got 0" in one["reason"]
    assert not two["accepted"] and "above the" in two["reason"]


def test_huge_update_is_refused_and_never_chosen_as_best(hostile_run):
    ws, report, _ = hostile_run
    for entry in report["rounds"]:
        c = entry["sites"]["site-4"]
        assert not c["accepted"] and "update norm" in c["reason"], c["reason"]
    best = report["best"]
    assert "site-4" not in best["sites"] and best["val_dice_personalized"] < 1.0
    for path in [ws / "server" / "simulate_job" / "best_global_model.npz",
                 *sorted((ws / "server" / "simulate_job" / "global_rounds").glob("*.npz"))]:
        assert all(np.isfinite(v).all() and np.abs(v).max() < 1e3 for v in _npz(path).values()), path


def test_global_is_the_example_weighted_mean_of_accepted_sites(hostile_run):
    ws, report, _ = hostile_run
    for entry in report["rounds"]:
        accepted = {s: c["weight"] for s, c in entry["sites"].items() if c["accepted"]}
        name = f"round_{entry['round']}.npz"
        sent = {s: _npz(ws / s / "simulate_job" / f"app_{s}" / "sent" / name) for s in accepted}
        glob = _npz(ws / "server" / "simulate_job" / "global_rounds" / f"round_{entry['round']}.npz")
        total = sum(accepted.values())
        for name, value in glob.items():
            expected = sum(np.float64(w) * sent[s][name] for s, w in accepted.items()) / total
            np.testing.assert_allclose(value, expected, rtol=1e-5, atol=1e-6)


def test_metadata_side_channel_is_closed(hostile_run):
    ws, report, _ = hostile_run
    for entry in report["rounds"][:2]:
        c = entry["sites"]["site-5"]
        assert not c["accepted"] and c["param_names"] == [] and not c["metrics"], c
    text = (ws / "server" / "simulate_job" / "report.json").read_text()
    assert "lmoe_" not in text and "patients" not in text


def test_dead_site_is_reported_missing(hostile_run):
    _, report, _ = hostile_run
    assert "site-5" in report["rounds"][2].get("missing", {}), report["rounds"][2]
    assert "site-5" not in report["rounds"][2]["sites"]


def test_honest_sites_keep_a_finite_lmoe(hostile_run):
    ws, _, _ = hostile_run
    for site in HONEST:
        folder = ws / site / "simulate_job" / f"app_{site}"
        last = torch.load(folder / "local_states" / f"round_{ROUNDS - 1}.pt", weights_only=True)
        first = torch.load(folder / "local_states" / "round_0.pt", weights_only=True)["local"]
        current = torch.load(folder / "pfedsam_local_state.pt", weights_only=True)
        assert current["round"] == ROUNDS  # saved after the final personalization, its round recorded
        assert (folder / "pfedsam_local_state.pt.bak").is_file()  # one backup: the state of the last round
        assert all(torch.isfinite(v).all() for state in (last, current) for v in state["local"].values())
        assert any(not torch.equal(first[k], last["local"][k]) for k in first)


# -- site-side policy: a job without filters is still filtered at the site -----------------------------------
def _site_scope(tmp_path):
    """The default scope FLARE builds from the shipped privacy.json, exactly as a client job process does."""
    from nvflare.apis.workspace import Workspace
    from nvflare.private.fed.app.fl_conf import create_privacy_manager
    from nvflare.private.privacy_manager import PrivacyService

    from pfedsam.flare.provision import install_site_policy

    root = tmp_path / "site-kit"
    (root / "startup").mkdir(parents=True)
    install_site_policy(root / "local")
    manager = create_privacy_manager(Workspace(str(root), "site-1"), names_only=False)
    PrivacyService.initialize(manager)
    try:
        assert manager.is_policy_defined() and not PrivacyService.is_scope_allowed("no-filters-scope")
        return manager.get_scope("")  # what a job naming no scope gets
    finally:
        PrivacyService.initialize(None)


def _filtered(job, scope, task: str, result):
    """FLARE's own apply_filters, for a job whose config has NO result filters at all."""
    from nvflare.apis.fl_constant import FilterKey, FLContextKey
    from nvflare.apis.utils.task_utils import apply_filters

    ctx = job.ctx()
    ctx.set_prop(FLContextKey.SCOPE_OBJECT, scope, private=True, sticky=False)
    ctx.set_prop(FLContextKey.TASK_NAME, task, private=True, sticky=False)
    return apply_filters("task_result_filters", result, ctx, {}, task, FilterKey.OUT)


def _train_result(facts, extra_weights=None, metrics=None):
    from nvflare.apis.dxo import DXO, DataKind, MetaKey

    from pfedsam.flare.common import METRICS_KEY, NUM_EXAMPLES_KEY

    weights = {k: v.copy() for k, v in facts.initial_global.items()}
    weights.update(extra_weights or {})
    meta = {MetaKey.NUM_STEPS_CURRENT_ROUND: 3, NUM_EXAMPLES_KEY: 8, METRICS_KEY: metrics or {"val_dice_global": 0.5}}
    return DXO(DataKind.WEIGHTS, weights, meta).to_shareable()


def _final_result(extra=None):
    from nvflare.apis.dxo import DXO, DataKind

    # what SiteTrainer.evaluate reports; empty_fp is NaN at a site without frames lacking a polyp
    stats = {"n": 3.0, "n_empty": 0.0, "dice": 0.5, "hd95": 4.0, "n_fg": 3.0, "dice_fg": 0.5, "empty_fp": float("nan")}
    return DXO(DataKind.METRICS, {"global": stats, "personalized": dict(stats), "export": "none", **(extra or {})}
               ).to_shareable()


@pytest.fixture(scope="module")
def policy_job(tmp_path_factory):
    from test_flare_components import TINY, _Job

    from pfedsam.flare.common import model_facts

    job = _Job(tmp_path_factory.mktemp("policy"), "policy-job", TINY)
    return job, model_facts(job.ctx())


@pytest.mark.parametrize("case,task,make", [
    ("lmoe_tensor", "train", lambda f: _train_result(f, {sorted(f.local_names)[0]: np.zeros(3, np.float32)})),
    ("lmoe_as_metrics", "train", lambda f: _train_result(f, metrics={f"lmoe_{i}": 0.1 for i in range(2000)})),
    ("path_like_metric", "train", lambda f: _train_result(f, metrics={"/data/patients/p1.png": 1.0})),
    ("list_metric", "train", lambda f: _train_result(f, metrics={"val_dice_global": [0.1] * 64})),
    ("metrics_on_train", "train", lambda f: _final_result()),
    ("final_extra_number", "final_eval", lambda f: _final_result({"lmoe_0": 0.3})),
    ("final_free_text", "final_eval", lambda f: _final_result({"export": "/site/model/weights.pt"})),
    ("weights_on_final", "final_eval", lambda f: _train_result(f)),
    ("unknown_task", "exfiltrate", lambda f: _final_result()),
])
def test_site_policy_blocks_what_a_filterless_job_would_send(tmp_path, policy_job, case, task, make):
    from pfedsam.flare.filters import LeakBlocked

    job, facts = policy_job
    with pytest.raises(LeakBlocked):
        _filtered(job, _site_scope(tmp_path), task, make(facts))


@pytest.mark.parametrize("task,make", [("train", _train_result), ("final_eval", lambda f: _final_result())])
def test_site_policy_passes_what_pfedsam_sends(tmp_path, policy_job, task, make):
    job, facts = policy_job
    result = make(facts)
    assert _filtered(job, _site_scope(tmp_path), task, result) is result


def test_shipped_authorization_is_tighter_than_flare_default():
    from nvflare.fuel.sec.authz import Authorizer, AuthzContext, Person

    from pfedsam.flare.provision import AUTHORIZATION_FILE

    authz = Authorizer("hospital_a")
    assert not authz.load_policy(json.loads(AUTHORIZATION_FILE.read_text()))

    def allowed(role, right, org="hospital_a"):
        return authz.authorize(AuthzContext(right, Person("u@x", org, role), Person("u@x", org, role)))[0]

    assert allowed("project_admin", "submit_job") and allowed("project_admin", "byoc")
    for role in ("project_admin", "org_admin", "lead", "member"):
        assert not allowed(role, "shell_commands"), role
    for role in ("org_admin", "lead", "member"):
        assert not allowed(role, "submit_job") and not allowed(role, "byoc"), role


# -- input edge cases --------------------------------------------------------------------------------------
def _one_pair(tmp_path, mask: np.ndarray, suffix: str = ".png", image_size: tuple[int, int] | None = None):
    from PIL import Image

    site = tmp_path / "site"
    (site / "images").mkdir(parents=True)
    (site / "masks").mkdir()
    if image_size is None:
        Image.fromarray(np.full((32, 32, 3), 90, np.uint8)).save(site / "images" / "a.png")
    else:
        Image.new("1", image_size).save(site / "images" / "a.png")
    Image.fromarray(mask).save(site / "masks" / f"a{suffix}")
    return site


def _dataset(site, **kwargs):
    from pfedsam.data.sites import SiteDataset

    return SiteDataset(site, split="all", image_size=32, normalization="minmax", **kwargs)


@pytest.mark.parametrize("colour", [(0, 255, 0), (0, 0, 200), (255, 0, 0)])
def test_colour_mask_foreground_is_read_on_every_channel(tmp_path, colour):
    mask = np.zeros((32, 32, 3), np.uint8)
    mask[8:24, 8:24] = colour
    sample = _dataset(_one_pair(tmp_path, mask)).plain_sample(0)
    assert sample["mask"].sum() == 16 * 16


def test_jpeg_mask_is_refused_by_name(tmp_path):
    from pfedsam.data.sites import SiteDataError

    mask = np.zeros((32, 32), np.uint8)
    mask[8:24, 8:24] = 255
    site = _one_pair(tmp_path, mask, ".jpg")
    with pytest.raises(SiteDataError, match=r"a\.jpg.*JPEG"):
        _dataset(site)
    with pytest.raises(SiteDataError, match="all 1 skipped"):  # skipped, never read as an empty mask
        _dataset(site, on_bad_file="skip")


def test_huge_image_is_refused_before_decoding(tmp_path):
    from pfedsam.data.sites import SiteDataError

    site = _one_pair(tmp_path, np.zeros((32, 32), np.uint8), image_size=(12000, 12000))
    with pytest.raises(SiteDataError, match=r"12000x12000.*above the limit"):
        _dataset(site)


def test_too_few_accepted_ends_the_run_with_a_clear_error(tmp_path):
    """min_clients 2, two sites, one sends 1e30 everywhere: round 0 is NOT aggregated from one site."""
    job = make_variant("pfedsam-tiny", tmp_path / "jobs", ROOT / "jobs" / "pfedsam", extra={
        "data": {"synthetic_dir": str(tmp_path / "synthetic")},
        "federation": {"rounds": 2, "min_clients": 2, "export_format": "none", "task_timeout_s": 120}})
    shutil.copy(ROOT / "tests" / "hostile_executor.py", job / "app" / "custom" / "hostile_executor.py")
    client_cfg = job / "app" / "config" / "config_fed_client.json"
    cfg = json.loads(client_cfg.read_text())
    cfg["executors"][0]["executor"].update(path="hostile_executor.HostileExecutor")
    cfg["executors"][0]["executor"]["args"]["roles"] = {"site-2": "huge"}
    client_cfg.write_text(json.dumps(cfg, indent=1))
    ws = tmp_path / "ws"
    proc = subprocess.run(
        [sys.executable, "-m", "nvflare.cli", "simulator", str(job), "-w", str(ws), "-n", "2", "-t", "2"],
        cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode != 0, log[-3000:]
    assert "NotEnoughSites: round 0: only 1 contribution(s) accepted, federation.min_clients is 2" in log
    report = json.loads((ws / "server" / "simulate_job" / "report.json").read_text())
    assert "min_clients" in report["stopped"] and not report["final"]
    assert "update norm" in report["rounds"][0]["sites"]["site-2"]["reason"]
    assert not (ws / "server" / "simulate_job" / "global_rounds").exists()  # nothing aggregated from one site
