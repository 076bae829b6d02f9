"""The benchmark's report helpers: tables come from the rows, seeds give mean +- std, budgets never mix."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("bench_run", ROOT / "benchmarks" / "run.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)

SITES = ["a", "b"]


def _row(dice_a: float, dice_b: float, **extra) -> dict:
    return {"per_site": {"a": {"dice": dice_a, "hd95": 10.0, "global_dice": 0.1},
                         "b": {"dice": dice_b, "hd95": 20.0, "global_dice": 0.3}}, **extra}


def _results(rows: dict) -> dict:
    return {"dataset": "x", "sites": SITES, "budget": {}, "hardware": {}, "empty_mask_rule": "", "rows": rows,
            "unseen": {}, "communication": {}, "protocol": bench.PROTOCOL}


@pytest.mark.parametrize(
    "rows,expected_lines",
    [
        ({"pfedsam|none|seed0": _row(0.5, 0.7, bytes_per_round_per_site=14e6, round_wall_s=100.0)},
         ["| pfedsam | 0.500 | 0.700 | **0.600** | 15.0 | 0.200 | 14.00 | 100 | - | - | - | - |"]),
        ({"fedavg|none|seed0": _row(0.5, 0.7, steps_per_site=68, images_per_site=272)},
         ["| fedavg | 0.500 | 0.700 | **0.600** | 15.0 | 0.200 | - | - | - | - | 68 | 272 |"]),
        ({"fedavg|none|seed0": _row(0.2, 0.4), "zero-shot|box|seed0": _row(0.9, 0.8)},  # zero-shot listed first
         ["| zero-shot | 0.900 | 0.800 | **0.850** |", "| fedavg | 0.200 | 0.400 | **0.300** |"]),
        ({"local|none|seed0": {"error": "simulator exit 1"}}, ["| local | - | - | error: simulator exit 1 |"]),
        ({"pfedsam|box|seed0": _row(0.5, 0.7), "pfedsam|none|seed1": _row(0.5, 0.7)}, []),  # other prompt/seed
    ],
)
def test_main_table_rows(rows, expected_lines):
    body = bench.table(_results(rows), "none", 0)[2:]
    assert len(body) == len(expected_lines)
    for line, expected in zip(body, expected_lines, strict=True):
        assert line.startswith(expected)


def test_seeds_table_gives_mean_and_sample_std():
    rows = {f"pfedsam|none|seed{s}": _row(d, d) for s, d in enumerate([0.5, 0.6, 0.7])}
    rows["fedavg|none|seed0"] = _row(0.3, 0.3)  # one seed only: not in the seeds table
    lines = bench.seeds_table(_results(rows), "none")
    assert len(lines) == 3
    assert f"{np.mean([0.5, 0.6, 0.7]):.3f} +- {np.std([0.5, 0.6, 0.7], ddof=1):.3f}" in lines[2]


def test_results_of_another_budget_are_refused(tmp_path):
    args = bench.parse_args(["--data-root", str(tmp_path), "--out", str(tmp_path)])
    stored = _results({})
    stored["budget"] = {**bench.budget(args), "rounds": "99"}
    (tmp_path / "results.json").write_text(json.dumps(stored))
    with pytest.raises(SystemExit, match="another budget"):
        bench.load_results(args, SITES)
    stored["budget"] = bench.budget(args)
    (tmp_path / "results.json").write_text(json.dumps(stored))
    assert bench.load_results(args, SITES)["rows"] == {}
    del stored["protocol"]  # rows of the old loop (replayed batches, unequal budgets)
    (tmp_path / "results.json").write_text(json.dumps(stored))
    with pytest.raises(SystemExit, match="training protocol 1"):
        bench.load_results(args, SITES)
