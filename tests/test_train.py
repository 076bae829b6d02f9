"""Training layer: the two phases touch only their own parameters; real training improves Dice."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pfedsam.config import load_config
from pfedsam.data.synth import write_synthetic_sites
from pfedsam.model.checkpoint import load_site_model
from pfedsam.train import SiteTrainer, Stream
from pfedsam.train.metrics import image_metrics, summarize

torch.set_num_threads(2)
SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="module")
def synth_site(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth")
    write_synthetic_sites(root / "set", sites=2, per_site=20, seed=0)
    return root / "set" / "site-1"


def _tiny(tmp_path: Path, site: Path, *extra: str) -> SiteTrainer:
    cfg = load_config(overrides=["backbone=tiny", "train.batch_size=4", "train.device=cpu", *extra])
    return SiteTrainer(cfg, "site-1", site_dir=site, workdir=tmp_path)


def _changed(before: dict, after: dict) -> set[str]:
    return {k for k in before if not np.array_equal(before[k], after[k])}


@pytest.mark.parametrize(
    "phase,moves,stays",
    [("run_local_phase", "local", "global"), ("run_global_phase", "global", "local")],
)
def test_each_phase_trains_only_its_parameters(tmp_path, synth_site, phase, moves, stays):
    trainer = _tiny(tmp_path, synth_site)
    before = {"global": trainer.get_global_state(), "local": trainer.get_local_state()}
    result = getattr(trainer, phase)(3)
    assert result["steps"] == 3 and np.isfinite(result["loss"])
    after = {"global": trainer.get_global_state(), "local": trainer.get_local_state()}
    assert _changed(before[moves], after[moves]), f"{phase} must update {moves} parameters"
    assert not _changed(before[stays], after[stays]), f"{phase} must not touch {stays} parameters"
    assert not any(p.requires_grad for p in trainer.model.parameters())


def test_joint_phase_trains_both(tmp_path, synth_site):
    trainer = _tiny(tmp_path, synth_site, "train.schedule=joint")
    g, loc = trainer.get_global_state(), trainer.get_local_state()
    trainer.run_joint_phase(2)
    assert _changed(g, trainer.get_global_state()) and _changed(loc, trainer.get_local_state())


@pytest.mark.parametrize("extra", [[], ["train.kd_start_round=1", "train.prox_mu=0.1", "train.grad_clip=0.001"]])
def test_concurrent_phase_moves_each_part_as_its_own_phase(tmp_path, synth_site, extra):
    """A concurrent step = a global step for the global part and a local step for the L-MoE.

    The L-MoE's loss must not reach the global parameters (nor their clipping): after three
    steps the global part equals three global-phase steps on the same batches, and after one
    step the experts equal one local-phase step (both start from the same global model).
    """
    trainer = _tiny(tmp_path, synth_site, "train.schedule=concurrent", *extra)
    g0, loc0 = trainer.get_global_state(), trainer.get_local_state()

    def run(phase: str, steps: int) -> tuple[dict, dict, dict]:
        trainer.set_global_state(g0)
        trainer.set_local_state(loc0)
        stats = getattr(trainer, phase)(steps, stream=Stream("same", 0))  # same batches, same augmentation
        return stats, trainer.get_global_state(), trainer.get_local_state()

    _, g_global, loc_global = run("run_global_phase", 3)
    stats, g_both, loc_both = run("run_concurrent_phase", 3)
    assert stats["steps"] == 3 and np.isfinite(stats["local_loss"])
    assert not _changed(g_global, g_both), "the L-MoE's loss leaked into the global parameters"
    assert not _changed(loc0, loc_global) and _changed(loc0, loc_both)
    _, g_local, loc_local = run("run_local_phase", 1)
    _, g_both, loc_both = run("run_concurrent_phase", 1)
    assert not _changed(g0, g_local) and _changed(g0, g_both)
    for name in loc0:
        np.testing.assert_allclose(loc_both[name], loc_local[name], rtol=0, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("kd_weight,kd_positive", [(0.0, False), (1.0, True)])
def test_local_phase_reports_kd(tmp_path, synth_site, kd_weight, kd_positive):
    trainer = _tiny(tmp_path, synth_site, f"train.kd_weight={kd_weight}")
    trainer.run_local_phase(2)  # experts move away from the teacher
    result = trainer.run_local_phase(2)
    assert (result["kd"] > 0) == kd_positive


@pytest.mark.parametrize("rnd,kd_positive", [(0, False), (1, False), (2, True), (3, True)])
def test_kd_starts_at_kd_start_round(tmp_path, synth_site, rnd, kd_positive):
    trainer = _tiny(tmp_path, synth_site, "train.kd_start_round=2")
    trainer.run_local_phase(2, stream=Stream("local", 0))  # experts move away from the teacher
    result = trainer.run_local_phase(2, stream=Stream("local", rnd, 8))
    assert (result["kd"] > 0) == kd_positive


def test_no_experts_means_no_local_phase(tmp_path, synth_site):
    trainer = _tiny(tmp_path, synth_site, "lmoe.num_experts=0")
    assert trainer.local_names() == []
    assert trainer.run_local_phase()["steps"] == 0


DITTO = ["federation.mode=ditto", "lmoe.num_experts=0", "train.kd_weight=0"]


def test_ditto_personal_phase_leaves_the_global_model_alone(tmp_path, synth_site):
    trainer = _tiny(tmp_path, synth_site, *DITTO)
    g = trainer.get_global_state()
    personal, stats = trainer.run_personal_phase(dict(g), 3)
    assert stats["steps"] == 3 and stats["prox"] > 0
    assert _changed(g, personal), "the personal copy must train"
    assert not _changed(g, trainer.get_global_state()), "G(t) must be restored after the personal phase"
    with trainer.global_swapped(personal):
        assert not _changed(personal, trainer.get_global_state())
    assert not _changed(g, trainer.get_global_state())


@pytest.mark.parametrize("lam", [0.0, 1e4])
def test_ditto_lambda_pulls_the_personal_copy_toward_global(tmp_path, synth_site, lam):
    trainer = _tiny(tmp_path, synth_site, *DITTO, f"train.ditto_lambda={lam}", "train.lr_global=1e-2")
    g = trainer.get_global_state()
    far = {k: v + 0.05 for k, v in g.items()}  # a personal copy away from G(t)
    personal, _ = trainer.run_personal_phase(far, 5)
    dist = lambda a: sum(float(np.sum((a[k] - g[k]) ** 2)) for k in g)  # noqa: E731
    assert (dist(personal) < 0.5 * dist(far)) == (lam > 0)


def test_local_state_round_trip_and_site_model(tmp_path, synth_site):
    trainer = _tiny(tmp_path, synth_site)
    trainer.run_local_phase(2)
    trainer.run_global_phase(2)
    path = tmp_path / "state" / "local.pt"
    trainer.save_local_state(path)
    fresh = _tiny(tmp_path / "b", synth_site)
    assert fresh.load_local_state(tmp_path / "absent.pt") is False
    assert fresh.load_local_state(path) is True
    assert not _changed(trainer.get_local_state(), fresh.get_local_state())
    folder = trainer.save_model(tmp_path / "model", {"round": 1})
    model, cfg, meta = load_site_model(folder)
    assert meta == {"site": "site-1", "round": 1} and cfg.backbone == "tiny"
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(images), trainer.model(images))


def test_uncached_training_runs_with_image_augmentation(tmp_path, synth_site):
    trainer = _tiny(tmp_path, synth_site, "train.cache=none")
    assert trainer.run_global_phase(2)["steps"] == 2
    assert trainer.cache.hits == 0 and trainer.cache.misses == 0


def test_seeded_training_is_reproducible(tmp_path, synth_site):
    runs = []
    for name in ("a", "b"):
        trainer = _tiny(tmp_path / name, synth_site)
        trainer.run_local_phase(2)
        trainer.run_global_phase(2)
        runs.append(trainer.get_global_state())
    assert not _changed(runs[0], runs[1])


# pred, truth, expected dice, expected hd95 (None = positive finite)
EMPTY = torch.zeros(8, 8, dtype=torch.bool)
BLOCK = EMPTY.clone()
BLOCK[2:5, 2:5] = True
METRIC_CASES = [
    (EMPTY, EMPTY, 1.0, 0.0),
    (BLOCK, EMPTY, 0.0, float(np.hypot(8, 8))),
    (EMPTY, BLOCK, 0.0, float(np.hypot(8, 8))),
    (BLOCK, BLOCK, 1.0, 0.0),
]


@pytest.mark.parametrize("pred,truth,dice,hd95", METRIC_CASES)
def test_image_metrics_empty_mask_rules(pred, truth, dice, hd95):
    m = image_metrics(pred, truth, (8, 8))
    assert m["dice"] == pytest.approx(dice)
    assert m["hd95"] == pytest.approx(hd95)


def test_summarize_skip_leaves_out_both_empty():
    rows = [image_metrics(EMPTY, EMPTY, (8, 8)), image_metrics(BLOCK, EMPTY, (8, 8))]
    assert summarize(rows, "one")["dice"] == pytest.approx(0.5)
    assert summarize(rows, "skip")["dice"] == pytest.approx(0.0)


def test_metrics_ignore_padding():
    pred = BLOCK.clone()
    pred[7, 7] = True  # in the padded area when the valid region is 6x6
    assert image_metrics(pred, BLOCK, (6, 6))["dice"] == pytest.approx(1.0)


@pytest.mark.skipif(not (SHARED / "polyp" / "kvasir-seg").is_dir(), reason=f"real polyp data not found at {SHARED}")
def test_short_training_on_real_polyp_improves_dice(tmp_path):
    """LiteMedSAM, prompt-free, Kvasir-SEG: a short run must beat the untrained model on val."""
    cfg = load_config(overrides=[
        "backbone=litemedsam", "train.device=cpu", "train.batch_size=4", "data.max_train=32",
        "data.max_eval=16", "eval.hd95=false",
    ])
    trainer = SiteTrainer(cfg, "kvasir-seg", site_dir=SHARED / "polyp" / "kvasir-seg", workdir=tmp_path)
    before = trainer.evaluate("val", "global")["dice"]
    trainer.run_global_phase(40)
    after_global = trainer.evaluate("val", "global")["dice"]
    trainer.run_local_phase(8)
    after_personal = trainer.evaluate("val", "personalized")["dice"]
    print(f"val Dice: untrained {before:.3f}, global phase {after_global:.3f}, + local phase {after_personal:.3f}")
    # prompt-free, the pretrained decoder segments nothing (Dice ~0): the automatic mode is learned
    assert after_global > before + 0.3
    assert after_personal > before + 0.3
