"""benchmarks/experts_kept.py on a tiny recorded pFedSAM row: the G(T) validation scores run.py records
must be what the saved site models score, an older row without them is scored from its models, and each
site's choice must follow its validation split; benchmarks/expert_steps.py on the same row's saved
site models."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
spec = importlib.util.spec_from_file_location("bench_run", ROOT / "benchmarks" / "run.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)
import expert_steps  # noqa: E402  (benchmarks/expert_steps.py)
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


def test_recorded_scores_are_what_the_saved_site_models_score(recorded):
    tmp, key, row = recorded
    for site, stored in row["per_site"].items():
        rescored = experts_kept.score_site(tmp / "out" / "work" / "models" / f"pfedsam-{key.split('|')[3]}" / site,
                                           site, tmp / "data" / site)
        for name, values in experts_kept.stored_scores(stored).items():
            np.testing.assert_allclose(rescored[name], values, atol=1e-5, err_msg=f"{site} {name}")
        assert stored["global"]["val_dice"] == pytest.approx(np.mean(stored["global"]["val_images"]), abs=1e-5)


def test_choices_follow_validation(recorded):
    tmp, key, row = recorded
    result = experts_kept.experts_kept(tmp / "out", [key], tmp / "data")
    sites = result["rows"][key]["sites"]
    assert sorted(sites) == sorted(row["per_site"])
    for r in sites.values():
        assert r["source"] == "results.json"
        assert r["kept"] == (r["val_on"] > r["val_off"])
    chosen = np.mean([r["test_on"] if r["kept"] else r["test_off"] for r in sites.values()])
    assert result["test_mean"]["chosen"] == pytest.approx(chosen)
    kept = [r["kept"] for r in sites.values()]
    if all(kept):  # the chosen models are the personalized ones: no difference to keeping them everywhere
        assert result["chosen_minus"]["on"]["diff"] == 0.0
    if not any(kept):
        assert result["chosen_minus"]["off"]["diff"] == 0.0


def test_seeds_pool_and_a_row_given_twice_is_refused(recorded, tmp_path):
    tmp, key, _ = recorded
    out = tmp_path / "out"
    shutil.copytree(tmp / "out", out)
    results = json.loads((out / "results.json").read_text())
    other = key.replace("seed0", "seed1")  # the same scores as a second seed
    results["runs"][other] = results["runs"][key]
    (out / "results.json").write_text(json.dumps(results))
    one = experts_kept.experts_kept(out, [key], tmp / "data")
    two = experts_kept.experts_kept(out, [key, other], tmp / "data")
    assert two["test_mean"] == pytest.approx(one["test_mean"])
    table = [line for line in experts_kept.markdown(two).splitlines() if line.startswith("| ")]
    lines = {line.split(" | ")[0][2:]: line for line in table}
    for site, r in one["rows"][key]["sites"].items():
        assert lines[site].endswith(f"| {2 if r['kept'] else 0} of 2 |")
    with pytest.raises(ValueError, match="given more than once"):
        experts_kept.experts_kept(out, [key, key], tmp / "data")


def as_older_row(recorded, out: Path, *also: str) -> None:
    """Copy the recorded benchmark folder to ``out`` with its row stripped of G(T)'s validation scores (as
    rows recorded before run.py kept them), also under the keys ``also``."""
    tmp, key, _ = recorded
    shutil.copytree(tmp / "out", out)
    results = json.loads((out / "results.json").read_text())
    for r in results["runs"][key]["per_site"].values():
        del r["global"]["val_images"], r["global"]["val_dice"]
    for other in also:
        results["runs"][other] = results["runs"][key]
    (out / "results.json").write_text(json.dumps(results))


def test_a_row_recorded_without_global_validation_scores_is_scored_from_its_models(recorded, tmp_path):
    tmp, key, _ = recorded
    out = tmp_path / "out"
    as_older_row(recorded, out, key.replace("seed0", "seed1"))
    old = experts_kept.experts_kept(out, [key], tmp / "data")
    new = experts_kept.experts_kept(tmp / "out", [key], tmp / "data")
    for site, r in old["rows"][key]["sites"].items():
        assert r["source"] == "site models"
        assert r["kept"] == new["rows"][key]["sites"][site]["kept"]
        for name, values in r["images"].items():
            np.testing.assert_allclose(values, new["rows"][key]["sites"][site]["images"][name], atol=1e-5)
    with pytest.raises(ValueError, match=r"seed1.*without G\(T\)'s validation scores.*seed 0 only"):
        experts_kept.experts_kept(out, [key.replace("seed0", "seed1")], tmp / "data")


def test_an_older_row_is_read_from_an_earlier_record_that_matches_it(recorded, tmp_path):
    tmp, key, _ = recorded
    out = tmp_path / "out"
    as_older_row(recorded, out)
    experts_kept.main(["--out", str(out), "--row", key, "--data-root", str(tmp / "data")])  # from the models
    first = json.loads((out / "experts_kept.json").read_text())[key]
    shutil.rmtree(out / "work" / "models")  # a new checkout has no site models
    again = experts_kept.experts_kept(out, [key], tmp / "data")
    for site, r in again["rows"][key]["sites"].items():
        assert r["source"] == "experts_kept.json"
        assert r["images"] == first["rows"][key]["sites"][site]["images"]
    assert again["test_mean"] == first["test_mean"]
    # a record whose personalized test scores are not the row's (the row was run again) is not used
    record = json.loads((out / "experts_kept.json").read_text())
    site = next(iter(record[key]["rows"][key]["sites"]))
    record[key]["rows"][key]["sites"][site]["images"]["test_on"][0] += 0.01
    (out / "experts_kept.json").write_text(json.dumps(record))
    with pytest.raises(FileNotFoundError, match="is not a site model folder"):
        experts_kept.experts_kept(out, [key], tmp / "data")


@pytest.mark.parametrize("row, error", [
    ("pfedsam|none|seed0|nope", r"has no row 'pfedsam\|none\|seed0\|nope'"),
])
def test_a_row_that_is_not_recorded_is_named(recorded, row, error):
    tmp, _, _ = recorded
    with pytest.raises(KeyError, match=error):
        experts_kept.experts_kept(tmp / "out", [row], tmp / "data")


def test_a_missing_model_folder_is_named(recorded, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"is not a site model folder: config\.yaml is missing"):
        experts_kept.score_site(tmp_path, "site-1", tmp_path)


# -- benchmarks/expert_steps.py on the same recorded row ------------------------------------------------------


def _site_model(recorded, site: str) -> Path:
    tmp, key, _ = recorded
    return tmp / "out" / "work" / "models" / f"pfedsam-{key.split('|')[3]}" / site


def test_expert_steps_scores_the_saved_model_as_recorded_and_arms_start_where_they_say(recorded):
    tmp, _, row = recorded
    site = sorted(row["per_site"])[0]
    stored = row["per_site"][site]
    # A learning rate of ~0 leaves each arm at its start: the saved experts, or fresh ones (G(T) exactly).
    result = expert_steps.expert_steps(_site_model(recorded, site), tmp / "data" / site, ["val", "test"],
                                       [("saved", 1e-9, [1]), ("fresh", 1e-9, [1]), ("fresh", 1.0, [2, 1])])
    saved = result["saved"]
    assert saved["val_on"] == pytest.approx(stored["val_dice"], abs=1e-5)
    assert saved["val_off"] == pytest.approx(stored["global"]["val_dice"], abs=1e-5)
    assert saved["test_on"] == pytest.approx(stored["dice"], abs=1e-5)
    assert saved["test_off"] == pytest.approx(stored["global"]["dice"], abs=1e-5)
    still_saved, still_fresh, trained = result["arms"]
    assert still_saved["chunks"][0]["val"] == pytest.approx(saved["val_on"], abs=1e-4)
    assert still_fresh["chunks"][0]["val"] == pytest.approx(saved["val_off"], abs=1e-4)
    assert [c["steps"] for c in trained["chunks"]] == [2, 3]
    assert all(np.isfinite(c["loss"]) and c["seconds"] >= 0 for c in trained["chunks"])


def test_expert_steps_main_keeps_earlier_records(recorded, tmp_path):
    tmp, _, row = recorded
    sites = sorted(row["per_site"])
    for site in sites:
        expert_steps.main(["--model", str(_site_model(recorded, site)), "--data-root", str(tmp / "data"),
                           "--out", str(tmp_path), "--arm", "saved,1/2,1"])
    stored = json.loads((tmp_path / "expert_steps.json").read_text())
    assert sorted(k.split("/")[1] for k in stored) == sites
    for record in stored.values():
        assert record["arms"][0]["lr_scale"] == 0.5 and list(record["saved"]) == ["val_on", "val_off"]


def _record(saved: dict, *arms: tuple) -> dict:
    return {"model": "m", "saved": saved, "arms": [
        {"start": start, "lr_scale": scale, "chunks": [{"steps": n, "val": val} for n in steps]}
        for start, scale, steps, val in arms]}


@pytest.mark.parametrize("stored, new, saved, arms", [
    (None, _record({"val_on": 0.7}, ("fresh", 1.0, [8], 0.5)), {"val_on": 0.7}, [("fresh", 1.0, 0.5)]),
    # a new arm is appended and a new split joins the saved scores
    (_record({"val_on": 0.7}, ("fresh", 1.0, [16], 0.4)),
     _record({"val_on": 0.7, "test_on": 0.6}, ("fresh", 1.0, [8], 0.5)),
     {"val_on": 0.7, "test_on": 0.6}, [("fresh", 1.0, 0.4), ("fresh", 1.0, 0.5)]),
    # the same arm run again takes its earlier result's place; the other arms stay where they were
    (_record({"val_on": 0.7}, ("saved", 1.0, [16], 0.4), ("fresh", 1.0, [16], 0.3), ("fresh", 0.5, [16], 0.2)),
     _record({"val_on": 0.7}, ("fresh", 1.0, [16], 0.35)), {"val_on": 0.7},
     [("saved", 1.0, 0.4), ("fresh", 1.0, 0.35), ("fresh", 0.5, 0.2)]),
    # an arm that differs only in its learning-rate scale is another arm
    (_record({"val_on": 0.7}, ("fresh", 1.0, [8, 16], 0.4)), _record({"val_on": 0.7}, ("fresh", 1 / 3, [8, 16], 0.5)),
     {"val_on": 0.7}, [("fresh", 1.0, 0.4), ("fresh", 1 / 3, 0.5)]),
    # a rescoring of the same model may move in the last digits
    (_record({"val_on": 0.7}), _record({"val_on": 0.7 + 1e-6}, ("saved", 1.0, [8], 0.5)),
     {"val_on": 0.7 + 1e-6}, [("saved", 1.0, 0.5)]),
])
def test_expert_steps_adds_a_later_run_to_the_stored_record(stored, new, saved, arms):
    merged = expert_steps.merge_record(stored, new, "f.json")
    assert merged["saved"] == saved
    assert [(a["start"], a["lr_scale"], a["chunks"][0]["val"]) for a in merged["arms"]] == arms


@pytest.mark.parametrize("stored, new, error", [
    (_record({"val_on": 0.7}), _record({"val_on": 0.71}), r"stored record scores val_on 0.700000.*another model"),
    (_record({"val_on": 0.7}), _record({"test_on": 0.6}), r"no split in common"),
])
def test_expert_steps_refuses_a_record_it_cannot_tell_is_the_same_model(stored, new, error):
    with pytest.raises(ValueError, match=rf"f.json: .*{error}"):
        expert_steps.merge_record(stored, new, "f.json")


def test_expert_steps_main_run_twice_on_one_model_keeps_both_runs(recorded, tmp_path):
    tmp, _, row = recorded
    model = str(_site_model(recorded, sorted(row["per_site"])[0]))
    for arm in ("fresh,1e-9,1", "fresh,1/2,1"):
        expert_steps.main(["--model", model, "--data-root", str(tmp / "data"), "--out", str(tmp_path), "--arm", arm])
    (record,) = json.loads((tmp_path / "expert_steps.json").read_text()).values()
    assert [a["lr_scale"] for a in record["arms"]] == [1e-9, 0.5]


@pytest.mark.parametrize("arm, error", [
    ("saved,1", "expected START,SCALE,CHUNKS"),
    ("stale,1,16", "START must be one of"),
    ("saved,x,16", "SCALE must be a number or a fraction"),
    ("saved,1/0,16", "SCALE must be a number or a fraction"),
    ("fresh,1,16+y", "CHUNKS integers"),
    ("fresh,0,16", "must be positive"),
    ("fresh,1,16+0", "must be positive"),
])
def test_expert_steps_names_a_bad_arm(arm, error):
    with pytest.raises(ValueError, match=rf"--arm '{re.escape(arm)}'.*{error}"):
        expert_steps.parse_arm(arm)


def test_expert_steps_names_a_folder_that_is_not_a_site_model(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a site model folder"):
        expert_steps.expert_steps(tmp_path, tmp_path, ["val"], [])
