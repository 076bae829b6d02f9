"""The benchmark's bookkeeping: settings of the search, tables from recorded runs, paired intervals, budgets."""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
spec = importlib.util.spec_from_file_location("bench_run", ROOT / "benchmarks" / "run.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)
import stats  # noqa: E402  (benchmarks/stats.py)

SITES = ["a", "b"]


def _run(dice_a: list[float], dice_b: list[float], val: float = 0.5, **extra) -> dict:
    def site(d: list[float]) -> dict:
        return {"dice": float(np.mean(d)), "hd95": 10.0, "dice_fg": float(np.mean(d)), "empty_fp": float("nan"),
                "images": d, "val_dice": val, "global": {"dice": 0.1, "images": [0.1] * len(d)}}

    return {"per_site": {"a": site(dice_a), "b": site(dice_b)}, "val_dice": val, **extra}


def _results(runs: dict, tuned: dict | None = None) -> dict:
    return {"dataset": "x", "sites": SITES, "budget": {}, "hardware": {}, "scoring": "", "runs": runs,
            "tuned": tuned or {}, "unseen": {}, "communication": {}, "protocol": bench.PROTOCOL}


# -- paired bootstrap ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "a,b,diff,excludes_zero",
    [
        ({"x": [[0.5, 0.6, 0.7]]}, {"x": [[0.5, 0.6, 0.7]]}, 0.0, False),  # the same scores: exactly 0
        ({"x": [[0.6, 0.7, 0.8, 0.9]]}, {"x": [[0.5, 0.6, 0.7, 0.8]]}, 0.1, True),  # a constant shift
        ({"x": [[0.9, 0.1, 0.9, 0.1]]}, {"x": [[0.1, 0.9, 0.1, 0.9]]}, 0.0, False),  # wins and losses cancel
        # seeds are averaged per image first: (0.6 + 0.8) / 2 - 0.5 = 0.2 on both images
        ({"x": [[0.6, 0.6], [0.8, 0.8]]}, {"x": [[0.5, 0.5]]}, 0.2, True),
        # centres count the same whatever their size: (0.1 + 0.3) / 2
        ({"x": [[0.6] * 10], "y": [[0.8, 0.8]]}, {"x": [[0.5] * 10], "y": [[0.5, 0.5]]}, 0.2, True),
    ],
)
def test_paired_difference(a, b, diff, excludes_zero):
    out = stats.paired_difference(a, b, n_boot=500)
    assert out["diff"] == pytest.approx(diff)
    assert out["lo"] <= out["diff"] + 1e-12 and out["diff"] - 1e-12 <= out["hi"]
    assert (out["lo"] > 0 or out["hi"] < 0) is excludes_zero


@pytest.mark.parametrize(
    "interval,reading",
    [({"lo": 0.01, "hi": 0.05}, "ahead"), ({"lo": -0.05, "hi": -0.01}, "behind"),
     ({"lo": -0.01, "hi": 0.05}, "no difference shown")],
)
def test_verdict(interval, reading):
    assert stats.verdict(interval) == reading


@pytest.mark.parametrize("values,text", [
    ([0.5, 0.6, 0.7], "0.600 +- 0.100"),
    ([0.3], "0.300"),  # one seed: no spread to print
    ([0.25, 0.25], "0.250 +- 0.000"),  # two seeds that agree do have one
])
def test_mean_std_text(values, text):
    assert stats.mean_std_text(values) == text


def test_paired_difference_refuses_unpaired_scores():
    with pytest.raises(ValueError, match="same images"):
        stats.paired_difference({"x": [[0.5, 0.6]]}, {"x": [[0.5]]})
    with pytest.raises(ValueError, match="different centres"):
        stats.paired_difference({"x": [[0.5]]}, {"y": [[0.5]]})


# -- settings and the search ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "setting,tag,lr_scale",
    [({"lr": 1.0}, "lr=1", 1.0), ({"lr": 0.3}, "lr=0.3", 0.3),
     ({"lr": 3.0, "kd_weight": 0.3}, "lr=3,kd_weight=0.3", 3.0)],
)
def test_setting_tags_and_overrides(setting, tag, lr_scale):
    assert bench.tag_of(setting) == tag
    train = bench.overrides_of(setting)["train"]
    assert train["lr_global"] == pytest.approx(bench.BASE.train.lr_global * lr_scale)
    assert train["lr_local"] == pytest.approx(bench.BASE.train.lr_local * lr_scale)
    assert {k: v for k, v in train.items() if not k.startswith("lr_")} == {
        k: v for k, v in setting.items() if k != "lr"}


@pytest.mark.parametrize(
    "method,best_lr,expected",
    [("fedavg", 3.0, []),
     ("pfedsam", 0.3, ["lr=0.3,kd_weight=0.3", "lr=0.3,kd_weight=3"]),
     ("fedprox", 1.0, ["lr=1,prox_mu=0.001", "lr=1,prox_mu=0.1"])],
)
def test_knob_grid(method, best_lr, expected):
    assert [bench.tag_of(s) for s in bench.knob_grid(method, best_lr)] == expected


@pytest.mark.parametrize(
    "method,val_of_lr,expected_runs,chosen",
    [
        # an interior best: the three scales, then the knob at the best one
        ("pfedsam", {0.3: 0.5, 1.0: 0.6, 3.0: 0.55},
         ["lr=0.3", "lr=1", "lr=3", "lr=1,kd_weight=0.3", "lr=1,kd_weight=3"], "lr=1,kd_weight=3"),
        # the largest scale wins: one rung further, then stop once the best is inside the range
        ("fedavg", {0.3: 0.5, 1.0: 0.6, 3.0: 0.62, 10.0: 0.61}, ["lr=0.3", "lr=1", "lr=3", "lr=10"], "lr=3"),
        ("fedavg", {0.3: 0.5, 1.0: 0.6, 3.0: 0.62, 10.0: 0.63, 30.0: 0.1},
         ["lr=0.3", "lr=1", "lr=3", "lr=10", "lr=30"], "lr=10"),
        # the smallest wins: down the ladder to its end, no further
        ("local-plain", {0.3: 0.6, 1.0: 0.5, 3.0: 0.4, 0.1: 0.7, 0.03: 0.8},
         ["lr=0.3", "lr=1", "lr=3", "lr=0.1", "lr=0.03"], "lr=0.03"),
        # the largest wins up to the ladder's end; a tie goes to the scale nearest 1
        ("fedavg", {0.3: 0.1, 1.0: 0.2, 3.0: 0.3, 10.0: 0.4, 30.0: 0.5}, ["lr=0.3", "lr=1", "lr=3", "lr=10", "lr=30"],
         "lr=30"),
        ("fedavg", {0.3: 0.6, 1.0: 0.6, 3.0: 0.6}, ["lr=0.3", "lr=1", "lr=3"], "lr=1"),
    ],
)
def test_search_extends_the_lr_range_while_the_best_is_at_its_edge(method, val_of_lr, expected_runs, chosen):
    returned = {}

    def run(setting):  # a KD weight of 3 adds 0.01 at any scale
        returned[bench.tag_of(setting)] = val_of_lr[setting["lr"]] + 0.01 * (setting.get("kd_weight") == 3.0)
        return returned[bench.tag_of(setting)]

    tuned = bench.search(method, run)
    assert list(returned) == expected_runs
    assert tuned["tag"] == chosen and tuned["val_dice"] == returned[chosen] and tuned["tried"] == returned


@pytest.mark.parametrize(
    "method,tuned,expected,from_search",
    [
        ("pfedsam", {}, {"lr": 1.0}, False),  # no search yet: the default, marked untuned
        ("pfedsam", {"pfedsam": {"setting": {"lr": 3.0, "kd_weight": 0.3}}}, {"lr": 3.0, "kd_weight": 0.3}, True),
        # ablations reuse pFedSAM's setting; one without KD does not take the KD weight
        ("pfedsam-joint", {"pfedsam": {"setting": {"lr": 3.0, "kd_weight": 0.3}}}, {"lr": 3.0, "kd_weight": 0.3}, True),
        ("pfedsam-nokd", {"pfedsam": {"setting": {"lr": 3.0, "kd_weight": 0.3}}}, {"lr": 3.0}, True),
        ("fedrep", {"fedavg": {"setting": {"lr": 0.3}}}, {"lr": 0.3}, True),
        ("centralized", {"fedavg": {"setting": {"lr": 0.3}}}, {"lr": 0.3}, True),
    ],
)
def test_chosen_setting(method, tuned, expected, from_search):
    assert bench.chosen_setting(_results({}, tuned), method) == (expected, from_search)


