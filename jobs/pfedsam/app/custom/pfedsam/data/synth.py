"""A deterministic SYNTHETIC multi-site segmentation set for a fresh clone.

Real medical images cannot be shipped, so the default run trains on generated "sites" in
the same layout as real data. Each site has its own acquisition style -- colour cast,
contrast, blur, noise, background texture -- and its own object statistics (size, shape,
count, contrast against the background), so a personalized model has something to learn.
Nothing here is medical data; every output folder says so in README.md and manifest.json.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from .sites import SiteDataError

MARKER = "pfedsam-synthetic"


def _site_style(rng: np.random.Generator, index: int) -> dict:
    """Appearance and object statistics of one synthetic site (spread out by index)."""
    hue = (index * 0.61803) % 1.0  # golden-ratio spacing: distinct casts for any number of sites
    cast = 0.55 + 0.45 * np.array([math.cos(2 * math.pi * (hue + k / 3)) * 0.5 + 0.5 for k in range(3)])
    return {
        "cast": [round(float(c), 3) for c in cast],
        "contrast": round(float(rng.uniform(0.45, 1.0)), 3),
        "blur": round(float(rng.choice([0.0, 0.8, 1.6, 2.4])), 2),
        "noise": round(float(rng.uniform(0.01, 0.08)), 3),
        "stripe_freq": round(float(rng.uniform(2.0, 14.0)), 2),
        "stripe_angle": round(float(rng.uniform(0, math.pi)), 3),
        "stripe_amp": round(float(rng.uniform(0.03, 0.15)), 3),
        "object_radius": [round(float(r), 3) for r in sorted(rng.uniform(0.06, 0.26, size=2))],
        "elongation": round(float(rng.uniform(1.0, 2.6)), 2),
        "wobble": round(float(rng.uniform(0.0, 0.25)), 3),
        "object_delta": round(float(rng.uniform(0.12, 0.35)) * (1 if index % 2 == 0 else -1), 3),
        "object_texture_freq": round(float(rng.uniform(18.0, 40.0)), 2),
        "max_objects": int(1 + index % 2),
        "empty_rate": 0.05,
    }


def _render(rng: np.random.Generator, style: dict, size: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    # Background: low-frequency blotches + oriented stripes.
    base = np.full((size, size), 0.5, np.float32)
    for _ in range(4):
        cy, cx, s = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.15, 0.4)
        base += rng.uniform(-0.15, 0.15) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * s * s))
    a = style["stripe_angle"]
    base += style["stripe_amp"] * np.sin(2 * np.pi * style["stripe_freq"] * (xx * math.cos(a) + yy * math.sin(a)))
    mask = np.zeros((size, size), np.uint8)
    n_obj = 0 if rng.uniform() < style["empty_rate"] else int(rng.integers(1, style["max_objects"] + 1))
    r_lo, r_hi = style["object_radius"]
    for _ in range(n_obj):
        r = rng.uniform(r_lo, r_hi)
        cy, cx = rng.uniform(r + 0.05, 0.95 - r), rng.uniform(r + 0.05, 0.95 - r)
        theta = rng.uniform(0, math.pi)
        dy, dx = yy - cy, xx - cx
        u = dx * math.cos(theta) + dy * math.sin(theta)
        v = -dx * math.sin(theta) + dy * math.cos(theta)
        ang = np.arctan2(v, u)
        k, phase = int(rng.integers(2, 6)), rng.uniform(0, 2 * math.pi)
        radius = r * (1 + style["wobble"] * np.sin(k * ang + phase))
        inside = (u * style["elongation"] ** 0.5) ** 2 + (v / style["elongation"] ** 0.5) ** 2 <= radius**2
        mask |= inside.astype(np.uint8)
    # Objects differ from the background by a shift and a fine texture of their own.
    tex = 0.06 * np.sin(2 * np.pi * style["object_texture_freq"] * (xx + yy))
    gray = base + mask * (style["object_delta"] + tex)
    gray = 0.5 + (gray - 0.5) * style["contrast"]
    rgb = np.clip(gray[..., None] * np.array(style["cast"], np.float32)[None, None], 0, 1)
    img = Image.fromarray((rgb * 255).astype(np.uint8))
    if style["blur"] > 0:
        img = img.filter(ImageFilter.GaussianBlur(style["blur"]))
    noisy = np.asarray(img).astype(np.float32) / 255 + rng.normal(0, style["noise"], (size, size, 3))
    return (np.clip(noisy, 0, 1) * 255).astype(np.uint8), mask * 255


def write_synthetic_sites(
    out_dir: str | Path, sites: int = 4, per_site: int = 60, image_size: int = 256, seed: int = 0
) -> dict:
    """Write ``sites`` synthetic sites of ``per_site`` images each into ``out_dir``.

    Arguments:
      out_dir: target folder; must be empty, absent, or an earlier synthetic output.
      sites: number of sites (``site-1`` ... ``site-N``).
      per_site: images per site (split 70/15/15 into train/val/test).
      image_size: side of the square images.
      seed: same arguments -> byte-identical files.
    """
    out = Path(out_dir).expanduser()
    if sites < 1 or per_site < 3:
        raise ValueError(f"need sites >= 1 and per_site >= 3, got sites={sites}, per_site={per_site}")
    if out.exists():
        if not out.is_dir():
            raise SiteDataError(f"{out} exists and is not a folder")
        manifest = out / "manifest.json"
        is_ours = manifest.is_file() and MARKER in manifest.read_text()
        if any(out.iterdir()) and not is_ours:
            raise SiteDataError(f"{out} is not empty and is not a pfedsam synthetic set; refusing to write into it")
    out.mkdir(parents=True, exist_ok=True)
    styles = {}
    for s in range(1, sites + 1):
        rng = np.random.default_rng([seed, s])
        style = _site_style(rng, s - 1)
        name = f"site-{s}"
        styles[name] = style
        (out / name / "images").mkdir(parents=True, exist_ok=True)
        (out / name / "masks").mkdir(parents=True, exist_ok=True)
        ids = [f"{name}-{i:04d}" for i in range(per_site)]
        for i in ids:
            image, mask = _render(rng, style, image_size)
            Image.fromarray(image).save(out / name / "images" / f"{i}.png")
            Image.fromarray(mask).save(out / name / "masks" / f"{i}.png")
        n_val = max(1, round(per_site * 0.15))
        n_train = per_site - 2 * n_val
        split = {"note": "SYNTHETIC data generated by pfedsam synth; not medical images",
                 "train": ids[:n_train], "val": ids[n_train:n_train + n_val], "test": ids[n_train + n_val:]}
        (out / name / "split.json").write_text(json.dumps(split, indent=1))
    manifest = {"generator": MARKER, "synthetic": True, "sites": sites, "per_site": per_site,
                "image_size": image_size, "seed": seed, "styles": styles}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    (out / "README.md").write_text(
        "# SYNTHETIC data\n\nGenerated by `pfedsam synth` "
        f"(sites={sites}, per_site={per_site}, image_size={image_size}, seed={seed}).\n"
        "These are generated shapes on textured backgrounds, one acquisition style per site; they are "
        "not medical images and no result on them says anything about clinical performance.\n"
    )
    return {"out_dir": str(out), "sites": list(styles), "per_site": per_site, "synthetic": True}
