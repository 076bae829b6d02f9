"""Scores people compare with: Dice / HD95 at each image's original resolution, empty-frame statistics."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pfedsam.config import ConfigError, load_config
from pfedsam.train import SiteTrainer
from pfedsam.train.metrics import (
    apply_size_rule,
    image_metrics,
    original_image_metrics,
    prediction_at_original,
    size_rule_threshold,
    summarize,
)

torch.set_num_threads(2)
NAN = float("nan")


def _logits(size: int, rows: tuple[int, int] | None, cols: tuple[int, int] | None, pad: tuple[int, int] | None = None,
            ) -> torch.Tensor:
    """``(1, S, S)`` logits: -10 everywhere, +10 on the block, +10 outside the valid region ``pad`` (h, w)."""
    x = torch.full((1, size, size), -10.0)
    if rows is not None and cols is not None:
        x[0, rows[0]:rows[1], cols[0]:cols[1]] = 10.0
    if pad is not None:
        x[0, pad[0]:, :] = 10.0
        x[0, :, pad[1]:] = 10.0
    return x


def _truth(hw: tuple[int, int], rows: tuple[int, int] | None = None, cols: tuple[int, int] | None = None) -> np.ndarray:
    t = np.zeros(hw, dtype=bool)
    if rows is not None and cols is not None:
        t[rows[0]:rows[1], cols[0]:cols[1]] = True
    return t


# A PolypGen frame, 410 x 512 (H x W), scored by a model of side 256: valid region 205 x 256, padded
# rows 205..255. A logit block on model rows 50..99, cols 60..119 resizes (x2, bilinear, align_corners
# False) to exactly rows 100..199, cols 120..239 at the original resolution: 100 x 120 = 12000 pixels.
# truth block (rows, cols) at 410 x 512, expected Dice, expected HD95 (None: not checked)
ORIGINAL_CASES = [
    ((100, 200), (120, 240), 1.0, 0.0),  # the same block
    ((100, 200), (140, 260), 2 * 10000 / 24000, None),  # shifted 20 columns: 100 x 100 overlap
    ((100, 150), (120, 240), 2 * 6000 / 18000, None),  # the top half
    (None, None, 0.0, math.hypot(410, 512)),  # a frame without a polyp: HD95 = the original diagonal
]


@pytest.mark.parametrize("rows,cols,dice,hd95", ORIGINAL_CASES)
def test_prediction_resized_to_a_non_square_original(rows, cols, dice, hd95):
    logits = _logits(256, (50, 100), (60, 120))
    pred = prediction_at_original(logits, (205, 256), (410, 512))
    assert pred.shape == (410, 512) and pred.dtype == torch.bool
    assert int(pred.sum()) == 12000 and bool(pred[100:200, 120:240].all())
    m = original_image_metrics(logits, (205, 256), _truth((410, 512), rows, cols))
    assert m["dice"] == pytest.approx(dice, abs=1e-6)
    if hd95 is not None:
        assert m["hd95"] == pytest.approx(hd95, abs=1e-4)


# original (H, W), valid (h, w) at S = 256: the padding (rows or columns) holds +10 logits
PADDING_CASES = [((410, 512), (205, 256)), ((512, 410), (256, 205)), ((288, 512), (144, 256))]


@pytest.mark.parametrize("orig,valid", PADDING_CASES)
def test_padding_never_counts(orig, valid):
    logits = _logits(256, None, None, pad=valid)
    m = original_image_metrics(logits, valid, _truth(orig))
    assert (m["dice"], m["hd95"], m["pred_empty"], m["truth_empty"]) == (1.0, 0.0, 1.0, 1.0)
    # without the crop the padding would bleed into the border rows/columns of the resized prediction
    uncropped = prediction_at_original(logits, (256, 256), orig)
    assert uncropped.any()


E = torch.zeros(8, 8, dtype=torch.bool)
B = E.clone()
B[2:6, 2:6] = True
HIT, MISS, TN, FP = (B, B), (E, B), (E, E), (B, E)  # (pred, truth)
# rows as (pred, truth) pairs, empty_dice, expected {key: value}
SUMMARY_CASES = [
    ([HIT, MISS, TN, FP], "one", {"n": 4, "n_empty": 1, "dice": 0.5, "n_fg": 2, "dice_fg": 0.5, "empty_fp": 0.5}),
    ([HIT, MISS, TN, FP], "skip", {"n": 3, "n_empty": 1, "dice": 1 / 3, "n_fg": 2, "dice_fg": 0.5, "empty_fp": 0.5}),
    ([HIT, HIT, MISS], "one", {"n": 3, "n_empty": 0, "dice": 2 / 3, "n_fg": 3, "dice_fg": 2 / 3, "empty_fp": NAN}),
    ([TN, TN, FP], "one", {"n": 3, "n_empty": 2, "dice": 2 / 3, "n_fg": 0, "dice_fg": NAN, "empty_fp": 1 / 3}),
    ([TN, TN], "skip", {"n": 0, "n_empty": 2, "dice": NAN, "n_fg": 0, "dice_fg": NAN, "empty_fp": 0.0}),
]


@pytest.mark.parametrize("pairs,empty_dice,expected", SUMMARY_CASES)
def test_summary_of_frames_with_and_without_a_polyp(pairs, empty_dice, expected):
    got = summarize([image_metrics(p, t, (8, 8)) for p, t in pairs], empty_dice)
    assert set(got) == {"n", "n_empty", "dice", "hd95", "n_fg", "dice_fg", "empty_fp"}
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, nan_ok=True), key


@pytest.mark.parametrize("pred_hw,valid,area", [((4, 4), (8, 8), 16 / 64), ((4, 4), (6, 8), 16 / 48),
                                               ((0, 0), (8, 8), 0.0)])
def test_predicted_area_is_a_share_of_the_scored_region(pred_hw, valid, area):
    pred = torch.zeros(8, 8, dtype=torch.bool)
    pred[: pred_hw[0], : pred_hw[1]] = True
    pred[7, 7] = True  # in the padding when the valid region is 6 x 8: never counted
    got = image_metrics(pred, E, valid)["pred_area"]
    assert got == pytest.approx(area + (1 / 64 if valid == (8, 8) else 0.0))


# dice, predicted area, truth empty (per image); the threshold chosen on them; the Dice it gives
SIZE_RULE_CASES = [
    ([0.8, 0.0], [0.1, 0.001], [False, False], 0.0, [0.8, 0.0]),  # no empty frame: nothing to gain, 0 kept
    ([0.8, 0.0], [0.1, 0.002], [False, True], 0.002, [0.8, 1.0]),  # a speck on an empty frame is removed
    ([0.6, 0.0], [0.03, 0.05], [False, True], 0.05, [0.0, 1.0]),  # areas overlap: a polyp is lost, the mean wins
    ([0.9, 0.0, 0.0], [0.2, 0.001, 0.3], [False, True, True], 0.3, [0.0, 1.0, 1.0]),  # 0.667 beats 0.633 at 0.001
    ([0.9, 1.0], [0.2, 0.0], [False, True], 0.0, [0.9, 1.0]),  # already empty: already right
]


@pytest.mark.parametrize("dice,area,empty,threshold,ruled", SIZE_RULE_CASES)
def test_size_rule(dice, area, empty, threshold, ruled):
    assert size_rule_threshold(dice, area, empty) == threshold
    assert apply_size_rule(dice, area, empty, threshold) == pytest.approx(ruled)
    assert apply_size_rule(dice, area, empty, 0.0) == pytest.approx(dice)  # threshold 0 changes nothing


def test_size_rule_refuses_unpaired_lists():
    with pytest.raises(ValueError, match="2 Dice, 1 areas and 2 truth flags"):
        apply_size_rule([0.5, 0.5], [0.1], [False, True], 0.0)


# --- SiteTrainer.evaluate on a small non-square site (tiny backbone, S = 64) -------------------------------
IDS = [f"f{i}" for i in range(8)]
SPLIT = {"train": IDS[:3], "val": IDS[3:5], "test": IDS[5:]}
EMPTY_IDS = {"f1", "f4", "f6"}  # frames without a polyp, in every split


def _write_site(root: Path, convention: str = "nonzero") -> Path:
    """8 frames of 40 x 50 (H x W), a 15 x 20 polyp except in EMPTY_IDS; masks stored as ``convention`` says."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for k, i in enumerate(IDS):
        image = rng.integers(0, 60, (40, 50, 3), dtype=np.uint8)
        fg = np.zeros((40, 50), dtype=bool)
        if i not in EMPTY_IDS:
            fg[5 + k:20 + k, 10 + k:30 + k] = True
            image[fg] += 150
        Image.fromarray(image).save(root / "images" / f"{i}.png")
        stored = fg if convention == "nonzero" else ~fg
        Image.fromarray(stored.astype(np.uint8) * 255).save(root / "masks" / f"{i}.png")
    (root / "split.json").write_text(json.dumps(SPLIT))
    return root