@pytest.mark.parametrize("text, expected", [
    ("default", {}),
    ("train.local_steps=4,train.global_steps=20", {"train.local_steps": 4, "train.global_steps": 20}),
    ("train.kd_gate=teacher_dice,lmoe.hidden=64", {"train.kd_gate": "teacher_dice", "lmoe.hidden": 64}),
    ("train.final_lr_scales=[0.3,1,3],train.local_start=1",
     {"train.final_lr_scales": [0.3, 1, 3], "train.local_start": 1}),
])
def test_parse_overrides(text, expected):
    assert bench.parse_overrides(text) == expected
    assert bench.variant_tag(expected) == ("default" if text == "default" else text)
    assert bench.row_tag({"lr": 3.0}, expected) == ("lr=3" if text == "default" else f"lr=3+{text}")


@pytest.mark.parametrize("variant, keeps_budget", [
    ({"train.local_steps": 4, "train.global_steps": 20}, True),  # steps moved between the phases
    ({"train.kd_weight": 0.5}, True),
    # the experts only after the last round: 12 x (8 + 12) + 64, and 12 x (8 + 8) + 112
    ({"train.local_start": 1.0, "train.global_steps": 12, "train.final_steps": 64}, True),
    ({"train.local_start": 1.0, "train.global_steps": 8, "train.final_steps": 112,
      "train.final_lr_scales": [0.3, 1, 3]}, True),
    ({"train.local_start": 1.0, "train.final_steps": 64}, False),
    ({"train.local_steps": 4}, False),  # 12 x 4 fewer steps
    ({"train.global_steps": 8, "train.batch_size": 8}, False),  # half the global steps at twice the batch
    ({"train.local_steps": 4, "train.global_steps": 20, "train.batch_size": 8}, False),  # same steps, 2x images
])
def test_a_variant_must_keep_the_budget(tmp_path, variant, keeps_budget):
    args = bench.parse_args(["--data-root", str(tmp_path), "--out", str(tmp_path)])
    if keeps_budget:
        cfg = bench.variant_of("pfedsam", args, 0, "none", {"lr": 3.0}, variant)
        for key, value in variant.items():
            assert getattr(cfg.train, key.split(".")[1]) == value
        assert cfg.train.lr_global == pytest.approx(3.0 * bench.BASE.train.lr_global)
    else:
        with pytest.raises(ValueError, match="budget is 304"):
            bench.variant_of("pfedsam", args, 0, "none", {"lr": 3.0}, variant)


# -- tables --------------------------------------------------------------------------------------------------
def test_main_table_uses_the_chosen_setting_and_seeds():
    runs = {f"pfedsam|none|seed{s}|lr=3": _run([d, d], [d, d]) for s, d in enumerate([0.5, 0.6, 0.7])}
    runs["pfedsam|none|seed0|lr=1"] = _run([0.1], [0.1])  # a search run that was not chosen
    runs["fedavg|none|seed0|lr=1"] = _run([0.3], [0.3])
    results = _results(runs, {"pfedsam": {"tag": "lr=3", "setting": {"lr": 3.0}}})
    lines = bench.main_table(results)[2:]
    assert lines[0].startswith("| fedavg | lr=1 (untuned) | 1 | 0.300 | 0.300 | **0.300** |")
    m, sd = np.mean([0.5, 0.6, 0.7]), np.std([0.5, 0.6, 0.7], ddof=1)
    assert lines[1].startswith(f"| pfedsam | lr=3 | 3 | {m:.3f} +- {sd:.3f} | {m:.3f} +- {sd:.3f} | "
                               f"**{m:.3f} +- {sd:.3f}**")


@pytest.mark.parametrize("tried, label", [
    ({"lr=0.3": 0.5, "lr=1": 0.6, "lr=3": 0.55}, "lr=1 |"),
    ({"lr=0.3": 0.5, "lr=1": 0.6, "lr=3": 0.65}, "lr=3 (search open: lr=10 to run) |"),  # recorded before the ladder
    ({"lr=0.3": 0.5, "lr=1": 0.6, "lr=3": 0.65, "lr=10": 0.6}, "lr=3 |"),
])
def test_main_table_says_when_a_recorded_search_stopped_at_its_edge(tried, label):
    tag = max(tried, key=tried.get)
    runs = {f"fedavg|none|seed0|{tag}": _run([0.5], [0.5])}
    results = _results(runs, {"fedavg": {"tag": tag, "setting": {"lr": float(tag[3:])}, "tried": tried}})
    assert bench.main_table(results)[2].startswith(f"| fedavg | {label} 1 |")


def test_interval_table_reads_ahead_only_when_the_interval_excludes_zero():
    runs = {"pfedsam|none|seed0|lr=1": _run([0.8, 0.9, 0.8, 0.9], [0.7, 0.8, 0.7, 0.8]),
            "fedavg|none|seed0|lr=1": _run([0.5, 0.6, 0.5, 0.6], [0.5, 0.6, 0.5, 0.6]),
            "ditto|none|seed0|lr=1": _run([0.9, 0.8, 0.8, 0.9], [0.8, 0.7, 0.7, 0.8])}
    lines = bench.interval_table(_results(runs))[2:]
    by_method = {line.split("|")[1].strip(): line for line in lines}
    assert "| ahead |" in by_method["fedavg"] and "+0.250" in by_method["fedavg"]
    assert "| no difference shown |" in by_method["ditto"]


def test_design_variants_are_compared_with_their_base_on_validation_only():
    base = _run([0.9, 0.9], [0.9, 0.9], val=0.5)
    better = _run([0.1, 0.1], [0.1, 0.1], val=0.6)  # ahead on validation, far behind on test
    for row, val in ((base, [0.5, 0.5, 0.4, 0.6]), (better, [0.6, 0.6, 0.5, 0.7])):
        for site in row["per_site"].values():
            site["val_images"] = val
    split = "lr=3+train.local_steps=4,train.global_steps=20"
    runs = {"pfedsam|none|seed0|lr=3": base, f"pfedsam|none|seed0|{split}": better,
            "pfedsam|none|seed1|lr=3+train.kd_weight=0": _run([0.5], [0.5], val=0.45)}  # seed 1 has no base row
    results = _results(runs, {"pfedsam": {"tag": "lr=3", "setting": {"lr": 3.0}}})
    lines = bench.variant_table(results)[2:]
    assert len(lines) == 2
    assert lines[0].startswith("| pfedsam | lr=3 | train.local_steps=4,train.global_steps=20 | 0 | 0.600 | +0.100 [")
    assert "| ahead |" in lines[0] and lines[0].endswith("| 0.100 | -0.800 [-0.800, -0.800] |")  # test: shown, not read
    assert "no base row" in lines[1]
    del base["per_site"]["a"]["val_images"]  # rows recorded before val_images existed: no interval
    assert "(no per-image val scores in the base row)" in bench.variant_table(results)[2]
    assert [line.split("|")[1].strip() for line in bench.main_table(results)[2:]] == ["pfedsam"]
    assert "| 1 | 0.900 |" in bench.main_table(results)[2]  # the variant's seed is not counted in the main row


