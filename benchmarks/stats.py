"""Statistics of the benchmark: mean +- std over seeds and paired bootstrap intervals over test images.

A difference between two methods is measured on the same test images: for each image, each
method's score is first averaged over that method's seeds, then the per-image difference is
formed. The headline number is the mean over centres of each centre's mean difference (every
centre counts the same, as in the tables). Its 95% interval comes from a stratified bootstrap:
images are resampled with replacement within each centre, ``n_boot`` times.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np


def per_image(runs: list[list[float]]) -> np.ndarray:
    """Mean over seeds of one method's per-image scores at one centre (``runs``: one list per seed)."""
    arr = np.asarray(runs, np.float64)
    if arr.ndim != 2 or arr.shape[1] == 0:
        raise ValueError(f"expected one non-empty list of per-image scores per seed, got shape {arr.shape}")
    return arr.mean(axis=0)


def paired_difference(
    a: Mapping[str, list[list[float]]], b: Mapping[str, list[list[float]]], n_boot: int = 2000, seed: int = 0,
) -> dict[str, float]:
    """Mean over centres of mean(a - b) per image, with a stratified paired bootstrap 95% interval.

    Arguments:
      a, b: centre -> per seed, the per-image scores on that centre's test split, in the same
        image order for both methods (the seeds of a and b may differ in number).
      n_boot: bootstrap resamples.
      seed: seed of the resampling.
    Returns ``{"diff", "lo", "hi", "n_images", "n_boot"}``.
    """
    centres = sorted(a)
    if sorted(b) != centres:
        raise ValueError(f"the two methods were scored on different centres: {sorted(a)} vs {sorted(b)}")
    diffs = []
    for c in centres:
        da, db = per_image(a[c]), per_image(b[c])
        if da.shape != db.shape:
            raise ValueError(f"centre {c}: {da.size} vs {db.size} test images; paired scores need the same images")
        diffs.append(da - db)
    rng = np.random.default_rng(seed)
    boots = np.zeros(n_boot)
    for d in diffs:
        idx = rng.integers(0, d.size, size=(n_boot, d.size))
        boots += d[idx].mean(axis=1)
    boots /= len(diffs)
    lo, hi = np.percentile(boots, [2.5, 97.5])
    return {"diff": float(np.mean([d.mean() for d in diffs])), "lo": float(lo), "hi": float(hi),
            "n_images": int(sum(d.size for d in diffs)), "n_boot": n_boot}


def mean_std_text(values: list[float]) -> str:
    """``0.653 +- 0.004``: mean and sample standard deviation over seeds, as every table prints them; one
    value has no spread, so it prints as its mean alone (a "+- 0.000" would claim seeds that agree)."""
    arr = np.asarray(values, np.float64)
    return f"{arr.mean():.3f} +- {arr.std(ddof=1):.3f}" if arr.size > 1 else f"{arr.mean():.3f}"


def interval_text(interval: Mapping[str, float]) -> str:
    """``+0.019 [+0.010, +0.027]``: a difference and its 95% interval, as every table prints them."""
    return f"{interval['diff']:+.3f} [{interval['lo']:+.3f}, {interval['hi']:+.3f}]"


def verdict(interval: Mapping[str, float]) -> str:
    """'ahead' / 'behind' when the 95% interval excludes 0, else 'no difference shown'."""
    if interval["lo"] > 0:
        return "ahead"
    if interval["hi"] < 0:
        return "behind"
    return "no difference shown"
