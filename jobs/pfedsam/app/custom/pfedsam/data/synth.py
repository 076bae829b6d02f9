"""A deterministic SYNTHETIC multi-site segmentation set for a fresh clone.

Real medical images cannot be shipped, so the default run trains on generated "sites" in
the same layout as real data. Each site has its own acquisition style -- colour cast,
brightness, contrast, blur, noise, background texture (blotches and stripes of its own
frequency) -- and its own object statistics (size, elongation, wobble, count, how the object
differs from the background), so a personalized model has something to learn. In some
sites the object is nearly the background's colour and is told apart only by its texture
and a darker rim. Nothing here is medical data; every output folder says so in README.md,
manifest.json and each split.json.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from .sites import SiteDataError

MARKER = "pfedsam-synthetic"
LAYOUT_VERSION = 1
SPLIT_FRACTIONS = (0.7, 0.15, 0.15)

# Object archetypes, cycled over the sites: (radius range, elongation range, wobble range,
# max objects, |intensity shift| range, object texture amplitude, rim darkening).
_ARCHETYPES = (
    ("large-round", (0.14, 0.24), (1.0, 1.3), (0.0, 0.08), 1, (0.22, 0.32), 0.03, 0.0),
    ("small-multiple", (0.05, 0.09), (1.0, 1.5), (0.05, 0.15), 2, (0.12, 0.20), 0.05, 0.06),
    ("elongated-faint", (0.09, 0.15), (2.4, 3.2), (0.0, 0.10), 1, (0.03, 0.06), 0.10, 0.12),
    ("wobbly-blob-faint", (0.10, 0.18), (1.1, 1.6), (0.20, 0.32), 2, (0.02, 0.05), 0.09, 0.10),
)


def _site_style(rng: np.random.Generator, index: int) -> dict:
    """Appearance and object statistics of one synthetic site (spread out by index)."""
    name, radius, elong, wobble, max_obj, delta, tex_amp, rim = _ARCHETYPES[index % len(_ARCHETYPES)]
    hue = (index * 0.61803) % 1.0  # golden-ratio spacing: distinct casts for any number of sites
    cast = 0.5 + 0.5 * np.array([math.cos(2 * math.pi * (hue + k / 3)) * 0.5 + 0.5 for k in range(3)])
    r_lo = rng.uniform(*radius)
    return {
        "archetype": name,
        "cast": [round(float(c), 3) for c in cast],
        "brightness": round(float(rng.uniform(0.4, 0.6)), 3),
        "contrast": round(float(rng.uniform(0.55, 1.0)), 3),
        "blur": [0.0, 1.2, 0.6, 2.0][index % 4],
        "noise": round(float(rng.uniform(0.01, 0.07)), 3),
        "blotch_scale": round(float(rng.uniform(0.08, 0.35)), 3),
        "stripe_freq": round(float(2.0 + 3.5 * (index % 4) + rng.uniform(0, 2)), 2),
        "stripe_angle": round(float(rng.uniform(0, math.pi)), 3),
        "stripe_amp": round(float(rng.uniform(0.03, 0.10)), 3),
        "object_radius": [round(float(r_lo), 3), round(float(min(r_lo * 1.6, radius[1])), 3)],
        "elongation": round(float(rng.uniform(*elong)), 2),
        "wobble": round(float(rng.uniform(*wobble)), 3),
        "max_objects": max_obj,
        "object_delta": round(float(rng.uniform(*delta)) * (1 if index % 2 == 0 else -1), 3),
        "object_texture_amp": tex_amp,
        "object_texture_freq": round(float(rng.uniform(18.0, 36.0)), 2),
        "rim_darkening": rim,
        "empty_rate": round(float(rng.uniform(0.02, 0.06)), 3),
    }


def _render(rng: np.random.Generator, style: dict, size: int) -> tuple[np.ndarray, np.ndarray]:
    """One ``size x size`` RGB uint8 image and its 0/255 mask."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    # Background: blotches of the site's scale + oriented stripes of the site's frequency.
    base = np.full((size, size), style["brightness"], np.float32)
    s = style["blotch_scale"]
    for _ in range(5):
        cy, cx, w = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.6, 1.4) * s
        base += rng.uniform(-0.15, 0.15) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * w * w))
    a = style["stripe_angle"]
    base += style["stripe_amp"] * np.sin(2 * np.pi * style["stripe_freq"] * (xx * math.cos(a) + yy * math.sin(a)))

    inside_any = np.zeros((size, size), bool)
    rim_any = np.zeros((size, size), bool)
    n_obj = 0 if rng.uniform() < style["empty_rate"] else int(rng.integers(1, style["max_objects"] + 1))
    r_lo, r_hi = style["object_radius"]
    e = math.sqrt(style["elongation"])
    for _ in range(n_obj):
        r = rng.uniform(r_lo, r_hi)
        reach = min(r * e, 0.4)
        cy, cx = rng.uniform(reach + 0.05, 0.95 - reach), rng.uniform(reach + 0.05, 0.95 - reach)
        theta = rng.uniform(0, math.pi)
        dy, dx = yy - cy, xx - cx
        u = dx * math.cos(theta) + dy * math.sin(theta)
        v = -dx * math.sin(theta) + dy * math.cos(theta)
        k, phase = int(rng.integers(2, 6)), rng.uniform(0, 2 * math.pi)
        radius = r * (1 + style["wobble"] * np.sin(k * np.arctan2(v, u) + phase))
        q = np.sqrt((u / e) ** 2 + (v * e) ** 2) / radius  # < 1 inside the (wobbly) ellipse
        inside_any |= q <= 1.0
        rim_any |= (q > 0.82) & (q <= 1.0)
    mask = inside_any.astype(np.uint8)

    # Objects differ by an intensity shift (faint in some sites), a fine texture and a darker rim.
    f = style["object_texture_freq"]
    tex = style["object_texture_amp"] * np.sin(2 * np.pi * f * xx) * np.sin(2 * np.pi * f * yy)
    gray = base + mask * (style["object_delta"] + tex) - rim_any * style["rim_darkening"]
    gray = style["brightness"] + (gray - style["brightness"]) * style["contrast"]
    rgb = np.clip(gray[..., None] * np.array(style["cast"], np.float32)[None, None], 0, 1)
    img = Image.fromarray(np.round(rgb * 255).astype(np.uint8))
    if style["blur"] > 0:
        img = img.filter(ImageFilter.GaussianBlur(style["blur"]))
    noisy = np.asarray(img).astype(np.float32) / 255 + rng.normal(0, style["noise"], (size, size, 3))
    return np.round(np.clip(noisy, 0, 1) * 255).astype(np.uint8), mask * 255