def test_design_variants_are_set_against_every_main_row_with_their_seeds_pooled():
    variant = "lr=3+lmoe.placement=blocks,lmoe.blocks=2"
    runs = {"pfedsam|none|seed0|lr=3": _run([0.6, 0.6], [0.6, 0.6]),
            "fedavg|none|seed0|lr=3": _run([0.5, 0.5], [0.5, 0.5]),
            "fedavg|none|seed1|lr=3": _run([0.7, 0.7], [0.7, 0.7]),  # FedAvg pooled per image: 0.6
            f"pfedsam|none|seed0|{variant}": _run([0.8, 0.8], [0.8, 0.8]),
            f"pfedsam|none|seed1|{variant}": _run([0.6, 0.6], [0.6, 0.6]),  # variant pooled: 0.7
            f"pfedsam|none|seed2|{variant}": {"error": "RuntimeError: boom", "wall_s": 1.0}}  # left out
    tuned = {m: {"tag": "lr=3", "setting": {"lr": 3.0}} for m in ("pfedsam", "fedavg")}
    lines = bench.variant_interval_table(_results(runs, tuned))[2:]
    shift = "+0.100 [+0.100, +0.100]"
    assert lines == [f"| pfedsam {variant} | fedavg | 2 / 2 | **{shift}** | ahead | {shift} | {shift} |",
                     f"| pfedsam {variant} | pfedsam | 2 / 1 | **{shift}** | ahead | {shift} | {shift} |"]
    assert bench.variant_interval_table(_results({k: v for k, v in runs.items() if "+" not in k}, tuned)) == []


def _with_size_rule_inputs(run: dict, val_area: list[float], area: list[float], empty: list[bool]) -> dict:
    for site in run["per_site"].values():
        site |= {"val_images": list(site["images"]), "val_pred_area": val_area, "val_truth_empty": empty,
                 "pred_area": area, "truth_empty": empty}
    return run


def test_the_size_rule_is_chosen_on_each_runs_validation_and_applied_to_its_test_split():
    # per site: a polyp frame (Dice 0.8, area 0.1) and a frame without one; the rule's threshold is
    # chosen on validation, where the empty frame's speck is 0.002 (seed 0) or 0.004 (seed 1)
    runs = {f"fedavg|none|seed{s}|lr=3": _with_size_rule_inputs(_run([0.8, 0.0], [0.8, 0.0]), [0.1, v], [0.1, t],
                                                                 [False, True])
            for s, (v, t) in enumerate([(0.002, 0.001), (0.004, 0.01)])}
    runs["pfedsam|none|seed0|lr=3"] = _run([0.5, 0.5], [0.5, 0.5])  # recorded before the rule's inputs: left out
    lines = bench.size_rule_table(_results(runs))[2:]
    # seed 0: test speck 0.001 <= 0.002 is removed (0.9); seed 1: 0.01 > 0.004 stays (0.4): mean 0.65
    # the rule's gain per site: images [0, +1.0] / 2 seeds, [0, +0.5]; mean +0.25
    assert lines == ["| fedavg | lr=3 | 2 | 0.400 | **0.650** | +0.250 [+0.000, +0.500] | 0.500 | 0.0030 / 0.0030 |"]
    runs["fedavg|none|seed2|lr=3"] = _run([0.1, 0.1], [0.1, 0.1])  # a seed without the inputs: counted, not used
    assert bench.size_rule_table(_results(runs))[2].startswith("| fedavg | lr=3 | 2 of 3 | 0.400 | **0.650** |")
    assert bench.empty_fp_under_rule(runs["fedavg|none|seed0|lr=3"]["per_site"]["a"], 0.0) == 1.0
    assert np.isnan(bench.empty_fp_under_rule(_with_size_rule_inputs(_run([0.8], [0.8]), [0.1], [0.1], [False])
                                              ["per_site"]["a"], 0.0))


def test_design_variants_are_paired_with_rows_run_on_the_same_cpu_in_the_same_precision():
    zen3, zen4 = ({"device": "Zen 3", "precision": "float32"}, {"device": "Zen 4", "precision": "bf16"})
    variant = "lr=3+lmoe.placement=blocks,lmoe.blocks=2"
    runs = {f"pfedsam|none|seed{s}|{variant}": _run([0.8, 0.8], [0.8, 0.8], machine=zen4) for s in (0, 1)}
    runs |= {"fedavg|none|seed0|lr=3": _run([0.5, 0.5], [0.5, 0.5], machine=zen3),  # another CPU: not paired
             "fedavg|none|seed0|lr=3+train.amp=True": _run([0.6, 0.6], [0.6, 0.6], machine=zen4),
             "fedavg|none|seed1|lr=3+train.amp=True": _run([0.8, 0.8], [0.8, 0.8], machine=zen4),  # pooled: 0.7
             "fedavg|none|seed0|lr=10": _run([0.1, 0.1], [0.1, 0.1], machine=zen4),  # a search row: not paired
             "ditto|none|seed0|lr=3": _run([0.9, 0.9], [0.9, 0.9])}  # no record of where it ran: not paired
    tuned = {m: {"tag": "lr=3", "setting": {"lr": 3.0}} for m in ("pfedsam", "fedavg", "ditto")}
    shift = "+0.100 [+0.100, +0.100]"
    assert bench.same_machine_table(_results(runs, tuned))[2:] == [
        f"| pfedsam {variant} | fedavg lr=3+train.amp=True | Zen 4, bf16 | 2 / 2 | **{shift}** | ahead | "
        f"{shift} | {shift} |"]
    runs[f"pfedsam|none|seed1|{variant}"]["machine"] = zen3  # a variant whose seeds ran apart pairs with nothing
    assert bench.same_machine_table(_results(runs, tuned)) == []


def test_a_design_variant_is_paired_with_the_default_design_run_on_the_same_cpu():
    """The own design counts when it ran at the chosen setting, bare or labelled by a variant that
    changes nothing (``train.amp=True`` is the job's default); another design change does not."""
    zen4 = {"device": "Zen 4", "precision": "bf16"}
    variant = f"lr=3+lmoe.hidden={2 * bench.BASE.lmoe.hidden}"  # a design change whatever the job's default
    runs = {f"pfedsam|none|seed0|{variant}": _run([0.8, 0.8], [0.8, 0.8], machine=zen4),
            "pfedsam|none|seed0|lr=3+train.amp=True": _run([0.6, 0.6], [0.6, 0.6], machine=zen4),
            "pfedsam|none|seed0|lr=3+train.kd_weight=0": _run([0.1, 0.1], [0.1, 0.1], machine=zen4)}
    tuned = {"pfedsam": {"tag": "lr=3", "setting": {"lr": 3.0}}}
    lines = bench.same_machine_table(_results(runs, tuned))[2:]
    shift = "+0.200 [+0.200, +0.200]"
    assert f"| pfedsam {variant} | pfedsam lr=3+train.amp=True | Zen 4, bf16 | 1 / 1 | **{shift}** | ahead | " \
        f"{shift} | {shift} |" in lines
    pairs = {tuple(cell.strip() for cell in line.split("|")[1:3]) for line in lines}
    assert pairs == {(f"pfedsam {variant}", "pfedsam lr=3+train.amp=True"),
                     ("pfedsam lr=3+train.kd_weight=0", "pfedsam lr=3+train.amp=True")}
    assert bench.labels_only("pfedsam", "lr=3+train.amp=True")
    assert not bench.labels_only("pfedsam", "lr=3+train.kd_weight=0")


def test_the_job_design_is_paired_with_baselines_run_on_the_same_cpu():
    """pFedSAM's own rows (the chosen setting, no variant) count too: against FedAvg run on the same
    CPU in the same precision, not against a row from another CPU or another setting."""
    zen3, zen4 = ({"device": "Zen 3", "precision": "float32"}, {"device": "Zen 4", "precision": "bf16"})
    runs = {"pfedsam|none|seed0|lr=3": _run([0.8, 0.8], [0.8, 0.8], machine=zen4),
            "pfedsam|none|seed0|lr=1": _run([0.9, 0.9], [0.9, 0.9], machine=zen4),  # not the chosen setting
            "fedavg|none|seed0|lr=3+train.amp=True": _run([0.7, 0.7], [0.7, 0.7], machine=zen4),
            "fedavg|none|seed0|lr=3": _run([0.1, 0.1], [0.1, 0.1], machine=zen3)}
    tuned = {m: {"tag": "lr=3", "setting": {"lr": 3.0}} for m in ("pfedsam", "fedavg")}
    lines = bench.same_machine_table(_results(runs, tuned))[2:]
    shift = "+0.100 [+0.100, +0.100]"
    assert lines == [f"| pfedsam lr=3 | fedavg lr=3+train.amp=True | Zen 4, bf16 | 1 / 1 | **{shift}** | ahead | "
                     f"{shift} | {shift} |"]


