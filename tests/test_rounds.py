"""One round, one budget, one data stream: the rules every method and every caller share."""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from pfedsam.config import ConfigError, load_config
from pfedsam.data.synth import write_synthetic_sites
from pfedsam.jobs import VARIANTS, variant_config
from pfedsam.train import SiteTrainer, Stream, plan_steps, run_final, run_round
from pfedsam.train.rounds import lr_scale_nearness

torch.set_num_threads(2)
ROOT = Path(__file__).resolve().parents[1]
MAIN_JOB = ROOT / "jobs" / "pfedsam"
SMALL = ["backbone=tiny", "train.device=cpu", "train.batch_size=2", "federation.rounds=3",
         "train.local_steps=2", "train.global_steps=3", "train.final_steps=2", "eval.hd95=false"]


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth")
    write_synthetic_sites(root / "set", sites=1, per_site=16, seed=0)
    return root / "set" / "site-1"


def _trainer(tmp_path: Path, site: Path, *extra: str) -> SiteTrainer:
    return SiteTrainer(load_config(overrides=[*SMALL, *extra]), "site-1", site_dir=site, workdir=tmp_path)


def _record_batches(trainer: SiteTrainer) -> list[tuple[str, int, list[int]]]:
    """Wrap the trainer's batch draw: (phase, round, indices) of every batch it trains on."""
    seen: list[tuple[str, int, list[int]]] = []
    draw = trainer._next_indices

    def recording(n: int, total: int) -> list[int]:
        idx = draw(n, total)
        seen.append((trainer._stream.phase, trainer._stream.round, idx))
        return idx

    trainer._next_indices = recording
    return seen


# -- the budget -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", [v for v in VARIANTS if v != "pfedsam-tiny"])
def test_every_variant_spends_the_same_budget(variant):
    """rounds * (local + global) + final steps per site, whatever the method (main job: 3 * (8 + 12) + 8)."""
    plan = plan_steps(variant_config(variant, MAIN_JOB))
    assert plan.total_steps == 68
    assert plan.total_images == 68 * 4


@pytest.mark.parametrize(
    "overrides,rounds,final",
    [
        ([], [{"local": 2, "global": 3}] * 3, {"local": 2}),
        (["lmoe.num_experts=0", "train.kd_weight=0", "federation.mode=fedavg"],
         [{"global": 5}, {"global": 5}, {"global": 7}], {}),
        (["lmoe.num_experts=0", "train.kd_weight=0", "federation.mode=fedavg", "federation.final_finetune=true"],
         [{"global": 5}] * 3, {"finetune": 2}),
        (["lmoe.num_experts=0", "train.kd_weight=0", "federation.mode=ditto"],
         [{"personal": 2, "global": 3}] * 3, {"personal": 2}),
        (["train.schedule=joint"], [{"joint": 5}] * 3, {"local": 2}),
        (["federation.mode=local"], [{"local": 2, "global": 3}] * 3, {"local": 2}),
        (["federation.mode=local", "lmoe.num_experts=0", "train.kd_weight=0"],  # plain local
         [{"global": 5}, {"global": 5}, {"global": 7}], {}),
        (["decoder_head=local", "lmoe.num_experts=0", "train.kd_weight=0"],  # FedRep: the head is personal
         [{"local": 2, "global": 3}] * 3, {"local": 2}),
        # train.local_start: the first floor(share * rounds) rounds give their local steps to the global phase
        (["train.local_start=0.7"], [{"global": 5}, {"global": 5}, {"local": 2, "global": 3}], {"local": 2}),
        (["train.local_start=0.5"], [{"global": 5}, {"local": 2, "global": 3}, {"local": 2, "global": 3}],
         {"local": 2}),
        (["train.local_start=1"], [{"global": 5}] * 3, {"local": 2}),
        (["lmoe.num_experts=0", "train.kd_weight=0", "federation.mode=ditto", "train.local_start=0.34"],
         [{"global": 5}, {"personal": 2, "global": 3}, {"personal": 2, "global": 3}], {"personal": 2}),
        (["train.schedule=joint", "train.local_start=0.34"], [{"global": 5}, {"joint": 5}, {"joint": 5}],
         {"local": 2}),
        (["train.schedule=concurrent"], [{"concurrent": 5}] * 3, {"local": 2}),
        (["train.schedule=concurrent", "train.local_start=0.34"],
         [{"global": 5}, {"concurrent": 5}, {"concurrent": 5}], {"local": 2}),
    ],
)
def test_plan_phases(overrides, rounds, final):
    plan = plan_steps(load_config(overrides=[*SMALL, *overrides]))
    assert [dict(r) for r in plan.rounds] == rounds
    assert dict(plan.final) == final
    assert plan.total_steps == 3 * 5 + 2