def _previous_manifest(out: Path) -> dict | None:
    """The manifest of an earlier synthetic output in ``out``, or None when there is none."""
    path = out / "manifest.json"
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return manifest if isinstance(manifest, dict) and manifest.get("generator") == MARKER else None


def _remove_previous(out: Path, manifest: dict) -> None:
    """Remove exactly the files an earlier synthetic run wrote (derived from its manifest); keep anything else."""
    try:
        sites, per_site = int(manifest["sites"]), int(manifest["per_site"])
    except (KeyError, TypeError, ValueError):
        raise SiteDataError(f"{out}/manifest.json is a pfedsam synthetic manifest without valid 'sites'/'per_site'; "
                            "refusing to write into it (remove the folder yourself)") from None
    for s in range(1, sites + 1):
        site = out / f"site-{s}"
        for i in range(per_site):
            for sub in ("images", "masks"):
                p = site / sub / f"site-{s}-{i:04d}.png"
                if p.is_file() and not p.is_symlink():
                    p.unlink()
        if (site / "split.json").is_file():
            (site / "split.json").unlink()
        for d in (site / "images", site / "masks", site):
            if d.is_dir() and not any(d.iterdir()):
                d.rmdir()


def _readme(sites: int, per_site: int, image_size: int, seed: int, styles: dict[str, dict]) -> str:
    keys = ("archetype", "cast", "brightness", "contrast", "blur", "noise", "stripe_freq", "blotch_scale",
            "object_radius", "elongation", "max_objects", "object_delta", "rim_darkening", "empty_rate")
    rows = ["| site | " + " | ".join(keys) + " |", "|" + "---|" * (len(keys) + 1)]
    for name, st in styles.items():
        rows.append(f"| {name} | " + " | ".join(str(st[k]) for k in keys) + " |")
    return (
        "# SYNTHETIC data -- not medical images\n\n"
        f"Generated by `pfedsam synth` (pfedsam.data.synth.write_synthetic_sites) with sites={sites}, "
        f"per_site={per_site}, image_size={image_size}, seed={seed}. The same arguments always give "
        "byte-identical files.\n\n"
        "Each site is one made-up acquisition style: generated shapes (ellipses, wobbly blobs) on textured "
        "backgrounds. They are not medical images and no result on them says anything about clinical "
        "performance. Layout: `site-N/images/<id>.png`, `site-N/masks/<id>.png` (0 background, 255 object; "
        "a few masks are empty on purpose), `site-N/split.json` (70/15/15 train/val/test).\n\n"
        "Per-site appearance parameters (all of them in manifest.json):\n\n" + "\n".join(rows) + "\n"
    )