def _with_val(run: dict, val: list[float]) -> dict:
    for site in run["per_site"].values():
        site["val_images"] = val
    return run


def test_each_design_change_is_set_against_the_nearest_design_it_extends():
    """A variant pairs with the same-CPU row whose design changes are the largest strict subset of its
    own: one change at a time, on validation (which decides) and on test; a value the job already has
    (``lmoe.top_k`` at the job's value, ``train.amp=True``) is no change."""
    zen3, zen4 = ({"device": "Zen 3", "precision": "float32"}, {"device": "Zen 4", "precision": "bf16"})
    wide = f"lmoe.hidden={2 * bench.BASE.lmoe.hidden}"
    hot = f"train.kd_temperature={2 * bench.BASE.train.kd_temperature:g}"
    two = f"lr=3+{wide},lmoe.top_k={bench.BASE.lmoe.top_k},{hot}"
    runs = {f"pfedsam|none|seed{s}|{two}": _with_val(_run([0.7, 0.7], [0.7, 0.7], machine=zen4), [0.6, 0.6])
            for s in (0, 1)}
    runs |= {f"pfedsam|none|seed0|{two},train.balance_weight=0.5":
             _with_val(_run([0.8, 0.8], [0.8, 0.8], machine=zen4), [0.5, 0.5]),
             "pfedsam|none|seed0|lr=3+train.amp=True":
             _with_val(_run([0.6, 0.6], [0.6, 0.6], machine=zen4), [0.5, 0.5]),
             "pfedsam|none|seed0|lr=3": _run([0.1, 0.1], [0.1, 0.1], machine=zen3),  # another CPU: never a base
             "pfedsam|none|seed0|lr=3+train.kd_weight=0": _run([0.6, 0.6], [0.6, 0.6], machine=zen4),  # no val
             "fedavg|none|seed0|lr=3+train.amp=True": _run([0.1, 0.1], [0.1, 0.1], machine=zen4)}  # not pFedSAM
    lines = bench.one_change_table(_results(runs, {"pfedsam": {"tag": "lr=3", "setting": {"lr": 3.0}}}))[2:]
    plus, minus, none = "+0.100 [+0.100, +0.100]", "-0.100 [-0.100, -0.100]", "+0.000 [+0.000, +0.000]"
    assert lines == [
        f"| pfedsam | {wide},{hot} | the job's design | Zen 4, bf16 | 2 / 1 | **{plus}** | ahead | {plus} | ahead |",
        f"| pfedsam | train.balance_weight=0.5 | {wide},{hot} | Zen 4, bf16 | 1 / 2 | **{minus}** | behind | {plus} "
        "| ahead |",
        f"| pfedsam | train.kd_weight=0 | the job's design | Zen 4, bf16 | 1 / 1 | no per-image scores in a row |  | "
        f"{none} | no difference shown |"]


def test_errors_are_listed_not_averaged():
    runs = {"pfedsam|none|seed0|lr=1": {"error": "RuntimeError: boom", "wall_s": 1.0}}
    results = _results(runs)
    assert bench.main_table(results)[2:] == []
    assert any("error: RuntimeError: boom" in line for line in bench.budget_table(results))


@pytest.mark.parametrize("amp", [True, False])
def test_each_row_records_its_cpu_and_the_precision_amp_gave_there(amp):
    """train.amp means bf16 only on hardware with it: the same settings give float32 rows on one CPU
    and bf16 rows on another, so each row says which it got."""
    import torch

    machine = bench.machine_of({"train.amp": amp}, "cpu")
    native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    assert machine["precision"] == ("bf16" if amp and native else "float32")
    assert "family" in machine["device"] or machine["device"]  # /proc/cpuinfo where there is one


@pytest.mark.parametrize("runtime,expected", [("torch", "torch"), ("auto", "onnxruntime")])
def test_each_row_records_what_filled_its_cache_and_its_package_versions(runtime, expected):
    """A fresh install with other package versions can change a seed's trajectory: rows must say what
    they ran with. ``auto`` fills LiteMedSAM's cache with ONNX Runtime on a CPU where it is installed."""
    if expected == "onnxruntime" and importlib.util.find_spec("onnxruntime") is None:
        expected = "torch"
    machine = bench.machine_of({"train.encoder_runtime": runtime, "backbone": "litemedsam"}, "cpu")
    assert machine["cache_fill"] == expected
    assert set(machine["packages"]) == set(bench.NUMERIC_PACKAGES)
    assert machine["packages"]["torch"].split("+")[0] == torch.__version__.split("+")[0]
    assert bench.package_versions(("surely-not-a-package-xyz",)) == {"surely-not-a-package-xyz": "not installed"}


def test_the_lock_file_pins_every_package_a_row_records():
    lock = Path(bench.__file__).parent / "requirements-lock.txt"
    pins = dict(line.split("==") for line in lock.read_text().splitlines() if line and not line.startswith("#"))
    assert set(bench.NUMERIC_PACKAGES) <= set(pins), "pin every recorded package"


@pytest.mark.parametrize("machine,text", [
    (None, "not recorded"),
    ({"device": "AMD EPYC (family 25 model 17)", "precision": "bf16"}, "AMD EPYC (family 25 model 17), bf16"),
    ({"device": "X", "precision": "float32", "stamped": "from the docs"}, "X, float32 (stamped afterwards)"),
])
def test_the_budget_table_names_where_and_in_what_precision_a_row_ran(machine, text):
    runs = {"pfedsam|none|seed0|lr=1": {"wall_s": 60.0, "steps_per_site": 304, "images_per_site": 1216,
                                        **({"machine": machine} if machine else {})}}
    lines = bench.budget_table(_results(runs))
    assert lines[0].endswith("| ran on, precision |") and lines[2].endswith(f"| {text} |")


def test_results_of_another_budget_or_protocol_are_refused(tmp_path):
    args = bench.parse_args(["--data-root", str(tmp_path), "--out", str(tmp_path)])
    stored = _results({})
    stored["budget"] = {**bench.budget(args), "rounds": "99"}
    (tmp_path / "results.json").write_text(json.dumps(stored))
    with pytest.raises(SystemExit, match="another budget"):
        bench.load_results(args, SITES)
    stored["budget"] = bench.budget(args)
    (tmp_path / "results.json").write_text(json.dumps(stored))
    assert bench.load_results(args, SITES)["runs"] == {}
    stored["protocol"] = 2  # model-resolution scores on the first 16 test images
    (tmp_path / "results.json").write_text(json.dumps(stored))
    with pytest.raises(SystemExit, match="protocol 2"):
        bench.load_results(args, SITES)


@pytest.mark.parametrize("recorded, changed", [
    ({"lmoe.placement": "neck", "train.lr_local": 0.003}, []),  # what the job gives now
    # a key added to the code after the row: it ran with the key's code default
    ({"lmoe.placement": "neck"}, ["train.lr_local: not recorded (the code default 0.001), now 0.003"]),
    ({"lmoe.placement": "neck", "train.lr_local": 0.003, "train.kd_temperature": 2.0}, []),
    ({"lmoe.placement": "blocks", "train.lr_local": 0.003}, ["lmoe.placement: recorded 'blocks', now 'neck'"]),
    ({"train.lr_local": 0.001, "data.split_fractions": [0.7, 0.15, 0.15]},
     ["train.lr_local: recorded 0.001, now 0.003"]),
    ({"data.split_fractions": [0.8, 0.1, 0.1], "train.lr_local": 0.003},
     ["data.split_fractions: recorded [0.8, 0.1, 0.1], now [0.7, 0.15, 0.15]"]),
])
def test_changed_settings(recorded, changed):
    now = {"lmoe.placement": "neck", "train.lr_local": 0.003, "data.split_fractions": [0.7, 0.15, 0.15],
           "train.kd_temperature": 2.0}
    assert bench.changed_settings(recorded, now) == changed


