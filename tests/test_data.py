"""Site data: real multi-site formats, splits, and clear errors for every kind of bad input."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pfedsam.data import SiteDataError, SiteDataset, discover_sites, load_split, write_synthetic_sites

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason=f"real data not found at {SHARED}")


# site (under shared/data), split, convention, normalization, expected length (None = any), min fg fraction
REAL_CASES = [
    ("polyp/kvasir-seg", "val", "nonzero", "minmax", 100, 0.01),
    ("polyp/polypgen-c1", "test", "nonzero", "sam", 51, 0.0),
    ("samples/fundus/Domain1", "all", "below_max", "minmax", 2, 0.01),
    ("samples/prostate/BIDMC", "all", "zero", "minmax", 2, 0.001),
]


@needs_shared
@pytest.mark.parametrize("site,split,convention,norm,length,min_fg", REAL_CASES)
def test_real_sites_load(site, split, convention, norm, length, min_fg):
    ds = SiteDataset(SHARED / site, split=split, image_size=256, normalization=norm, mask_convention=convention)
    assert len(ds) == length
    s = ds[0]
    assert s["image"].shape == (3, 256, 256) and s["image"].dtype == torch.float32
    assert s["mask"].shape == (1, 256, 256)
    assert set(torch.unique(s["mask"]).tolist()) <= {0.0, 1.0}
    h, w = s["valid_hw"].tolist()
    assert max(h, w) == 256
    assert torch.all(s["mask"][:, h:, :] == 0) and torch.all(s["mask"][:, :, w:] == 0)
    x0, y0, x1, y1 = s["box"].tolist()
    assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
    fg = float(np.mean([ds.plain_sample(i)["mask"].mean() for i in range(min(len(ds), 4))]))
    assert fg >= min_fg
    if norm == "minmax":
        assert 0.0 <= float(s["image"].min()) and float(s["image"].max()) <= 1.0


@needs_shared
def test_non_square_polypgen_keeps_aspect_ratio():
    ds = SiteDataset(SHARED / "polyp/polypgen-c1", split="train", image_size=256)
    shapes = {tuple(ds.plain_sample(i)["valid_hw"].tolist()) for i in range(8)}
    assert any(min(s) < 256 for s in shapes)


@needs_shared
def test_split_json_is_used_as_given():
    split = load_split(SHARED / "polyp/cvc-clinicdb")
    given = json.loads((SHARED / "polyp/cvc-clinicdb/split.json").read_text())
    assert {k: split[k] for k in ("train", "val", "test")} == {k: given[k] for k in ("train", "val", "test")}


@needs_shared
def test_broken_site_reports_both_orphans():
    site = SHARED / "samples/prostate/I2CVB"
    with pytest.raises(SiteDataError) as err:
        SiteDataset(site, split="all", mask_convention="zero")
    assert "train_00_01.png" in str(err.value) and "image has no mask" in str(err.value)
    assert "train_00_00.png" in str(err.value) and "mask has no image" in str(err.value)
    with pytest.warns(UserWarning, match="skipping"):
        ds = SiteDataset(site, split="all", mask_convention="zero", on_bad_file="skip")
    assert len(ds.skipped) == 2


def _site(root: Path, n: int = 6, size=(40, 50)) -> Path:
    site = root / "site"
    (site / "images").mkdir(parents=True)
    (site / "masks").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(site / "images" / f"im{i}.png")
        mask = np.zeros(size, np.uint8)
        mask[5:15, 10:30] = 255
        Image.fromarray(mask).save(site / "masks" / f"im{i}.png")
    return site


def _truncate(site: Path) -> str:
    data = (site / "images/im0.png").read_bytes()
    (site / "images/im0.png").write_bytes(data[:60])
    return "im0.png"


def _wrong_size(site: Path) -> str:
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(site / "masks/im1.png")
    return "mask is 10x10 but its image im1.png is 50x40"


def _orphan_mask(site: Path) -> str:
    shutil.copy(site / "masks/im1.png", site / "masks/extra.png")
    return "extra.png: mask has no image"


def _orphan_image(site: Path) -> str:
    (site / "masks/im2.png").unlink()
    return "im2.png: image has no mask"


BAD_CASES = [
    (_truncate, "cannot read image"),
    (_wrong_size, "mask is 10x10 but its image im1.png is 50x40"),
    (_orphan_mask, "extra.png: mask has no image"),
    (_orphan_image, "im2.png: image has no mask"),
]


@pytest.mark.parametrize("break_site,message", BAD_CASES)
def test_bad_files_error_or_skip(tmp_path, break_site, message):
    site = _site(tmp_path)
    break_site(site)
    with pytest.raises(SiteDataError) as err:
        SiteDataset(site, split="all")
    assert message in str(err.value)
    assert "on_bad_file: skip" in str(err.value)
    with pytest.warns(UserWarning):
        ds = SiteDataset(site, split="all", on_bad_file="skip")
    assert len(ds.skipped) == 1 and len(ds) >= 5


@pytest.mark.parametrize(
    "prepare,kwargs,message",
    [
        (lambda r: r / "nowhere", {}, "does not exist"),
        (lambda r: (r / "empty" / "images").mkdir(parents=True) or (r / "empty" / "masks").mkdir() or r / "empty",
         {}, "has no usable image/mask pairs"),
        (lambda r: (r / "noimg").mkdir() or r / "noimg", {}, "has no images/ folder"),
        (lambda r: _site(r), {"split": "training"}, "split must be one of"),
        (lambda r: _site(r), {"mask_convention": "white"}, "mask_convention must be one of"),
    ],
)
def test_folder_and_argument_errors(tmp_path, prepare, kwargs, message):
    with pytest.raises(SiteDataError, match=message):
        SiteDataset(prepare(tmp_path), **{"split": "all", **kwargs})


def test_discover_sites_errors(tmp_path):
    with pytest.raises(SiteDataError, match="does not exist"):
        discover_sites(tmp_path / "missing")
    with pytest.raises(SiteDataError, match="no site folders"):
        discover_sites(tmp_path)
    _site(tmp_path)
    assert discover_sites(tmp_path) == ["site"]


@pytest.mark.parametrize(
    "content,message",
    [("{not json", "not valid JSON"), ('{"train": ["im0"], "val": "im1", "test": []}', "'val' must be a list"),
     ('{"train": ["im0"], "val": ["im0"], "test": []}', "in both 'train' and 'val'"),
     ('{"train": ["ghost"], "val": [], "test": []}', None)],
)
def test_bad_split_json(tmp_path, content, message):
    site = _site(tmp_path)
    (site / "split.json").write_text(content)
    if message is None:  # an id with no files is caught when the split is loaded as a dataset
        with pytest.raises(SiteDataError, match="'ghost'"):
            SiteDataset(site, split="train")
    else:
        with pytest.raises(SiteDataError, match=message):
            load_split(site)


def test_seeded_split_is_deterministic_and_complete(tmp_path):
    site = _site(tmp_path, n=20)
    a, b, c = load_split(site, seed=1), load_split(site, seed=1), load_split(site, seed=2)
    assert a == b and a != c
    assert sorted(a["train"] + a["val"] + a["test"]) == sorted(f"im{i}" for i in range(20))
    assert all(a[k] for k in ("train", "val", "test"))


def test_augmentation_is_seeded_and_keeps_mask_binary(tmp_path):
    site = _site(tmp_path)
    ds = SiteDataset(site, split="all", augment=True, image_size=64)
    s = ds[0]
    assert set(torch.unique(s["mask"]).tolist()) <= {0.0, 1.0}
    assert not torch.equal(ds.plain_sample(0)["image"], ds.plain_sample(1)["image"])


def _digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(p.relative_to(folder).as_posix().encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def test_synthetic_sites_are_deterministic_and_distinct(tmp_path):
    a = write_synthetic_sites(tmp_path / "a", sites=3, per_site=10, image_size=64, seed=0)
    write_synthetic_sites(tmp_path / "b", sites=3, per_site=10, image_size=64, seed=0)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    assert a["sites"] == ["site-1", "site-2", "site-3"]
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert manifest["synthetic"] is True
    assert "SYNTHETIC" in (tmp_path / "a" / "README.md").read_text()
    means = []
    for site in a["sites"]:
        ds = SiteDataset(tmp_path / "a" / site, split="all", image_size=64)
        assert len(ds) == 10 and len(load_split(tmp_path / "a" / site)["test"]) >= 1
        files = sorted((tmp_path / "a" / site / "images").glob("*.png"))
        raw = [np.asarray(Image.open(p)).reshape(-1, 3).mean(0) for p in files]
        means.append(np.mean(raw, axis=0))
    # colour casts differ between every pair of sites
    for i in range(3):
        for j in range(i + 1, 3):
            assert np.abs(means[i] - means[j]).max() > 10


def test_synth_refuses_foreign_folder(tmp_path):
    (tmp_path / "mine.txt").write_text("user data")
    with pytest.raises(SiteDataError, match="refusing"):
        write_synthetic_sites(tmp_path, sites=1, per_site=3)
    assert (tmp_path / "mine.txt").read_text() == "user data"
