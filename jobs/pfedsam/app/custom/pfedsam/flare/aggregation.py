"""Aggregation rules without FLARE: validate one site's contribution, weighted mean of many.

Kept free of nvflare imports so every rejection rule is unit-testable on plain arrays.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np


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
      num_steps: the aggregation weight the site reported (must be a positive number).
    """
    if contribution_round is not None and current_round is not None and contribution_round != current_round:
        return f"result is for round {contribution_round}, current round is {current_round}"
    if not isinstance(num_steps, (int, float)) or isinstance(num_steps, bool) or not num_steps > 0:
        return f"aggregation weight (steps) must be a positive number, got {num_steps!r}"
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


def weighted_mean(contributions: list[tuple[Mapping[str, np.ndarray], float]]) -> dict[str, np.ndarray]:
    """sum_i w_i * x_i / sum_i w_i per parameter, in float64, returned in each input's dtype."""
    if not contributions:
        raise ValueError("no contributions to aggregate")
    total = float(sum(w for _, w in contributions))
    first = contributions[0][0]
    out = {}
    for name, ref in first.items():
        acc = np.zeros(ref.shape, np.float64)
        for weights, w in contributions:
            acc += np.asarray(weights[name], np.float64) * (w / total)
        out[name] = acc.astype(ref.dtype)
    return out