def _trainer(tmp_path: Path, site: Path, *extra: str) -> SiteTrainer:
    cfg = load_config(overrides=["backbone=tiny", "train.device=cpu", "train.batch_size=4", *extra])
    return SiteTrainer(cfg, "site-1", site_dir=site, workdir=tmp_path)


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> SiteTrainer:
    """One trainer on the small site for the tests below; each sets the ``eval`` keys it needs."""
    root = tmp_path_factory.mktemp("nonsquare")
    return _trainer(root / "work", _write_site(root / "site"))


def _set_eval(monkeypatch, trainer: SiteTrainer, **values) -> SiteTrainer:
    for key, value in values.items():
        monkeypatch.setattr(trainer.cfg.eval, key, value)
    return trainer


def _old_evaluate(trainer: SiteTrainer, split: str, which: str) -> dict[str, float]:
    """The model-resolution evaluation as it was before ``eval.resolution`` (main at 8a26ec0)."""
    s = trainer._split(split)
    probs = torch.sigmoid(trainer.predict_logits(split, list(range(len(s))), which)).cpu()
    hd95 = trainer.cfg.eval.hd95 and (split != "val" or trainer.cfg.eval.hd95_val)
    rows = [image_metrics(probs[i, 0] > trainer.cfg.eval.threshold, s.masks[i, 0], tuple(s.valid[i].tolist()), hd95)
            for i in range(len(s))]
    old = summarize(rows, trainer.cfg.eval.empty_dice)
    return {k: old[k] for k in ("n", "n_empty", "dice", "hd95")}


