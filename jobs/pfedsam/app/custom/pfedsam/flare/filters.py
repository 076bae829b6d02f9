"""DXO filters that make "only global weights leave a site" a guarantee, and fp16 transport.

Client ``task_result_filters`` on ``train``: ``GlobalOnlyFilter`` then (optionally)
``Fp16Quantizer``. Server ``task_result_filters`` on ``train``: (optionally) ``Fp16Dequantizer``
then ``GlobalKeyCheck``. Server ``task_data_filters``: ``Fp16Quantizer``; client
``task_data_filters``: ``Fp16Dequantizer``. Both key filters ask the registry (through the
job's YAML), never the executor, so a bug in training code cannot widen what is sent.
"""

from __future__ import annotations

import numpy as np
from nvflare.apis.dxo import DXO, DataKind, from_shareable
from nvflare.apis.dxo_filter import DXOFilter
from nvflare.apis.fl_constant import ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable

from .common import CONFIG_FILE, FP16_KEY, job_config, model_facts

_ALL_KINDS = [getattr(DataKind, k) for k in dir(DataKind) if k.isupper()]


class LeakBlocked(RuntimeError):
    """Raised by a filter to block a result that would carry a non-global parameter."""


class GlobalOnlyFilter(DXOFilter):
    """Client side, on the way out: pass a result only if it holds global parameters and nothing else.

    Fails closed: any DXO that is not WEIGHTS, or any key that the registry does not call global,
    raises LeakBlocked, so FLARE replaces the result with an error and nothing is sent.

    Arguments:
      config_file (str): the job's YAML in the app's config folder.
    """

    def __init__(self, config_file: str = CONFIG_FILE) -> None:
        super().__init__(supported_data_kinds=_ALL_KINDS, data_kinds_to_filter=_ALL_KINDS)
        self.config_file = config_file

    def process(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        if shareable.get_return_code() != ReturnCode.OK:
            return shareable  # an error reply carries no data
        try:
            dxo = from_shareable(shareable)
        except Exception:
            raise LeakBlocked("blocked a result that is not a DXO: only global WEIGHTS may leave this site") from None
        if dxo.data_kind != DataKind.WEIGHTS:  # checked here: DXOFilter would recurse into collections
            raise LeakBlocked(f"blocked a {dxo.data_kind} result: only global WEIGHTS may leave this site")
        return super().process(shareable, fl_ctx)

    def process_dxo(self, dxo: DXO, shareable: Shareable, fl_ctx: FLContext) -> DXO | None:
        allowed = model_facts(fl_ctx, self.config_file).global_names
        foreign = sorted(set(dxo.data) - allowed)
        if foreign:
            self.log_error(fl_ctx, f"BLOCKED result: {len(foreign)} non-global key(s), e.g. {foreign[:3]}")
            raise LeakBlocked(f"blocked a result carrying {len(foreign)} non-global parameter(s): {foreign[:3]}")
        return None


class GlobalKeyCheck(DXOFilter):
    """Server side, on the way in: refuse (raise) a result that carries any non-global key."""

    def __init__(self, config_file: str = CONFIG_FILE) -> None:
        super().__init__(supported_data_kinds=[DataKind.WEIGHTS], data_kinds_to_filter=[DataKind.WEIGHTS])
        self.config_file = config_file

    def process_dxo(self, dxo: DXO, shareable: Shareable, fl_ctx: FLContext) -> DXO | None:
        facts = model_facts(fl_ctx, self.config_file)
        foreign = sorted(set(dxo.data) - facts.global_names)
        if foreign:
            local = [k for k in foreign if k in facts.local_names]
            self.log_error(fl_ctx, f"REFUSED result with non-global keys {foreign[:3]} ({len(local)} local)")
            raise LeakBlocked(f"refused a result carrying {len(foreign)} non-global parameter(s): {foreign[:3]}")
        return None


def _compression_on(fl_ctx: FLContext, config_file: str) -> bool:
    return job_config(fl_ctx, config_file).federation.compression == "fp16"


class Fp16Quantizer(DXOFilter):
    """float32 arrays -> float16 on the wire, when ``federation.compression: fp16`` (else a no-op)."""

    def __init__(self, config_file: str = CONFIG_FILE) -> None:
        super().__init__(supported_data_kinds=[DataKind.WEIGHTS], data_kinds_to_filter=[DataKind.WEIGHTS])
        self.config_file = config_file

    def process_dxo(self, dxo: DXO, shareable: Shareable, fl_ctx: FLContext) -> DXO | None:
        if not _compression_on(fl_ctx, self.config_file):
            return None
        names = [k for k, v in dxo.data.items() if isinstance(v, np.ndarray) and v.dtype == np.float32]
        data = {k: (v.astype(np.float16) if k in names else v) for k, v in dxo.data.items()}
        out = DXO(data_kind=dxo.data_kind, data=data, meta=dict(dxo.meta))
        out.set_meta_prop(FP16_KEY, names)
        return out


class Fp16Dequantizer(DXOFilter):
    """float16 arrays named by the quantizer -> float32 again."""

    def __init__(self) -> None:
        super().__init__(supported_data_kinds=[DataKind.WEIGHTS], data_kinds_to_filter=[DataKind.WEIGHTS])

    def process_dxo(self, dxo: DXO, shareable: Shareable, fl_ctx: FLContext) -> DXO | None:
        names = dxo.get_meta_prop(FP16_KEY)
        if not names:
            return None
        data = {k: (np.asarray(v).astype(np.float32) if k in names else v) for k, v in dxo.data.items()}
        meta = {k: v for k, v in dxo.meta.items() if k != FP16_KEY}
        return DXO(data_kind=dxo.data_kind, data=data, meta=meta)
