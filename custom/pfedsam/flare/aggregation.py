"""Aggregation rules without FLARE: validate one site's contribution, bound it, combine many.

Kept free of nvflare imports so every rejection rule is unit-testable on plain arrays.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

AGGREGATIONS = ("mean", "trimmed_mean", "median")
WEIGHTINGS = ("examples", "uniform", "steps")


def check_weight(weight: object, declared: int | None = None, what: str = "aggregation weight") -> str | None:
    """Why an aggregation weight must be refused, or None.

    Arguments:
      weight: what the site reported (examples or steps).
      declared: what the same site reported at its first accepted round (None = first round).
      what: name of the weight in the message.
    A weight is a finite positive integer; it may not exceed nor differ from the declared one
    (a site cannot grow its say in the average after the first round).
    """
    if isinstance(weight, bool) or not isinstance(weight, (int, float, np.integer, np.floating)):
        return f"{what} must be a positive integer, got {weight!r}"
    if not math.isfinite(float(weight)) or float(weight) <= 0 or float(weight) != int(weight):
        return f"{what} must be a finite positive integer, got {weight!r}"
    if declared is not None and int(weight) > declared:
        return f"{what} {int(weight)} is above the {declared} this site declared at its first round"
    if declared is not None and int(weight) != declared:
        return f"{what} changed from the {declared} this site declared at its first round to {int(weight)}"
    return None


def check_contribution(
    weights: Mapping[str, np.ndarray],
    reference: Mapping[str, np.ndarray],
    local_names: set[str] | frozenset[str] = frozenset(),
    contribution_round: int | None = None,
    current_round: int | None = None,
    num_steps: object = 1,
) -> str | None:
    """Why a contribution must be rejected, or None when it is acceptable.

    Arguments:
      weights: the parameters a site sent.
      reference: the current global parameters (names, shapes and dtypes to match).
      local_names: names of local (L-MoE) parameters; one of them arriving is a privacy breach.
      contribution_round: the round the site says it trained for.
      current_round: the server's round.
      num_steps: the optimizer steps the site reported (a finite positive integer).
    """
    if contribution_round is not None and current_round is not None and contribution_round != current_round:
        return f"result is for round {contribution_round}, current round is {current_round}"
    bad_steps = check_weight(num_steps, None, "step count")
    if bad_steps:
        return bad_steps
    leaked = sorted(set(weights) & set(local_names))
    if leaked:
        return f"carries {len(leaked)} local parameter(s), e.g. '{leaked[0]}'"
    unknown = sorted(set(weights) - set(reference))
    if unknown:
        return f"carries {len(unknown)} unknown parameter(s), e.g. '{unknown[0]}'"
    missing = sorted(set(reference) - set(weights))
    if missing:
        return f"misses {len(missing)} global parameter(s), e.g. '{missing[0]}'"
    for name, ref in reference.items():
        value = weights[name]
        if not isinstance(value, np.ndarray):
            return f"'{name}' is {type(value).__name__}, not an array"
        if value.shape != ref.shape:
            return f"'{name}' has shape {value.shape}, expected {ref.shape}"
        if value.dtype != ref.dtype:
            return f"'{name}' has dtype {value.dtype}, expected {ref.dtype}"
        if not np.isfinite(value).all():
            return f"'{name}' contains NaN or Inf"
    return None


def update_norm(weights: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]) -> float:
    """L2 norm of ``weights - reference`` over all parameters, in float64 (inf when it overflows)."""
    with np.errstate(over="ignore", invalid="ignore"):
        total = sum(float(np.sum(np.square(np.asarray(weights[k], np.float64) - np.asarray(v, np.float64))))
                    for k, v in reference.items())
    return math.sqrt(total) if math.isfinite(total) else math.inf


def outlying_updates(norms: Mapping[str, float], max_ratio: float, fallback: float | None = None) -> dict[str, str]:
    """Sites whose update norm exceeds ``max_ratio`` x the median norm of the OTHER sites.

    Arguments:
      norms: site -> update norm of this round's otherwise valid contributions.
      max_ratio: the bound (0 = no bound).
      fallback: the median accepted norm of an earlier round, used when a site is alone.
    Comparing with the others (not with a median that includes the site itself) keeps one huge
    update from raising its own threshold, also with only two sites. Returns site -> reason.
    """
    out: dict[str, str] = {}
    if not max_ratio:
        return out
    for site, norm in norms.items():
        others = [n for s, n in norms.items() if s != site and math.isfinite(n)]
        median = float(np.median(others)) if others else fallback
        if median is None:
            if not math.isfinite(norm):
                out[site] = "update norm is not finite"
            continue
        limit = max_ratio * max(median, 1e-12)
        if not norm <= limit:
            out[site] = (f"update norm {norm:.3g} exceeds {max_ratio:g} x the median of the other sites' "
                         f"({median:.3g})")
    return out


def weighted_mean(contributions: list[tuple[Mapping[str, np.ndarray], float]]) -> dict[str, np.ndarray]:
    """sum_i w_i * x_i / sum_i w_i per parameter, in float64, returned in each input's dtype."""
    if not contributions:
        raise ValueError("no contributions to aggregate")
    total = float(sum(w for _, w in contributions))
    if not (math.isfinite(total) and total > 0):
        raise ValueError(f"aggregation weights must sum to a finite positive number, got {total}")
    first = contributions[0][0]
    out = {}
    for name, ref in first.items():
        acc = np.zeros(ref.shape, np.float64)
        for weights, w in contributions:
            acc += np.asarray(weights[name], np.float64) * (w / total)
        out[name] = acc.astype(ref.dtype)
    return out


def robust_combine(
    contributions: list[tuple[Mapping[str, np.ndarray], float]], rule: str = "mean", trim_fraction: float = 0.2
) -> dict[str, np.ndarray]:
    """Combine contributions by ``rule``: weighted ``mean``, coordinate-wise ``median`` or ``trimmed_mean``.

    Arguments:
      contributions: (parameters, weight) per accepted site.
      rule: one of AGGREGATIONS; median and trimmed mean ignore the weights (one site, one vote).
      trim_fraction: share of the sites dropped at EACH end per coordinate (trimmed mean), at
        least one site per end when there are three or more.
    """
    if rule not in AGGREGATIONS:
        raise ValueError(f"aggregation rule must be one of {AGGREGATIONS}, got {rule!r}")
    if rule == "mean":
        return weighted_mean(contributions)
    if not contributions:
        raise ValueError("no contributions to aggregate")
    n = len(contributions)
    cut = max(int(math.floor(trim_fraction * n)), 1 if n >= 3 else 0)
    out = {}
    for name, ref in contributions[0][0].items():
        stack = np.stack([np.asarray(w[name], np.float64) for w, _ in contributions])
        if rule == "median":
            value = np.median(stack, axis=0)
        else:
            value = np.sort(stack, axis=0)[cut:n - cut].mean(axis=0)
        out[name] = value.astype(ref.dtype)
    return out