@pytest.mark.parametrize("split,which", [("test", "global"), ("val", "personalized"), ("test", "personalized")])
def test_model_resolution_reproduces_the_old_numbers(small, monkeypatch, split, which):
    trainer = _set_eval(monkeypatch, small, resolution="model", resolution_val=True)
    got = trainer.evaluate(split, which)
    old = _old_evaluate(trainer, split, which)
    assert {k: got[k] for k in old} == pytest.approx(old, nan_ok=True)


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_per_image_rows_follow_the_split(small, split):
    got = small.evaluate(split, "global", per_image=True)
    rows = got["images"]
    assert [r["id"] for r in rows] == SPLIT[split]
    assert [r["truth_empty"] for r in rows] == [i in EMPTY_IDS for i in SPLIT[split]]
    assert set(rows[0]) == {"id", "dice", "hd95", "truth_empty", "pred_empty", "pred_area"}
    assert all((r["pred_area"] == 0.0) == r["pred_empty"] and 0.0 <= r["pred_area"] <= 1.0 for r in rows)
    assert got["dice"] == pytest.approx(np.mean([r["dice"] for r in rows]))
    assert got["n_fg"] == sum(not r["truth_empty"] for r in rows)


@pytest.mark.parametrize("convention", ["nonzero", "zero"])
def test_original_resolution_scores_against_the_mask_file(tmp_path, convention):
    site = _write_site(tmp_path / "site", convention)
    trainer = _trainer(tmp_path / "w", site, f"data.mask_convention={convention}")
    got = trainer.evaluate("test", "global", per_image=True)
    logits = trainer.predict_logits("test", list(range(3)), "global")
    split = trainer._split("test")
    for j, row in enumerate(got["images"]):
        stored = np.asarray(Image.open(site / "masks" / f"{row['id']}.png")) > 0
        truth = stored if convention == "nonzero" else ~stored
        assert split.original_mask(j).shape == (40, 50)
        want = original_image_metrics(logits[j], tuple(split.valid[j].tolist()), truth, trainer.cfg.eval.threshold)
        assert (row["dice"], row["hd95"]) == pytest.approx((want["dice"], want["hd95"]))
        if row["truth_empty"] != row["pred_empty"]:  # one of them empty: the diagonal of the 40 x 50 frame
            assert row["hd95"] == pytest.approx(math.hypot(40, 50))


