"""A PFedSAMExecutor that misbehaves on chosen sites (copied into a test job's app/custom/).

Not a test module: tests/test_hostile_sites.py ships it with the tiny job. ``roles`` maps a site
name to one behaviour; every other site runs the honest executor unchanged.
"""

from __future__ import annotations

import os

import numpy as np
from nvflare.apis.dxo import DXO, from_shareable
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable
from nvflare.apis.signal import Signal
from nvflare.app_common.app_constant import AppConstants

from pfedsam.flare.common import METRICS_KEY, NUM_EXAMPLES_KEY
from pfedsam.flare.executor import PFedSAMExecutor


class HostileExecutor(PFedSAMExecutor):
    """Honest training, then the result is tampered with according to ``roles[site]``.

    Roles: ``weights`` (round 1: example count 0; round 2: 1000x the declared count),
    ``huge`` (every sent value 1e30 and a perfect validation Dice claimed), ``meta`` (2000 L-MoE
    values and a path-like key smuggled as metrics; in round 2 the site process dies).
    """

    def __init__(self, roles: dict | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.roles = dict(roles or {})

    def _train(self, shareable: Shareable, fl_ctx: FLContext, abort_signal: Signal) -> Shareable:
        role = self.roles.get(fl_ctx.get_identity_name())
        rnd = int(shareable.get_header(AppConstants.CURRENT_ROUND, 0))
        if role == "meta" and rnd == 2:
            os._exit(1)  # a crashed site: no reply, no goodbye
        out = super()._train(shareable, fl_ctx, abort_signal)
        if role is None:
            return out
        dxo = from_shareable(out)
        meta = dict(dxo.meta)
        data = dict(dxo.data)
        if role == "weights" and rnd == 1:  # (inf would already be blocked by its own GlobalOnlyFilter)
            meta[NUM_EXAMPLES_KEY] = 0
        elif role == "weights" and rnd >= 2:
            meta[NUM_EXAMPLES_KEY] = int(meta[NUM_EXAMPLES_KEY]) * 1000
        elif role == "huge":
            data = {k: np.full_like(v, 1e30) for k, v in data.items()}
            meta[METRICS_KEY] = {**meta[METRICS_KEY], "val_dice_personalized": 1.0}
            meta["initial_metrics"] = {"val_dice_personalized": 1.0}
        elif role == "meta":
            values = np.concatenate([v.ravel() for v in self.trainer.get_local_state().values()])[:2000]
            meta[METRICS_KEY] = {**meta[METRICS_KEY], **{f"lmoe_{i}": float(v) for i, v in enumerate(values)},
                                 "/data/patients/p0001.png": 1.0}
        return DXO(data_kind=dxo.data_kind, data=data, meta=meta).to_shareable()
