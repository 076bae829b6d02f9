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
from nvflare.apis.fl_constant import ReservedKey, ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import ReservedHeaderKey, Shareable, make_reply
from nvflare.app_common.app_constant import AppConstants

from .common import CONFIG_FILE, FP16_KEY, WIRE_BYTES_KEY, job_config, model_facts

_ALL_KINDS = [getattr(DataKind, k) for k in dir(DataKind) if k.isupper()]


class LeakBlocked(RuntimeError):
    """Raised by a filter to block a result that would carry a non-global parameter."""


_ENVELOPE_KEYS = {ReservedHeaderKey.HEADERS, "DXO"}
_SMALL = 64  # longest list / deepest dict tolerated in DXO meta


def check_envelope(shareable: Shareable) -> None:
    """Only headers, cookies and the DXO may travel; anything else at the top level is blocked."""
    extra = sorted(set(shareable) - _ENVELOPE_KEYS)
    if extra:
        raise LeakBlocked(f"blocked a result with extra top-level entries {extra[:3]}")

    def arrays_in(value: object) -> bool:
        if isinstance(value, dict):
            return any(arrays_in(v) for v in value.values())
        if isinstance(value, (list, tuple)):
            return any(arrays_in(v) for v in value)
        return isinstance(value, np.ndarray) or type(value).__name__ == "Tensor"

    if arrays_in(shareable.get(ReservedHeaderKey.HEADERS, {})):
        raise LeakBlocked("blocked a result carrying an array in its headers")


def check_meta(meta: dict, where: str = "meta", depth: int = 0) -> None:
    """DXO meta may hold scalars, short strings and small dicts/lists of them -- never arrays."""
    if depth > 3:
        raise LeakBlocked(f"blocked a result: {where} is nested too deeply")
    for key, value in meta.items():
        path = f"{where}.{key}"
        if isinstance(value, dict):
            check_meta(value, path, depth + 1)
        elif isinstance(value, (list, tuple)):
            if len(value) > _SMALL or not all(isinstance(v, (str, int, float, bool)) for v in value):
                raise LeakBlocked(f"blocked a result: {path} is a long or non-scalar list")
        elif isinstance(value, str):
            if len(value) > 256:
                raise LeakBlocked(f"blocked a result: {path} is a long string")
        elif not (value is None or isinstance(value, (bool, int, float, np.integer, np.floating))):
            raise LeakBlocked(f"blocked a result: {path} is a {type(value).__name__}, not a scalar")


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
        rc = shareable.get_return_code()
        if rc != ReturnCode.OK:
            return make_reply(rc)  # an error reply leaves with its code and nothing else
        try:
            dxo = from_shareable(shareable)
        except Exception:
            raise LeakBlocked("blocked a result that is not a DXO: only global WEIGHTS may leave this site") from None
        check_envelope(shareable)
        if dxo.data_kind != DataKind.WEIGHTS:  # checked here: DXOFilter would recurse into collections
            raise LeakBlocked(f"blocked a {dxo.data_kind} result: only global WEIGHTS may leave this site")
        check_meta(dxo.meta)
        return super().process(shareable, fl_ctx)

    def process_dxo(self, dxo: DXO, shareable: Shareable, fl_ctx: FLContext) -> DXO | None:
        allowed = model_facts(fl_ctx, self.config_file).global_names
        foreign = sorted(set(dxo.data) - allowed)
        if foreign:
            self.log_error(fl_ctx, f"BLOCKED result: {len(foreign)} non-global key(s), e.g. {foreign[:3]}")
            raise LeakBlocked(f"blocked a result carrying {len(foreign)} non-global parameter(s): {foreign[:3]}")
        return None


class MetricsOnlyFilter(DXOFilter):
    """Client side, on the way out of the final task: numbers and status words only.

    The final evaluation reports test metrics; the model, its path and error details stay
    at the site (they are in the site's log). Anything else blocks the result.
    """

    STATUS_WORDS = frozenset({"onnx", "none", "failed"})

    def __init__(self) -> None:
        super().__init__(supported_data_kinds=_ALL_KINDS, data_kinds_to_filter=_ALL_KINDS)

    def process(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        rc = shareable.get_return_code()
        if rc != ReturnCode.OK:
            return make_reply(rc)
        check_envelope(shareable)
        dxo = from_shareable(shareable)
        if dxo.data_kind != DataKind.METRICS:
            raise LeakBlocked(f"blocked a {dxo.data_kind} final result: only METRICS may leave this site")
        check_meta(dxo.meta)
        self._check(dxo.data, "data")
        return shareable

    def _check(self, data: dict, where: str) -> None:
        for key, value in data.items():
            if isinstance(value, dict):
                self._check(value, f"{where}.{key}")
            elif isinstance(value, str):
                if value not in self.STATUS_WORDS:
                    raise LeakBlocked(f"blocked a final result: {where}.{key} is free text")
            elif not isinstance(value, (int, float, np.integer, np.floating)) or isinstance(value, bool):
                raise LeakBlocked(f"blocked a final result: {where}.{key} is a {type(value).__name__}")

    def process_dxo(self, dxo: DXO, shareable: Shareable, fl_ctx: FLContext) -> DXO | None:
        return None


class GlobalKeyCheck(DXOFilter):
    """Server side, on the way in: refuse (raise) a result that carries any non-global key.

    Refusals and error replies never reach the aggregator, so this filter also records them
    in the run report (site, round, reason).

    Arguments:
      config_file (str): the job's YAML.
      report_id (str): id of the ReportWriter component ("" = no report).
    """

    def __init__(self, config_file: str = CONFIG_FILE, report_id: str = "report_writer") -> None:
        super().__init__(supported_data_kinds=[DataKind.WEIGHTS], data_kinds_to_filter=[DataKind.WEIGHTS])
        self.config_file = config_file
        self.report_id = report_id

    def _record(self, shareable: Shareable, fl_ctx: FLContext, reason: str) -> None:
        from .aggregator import ReportWriter

        engine = fl_ctx.get_engine()
        writer = engine.get_component(self.report_id) if engine is not None and self.report_id else None
        rnd = fl_ctx.get_prop(AppConstants.CURRENT_ROUND)
        if isinstance(writer, ReportWriter) and rnd is not None:
            site = shareable.get_peer_prop(ReservedKey.IDENTITY_NAME, "?")
            writer.report.add_contribution(int(rnd), site, [], 0, {}, False, reason)

    def process(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        rc = shareable.get_return_code()
        if rc != ReturnCode.OK:
            self._record(shareable, fl_ctx, f"site returned {rc} (blocked by its own filter, failed or aborted)")
            return shareable
        return super().process(shareable, fl_ctx)

    def process_dxo(self, dxo: DXO, shareable: Shareable, fl_ctx: FLContext) -> DXO | None:
        facts = model_facts(fl_ctx, self.config_file)
        foreign = sorted(set(dxo.data) - facts.global_names)
        if foreign:
            local = [k for k in foreign if k in facts.local_names]
            reason = f"refused: {len(foreign)} non-global parameter(s) ({len(local)} local), e.g. {foreign[:3]}"
            self.log_error(fl_ctx, reason)
            self._record(shareable, fl_ctx, reason)
            raise LeakBlocked(reason)
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
        wire = int(sum(np.asarray(v).nbytes for v in dxo.data.values()))
        data = {k: (np.asarray(v).astype(np.float32) if k in names else v) for k, v in dxo.data.items()}
        meta = {k: v for k, v in dxo.meta.items() if k != FP16_KEY}
        meta[WIRE_BYTES_KEY] = wire
        return DXO(data_kind=dxo.data_kind, data=data, meta=meta)
