"""benchmarks/experts_kept.py on a tiny recorded pFedSAM row: the scores it computes from the saved
site models must be the row's own, and each site's choice must follow its validation split."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
spec = importlib.util.spec_from_file_location("bench_run", ROOT / "benchmarks" / "run.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)
import experts_kept  # noqa: E402  (benchmarks/experts_kept.py)


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """A two-site, two-round pFedSAM row on tiny synthetic sites, recorded by run.py's main."""
    from pfedsam.data.synth import write_synthetic_sites

    tmp = tmp_path_factory.mktemp("kept")
    write_synthetic_sites(tmp / "data", sites=2, per_site=8, image_size=64, seed=0)
    argv = ["--data-root", str(tmp / "data"), "--out", str(tmp / "out"), "--backbone", "tiny", "--rounds", "2",
            "--local-steps", "2", "--global-steps", "2", "--final-steps", "2", "--max-train", "4",
            "--batch-size", "2", "--methods", "pfedsam", "--no-overlays"]
    mp = pytest.MonkeyPatch()
    mp.setattr(sys, "argv", ["run.py", *argv])
    mp.setattr(bench, "plots", lambda *a: None)
    try:
        bench.main()
    finally:
        mp.undo()
    results = json.loads((tmp / "out" / "results.json").read_text())
    (key,) = [k for k in results["runs"] if k.startswith("pfedsam|")]
    return tmp, key, results["runs"][key]


def test_scores_reproduce_the_row_and_choices_follow_validation(recorded):
    tmp, key, row = recorded
    result = experts_kept.experts_kept(tmp / "out", key, tmp / "data")
    assert sorted(result["sites"]) == sorted(row["per_site"])
    for site, r in result["sites"].items():
        stored = row["per_site"][site]
        np.testing.assert_allclose(r["images"]["test_on"], stored["images"], atol=1e-5)
        np.testing.assert_allclose(r["images"]["test_off"], stored["global"]["images"], atol=1e-5)
        np.testing.assert_allclose(r["images"]["val_on"], stored["val_images"], atol=1e-5)
        assert r["kept"] == (r["val_on"] > r["val_off"])
    chosen = np.mean([r["test_on"] if r["kept"] else r["test_off"] for r in result["sites"].values()])
    assert result["test_mean"]["chosen"] == pytest.approx(chosen)
    kept = [r["kept"] for r in result["sites"].values()]
    if all(kept):  # the chosen models are the personalized ones: no difference to keeping them everywhere
        assert result["chosen_minus"]["on"]["diff"] == 0.0
    if not any(kept):
        assert result["chosen_minus"]["off"]["diff"] == 0.0


@pytest.mark.parametrize("row, error", [
    ("pfedsam|none|seed0|nope", r"has no row 'pfedsam\|none\|seed0\|nope'"),
])
def test_a_row_that_is_not_recorded_is_named(recorded, row, error):
    tmp, _, _ = recorded
    with pytest.raises(KeyError, match=error):
        experts_kept.experts_kept(tmp / "out", row, tmp / "data")


def test_a_missing_model_folder_is_named(recorded, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"is not a site model folder: config\.yaml is missing"):
        experts_kept.score_site(tmp_path, "site-1", tmp_path)