@pytest.mark.parametrize(
    "overrides",
    [[], ["lmoe.num_experts=0", "train.kd_weight=0", "federation.mode=fedavg"],
     ["lmoe.num_experts=0", "train.kd_weight=0", "federation.mode=fedavg", "federation.final_finetune=true"],
     ["lmoe.num_experts=0", "train.kd_weight=0", "federation.mode=ditto"], ["train.schedule=joint"],
     ["train.schedule=concurrent"], ["train.local_start=0.7"]],
)
def test_rounds_and_final_spend_the_planned_steps(tmp_path, site, overrides):
    """What run_round / run_final actually train equals the plan: the budget is not only on paper."""
    trainer = _trainer(tmp_path, site, *overrides)
    seen = _record_batches(trainer)
    personal, spent = None, 0
    for rnd in range(3):
        result = run_round(trainer, rnd, personal)
        personal, spent = result.personal, spent + result.steps
        assert result.images == result.steps * 2
    spent += run_final(trainer, personal).steps
    assert spent == len(seen) == plan_steps(trainer.cfg).total_steps == 17


@pytest.mark.parametrize("key,value,message", [
    ("federation.final_local_steps", "20", "'train.final_steps'"),
    ("federation.final_finetune", "true", "without a personal part"),
    ("train.final_steps", "-1", "'train.final_steps' must be >= 0"),
    ("train.local_start", "1.5", "'train.local_start' is a share of the rounds, in [0, 1]; got 1.5"),
    ("federation.weighting", "steps", "'federation.weighting: steps' rejects a weight that changes"),
])
def test_budget_keys_are_checked(key, value, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(overrides=["train.local_start=0.5", f"{key}={value}"])


def test_experts_stay_untouched_before_the_local_start(tmp_path, site):
    """Rounds before floor(train.local_start * rounds) train only the global part; the L-MoE starts after them."""
    trainer = _trainer(tmp_path, site, "train.local_start=0.7")
    start_local, start_global = trainer.get_local_state(), trainer.get_global_state()
    for rnd in range(2):
        result = run_round(trainer, rnd)
        assert list(result.phases) == ["global"] and result.global_steps == 5
    assert all(np.array_equal(v, start_local[k]) for k, v in trainer.get_local_state().items())
    assert not all(np.array_equal(v, start_global[k]) for k, v in trainer.get_global_state().items())
    assert list(run_round(trainer, 2).phases) == ["local", "global"]
    assert not all(np.array_equal(v, start_local[k]) for k, v in trainer.get_local_state().items())


# -- the data stream ------------------------------------------------------------------------------------
def test_rounds_see_new_batches_and_every_image(tmp_path, site):
    trainer = _trainer(tmp_path, site)
    seen = _record_batches(trainer)
    for rnd in range(3):
        run_round(trainer, rnd)
    by_round = {rnd: [i for p, r, idx in seen if p == "global" and r == rnd for i in idx] for rnd in range(3)}
    assert by_round[0] != by_round[1] != by_round[2]
    n_train = trainer.num_train_images
    drawn = [i for p, _, idx in seen if p == "global" for i in idx]
    assert len(drawn) == 3 * 3 * 2 >= n_train  # 18 draws over 11 images: the stream covers all of them
    assert set(drawn) == set(range(n_train))
    assert sorted(drawn[:n_train]) == list(range(n_train))  # one whole epoch before any image repeats


def test_stream_does_not_depend_on_process_lifetime(tmp_path, site):
    """A client re-created for round 2 (the simulator with -t < -n) trains on what a living one would."""
    living = _trainer(tmp_path / "a", site)
    seen_living = _record_batches(living)
    for rnd in range(3):
        run_round(living, rnd, evaluate=False)
    fresh = _trainer(tmp_path / "b", site)
    seen_fresh = _record_batches(fresh)
    run_round(fresh, 2, evaluate=False)
    assert [s for s in seen_living if s[1] == 2] == seen_fresh


def test_augmentation_differs_between_rounds(tmp_path, site):
    trainer = _trainer(tmp_path, site)
    flips = []
    for rnd in range(2):
        trainer._open_stream(Stream("global", rnd, start=0))  # same images, another round
        flips.append([trainer._rng.random() for _ in range(8)])
    assert flips[0] != flips[1]


def _grid_features(masks: torch.Tensor, layout: str) -> torch.Tensor:
    """Features whose channel 1 at each grid cell is the mask there (channel 0 the cell's row index)."""
    b, _, size, _ = masks.shape
    rows = torch.arange(size, dtype=torch.float32).view(1, size, 1).expand(b, size, size)
    grid = torch.stack([rows, masks[:, 0]], dim=-1)  # (B, h, w, 2)
    return {"embedding": grid.permute(0, 3, 1, 2), "blocks": grid, "tokens": grid.reshape(b, size * size, 2)}[layout]


@pytest.mark.parametrize("layout", ["embedding", "blocks", "tokens"])  # image embedding, ViT block, TinyViT tokens
def test_feature_flips_move_features_with_their_mask_and_box(layout):
    """Cached features are flipped in place with the mask and box, whatever their layout."""
    import random

    from pfedsam.train.site import feature_grid, flip_batch

    size, n = 8, 16
    masks = torch.zeros(n, 1, size, size)
    masks[:, :, 1:3, 0:5] = 1  # off-centre, so every flip moves it
    boxes = torch.tensor([[0.0, 1.0, 5.0, 3.0]]).repeat(n, 1)
    feats = _grid_features(masks, layout)
    feats, masks, boxes = flip_batch(feats, masks.clone(), boxes.clone(), layout == "embedding", random.Random(0))
    grid, (h_dim, w_dim) = feature_grid(feats, layout == "embedding")
    assert (h_dim, w_dim) == ((1, 2) if layout == "embedding" else (0, 1))
    cells = grid if layout != "embedding" else grid.permute(0, 2, 3, 1)
    assert torch.equal(cells[..., 1], masks[:, 0])  # each feature still sits on its own mask pixel
    flipped_v = cells[:, 0, 0, 0] == size - 1  # the row index moved: a vertical flip
    assert 0 < int(flipped_v.sum()) < n and len({tuple(m.flatten().tolist()) for m in masks}) == 4
    for m, box in zip(masks[:, 0], boxes, strict=True):
        ys, xs = torch.nonzero(m, as_tuple=True)
        assert box.tolist() == [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]


def test_feature_grid_refuses_tokens_without_a_square_grid():
    from pfedsam.train.site import feature_grid

    with pytest.raises(ValueError, match="no square token grid"):
        feature_grid(torch.zeros(2, 10, 4), is_embedding=False)


# -- the experts-off path from the cached embedding -----------------------------------------------------
def test_global_from_embedding_gives_the_global_model_of_the_embedding_placement(tmp_path, site):
    """Experts in the encoder + train.global_from_embedding: G trains, teaches and scores as with experts on
    the embedding (bit for bit), and reads the embedding entries that run left in the shared cache."""
    cache = ["train.cache=disk", f"train.cache_dir={tmp_path / 'cache'}"]
    blocks = ["lmoe.placement=blocks", "lmoe.blocks=1"]
    runs = {}
    for name, extra in (("neck", []), ("blocks+embedding", [*blocks, "train.global_from_embedding=true"]),
                        ("blocks", blocks)):
        trainer = _trainer(tmp_path / name, site, *cache, *extra)
        fill = trainer.warm_cache()
        vals = [run_round(trainer, rnd).val for rnd in range(2)]
        runs[name] = (trainer, fill["computed"], vals)
    n = sum(len(runs["neck"][0].datasets[s]) for s in ("train", "val", "test"))
    # neck fills the embeddings; blocks+embedding adds only its tokens; blocks finds both
    assert [runs[k][1] for k in ("neck", "blocks+embedding", "blocks")] == [n, n, 0]
    neck, emb, plain = (runs[k][0].get_global_state() for k in ("neck", "blocks+embedding", "blocks"))
    for key in neck:
        np.testing.assert_array_equal(emb[key], neck[key], err_msg=key)
    assert any(not np.array_equal(plain[k], neck[k]) for k in neck)  # without it the blocks run on the tokens
    for a, b in zip(runs["neck"][2], runs["blocks+embedding"][2], strict=True):
        assert a["global"]["dice"] == b["global"]["dice"]
    test_global = [runs[k][0].evaluate("test", "global")["dice"] for k in ("neck", "blocks+embedding")]
    assert test_global[0] == test_global[1]


@pytest.mark.parametrize("extra", [["lora.encoder_blocks=1"], ["train.cache=none"]])
def test_global_from_embedding_needs_a_frozen_encoder_and_a_cache(extra):
    with pytest.raises(ConfigError, match=r"train.global_from_embedding.*lora.encoder_blocks.*train.cache"):
        load_config(overrides=[*SMALL, "lmoe.placement=blocks", "train.global_from_embedding=true", *extra])


# -- the final personalization --------------------------------------------------------------------------
@pytest.mark.parametrize("overrides,phase_method", [
    ([], "run_local_phase"),
    (["lmoe.num_experts=0", "train.kd_weight=0", "federation.mode=ditto"], "run_personal_phase"),
])
def test_final_personalizes_against_the_last_global_model(tmp_path, site, overrides, phase_method):
    """Regression: at the final evaluation the L-MoE (or Ditto's copy) was trained against G(T), not G(T-1)."""
    trainer = _trainer(tmp_path, site, *overrides)
    personal = None
    for rnd in range(3):
        personal = run_round(trainer, rnd, personal).personal
    g_last = {k: v + 0.01 for k, v in trainer.get_global_state().items()}  # the server's G(T) differs from G_i
    trainer.set_global_state(g_last)
    teachers: list[dict] = []
    method = getattr(trainer, phase_method)

    def recording(*args, **kwargs):
        teachers.append(trainer.get_global_state())  # the global model loaded while it trains
        return method(*args, **kwargs)

    setattr(trainer, phase_method, recording)
    final = run_final(trainer, personal)
    assert len(teachers) == 1 and final.steps == 2
    for name, value in g_last.items():
        np.testing.assert_array_equal(teachers[0][name], value)
    assert 0.0 <= final.val["personalized"]["dice"] <= 1.0


# -- one implementation ---------------------------------------------------------------------------------
def test_phases_are_run_only_by_the_round_functions():
    """The executor, `pfedsam train` and the benchmark all go through run_round / run_final."""
    callers = []
    for path in [*(ROOT / "custom" / "pfedsam").rglob("*.py"), *(ROOT / "benchmarks").rglob("*.py")]:
        text = path.read_text()
        # train_step.py times single phases on purpose (a speed benchmark, not a round loop), and
        # expert_steps.py continues one saved model's local phase (an analysis, not a row)
        if re.search(r"\.run_(local|global|joint|personal)_phase\(", text) and path.name not in (
                "rounds.py", "train_step.py", "expert_steps.py"):
            callers.append(path.relative_to(ROOT).as_posix())
    assert callers == []
    for user in ("custom/pfedsam/flare/executor.py", "custom/pfedsam/cli.py", "benchmarks/run.py"):
        text = (ROOT / user).read_text()
        assert "run_round(" in text and "run_final(" in text, user


# -- FedRep: shared body, personal head --------------------------------------------------------------------
def test_fedrep_trains_the_head_locally_and_the_body_globally(tmp_path, site):
    trainer = _trainer(tmp_path, site, "decoder_head=local", "lmoe.num_experts=0", "train.kd_weight=0")
    local = trainer.local_names()
    assert local and all(n.startswith(("mask_decoder.output_upscaling", "mask_decoder.output_hypernetworks_mlps.0"))
                         for n in local)
    assert not set(local) & set(trainer.global_names())
    head0, body0 = trainer.get_local_state(), trainer.get_global_state()
    result = run_round(trainer, 0)
    assert set(result.phases) == {"local", "global"}
    head1, body1 = trainer.get_local_state(), trainer.get_global_state()
    assert any(not np.array_equal(head0[k], head1[k]) for k in head0)  # the local phase moved the head
    assert any(not np.array_equal(body0[k], body1[k]) for k in body0)  # the global phase moved the body


def test_fedrep_global_phase_leaves_the_head_alone(tmp_path, site):
    trainer = _trainer(tmp_path, site, "decoder_head=local", "lmoe.num_experts=0", "train.kd_weight=0",
                       "train.local_steps=0")
    head0 = trainer.get_local_state()
    run_round(trainer, 0)  # global phase only
    head1 = trainer.get_local_state()
    assert all(np.array_equal(head0[k], head1[k]) for k in head0)


def test_fedrep_needs_a_fully_trained_decoder():
    with pytest.raises(ConfigError, match="decoder_head: local"):
        load_config(overrides=[*SMALL, "decoder_head=local", "decoder=lora", "lmoe.num_experts=0"])


@pytest.mark.parametrize("overrides,evaluations", [
    (["lmoe.num_experts=0", "train.kd_weight=0", "federation.mode=fedavg"], 1),  # one model: scored once
    (["federation.mode=local", "lmoe.num_experts=0", "train.kd_weight=0"], 1),
    ([], 2),  # L-MoE on: the personalized model differs from the global one
    (["lmoe.num_experts=0", "train.kd_weight=0", "federation.mode=ditto"], 2),  # the personal copy differs
])
def test_a_site_with_one_model_is_scored_once(tmp_path, site, overrides, evaluations):
    """Scores under both names are the one model's; a personal part is always scored on its own."""
    trainer = _trainer(tmp_path, site, *overrides)
    calls: list[str] = []
    evaluate = trainer.evaluate
    trainer.evaluate = lambda split, which, **kw: calls.append(which) or evaluate(split, which, **kw)
    personal = None
    for rnd in range(3):
        calls.clear()
        result = run_round(trainer, rnd, personal)
        personal = result.personal
        assert len(calls) == evaluations
        if evaluations == 1:  # (assert_equal: nan equals nan)
            np.testing.assert_equal(result.val["personalized"], result.val["global"])
    calls.clear()
    final = run_final(trainer, personal)
    assert len(calls) == evaluations
    if evaluations == 1:
        np.testing.assert_equal(final.val["personalized"], final.val["global"])
        np.testing.assert_equal(final.val["global"], evaluate("test", "personalized"))
        np.testing.assert_equal(final.val["global"], evaluate("test", "global"))


# -- the final personalization's learning rate, chosen at the site --------------------------------------
SEARCH_MODES = {
    "pfedsam": [],
    "fedavg-ft": ["lmoe.num_experts=0", "train.kd_weight=0", "federation.mode=fedavg",
                  "federation.final_finetune=true"],
    "ditto": ["lmoe.num_experts=0", "train.kd_weight=0", "federation.mode=ditto"],
}


@pytest.mark.parametrize("mode", list(SEARCH_MODES))
def test_final_lr_search_keeps_the_scale_best_on_validation(tmp_path, site, mode):
    """Each scale trains from the same start on the same batches: a separate site at that learning rate
    reaches the same validation Dice, and the kept model is the one a single pass at the kept scale gives."""
    scales = [0.3, 1.0, 3.0]
    trainer = _trainer(tmp_path / "search", site, *SEARCH_MODES[mode], f"train.final_lr_scales={scales}")
    personal = None
    for rnd in range(3):
        personal = run_round(trainer, rnd, personal).personal
    start = trainer.get_global_state(), trainer.get_local_state(), personal
    seen = _record_batches(trainer)
    final = run_final(trainer, personal)
    assert final.steps == 2 and len(seen) == 2 * len(scales)  # the kept model trained final_steps; each scale paid
    assert len({tuple(idx) for _, _, idx in seen}) == 2  # every scale saw the same two batches
    assert list(final.val_by_lr_scale) == scales and trainer.lr_scale == 1.0
    assert final.lr_scale == max(scales, key=lambda s: (final.val_by_lr_scale[s], -abs(np.log(s))))
    base = trainer.cfg.train
    for scale in scales:
        single = _trainer(tmp_path / f"single-{scale}", site, *SEARCH_MODES[mode],
                          f"train.lr_local={base.lr_local * scale}", f"train.lr_global={base.lr_global * scale}")
        single.set_global_state(start[0])
        single.set_local_state(start[1])
        alone = run_final(single, None if start[2] is None else dict(start[2]))
        with single.global_swapped(alone.personal):
            dice = single.evaluate("val", "personalized")["dice"]
        assert dice == pytest.approx(final.val_by_lr_scale[scale], abs=1e-6)
        if scale == final.lr_scale:
            assert alone.val["personalized"]["dice"] == pytest.approx(final.val["personalized"]["dice"], abs=1e-6)
            for name, value in single.get_local_state().items():
                np.testing.assert_allclose(trainer.get_local_state()[name], value, atol=1e-6)
            for name, value in single.get_global_state().items():
                np.testing.assert_allclose(trainer.get_global_state()[name], value, atol=1e-6)


def test_final_lr_search_breaks_a_tie_toward_scale_one(tmp_path, site, monkeypatch):
    trainer = _trainer(tmp_path, site, "train.final_lr_scales=[3, 0.3, 1, 10]")
    monkeypatch.setattr(trainer, "evaluate", lambda split="val", which="personalized", per_image=False: {"dice": 0.5})
    assert run_final(trainer).lr_scale == 1


@pytest.mark.parametrize("nearer,further", [(1, 0.3), (1, 3), (0.3, 0.1), (3, 10), (3, 0.1), (0.3, 10)])
def test_lr_scale_nearness_orders_scales_by_their_distance_from_one(nearer, further):
    assert lr_scale_nearness(nearer) > lr_scale_nearness(further)


def test_lr_scaled_restores_the_scale_it_found():
    holder = SimpleNamespace(lr_scale=1.0)  # the context manager touches nothing else of a trainer
    with SiteTrainer.lr_scaled(holder, 3):
        with SiteTrainer.lr_scaled(holder, 0.5):
            assert holder.lr_scale == 0.5
        assert holder.lr_scale == 3.0
    assert holder.lr_scale == 1.0


def test_lr_scale_nearness_is_zero_at_one_and_symmetric_on_a_log_scale():
    assert lr_scale_nearness(1) == 0 and lr_scale_nearness(3) == pytest.approx(lr_scale_nearness(1 / 3))


@pytest.mark.parametrize("value,extra,message", [
    ("[0.3, 0, 3]", [], "'train.final_lr_scales' must be distinct positive numbers"),
    ("[1, 1]", [], "'train.final_lr_scales' must be distinct positive numbers"),
    ("[true]", [], "'train.final_lr_scales' must be distinct positive numbers"),
    ("['3']", [], "'train.final_lr_scales' must be distinct positive numbers"),
    ("3", [], "'train.final_lr_scales' must be list"),
    ("[1, 3]", ["train.final_steps=0"], "this job has none ('train.final_steps' is 0"),
    ("[1, 3]", ["lmoe.num_experts=0", "train.kd_weight=0", "federation.mode=fedavg"], "this job has none"),
])
def test_final_lr_scales_are_checked(value, extra, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(overrides=[*extra, f"train.final_lr_scales={value}"])
