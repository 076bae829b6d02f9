"""Site data: real multi-site formats, SAM preprocessing, splits, and clear errors for bad input."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pfedsam.data import (
    MASK_CONVENTIONS,
    BadFile,
    SiteDataError,
    SiteDataset,
    discover_sites,
    load_split,
)
from pfedsam.data.transforms import SAM_MEAN, SAM_STD, preprocess_image, preprocess_mask, resized_hw

torch.set_num_threads(1)

# --- real data (../shared/data, via the shared_data fixture) -------------------------------------------

# site, split, mask convention, normalization, length, orig (h, w) of item 0 (None: varies),
# foreground fraction range of the first items (a wrong convention falls far outside it)
REAL_CASES = [
    ("polyp/kvasir-seg", "val", "nonzero", "minmax", 100, (256, 256), (0.01, 0.6)),
    ("polyp/polypgen-c1", "test", "nonzero", "sam", 51, None, (0.0, 0.6)),
    ("samples/fundus/Domain1", "all", "below_max", "minmax", 2, (800, 800), (0.05, 0.6)),
    ("samples/prostate/BIDMC", "all", "zero", "minmax", 2, (384, 384), (0.001, 0.2)),
]


@pytest.mark.parametrize("site,split,convention,norm,length,orig_hw,fg_range", REAL_CASES,
                         ids=[c[0].split("/")[-1] for c in REAL_CASES])
def test_real_sites_shapes_dtypes_ranges(shared_data, site, split, convention, norm, length, orig_hw, fg_range):
    ds = SiteDataset(shared_data / site, split=split, image_size=256, normalization=norm, mask_convention=convention)
    assert len(ds) == len(ds.ids) == length and ds.skipped == []
    fgs = []
    for i in range(min(len(ds), 4)):
        s = ds[i]
        assert set(s) == {"id", "image", "mask", "box", "valid_hw", "orig_hw"} and s["id"] == ds.ids[i]
        assert s["image"].shape == (3, 256, 256) and s["image"].dtype == torch.float32
        assert s["mask"].shape == (1, 256, 256) and s["mask"].dtype == torch.float32
        assert s["box"].shape == (4,) and s["box"].dtype == torch.float32
        assert s["valid_hw"].dtype == s["orig_hw"].dtype == torch.int64
        assert set(torch.unique(s["mask"]).tolist()) <= {0.0, 1.0}
        h, w = s["valid_hw"].tolist()
        oh, ow = s["orig_hw"].tolist()
        if orig_hw is not None:
            assert (oh, ow) == orig_hw
        assert (h, w) == resized_hw(oh, ow, 256) and max(h, w) == 256
        # padding (bottom/right) is zero in image and mask, for both normalizations
        assert torch.all(s["image"][:, h:, :] == 0) and torch.all(s["image"][:, :, w:] == 0)
        assert torch.all(s["mask"][:, h:, :] == 0) and torch.all(s["mask"][:, :, w:] == 0)
        x0, y0, x1, y1 = s["box"].tolist()
        assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
        valid = s["image"][:, :h, :w]
        if norm == "minmax":
            assert float(valid.min()) == 0.0 and float(valid.max()) == pytest.approx(1.0)
        else:  # ImageNet mean/std on the 0-255 scale
            assert -2.2 < float(valid.min()) < 0 < float(valid.max()) < 2.7
        fgs.append(float(s["mask"].mean()))
    assert fg_range[0] <= float(np.mean(fgs)) <= fg_range[1]


# site, raw mask channels, raw image channels (what the loader has to convert)
RAW_FORMATS = [
    ("samples/fundus/Domain2", 3, 3),  # 3-channel masks, identical channels
    ("samples/prostate/HK", 1, 1),  # grayscale images -> 3 identical channels
]


@pytest.mark.parametrize("site,mask_channels,image_channels", RAW_FORMATS)
def test_raw_formats_are_converted(shared_data, site, mask_channels, image_channels):
    d = shared_data / site
    first = sorted((d / "images").iterdir())[0]
    raw_mask = np.asarray(Image.open(d / "masks" / f"{first.stem}.png"))
    raw_image = np.asarray(Image.open(first))
    assert (raw_mask.shape[2] if raw_mask.ndim == 3 else 1) == mask_channels
    assert (raw_image.shape[2] if raw_image.ndim == 3 else 1) == image_channels
    convention = "below_max" if "fundus" in site else "zero"
    ds = SiteDataset(d, split="all", mask_convention=convention, image_size=128)
    x = ds.load_image(0)
    assert x.shape == (3, 128, 128)
    if image_channels == 1:
        assert torch.equal(x[0], x[1]) and torch.equal(x[1], x[2])
    first_channel = raw_mask[..., 0] if raw_mask.ndim == 3 else raw_mask
    expected = (first_channel < 255) if convention == "below_max" else (first_channel == 0)
    assert float(ds[0]["mask"].mean()) == pytest.approx(float(expected.mean()), abs=0.01)


# site, convention, foreground fraction range over the site's two images
CONVENTIONS = [
    ("samples/fundus/Domain3", "below_max", (0.02, 0.6)),  # optic disc (cup + rim)
    ("samples/fundus/Domain3", "zero", (0.0, 0.3)),  # optic cup only
    ("samples/fundus/Domain3", "nonzero", (0.7, 1.0)),  # rim + background: the wrong rule for fundus
    ("samples/prostate/RUNMC", "zero", (0.001, 0.2)),
    ("samples/prostate/RUNMC", "nonzero", (0.8, 1.0)),  # background: the wrong rule for prostate
]


@pytest.mark.parametrize("site,convention,fg_range", CONVENTIONS)
def test_mask_conventions(shared_data, site, convention, fg_range):
    assert convention in MASK_CONVENTIONS
    ds = SiteDataset(shared_data / site, split="all", mask_convention=convention, image_size=64)
    fg = float(np.mean([float(ds.plain_sample(i)["mask"].mean()) for i in range(len(ds))]))
    # fraction of the valid region (these images are square, so valid = whole frame)
    assert fg_range[0] <= fg <= fg_range[1]


def test_non_square_polypgen_valid_region_and_box(shared_data):
    ds = SiteDataset(shared_data / "polyp/polypgen-c1", split="val", image_size=256)
    assert len(ds) == 26
    for i in range(6):
        s = ds.plain_sample(i)
        h, w = s["valid_hw"].tolist()
        oh, ow = s["orig_hw"].tolist()
        assert ow == 512 and oh < 512 and w == 256 and h < 256  # these frames are landscape
        assert h == int(oh * 256 / 512 + 0.5)
        x0, y0, x1, y1 = s["box"].tolist()
        assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
        assert torch.all(s["image"][:, h:, :] == 0)
        assert torch.equal(s["image"], ds.load_image(i)) and torch.equal(s["image"], ds[i]["image"])


def test_split_json_is_used_as_given(shared_data):
    site = shared_data / "polyp/kvasir-seg"
    given = json.loads((site / "split.json").read_text())
    split = load_split(site, seed=123)  # the seed does not matter when split.json exists
    assert split == {k: given[k] for k in ("train", "val", "test")}
    assert len(split["val"]) == 100
    assert SiteDataset(site, split="val").ids == given["val"]


def test_broken_i2cvb_errors_or_skips(shared_data):
    site = shared_data / "samples/prostate/I2CVB"
    with pytest.raises(SiteDataError) as err:
        SiteDataset(site, split="all", mask_convention="zero")
    msg = str(err.value)
    assert "images/train_00_01.png: image has no mask" in msg
    assert "masks/train_00_00.png: mask has no image" in msg
    assert "on_bad_file='skip'" in msg
    with pytest.warns(UserWarning, match="skipping 2 bad file"):
        ds = SiteDataset(site, split="all", mask_convention="zero", on_bad_file="skip")
    assert ds.ids == ["test_00_00"] and len(ds) == 1
    assert sorted((b.path.parent.name, b.path.name, b.reason) for b in ds.skipped) == [
        ("images", "train_00_01.png", "image has no mask"), ("masks", "train_00_00.png", "mask has no image")]
    assert all(isinstance(b, BadFile) for b in ds.skipped)


# --- preprocessing -------------------------------------------------------------------------------------

@pytest.mark.parametrize("h,w,size,expected", [
    (256, 256, 256, (256, 256)), (410, 512, 256, (205, 256)), (512, 495, 256, (256, 248)),
    (40, 50, 64, (51, 64)), (3, 1000, 256, (1, 256)), (800, 800, 1024, (1024, 1024)),
])
def test_resized_hw(h, w, size, expected):
    assert resized_hw(h, w, size) == expected


def test_normalizations_on_known_values():
    image = np.zeros((20, 40, 3), np.uint8)
    image[:, :20] = (10, 110, 210)
    image[:, 20:] = (123, 116, 104)
    x, valid = preprocess_image(image, 40, "minmax")  # no resize: 40 is already the longest side
    assert valid == (20, 40) and x.shape == (3, 40, 40)
    assert x[:, :20, :20].reshape(3, -1)[:, 0].tolist() == pytest.approx([0.0, 0.5, 1.0])
    assert torch.all(x[:, 20:] == 0)
    x, _ = preprocess_image(image, 40, "sam")
    expected = [(c - m) / s for c, m, s in zip((10, 110, 210), SAM_MEAN, SAM_STD, strict=True)]
    assert x[:, 0, 0].tolist() == pytest.approx(expected, rel=1e-5)
    assert torch.all(x[:, 20:] == 0)
    m = preprocess_mask((image[..., 0] == 10).astype(np.uint8), 80)  # nearest: stays binary
    assert m.shape == (1, 80, 80) and set(torch.unique(m).tolist()) == {0.0, 1.0}
    assert float(m[0, :40, :40].mean()) == 1.0 and float(m[0, 40:].sum()) == 0.0


# --- broken sites built in tmp_path --------------------------------------------------------------------

def _site(root: Path, n: int = 6, size: tuple[int, int] = (40, 50), name: str = "site") -> Path:
    site = root / name
    (site / "images").mkdir(parents=True)
    (site / "masks").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(site / "images" / f"im{i}.png")
        mask = np.zeros(size, np.uint8)
        mask[5:15, 10 + i:30] = 255
        Image.fromarray(mask).save(site / "masks" / f"im{i}.png")
    return site


def _truncated_jpg(site: Path) -> None:
    (site / "images/im0.png").unlink()
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(
        site / "images/im0.jpg", quality=95)
    data = (site / "images/im0.jpg").read_bytes()
    (site / "images/im0.jpg").write_bytes(data[:500])


def _not_an_image(site: Path) -> None:
    (site / "images/im0.png").write_bytes(b"this is not a png")


def _corrupt_mask(site: Path) -> None:
    (site / "masks/im0.png").write_bytes((site / "masks/im0.png").read_bytes()[:40])


def _wrong_size(site: Path) -> None:
    Image.fromarray(np.zeros((10, 12), np.uint8)).save(site / "masks/im1.png")


def _orphan_mask(site: Path) -> None:
    shutil.copy(site / "masks/im1.png", site / "masks/extra.png")


def _orphan_image(site: Path) -> None:
    (site / "masks/im2.png").unlink()


def _clashing_ids(site: Path) -> None:
    Image.open(site / "images/im3.png").save(site / "images/im3.jpg")


# break the site, message parts expected in the error, names of the skipped files, usable pairs left
BAD_CASES = [
    (_truncated_jpg, ["images/im0.jpg", "cannot read image", "truncated"], ["im0.jpg"], 5),
    (_not_an_image, ["images/im0.png", "cannot read image"], ["im0.png"], 5),
    (_corrupt_mask, ["masks/im0.png", "cannot read mask"], ["im0.png"], 5),
    (_wrong_size, ["masks/im1.png", "mask is 12x10 (WxH) but its image im1.png is 50x40"], ["im1.png"], 5),
    (_orphan_mask, ["masks/extra.png: mask has no image"], ["extra.png"], 6),
    (_orphan_image, ["images/im2.png: image has no mask"], ["im2.png"], 5),
    (_clashing_ids, ["share the id 'im3' (im3.jpg, im3.png)"], ["im3.jpg", "im3.png"], 5),
]


@pytest.mark.parametrize("break_site,message,skipped,n_left", BAD_CASES, ids=[c[0].__name__ for c in BAD_CASES])
def test_bad_files_error_or_skip(tmp_path, break_site, message, skipped, n_left):
    site = _site(tmp_path)
    break_site(site)
    with pytest.raises(SiteDataError) as err:
        SiteDataset(site, split="all")
    for part in message:
        assert part.lower() in str(err.value).lower()
    assert err.value.__cause__ is None  # no chained PIL/torch trace
    with pytest.warns(UserWarning, match="skipping"):
        ds = SiteDataset(site, split="all", on_bad_file="skip")
    assert sorted(b.path.name for b in ds.skipped) == skipped and len(ds) == n_left
    assert ds[len(ds) - 1]["image"].shape == (3, 256, 256)


def _no_masks_folder(root: Path) -> Path:
    site = _site(root)
    shutil.rmtree(site / "masks")
    return site


def _split_json(content: dict) -> Callable[[Path], Path]:
    def make(root: Path) -> Path:
        site = _site(root)
        (site / "split.json").write_text(json.dumps(content))
        return site
    return make


# make the site folder, SiteDataset arguments, regex the error must match
FOLDER_AND_ARGUMENT_CASES = [
    (lambda r: r / "nowhere", {}, r"site folder .*nowhere does not exist"),
    (lambda r: (r / "noimg").mkdir() or r / "noimg", {}, r"noimg has no images/ folder"),
    (_no_masks_folder, {}, r"site has no masks/ folder"),
    (lambda r: (r / "f.txt").write_text("x") and r / "f.txt", {}, r"f.txt is not a folder"),
    (lambda r: _site(r, n=0), {}, r"has no image/mask pairs \(empty site\)"),
    (lambda r: _site(r, n=0), {"split": "train"}, r"has no image/mask pairs \(empty site\)"),
    (_split_json({"train": ["im0"], "val": [], "test": ["im1"]}), {"split": "val"},
     r"split 'val' is empty \(no ids from split.json\)"),
    (_site, {"ids": []}, r"split 'all' is empty \(no ids from the ids argument\)"),
    (_site, {"ids": ["im0", "ghost"]}, r"ids: 'ghost' .*has no images/ghost"),
    (_site, {"split": "training"}, r"split must be one of train, val, test, all, got 'training'"),
    (_site, {"mask_convention": "white"}, r"mask_convention must be one of nonzero, zero, below_max, got 'white'"),
    (_site, {"normalization": "imagenet"}, r"normalization must be one of minmax, sam, got 'imagenet'"),
    (_site, {"on_bad_file": "ignore"}, r"on_bad_file must be one of error, skip, got 'ignore'"),
    (_site, {"image_size": 0}, r"image_size must be a positive integer, got 0"),
    (_site, {"split": "train", "split_fractions": (0.5, 0.5, 0.5)}, r"fractions .* got \(0.5, 0.5, 0.5\)"),
]


@pytest.mark.parametrize("prepare,kwargs,message", FOLDER_AND_ARGUMENT_CASES)
def test_folder_and_argument_errors(tmp_path, prepare, kwargs, message):
    with pytest.raises(SiteDataError, match=message):
        SiteDataset(prepare(tmp_path), **{"split": "all", **kwargs})


def test_discover_sites(tmp_path):
    with pytest.raises(SiteDataError, match=r"data root .*missing does not exist"):
        discover_sites(tmp_path / "missing")
    (tmp_path / "file").write_text("x")
    with pytest.raises(SiteDataError, match=r"data root .*file is not a folder"):
        discover_sites(tmp_path / "file")
    with pytest.raises(SiteDataError, match="has no site folders"):
        discover_sites(tmp_path)
    _site(tmp_path, name="b-site")
    _site(tmp_path, name="a-site")
    (tmp_path / "notes").mkdir()  # no images/: not a site
    assert discover_sites(tmp_path) == ["a-site", "b-site"]


# split.json content, regex the error must match (always naming split.json)
BAD_SPLIT_JSON = [
    ("{not json", r"split.json: not valid JSON"),
    ('["im0"]', r"split.json: expected a JSON object .* got list"),
    ('{"train": ["im0"], "val": ["im1"]}', r"split.json: missing the 'test' list"),
    ('{"train": ["im0"], "val": "im1", "test": []}', r"split.json: 'val' must be a list of image ids"),
    ('{"train": ["im0"], "val": [1], "test": []}', r"split.json: 'val' must be a list of image ids"),
    ('{"train": ["im0"], "val": ["im0"], "test": []}', r"split.json: id 'im0' is in both 'train' and 'val'"),
    ('{"train": ["im0", "im0"], "val": [], "test": []}', r"split.json: id 'im0' is twice in 'train'"),
    ('{"train": ["im0"], "val": [], "test": ["ghost", "ghost2"]}',
     r"split.json: 'test' lists id 'ghost' \(and 1 more\) but .* has no images/ghost"),
]


@pytest.mark.parametrize("content,message", BAD_SPLIT_JSON)
def test_bad_split_json(tmp_path, content, message):
    site = _site(tmp_path)
    (site / "split.json").write_text(content)
    with pytest.raises(SiteDataError, match=message):
        load_split(site)
    with pytest.raises(SiteDataError, match=message):
        SiteDataset(site, split="train")


# number of ids, fractions, expected (train, val, test) sizes
SEEDED_SPLITS = [
    (3, (0.7, 0.15, 0.15), (1, 1, 1)),
    (4, (0.7, 0.15, 0.15), (2, 1, 1)),
    (20, (0.7, 0.15, 0.15), (14, 3, 3)),
    (60, (0.7, 0.15, 0.15), (42, 9, 9)),
    (4, (0.1, 0.45, 0.45), (1, 1, 2)),
    (5, (1.0, 0.0, 0.0), (5, 0, 0)),
    (2, (0.7, 0.15, 0.15), (2, 0, 0)),
]


@pytest.mark.parametrize("n,fractions,sizes", SEEDED_SPLITS)
def test_seeded_split_sizes_and_determinism(tmp_path, n, fractions, sizes):
    site = _site(tmp_path, n=n, size=(8, 8))
    a = load_split(site, seed=1, fractions=fractions)
    assert a == load_split(site, seed=1, fractions=fractions)
    assert tuple(len(a[k]) for k in ("train", "val", "test")) == sizes
    every = a["train"] + a["val"] + a["test"]
    assert sorted(every) == sorted(f"im{i}" for i in range(n)) and len(set(every)) == n
    assert all(a[k] == sorted(a[k]) for k in a)


def test_seeded_split_depends_on_seed(tmp_path):
    site = _site(tmp_path, n=20, size=(8, 8))
    assert load_split(site, seed=1) != load_split(site, seed=2)
    assert SiteDataset(site, split="val", seed=2).ids == load_split(site, seed=2)["val"]


def test_augmentation_seeded_valid_region_only(tmp_path):
    site = _site(tmp_path, n=4, size=(40, 64))  # non-square: the padding must stay zero
    a = SiteDataset(site, split="all", augment=True, image_size=64, seed=3)
    b = SiteDataset(site, split="all", augment=True, image_size=64, seed=3)
    plain = SiteDataset(site, split="all", augment=False, image_size=64)
    changed = 0
    for i in range(len(a)):
        for _ in range(3):
            sa, sb = a[i], b[i]
            assert torch.equal(sa["image"], sb["image"]) and torch.equal(sa["mask"], sb["mask"])
            h, w = sa["valid_hw"].tolist()
            assert (h, w) == (40, 64)
            assert torch.all(sa["image"][:, h:] == 0) and torch.all(sa["mask"][:, h:] == 0)
            assert set(torch.unique(sa["mask"]).tolist()) <= {0.0, 1.0}
            assert 0.0 <= float(sa["image"].min()) and float(sa["image"].max()) <= 1.0
            assert float(sa["mask"].sum()) == float(plain[i]["mask"].sum())  # flips keep the area
            ys, xs = torch.nonzero(sa["mask"][0], as_tuple=True)
            assert sa["box"].tolist() == [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]
            changed += not torch.equal(sa["image"], plain[i]["image"])
        assert torch.equal(a.load_image(i), plain.load_image(i))  # load_image never augments
    assert changed > 0


def test_augmentation_in_dataloader_workers_repeats_under_manual_seed(tmp_path):
    ds = SiteDataset(_site(tmp_path, n=4, size=(32, 32)), split="all", augment=True, image_size=32)

    def epoch(seed: int) -> list[torch.Tensor]:
        torch.manual_seed(seed)  # DataLoader workers draw their seeds from it; the dataset reseeds from those
        return [b["image"] for b in torch.utils.data.DataLoader(ds, batch_size=2, num_workers=2)]

    a, b, c = epoch(0), epoch(0), epoch(1)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert any(not torch.equal(x, y) for x, y in zip(a, c, strict=True))