@pytest.mark.parametrize("resolution_val,split,original", [
    (False, "val", False), (True, "val", True), (False, "test", True),
])
def test_validation_rounds_stay_at_model_resolution_unless_asked(small, monkeypatch, resolution_val, split, original):
    import pfedsam.train.site as site_module

    calls = []
    real = site_module.original_image_metrics
    monkeypatch.setattr(site_module, "original_image_metrics", lambda *a, **k: calls.append(1) or real(*a, **k))
    _set_eval(monkeypatch, small, resolution_val=resolution_val).evaluate(split, "global")
    assert bool(calls) == original


def test_resolution_setting():
    assert load_config().eval.resolution == "original" and load_config().eval.resolution_val is False
    with pytest.raises(ConfigError, match="eval.resolution"):
        load_config(overrides=["eval.resolution=native"])


def test_final_result_is_scalars_the_filter_allows(small):
    """What run_final reports passes MetricsOnlyFilter's schema (NaN included); per-image rows would not."""
    from pfedsam.flare.common import FINAL_STATS
    from pfedsam.flare.filters import FINAL_DATA_SCHEMA, LeakBlocked, check_allowed

    scores = small.evaluate("test", "global")
    assert set(scores) == set(FINAL_STATS)
    check_allowed({"global": scores, "personalized": {**scores, "empty_fp": NAN}, "export": "none"},
                  FINAL_DATA_SCHEMA, "data")
    with pytest.raises(LeakBlocked):
        check_allowed({"global": small.evaluate("test", "global", per_image=True)}, FINAL_DATA_SCHEMA, "data")


def test_real_polypgen_frames_at_their_stored_size(tmp_path, shared_data):
    """PolypGen centre 4: 512 x 288 frames, many without a polyp; truth read at the stored size."""
    site = shared_data / "polyp" / "polypgen-c4"
    if not site.is_dir():
        pytest.skip(f"{site} not found")
    trainer = _trainer(tmp_path, site, "data.max_train=2", "eval.hd95=false")
    got = trainer.evaluate("test", "global", per_image=True)
    ids = json.loads((site / "split.json").read_text())["test"]
    assert [r["id"] for r in got["images"]] == ids
    empty = [not (np.asarray(Image.open(site / "masks" / f"{i}.png")) > 0).any() for i in ids]
    assert [r["truth_empty"] for r in got["images"]] == empty
    assert got["n_fg"] == len(ids) - sum(empty) and 0 < got["n_fg"] < len(ids)
    assert trainer._split("test").original_mask(0).shape == (288, 512)
