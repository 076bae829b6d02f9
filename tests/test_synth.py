"""The SYNTHETIC multi-site set: deterministic, same layout as real data, visibly different sites."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pfedsam.data import SiteDataError, SiteDataset, discover_sites, load_split, write_synthetic_sites

torch.set_num_threads(1)


def _digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(p.relative_to(folder).as_posix().encode())
            h.update(p.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> tuple[Path, dict]:
    """Four sites of 16 images at 64 px (the default archetypes all appear)."""
    out = tmp_path_factory.mktemp("synth") / "set"
    return out, write_synthetic_sites(out, sites=4, per_site=16, image_size=64, seed=0)


def test_same_arguments_give_byte_identical_files(synth, tmp_path):
    out, _ = synth
    again = write_synthetic_sites(tmp_path / "again", sites=4, per_site=16, image_size=64, seed=0)
    assert _digest(out) == _digest(tmp_path / "again")
    assert again["counts"] == synth[1]["counts"]
    write_synthetic_sites(tmp_path / "other", sites=4, per_site=16, image_size=64, seed=1)
    assert _digest(out) != _digest(tmp_path / "other")


def test_layout_and_labels(synth):
    out, summary = synth
    assert summary["sites"] == discover_sites(out) == ["site-1", "site-2", "site-3", "site-4"]
    assert summary["synthetic"] is True and summary["out_dir"] == str(out)
    readme = (out / "README.md").read_text()
    assert "SYNTHETIC" in readme and "pfedsam synth" in readme and "not medical images" in readme
    assert "sites=4, per_site=16, image_size=64, seed=0" in readme and "| site-4 |" in readme
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["synthetic"] is True and manifest["generator"] == "pfedsam-synthetic"
    assert {k: manifest[k] for k in ("sites", "per_site", "image_size", "seed")} == {
        "sites": 4, "per_site": 16, "image_size": 64, "seed": 0}
    assert set(manifest["styles"]) == set(summary["sites"])
    for name in summary["sites"]:
        site = out / name
        split = json.loads((site / "split.json").read_text())
        assert "SYNTHETIC" in split["note"]
        assert [len(split[k]) for k in ("train", "val", "test")] == [12, 2, 2]
        assert load_split(site) == {k: split[k] for k in ("train", "val", "test")}
        ids = sorted(p.stem for p in (site / "images").glob("*.png"))
        assert ids == sorted(p.stem for p in (site / "masks").glob("*.png")) == sorted(
            split["train"] + split["val"] + split["test"])
        image = Image.open(site / "images" / f"{ids[0]}.png")
        mask = np.asarray(Image.open(site / "masks" / f"{ids[0]}.png"))
        assert image.mode == "RGB" and image.size == (64, 64) and mask.shape == (64, 64)
        assert set(np.unique(mask).tolist()) <= {0, 255}
        for part in ("train", "val", "test"):
            ds = SiteDataset(site, split=part, image_size=64)
            assert len(ds) == len(split[part]) and ds.skipped == []


def _site_pixels(out: Path, name: str) -> tuple[np.ndarray, np.ndarray]:
    files = sorted((out / name / "images").glob("*.png"))
    images = np.stack([np.asarray(Image.open(p)) for p in files]).astype(np.float64)
    masks = np.stack([np.asarray(Image.open(out / name / "masks" / p.name)) > 0 for p in files])
    return images, masks


def test_sites_look_different(synth):
    out, summary = synth
    means = {name: _site_pixels(out, name)[0].reshape(-1, 3).mean(0) for name in summary["sites"]}
    names = summary["sites"]
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert np.abs(means[a] - means[b]).max() > 10, (a, b, means[a], means[b])
    styles = json.loads((out / "manifest.json").read_text())["styles"]
    assert len({tuple(s["cast"]) for s in styles.values()}) == 4
    assert len({s["archetype"] for s in styles.values()}) == 4
    fg = {name: _site_pixels(out, name)[1].mean() for name in names}
    assert fg["site-1"] > 2 * fg["site-2"]  # large round objects vs small ones


@pytest.mark.parametrize("site,faint", [("site-1", False), ("site-2", False), ("site-3", True), ("site-4", True)])
def test_objects_visible_but_not_by_colour_alone_in_faint_sites(synth, site, faint):
    out, _ = synth
    images, masks = _site_pixels(out, site)
    gaps = []
    for image, mask in zip(images.mean(-1), masks, strict=True):
        if mask.any() and (~mask).any():
            gaps.append(abs(image[mask].mean() - image[~mask].mean()) / image[~mask].std())
    assert len(gaps) >= 10  # empty masks are rare
    if faint:  # the object's mean intensity is within the background's spread
        assert np.median(gaps) < 1.2
    else:
        assert np.median(gaps) > 1.5
    assert masks.any(axis=(1, 2)).mean() >= 0.8


def test_refuses_foreign_folder_and_keeps_user_files(tmp_path):
    (tmp_path / "mine.txt").write_text("user data")
    with pytest.raises(SiteDataError, match=r"is not empty and is not a pfedsam synthetic set.*refusing"):
        write_synthetic_sites(tmp_path, sites=1, per_site=3, image_size=16)
    assert (tmp_path / "mine.txt").read_text() == "user data"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.txt"]
    with pytest.raises(SiteDataError, match=r"mine.txt exists and is not a folder"):
        write_synthetic_sites(tmp_path / "mine.txt", sites=1, per_site=3, image_size=16)


def test_rewrites_earlier_output_removing_only_its_own_files(tmp_path):
    out = tmp_path / "set"
    write_synthetic_sites(out, sites=3, per_site=6, image_size=16)
    (out / "site-1" / "images" / "my-notes.txt").write_text("keep me")
    write_synthetic_sites(out, sites=2, per_site=4, image_size=16)
    assert discover_sites(out) == ["site-1", "site-2"]  # site-3 of the earlier run is gone
    assert len(list((out / "site-2" / "images").glob("*.png"))) == 4
    assert (out / "site-1" / "images" / "my-notes.txt").read_text() == "keep me"
    fresh = tmp_path / "fresh"
    write_synthetic_sites(fresh, sites=2, per_site=4, image_size=16)
    (out / "site-1" / "images" / "my-notes.txt").unlink()
    assert _digest(out) == _digest(fresh)


@pytest.mark.parametrize("kwargs,message", [
    ({"sites": 0}, "sites must be an integer >= 1, got 0"),
    ({"per_site": 2}, "per_site must be an integer >= 3, got 2"),
    ({"image_size": 8}, "image_size must be an integer >= 16, got 8"),
    ({"sites": 2.5}, "sites must be an integer >= 1, got 2.5"),
])
def test_bad_arguments(tmp_path, kwargs, message):
    with pytest.raises(SiteDataError, match=message):
        write_synthetic_sites(tmp_path / "x", **kwargs)
    assert not (tmp_path / "x").exists()