def test_a_row_recorded_with_other_settings_is_not_reused(tmp_path, monkeypatch):
    (tmp_path / "data" / "a" / "images").mkdir(parents=True)
    out = tmp_path / "out"
    argv = ["run.py", "--data-root", str(tmp_path / "data"), "--out", str(out), "--methods", "pfedsam",
            "--no-overlays"]
    args = bench.parse_args(argv[1:])
    args.data_root, args.out = args.data_root.resolve(), out.resolve()
    settings = bench.settings_of("pfedsam", args, 0, "none", {"lr": 1.0})
    assert "data.root" not in settings and "train.cache_dir" not in settings  # where it ran is not what it trained
    assert settings["train.lr_local"] == pytest.approx(bench.BASE.train.lr_local)
    stored = {**_results({"pfedsam|none|seed0|lr=1": {**_run([0.5], [0.5]), "settings": settings}}),
              "sites": ["a"], "budget": bench.budget(args)}
    out.mkdir()
    (out / "results.json").write_text(json.dumps(stored))
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as no_run:  # reused as it is: nothing trains, only the report is written
        monkeypatch.setattr(bench, "run_method", lambda *a, **k: pytest.fail("a recorded row was trained again"))
        monkeypatch.setattr(bench, "markdown", lambda results: sys.exit("report"))
        bench.main()
    assert str(no_run.value) == "report"
    now = settings["lmoe.placement"]
    other = "neck" if now == "blocks" else "blocks"
    stored["runs"]["pfedsam|none|seed0|lr=1"]["settings"]["lmoe.placement"] = other
    (out / "results.json").write_text(json.dumps(stored))
    with pytest.raises(SystemExit, match=r"pfedsam\|none\|seed0\|lr=1 .* other settings .*lmoe.placement: "
                                         rf"recorded '{other}', now '{now}'.*--force"):
        bench.main()


@pytest.mark.parametrize("settings,inert", [
    ({"lmoe.num_experts": 4, "lmoe.placement": "blocks", "lmoe.blocks": 2}, set()),
    ({"lmoe.num_experts": 4, "lmoe.placement": "neck"}, {"train.global_from_embedding"}),
    ({"lmoe.num_experts": 0, "lmoe.placement": "blocks", "lmoe.blocks": 2, "federation.mode": "fedavg"},
     {"lmoe.placement", "lmoe.blocks", "train.global_from_embedding", "train.local_start"}),
    ({"lmoe.num_experts": 0, "lmoe.hidden": 32, "federation.mode": "ditto"},  # Ditto's copy starts late too
     {"lmoe.hidden", "train.global_from_embedding"}),
    ({"lmoe.num_experts": 0, "decoder_head": "local", "federation.mode": "pfedsam"},  # FedRep's head
     {"train.global_from_embedding"}),
])
def test_inert_keys(settings, inert):
    assert bench.inert_keys(settings) == inert


def test_retag_names_what_each_row_trained_after_the_job_changed(tmp_path):
    """Rows recorded when the job said ``lmoe.hidden: 16`` (today 32): each key gains what differs, a
    variant that only restates today's job becomes the bare row where that key is free, and every
    renamed key reproduces its recorded settings (the resume check accepts it)."""
    args = bench.parse_args(["--data-root", str(tmp_path), "--out", str(tmp_path)])
    was = {"lmoe.hidden": 16}  # the job's former default

    def row(method: str, seed: int, setting: dict, variant: dict) -> dict:
        return {**_run([0.5], [0.5]), "settings": bench.settings_of(method, args, seed, "none", setting, variant)}

    runs = {"pfedsam|none|seed0|lr=3": row("pfedsam", 0, {"lr": 3.0}, was),
            "pfedsam|none|seed0|lr=1": row("pfedsam", 0, {"lr": 1.0}, was),
            "pfedsam|none|seed0|lr=3+train.amp=True": row("pfedsam", 0, {"lr": 3.0}, {"train.amp": True, **was}),
            "pfedsam|none|seed1|lr=3+lmoe.hidden=32": row("pfedsam", 1, {"lr": 3.0}, {"lmoe.hidden": 32}),
            "pfedsam|none|seed1|lr=3+lmoe.hidden=32,train.kd_weight=0": row(
                "pfedsam", 1, {"lr": 3.0}, {"lmoe.hidden": 32, "train.kd_weight": 0}),
            "fedavg|none|seed0|lr=3": row("fedavg", 0, {"lr": 3.0}, was)}  # no experts: lmoe.hidden is inert
    for key in ("pfedsam|none|seed0|lr=3", "pfedsam|none|seed0|lr=1"):
        runs[key]["search"] = True
    results = _results(runs, {m: {"tag": "lr=3", "setting": {"lr": 3.0}} for m in ("pfedsam", "fedavg")})
    renamed = bench.retag(results, args)
    assert sorted(renamed) == [
        ("pfedsam|none|seed0|lr=1", "pfedsam|none|seed0|lr=1+lmoe.hidden=16"),
        ("pfedsam|none|seed0|lr=3", "pfedsam|none|seed0|lr=3+lmoe.hidden=16"),
        # the shorter lr=3+lmoe.hidden=16 is taken by the row above: the label stays
        ("pfedsam|none|seed0|lr=3+train.amp=True", "pfedsam|none|seed0|lr=3+train.amp=True,lmoe.hidden=16"),
        ("pfedsam|none|seed1|lr=3+lmoe.hidden=32", "pfedsam|none|seed1|lr=3"),
        ("pfedsam|none|seed1|lr=3+lmoe.hidden=32,train.kd_weight=0", "pfedsam|none|seed1|lr=3+train.kd_weight=0")]
    for key, r in results["runs"].items():
        m, p, s, tag = key.split("|")
        variant = bench.parse_overrides(tag.partition("+")[2]) if "+" in tag else {}
        now = bench.settings_of(m, args, int(s[4:]), p, bench.setting_of_tag(tag), variant)
        assert bench.changed_settings(r["settings"], now) == [], key
    assert bench.retag(results, args) == []  # a second pass has nothing left to say
    # pFedSAM's search ran on the former design; the main table, whose row is today's, says so
    assert [results["tuned"][m].get("searched_with") for m in ("pfedsam", "fedavg")] == ["lmoe.hidden=16", None]
    assert bench.main_table(results)[3].startswith("| pfedsam | lr=3 (searched with lmoe.hidden=16) | 1 |")
    chosen = {line.split("|")[2].strip(): line.split("|")[5].strip() for line in bench.search_table(results)[2:]}
    assert chosen == {"lr=3+lmoe.hidden=16": "yes", "lr=1+lmoe.hidden=16": ""}  # the row the search chose then

    clash = _results({"pfedsam|none|seed0|lr=3": row("pfedsam", 0, {"lr": 3.0}, was),
                      "pfedsam|none|seed0|lr=3+lmoe.hidden=16": row("pfedsam", 0, {"lr": 3.0}, was)})
    keys = list(clash["runs"])
    with pytest.raises(ValueError, match="more than one row would be named"):
        bench.retag(clash, args)
    assert list(clash["runs"]) == keys  # nothing renamed


@pytest.mark.parametrize(
    "tried,expected",
    [
        ({"lr=0.3": (0.5, {"lr": 0.3}), "lr=1": (0.6, {"lr": 1.0}), "lr=3": (0.7, {"lr": 3.0})}, "lr=3"),
        ({"lr=0.3": (0.5, {"lr": 0.3}), "lr=1": (0.5, {"lr": 1.0}), "lr=3": (0.5, {"lr": 3.0})}, "lr=1"),  # a tie
        ({"lr=1": (0.6, {"lr": 1.0}), "lr=1,kd_weight=3": (0.6, {"lr": 1.0, "kd_weight": 3.0})}, "lr=1"),
        ({"lr=1": (0.6, {"lr": 1.0}), "lr=1,kd_weight=3": (0.61, {"lr": 1.0, "kd_weight": 3.0})}, "lr=1,kd_weight=3"),
    ],
)
def test_best_setting(tried, expected):
    assert bench.tag_of(bench.best_setting(tried)[1]) == expected


