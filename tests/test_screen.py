"""benchmarks/screen.py: replaying pFedSAM's local phases against a kept global trajectory is exact."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

from pfedsam.data import discover_sites
from pfedsam.data.synth import write_synthetic_sites
from pfedsam.train import SiteTrainer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
spec = importlib.util.spec_from_file_location("bench_screen", ROOT / "benchmarks" / "screen.py")
screen = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = screen
spec.loader.exec_module(screen)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("screen")
    write_synthetic_sites(tmp / "data", sites=2, per_site=12, image_size=64, seed=0)
    args = screen.bench.parse_args([
        "--data-root", str(tmp / "data"), "--out", str(tmp / "out"), "--backbone", "tiny", "--rounds", "2",
        "--local-steps", "2", "--global-steps", "2", "--final-steps", "2", "--max-train", "0"])
    return args, discover_sites(args.data_root)


def assert_replay_matches(fed, trainers: dict, replayed: dict, sites: list[str]) -> None:
    """Every site's replayed L-MoE equals the full run's (to 1e-6), and so does its validation Dice."""
    for s in sites:
        full_local, replay_local = fed.trainers[s].get_local_state(), trainers[s].get_local_state()
        assert full_local.keys() == replay_local.keys() and full_local
        for name in full_local:
            np.testing.assert_allclose(replay_local[name], full_local[name], rtol=0, atol=1e-6, err_msg=name)
        assert replayed["per_site"][s]["dice"] == pytest.approx(fed.final[s]["val"]["personalized"]["dice"], abs=1e-6)


def test_replay_reaches_the_models_of_a_full_run(tiny):
    """Same G(T), same L-MoE weights and same validation scores as the full federation with a local
    phase in every round (the screen's schedule)."""
    args, sites = tiny
    cfg = screen.bench.make_config("pfedsam", args, 0, "none", {"lr": 1.0}, train=screen.SCREEN_TRAIN)
    fed = screen.federate(lambda s: SiteTrainer(cfg, s, site_dir=args.data_root / s, workdir=args.out / "full" / s),
                          sites, final_split="val", log=lambda m: None)
    globs = screen.trajectory(args, sites, 0, 1.0)
    assert len(globs) == 3
    for name, value in fed.global_state.items():
        np.testing.assert_array_equal(globs[-1][name], value, err_msg=name)
    trainers: dict = {}
    replayed = screen.replay(args, sites, 0, 1.0, {}, globs, trainers)
    assert_replay_matches(fed, trainers, replayed, sites)
    # the replayed L-MoE learned something: it is not the freshly built one
    fresh = SiteTrainer(cfg, sites[0], site_dir=args.data_root / sites[0], workdir=args.out / "fresh").get_local_state()
    assert any(not np.allclose(fresh[n], trainers[sites[0]].get_local_state()[n]) for n in fresh)


def test_a_variant_changes_the_replayed_models(tiny):
    args, sites = tiny
    globs = screen.trajectory(args, sites, 0, 1.0)  # kept from the test above: loaded, not retrained
    a, b = {}, {}
    screen.replay(args, sites, 0, 1.0, {}, globs, a)
    screen.replay(args, sites, 0, 1.0, screen.parse_variant("train.kd_gate=teacher_dice,train.lr_local=0.01"), globs, b)
    la, lb = a[sites[0]].get_local_state(), b[sites[0]].get_local_state()
    assert any(not np.allclose(la[n], lb[n]) for n in la)


@pytest.mark.parametrize("text, expected", [
    ("default", {}),
    ("train.kd_weight=0", {"train.kd_weight": 0}),
    ("train.kd_gate=teacher_dice,lmoe.hidden=64", {"train.kd_gate": "teacher_dice", "lmoe.hidden": 64}),
])
def test_parse_variant(text, expected):
    assert screen.parse_variant(text) == expected


@pytest.mark.parametrize("text", ["kd_weight=0", "train.kd_weight", "train.lr_global=1e-3", "lora.encoder_blocks=2",
                                  "federation.rounds=3"])
def test_parse_variant_refuses_what_a_screen_cannot_replay(text):
    with pytest.raises(ValueError, match="variant"):
        screen.parse_variant(text)


def test_markdown_groups_by_seed_and_lr_and_compares_with_default():
    def run(dice: list[float]) -> dict:
        site = {"dice": float(np.mean(dice)), "global_dice": 0.5, "empty_fp": None, "images": dice}
        return {"val_dice": site["dice"], "global_val_dice": 0.5, "per_site": {"a": site}, "wall_s": 60.0}

    text = screen.markdown({"sites": ["a"], "budget": {}, "runs": {
        "seed0|lr=3|default": run([0.5, 0.5, 0.5]),
        "seed0|lr=3|train.kd_weight=0": run([0.6, 0.6, 0.6]),
        "seed0|lr=1|default": run([0.4, 0.4, 0.4]),
    }})
    assert "## seed0, lr=3" in text and "## seed0, lr=1" in text
    assert "| train.kd_weight=0 | **0.600** | +0.100 [+0.100, +0.100] | ahead |" in text


LORA_BASE = "lora.encoder_blocks=1,train.global_from_embedding=false"


def test_a_base_with_encoder_lora_replays_a_full_run(tiny):
    """With a global design as base (encoder LoRA), the kept trajectory is the full run's G(t) bit for bit and
    the replay reaches its experts and validation scores."""
    args, sites = tiny
    base = screen.parse_base(LORA_BASE, args, 0, 1.0)
    overrides = screen.with_train(base, **screen.SCREEN_TRAIN)
    cfg = screen.bench.make_config("pfedsam", args, 0, "none", {"lr": 1.0}, **overrides)
    assert cfg.lora.encoder_blocks == 1
    fed = screen.federate(lambda s: SiteTrainer(cfg, s, site_dir=args.data_root / s, workdir=args.out / "lora" / s),
                          sites, final_split="val", log=lambda m: None, keep_globals=True)
    globs = screen.trajectory(args, sites, 0, 1.0, base)
    plain = screen.trajectory(args, sites, 0, 1.0)
    assert any(n not in plain[-1] for n in globs[-1])  # the base's LoRA is among the global weights
    for rnd, kept in enumerate(fed.globals):
        assert kept.keys() == globs[rnd].keys()
        for name, value in kept.items():
            np.testing.assert_array_equal(globs[rnd][name], value, err_msg=f"round {rnd} {name}")
    trainers: dict = {}
    replayed = screen.replay(args, sites, 0, 1.0, {}, globs, trainers, base=base)
    assert_replay_matches(fed, trainers, replayed, sites)


@pytest.mark.parametrize("text, match", [
    ("train.local_steps=5", "optimizer steps"),  # more steps: another budget
    ("lmoe.hiden=8", "hiden"),  # misspelled key
    ("lora.encoder_blocks", "key=value"),  # no value
    ("train.local_start=0.5", "local_start"),  # the screen's own schedule
])
def test_parse_base_refuses_what_breaks_the_screen(tiny, text, match):
    args, _ = tiny
    with pytest.raises(ValueError, match=match) as err:
        screen.parse_base(text, args, 0, 1.0)
    assert str(err.value).startswith("--base ")