def write_synthetic_sites(
    out_dir: str | Path, sites: int = 4, per_site: int = 60, image_size: int = 256, seed: int = 0
) -> dict:
    """Write ``sites`` synthetic sites of ``per_site`` images each into ``out_dir``.

    Refuses (SiteDataError) to write into a non-empty folder that is not an earlier synthetic
    output; rewriting an earlier output removes only the files that output listed as its own.

    Arguments:
      out_dir: target folder; absent, empty, or an earlier synthetic output.
      sites: number of sites (``site-1`` ... ``site-N``).
      per_site: images per site (split 70/15/15 into train/val/test; at least 3).
      image_size: side of the square images (at least 16).
      seed: same arguments -> byte-identical files.
    Returns:
      A summary: ``out_dir``, ``sites`` (names), ``per_site``, ``image_size``, ``seed``,
      ``synthetic`` (True), ``counts`` (per site: train/val/test/empty_masks), ``manifest``, ``readme``.
    """
    for key, value, low in (("sites", sites, 1), ("per_site", per_site, 3), ("image_size", image_size, 16)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise SiteDataError(f"{key} must be an integer >= {low}, got {value!r}")
    out = Path(out_dir).expanduser()
    if out.exists():
        if not out.is_dir():
            raise SiteDataError(f"{out} exists and is not a folder; refusing to write synthetic data there")
        previous = _previous_manifest(out)
        if previous is None and any(out.iterdir()):
            raise SiteDataError(f"{out} is not empty and is not a pfedsam synthetic set (no manifest.json from "
                                "pfedsam synth); refusing to write into it")
        if previous is not None:
            _remove_previous(out, previous)
    out.mkdir(parents=True, exist_ok=True)

    styles: dict[str, dict] = {}
    counts: dict[str, dict[str, int]] = {}
    for s in range(1, sites + 1):
        rng = np.random.default_rng([seed, s])
        style = _site_style(rng, s - 1)
        name = f"site-{s}"
        styles[name] = style
        (out / name / "images").mkdir(parents=True, exist_ok=True)
        (out / name / "masks").mkdir(parents=True, exist_ok=True)
        ids = [f"{name}-{i:04d}" for i in range(per_site)]
        empty = 0
        for i in ids:
            image, mask = _render(rng, style, image_size)
            empty += int(not mask.any())
            Image.fromarray(image).save(out / name / "images" / f"{i}.png", compress_level=1)
            Image.fromarray(mask).save(out / name / "masks" / f"{i}.png", compress_level=1)
        n_val = max(1, round(per_site * SPLIT_FRACTIONS[1]))
        n_test = max(1, round(per_site * SPLIT_FRACTIONS[2]))
        n_train = per_site - n_val - n_test
        split = {"note": "SYNTHETIC data generated by pfedsam synth; not medical images",
                 "train": ids[:n_train], "val": ids[n_train:n_train + n_val], "test": ids[n_train + n_val:]}
        (out / name / "split.json").write_text(json.dumps(split, indent=1) + "\n")
        counts[name] = {"train": n_train, "val": n_val, "test": n_test, "empty_masks": empty}
    manifest = {
        "generator": MARKER, "synthetic": True, "layout_version": LAYOUT_VERSION,
        "note": "SYNTHETIC data generated by pfedsam synth (pfedsam.data.synth); not medical images",
        "sites": sites, "per_site": per_site, "image_size": image_size, "seed": seed,
        "mask_values": {"background": 0, "object": 255}, "counts": counts, "styles": styles,
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    (out / "README.md").write_text(_readme(sites, per_site, image_size, seed, styles))
    return {"out_dir": str(out), "sites": list(styles), "per_site": per_site, "image_size": image_size,
            "seed": seed, "synthetic": True, "counts": counts, "manifest": str(out / "manifest.json"),
            "readme": str(out / "README.md")}