@pytest.mark.parametrize("plain,fast,diff_mean,diff_abs_max,spread", [
    ([0.70, 0.60], [0.70, 0.60], 0.0, 0.0, 0.10),  # identical paths
    ([0.70, 0.60], [0.60, 0.70], 0.0, 0.10, 0.10),  # paired by seed, not by sorted value
    ([0.50, 0.50, 0.80], [0.60, 0.40, 0.80], 0.0, 0.10, 0.30),
])
def test_numerics_summary_pairs_by_seed(plain, fast, diff_mean, diff_abs_max, spread):
    from train_step import paired_summary  # benchmarks/train_step.py

    rows = {name: [{"personalized": v, "global": v} for v in values] for name, values in (("plain", plain),
                                                                                         ("fast", fast))}
    for summary in paired_summary(rows).values():
        assert summary["diff_mean"] == pytest.approx(diff_mean, abs=1e-12)
        assert summary["diff_abs_max"] == pytest.approx(diff_abs_max)
        assert summary["seed_spread_plain"] == pytest.approx(spread)


def test_fedavg_finetune_reports_the_aggregated_model_as_its_global_one(tmp_path, monkeypatch):
    """FedAvg + fine-tune trains each site's global parameters in place at the end: its "global Dice"
    must score G(T), the server's last state, not the fine-tuned weights a second time."""
    from pfedsam.data.synth import write_synthetic_sites

    write_synthetic_sites(tmp_path / "data", sites=2, per_site=10, image_size=64, seed=0)
    args = bench.parse_args(["--data-root", str(tmp_path / "data"), "--out", str(tmp_path / "out"), "--backbone",
                             "tiny", "--rounds", "1", "--local-steps", "1", "--global-steps", "1", "--final-steps",
                             "2", "--max-train", "4", "--batch-size", "2"])
    feds = []
    federate = bench.federate
    monkeypatch.setattr(bench, "federate", lambda *a, **k: feds.append(federate(*a, **k)) or feds[-1])
    row = _run_method("fedavg-ft", args, ["site-1", "site-2"], {"lr": 30.0})
    fed = feds[0]
    for s, t in fed.trainers.items():
        fine_tuned = t.get_global_state()
        assert any(not np.array_equal(fine_tuned[n], v) for n, v in fed.global_state.items())  # it did move
        expected = bench.test_scores(t, fed.global_state, "personalized")
        assert row["per_site"][s]["global"]["images"] == expected["images"]
        assert row["per_site"][s]["images"] == bench.test_scores(t, None, "personalized")["images"]


def test_an_unseen_centre_gets_a_fresh_lmoe_on_pfedsams_global_model_and_fedavg_fine_tuned(tmp_path, monkeypatch):
    """Leave-one-centre-out on tiny synthetic sites: both federations train without the centre, and
    at the centre pFedSAM's adaptation trains only a fresh L-MoE (its global part stays G) while
    FedAvg's fine-tunes the global part; both with the same steps, the lr chosen on validation."""
    from pfedsam.data.synth import write_synthetic_sites
    from pfedsam.model import ParamKind

    write_synthetic_sites(tmp_path / "data", sites=3, per_site=10, image_size=64, seed=0)
    args = bench.parse_args(["--data-root", str(tmp_path / "data"), "--out", str(tmp_path / "out"), "--backbone",
                             "tiny", "--rounds", "1", "--local-steps", "1", "--global-steps", "1", "--final-steps",
                             "1", "--max-train", "4", "--batch-size", "2"])
    monkeypatch.setattr(bench, "LR_SCALES", (1.0, 3.0))
    adapted: dict[str, tuple[dict, dict]] = {}
    run_final = bench.run_final

    def recording_final(trainer, *a, **k):
        def local_state() -> dict[str, torch.Tensor]:  # the registry decides what is local
            return {n: p.detach().clone() for n, p in trainer.model.named_parameters()
                    if trainer.model.registry.kind(n) is ParamKind.LOCAL}

        before, local = trainer.get_global_state(), local_state()
        result = run_final(trainer, *a, **k)
        moved = {n: not np.array_equal(before[n], v) for n, v in trainer.get_global_state().items()}
        experts = {n: not torch.equal(local[n], p) for n, p in local_state().items()}
        adapted[f"{trainer.cfg.federation.mode}-{trainer.cfg.train.lr_local:g}"] = (moved, experts)
        return result

    monkeypatch.setattr(bench, "run_final", recording_final)
    out = bench.run_unseen("site-3", args, ["site-1", "site-2", "site-3"], 0, "none", _results({}))
    assert out["train_sites"] == ["site-1", "site-2"] and out["adapt_steps"] == 1 * 1 + 1
    for key, lr_key in (("pfedsam_fresh_lmoe", "lr_local"), ("fedavg_finetuned", "lr_global")):
        tried = {float(s): v for s, v in out[key]["val_dice_by_lr_scale"].items()}
        chosen = out[key][lr_key] / getattr(bench.BASE.train, lr_key)
        assert {1.0, 3.0} <= set(tried) and chosen == pytest.approx(max(tried, key=tried.get))
        # as in every search: a best scale at the edge of those tried is one at the ladder's end
        assert chosen not in (min(tried), max(tried)) or chosen in (bench.LR_LADDER[0], bench.LR_LADDER[-1])
    for key in ("pfedsam_global", "fedavg_global", "pfedsam_fresh_lmoe", "fedavg_finetuned"):
        assert 0.0 <= out[key]["dice"] <= 1.0 and out[key]["n"] > 0
    pfedsam = [v for k, v in adapted.items() if k.startswith("pfedsam")]
    assert len(pfedsam) == len(out["pfedsam_fresh_lmoe"]["val_dice_by_lr_scale"]) >= 3  # 1, 3 and one rung beyond
    for moved, experts in pfedsam:
        assert not any(moved.values())  # G untouched: only the fresh experts adapt
        assert any(experts.values())
    fine_tuned = [v for k, v in adapted.items() if not k.startswith("pfedsam")]
    assert len(fine_tuned) == len(out["fedavg_finetuned"]["val_dice_by_lr_scale"]) >= 3
    assert all(any(moved.values()) for moved, _ in fine_tuned)


def test_a_row_records_the_commit_and_whether_its_code_differed(tmp_path):
    import subprocess

    def git(*args: str) -> None:
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path, check=True,
                       capture_output=True)

    assert bench.code_version(tmp_path) == "unknown"  # not a git checkout
    for name in ("custom/pfedsam/model.py", "docs/results.md"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x = 1\n")
    (tmp_path / "benchmarks").mkdir()
    git("init", "-q")
    git("add", "-A")
    git("commit", "-qm", "start")
    clean = bench.code_version(tmp_path / "benchmarks")  # run.py sits in benchmarks/
    assert len(clean) == 12 and all(c in "0123456789abcdef" for c in clean)
    (tmp_path / "docs" / "results.md").write_text("new rows\n")
    assert bench.code_version(tmp_path / "benchmarks") == clean  # docs and results do not count
    (tmp_path / "custom" / "pfedsam" / "model.py").write_text("x = 2\n")
    assert bench.code_version(tmp_path / "benchmarks") == clean + "-dirty"


@pytest.mark.parametrize("obj", [
    {}, [], {"a": []}, {"a": [1, 2.5, None, "x", True]}, [[1, 2], [3]], {"a": {"b": [{"c": [0.1, 1e-9]}]}},
    {"n": [float("nan"), np.float32(0.25)]},
])
def test_results_json_reads_back_as_json_dumps_wrote_it(obj):
    """results.json's compact layout (score lists on one line) changes no value."""
    text = bench.results_json(obj)
    expected = json.loads(json.dumps(obj, default=float))
    assert json.dumps(json.loads(text), sort_keys=True) == json.dumps(expected, sort_keys=True)


@pytest.mark.parametrize("value,written", [
    (0.9628310203552246, 0.962831), (0.000428265513619408, 0.0004282655), (0.0, 0.0), (1.0, 1.0),
    (0.1, 0.1), (1 / 3, 0.33333334),
])
def test_per_image_scores_are_kept_at_float32_precision(value, written):
    """The shortest decimal that reads back as the same float32: no float32 value changes."""
    (got,) = bench.float32_scores([value])
    assert got == written and np.float32(got) == np.float32(value)
    assert bench.float32_scores([got]) == [got]  # a second pass changes nothing


def _with_ids(row: dict, ids: dict[str, list[str]]) -> dict:
    for site, r in row["per_site"].items():
        r["ids"] = list(ids[site])
    return row


def test_test_ids_are_kept_once_per_site_and_a_different_order_is_refused():
    ids = {"a": ["a1", "a2"], "b": ["b1", "b2"]}
    results = _results({})
    first = _with_ids(_run([0.5, 0.6], [0.7, 0.8]), ids)
    bench.store_test_ids(results, first)
    assert results["test_ids"] == ids and all("ids" not in r for r in first["per_site"].values())
    second = _with_ids(_run([0.1, 0.2], [0.3, 0.4]), ids)
    bench.store_test_ids(results, second)
    assert results["test_ids"] == ids and all("ids" not in r for r in second["per_site"].values())
    swapped = _with_ids(_run([0.1, 0.2], [0.3, 0.4]), {"a": ["a1", "a2"], "b": ["b2", "b1"]})
    with pytest.raises(ValueError, match="site 'b': the test split lists other images"):
        bench.store_test_ids(results, swapped)
    assert swapped["per_site"]["a"]["ids"] == ["a1", "a2"]  # refused as a whole: the row keeps its ids
    assert results["test_ids"] == ids


def test_compacting_results_changes_no_score_and_is_idempotent():
    ids = {"a": ["a1", "a2"], "b": ["b1", "b2"]}
    values = [float(np.float32(v)) for v in (0.9628310203552246, 0.25, 0.7, 0.123456789)]
    runs = {"pfedsam|none|seed0|lr=1": _with_ids(_run(values[:2], values[2:]), ids),
            "fedavg|none|seed0|lr=1": _with_ids(_run(values[2:], values[:2]), ids)}
    stored = _results(runs)
    stored["unseen"] = {"a": {"adapt_steps": 3, "fedavg_global": {"dice": 0.5, "images": [1 / 3, 0.1]}}}
    results = bench.compact_results(json.loads(json.dumps(stored)))
    assert results["test_ids"] == ids
    assert results["unseen"]["a"]["fedavg_global"]["images"] == [0.33333334, 0.1]  # leave-one-out entries too
    for key, row in runs.items():
        for site, r in row["per_site"].items():
            got = results["runs"][key]["per_site"][site]
            assert "ids" not in got
            assert np.array_equal(np.float32(got["images"]), np.float32(r["images"]))
            assert np.array_equal(np.float32(got["global"]["images"]), np.float32(r["global"]["images"]))
    text = bench.results_json(results)
    assert bench.results_json(bench.compact_results(json.loads(text))) == text
    assert len(text) < len(bench.results_json(stored))


def test_a_budget_study_takes_the_settings_other_results_chose(tmp_path):
    chosen = {"pfedsam": {"tag": "lr=3,kd_weight=0.3", "setting": {"lr": 3.0, "kd_weight": 0.3}, "val_dice": 0.65},
              "fedavg": {"tag": "lr=3", "setting": {"lr": 3.0}, "val_dice": 0.62}}
    source = tmp_path / "results.json"
    source.write_text(json.dumps(_results({}, chosen)))
    own = {"fedavg": {"tag": "lr=1", "setting": {"lr": 1.0}, "val_dice": 0.5}}
    results = _results({}, dict(own))
    assert bench.adopt_tuned(results, source) == ["pfedsam"]
    assert results["tuned"]["fedavg"] == own["fedavg"]  # its own search stays
    assert results["tuned"]["pfedsam"] == {**chosen["pfedsam"], "from": str(source)}
    assert bench.chosen_setting(results, "pfedsam") == ({"lr": 3.0, "kd_weight": 0.3}, True)
    assert bench.taken_settings_text(results) == [  # the report says which settings were not searched here
        f"Settings chosen by the search recorded in `{source}` (not searched at this budget): "
        "pfedsam lr=3,kd_weight=0.3.\n"]
    assert bench.taken_settings_text(_results({}, chosen)) == []
    (tmp_path / "broken.json").write_text("{")
    for bad in (tmp_path / "broken.json", tmp_path / "missing.json"):
        with pytest.raises(ValueError, match=f"--tuned-from {bad}: no search records"):
            bench.adopt_tuned(results, bad)


def _unseen(fresh: list[float], tuned: list[float], lrs: dict[str, float]) -> dict:
    def scored(images: list[float]) -> dict:
        return {"dice": float(np.mean(images)), "images": images}

    return {"adapt_steps": 3, "pfedsam_global": scored([0.5, 0.5]), "fedavg_global": scored([0.4, 0.4]),
            "pfedsam_fresh_lmoe": {**scored(fresh), "val_dice_by_lr_scale": lrs},
            "fedavg_finetuned": {**scored(tuned), "val_dice_by_lr_scale": {"0.3": 0.6, "1": 0.7, "3": 0.5}}}


@pytest.mark.parametrize("lrs, label", [
    ({"0.3": 0.5, "1": 0.6, "3": 0.55}, "| 1 / 1 |"),
    ({"0.3": 0.5, "1": 0.6, "3": 0.65}, "| 3 (search open: 10 to run) / 1 |"),  # recorded before the ladder
    ({"0.3": 0.5, "1": 0.6, "3": 0.65, "10": 0.6}, "| 3 / 1 |"),
    ({"0.3": 0.6, "1": 0.6, "3": 0.6}, "| 1 / 1 |"),  # a tie goes to the scale nearest 1
])
def test_unseen_table_names_each_chosen_lr_and_a_search_left_open(lrs, label):
    results = {"unseen": {"a": _unseen([0.8, 0.6], [0.7, 0.5], lrs), "b": _unseen([0.6, 0.6], [0.6, 0.6], lrs),
                          "c": {"error": "RuntimeError: out of memory"}}}
    lines = bench.unseen_table(results)
    assert label in lines[2] and lines[2].endswith("| +0.100 [+0.100, +0.100] |")
    assert lines[4].startswith("| c | error: RuntimeError")
    # the mean weighs each finished centre the same: (0.1 + 0.0) / 2
    assert lines[5].startswith("| **mean of 2** | 0.500 | 0.650 | 0.400 | 0.600 |")
    assert lines[5].endswith("| **+0.050 [+0.050, +0.050]** |")  # per-centre differences are constant


# -- has training flattened? (issue 11's criterion) ---------------------------------------------------------
@pytest.mark.parametrize("curve, span, gain", [
    ([0.1 * i for i in range(12)], 1, 0.4),               # last third of 12 rounds: round 7 to 11
    ([0.1 * i for i in range(12)], 3, 0.4),               # means of rounds 9-11 and 5-7
    ([0.5] * 15 + [0.6] + [0.5] * 8, 1, -0.1),            # 24 rounds: round 15 to 23, a high round 15 decides it
    ([0.5] * 15 + [0.6] + [0.5] * 8, 3, -0.1 / 3),        # three-round means damp that one round
    ([0.2, 0.3, 0.4], 1, 0.1),
    ([0.2, 0.3, 0.4], 3, None),                           # too short for three rounds at each end
])
def test_last_third_gain(curve, span, gain):
    got = bench.last_third_gain(curve, span)
    assert got == gain if gain is None else got == pytest.approx(gain)


def test_convergence_is_read_on_the_seed_averaged_curve_of_each_main_row():
    rising = [0.1 * i for i in range(9)]
    up, down = [0.5] * 6 + [0.6] * 3, [0.5] * 6 + [0.4] * 3  # each seed moves; their mean is flat
    high_start = [0.5] * 5 + [0.6, 0.55, 0.56, 0.58]  # flat only because round 5 was a high point
    runs = {"fedavg|none|seed0|lr=1": _run([0.3], [0.3], val_curve=rising),
            "fedprox|none|seed0|lr=1": _run([0.3], [0.3], val_curve=high_start),
            "pfedsam|none|seed0|lr=1": _run([0.3], [0.3], val_curve=up),
            "pfedsam|none|seed1|lr=1": _run([0.3], [0.3], val_curve=down),
            "centralized|none|seed0|lr=1": _run([0.3], [0.3])}  # no rounds: no curve, no line
    lines = bench.convergence_table(_results(runs))[2:]
    assert lines == ["| fedavg | 1 | 9 | 0.500 (round 5) | 0.800 | +30.0 | +30.0 | no |",
                     "| fedprox | 1 | 9 | 0.600 (round 5) | 0.580 | -2.0 | +3.0 | no |",
                     "| pfedsam | 2 | 9 | 0.500 (round 5) | 0.500 | +0.0 | +0.0 | yes |"]
    assert bench.mean_curve([runs["fedavg|none|seed0|lr=1"], {"val_curve": [0.1]}]) is None  # unequal lengths


class Killed(BaseException):
    """The end of a process mid-row (not an Exception: nothing in the benchmark may catch it)."""


def _killed_after_round(monkeypatch, after: int) -> None:
    """Make the next federated run die once round ``after`` is finished (and logged)."""
    federate = bench.federate

    def dying(*a, **k):
        log = k["log"]

        def log_then_die(message: str) -> None:
            log(message)
            if message.startswith(f"round {after}:"):
                raise Killed(message)

        return federate(*a, **{**k, "log": log_then_die})

    monkeypatch.setattr(bench, "federate", dying)


def _tiny_argv(tmp_path: Path, out: str) -> list[str]:
    """run.py's arguments for two tiny synthetic sites (written on first use), two rounds."""
    from pfedsam.data.synth import write_synthetic_sites

    if not (tmp_path / "data").exists():
        write_synthetic_sites(tmp_path / "data", sites=2, per_site=8, image_size=64, seed=0)
    return ["--data-root", str(tmp_path / "data"), "--out", str(tmp_path / out), "--backbone", "tiny", "--rounds",
            "2", "--local-steps", "1", "--global-steps", "2", "--final-steps", "1", "--max-train", "4",
            "--batch-size", "2"]


def _tiny_args(tmp_path: Path, out: str) -> argparse.Namespace:
    return bench.parse_args(_tiny_argv(tmp_path, out))


def _run_method(method: str, args: argparse.Namespace, sites: list[str], setting: dict) -> dict:
    """``run_method`` for seed 0, no prompt, with the key and folder ``main`` gives it."""
    tag = bench.row_tag(setting)
    return bench.run_method(method, args, sites, 0, "none", setting, key=bench.row_key(method, "none", 0, tag),
                            work=bench.work_dir(args, method, "none", 0, tag))


SCORED = ("per_site", "val_dice", "val_curve", "val_curve_global", "rejected", "steps_per_site")


@pytest.mark.parametrize("method, killed_after", [
    ("pfedsam", 0),  # L-MoE experts: the local part a site carries between rounds
    ("ditto", 0),    # the personal copy
    ("local", 0),    # mode 'local': each site's own global part, no server average
    ("fedavg", 1),   # every round done: only the final personalization is left
])
def test_a_row_killed_mid_run_resumes_to_the_uninterrupted_rows_numbers(tmp_path, monkeypatch, method, killed_after):
    sites, setting = ["site-1", "site-2"], {"lr": 3.0}
    whole = _run_method(method, _tiny_args(tmp_path, "whole"), sites, setting)
    args = _tiny_args(tmp_path, "parts")
    with monkeypatch.context() as m:
        _killed_after_round(m, killed_after)
        with pytest.raises(Killed):
            _run_method(method, args, sites, setting)
    resumed = _run_method(method, args, sites, setting)
    assert resumed["resumed_at_rounds"] == [killed_after + 1] and "resumed_at_rounds" not in whole
    for key in SCORED:  # as JSON: every float to the bit, NaN (no empty test image) equal to NaN
        assert json.dumps(resumed[key], sort_keys=True) == json.dumps(whole[key], sort_keys=True), key


def test_a_round_checkpoint_of_other_code_or_another_machine_is_refused(tmp_path, monkeypatch):
    sites, setting = ["site-1", "site-2"], {"lr": 3.0}
    args = _tiny_args(tmp_path, "out")
    with monkeypatch.context() as m:
        _killed_after_round(m, 0)
        with pytest.raises(Killed):
            _run_method("fedavg", args, sites, setting)
    monkeypatch.setattr(bench, "code_tree", lambda: "edited")
    with pytest.raises(ValueError, match=r"rounds\.pt holds rounds of another run \(code: was '.*', now 'edited'\)"
                                         r".*delete it"):
        _run_method("fedavg", args, sites, setting)
    monkeypatch.undo()
    machine = bench.machine_of
    monkeypatch.setattr(bench, "machine_of", lambda *a: {**machine(*a), "precision": "float16"})
    with pytest.raises(ValueError, match=r"machine\.precision: was '(bf16|float32)', now 'float16'"):
        _run_method("fedavg", args, sites, setting)


def test_a_recorded_row_drops_its_round_checkpoint_and_says_where_it_resumed(tmp_path, monkeypatch):
    argv = _tiny_argv(tmp_path, "out")
    args = bench.parse_args(argv)
    monkeypatch.setattr(sys, "argv", ["run.py", *argv, "--methods", "fedavg", "--no-overlays"])
    monkeypatch.setattr(bench, "plots", lambda *a: None)
    with monkeypatch.context() as m:
        _killed_after_round(m, 0)
        with pytest.raises(Killed):
            bench.main()
    checkpoints = list((args.out / "work").glob(f"*/{bench.ROUND_CHECKPOINT}"))
    assert len(checkpoints) == 1 and not (args.out / "results.json").exists()
    bench.main()
    row = json.loads((args.out / "results.json").read_text())["runs"]["fedavg|none|seed0|lr=1"]
    assert row["resumed_at_rounds"] == [1] and "error" not in row
    assert not checkpoints[0].exists()


def test_row_code_names_every_benchmark_module_a_row_imports():
    """``ROW_CODE`` is kept by hand: a benchmark module that run.py starts to import (directly or through
    another one) must join it, or a checkpoint would resume across a change to that module."""
    import ast

    folder, seen, todo = ROOT / "benchmarks", set(), ["run"]
    while todo:
        module = todo.pop()
        seen.add(module)
        for node in ast.walk(ast.parse((folder / f"{module}.py").read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
            todo += [n for n in names if (folder / f"{n}.py").is_file() and n not in seen]
    assert seen >= {"run", "engine", "stats", "latency"}
    assert {f"benchmarks/{m}.py" for m in seen} == {c for c in bench.ROW_CODE if c.startswith("benchmarks/")}


def test_code_tree_ignores_results_commits_and_names_uncommitted_code(tmp_path):
    import subprocess

    def git(*args: str) -> None:
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path, check=True,
                       capture_output=True)

    row_files = ("benchmarks/run.py", "benchmarks/engine.py", "benchmarks/stats.py", "benchmarks/latency.py")
    for name in ("custom/pfedsam/model.py", "jobs/pfedsam/meta.json", *row_files, "benchmarks/screen.py",
                 "docs/results.md"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x = 1\n")
    git("init", "-q")
    git("add", "-A")
    git("commit", "-qm", "start")
    clean = bench.code_tree(tmp_path / "benchmarks")
    assert len(clean.split()) == 2 + len(row_files)
    (tmp_path / "docs" / "results.md").write_text("a new row\n")
    git("commit", "-qam", "results")
    assert bench.code_tree(tmp_path / "benchmarks") == clean
    # a script no row imports: neither a commit nor an uncommitted edit of it voids a checkpoint
    (tmp_path / "benchmarks" / "screen.py").write_text("x = 3\n")
    assert bench.code_tree(tmp_path / "benchmarks") == clean
    git("commit", "-qam", "screen")
    assert bench.code_tree(tmp_path / "benchmarks") == clean
    for name in row_files:  # every module a row imports counts
        (tmp_path / name).write_text("x = 4\n")
        assert bench.code_tree(tmp_path / "benchmarks") != clean, name
        git("checkout", "-q", "--", name)
    (tmp_path / "custom" / "pfedsam" / "model.py").write_text("x = 2\n")
    edited = bench.code_tree(tmp_path / "benchmarks")
    assert edited.startswith(clean + " +") and edited != clean
