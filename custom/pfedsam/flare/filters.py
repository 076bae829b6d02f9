"""DXO filters that make "only global weights leave a site" a guarantee, and fp16 transport.

Client ``task_result_filters`` on ``train``: ``GlobalOnlyFilter`` then (optionally)
``Fp16Quantizer``. Server ``task_result_filters`` on ``train``: (optionally) ``Fp16Dequantizer``
then ``GlobalKeyCheck``. Server ``task_data_filters``: ``Fp16Quantizer``; client
``task_data_filters``: ``Fp16Dequantizer``. Both key filters ask the registry (through the
job's YAML), never the executor, so a bug in training code cannot widen what is sent.
"""

from __future__ import annotations

import numpy as np
from nvflare.apis.dxo import DXO, DataKind, MetaKey, from_shareable
from nvflare.apis.dxo_filter import DXOFilter
from nvflare.apis.filter import Filter
from nvflare.apis.fl_constant import FLContextKey, ReservedKey, ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import ReservedHeaderKey, Shareable, make_reply
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_opt.tracking.tb.tb_receiver import TBAnalyticsReceiver

from .common import (
    CONFIG_FILE,
    FINAL_MODELS,
    FINAL_NUMBERS,
    FINAL_STATS,
    FINAL_STATUS,
    FP16_KEY,
    METRICS_KEY,
    NUM_EXAMPLES_KEY,
    ROUND_METRICS,
    TB_TAGS,
    WIRE_BYTES_KEY,
    job_config,
    model_facts,
)

_ALL_KINDS = [getattr(DataKind, k) for k in dir(DataKind) if k.isupper()]


class LeakBlocked(RuntimeError):
    """Raised by a filter to block a result that would carry a non-global parameter."""


_ENVELOPE_KEYS = {ReservedHeaderKey.HEADERS, "DXO"}
_OUR_FILTERS = frozenset({"GlobalOnlyFilter", "MetricsOnlyFilter", "Fp16Quantizer", "Fp16Dequantizer",
                          "GlobalKeyCheck"})


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


def _is_number(value: object, typ: type) -> bool:
    if isinstance(value, bool):
        return False
    if typ is int:
        return isinstance(value, (int, np.integer)) or (isinstance(value, float) and value.is_integer())
    return isinstance(value, (int, float, np.integer, np.floating))


def check_allowed(values: object, schema: dict, where: str) -> None:
    """``values`` must be a dict whose keys are all in ``schema`` and whose values match it.

    A schema value is a type (``int``/``float``: one number), a nested schema (dict), a tuple of
    allowed status words, or a frozenset of allowed strings (a list of them). Anything else --
    an unknown key, a path-like key, a list of numbers, free text -- raises LeakBlocked.
    """
    if not isinstance(values, dict):
        raise LeakBlocked(f"blocked a result: {where} is a {type(values).__name__}, not a mapping")
    unknown = [k for k in values if not isinstance(k, str) or k not in schema]
    if unknown:
        shown = repr(unknown[0])[:60]
        raise LeakBlocked(f"blocked a result: {where} carries {len(unknown)} name(s) outside the metric "
                          f"allow-list, e.g. {shown}")
    for key, value in values.items():
        rule, path = schema[key], f"{where}.{key}"
        if isinstance(rule, dict):
            check_allowed(value, rule, path)
        elif isinstance(rule, tuple):
            if value not in rule:
                raise LeakBlocked(f"blocked a result: {path} must be one of {rule}, got {str(value)[:40]!r}")
        elif isinstance(rule, frozenset):
            if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) and v in rule for v in value):
                raise LeakBlocked(f"blocked a result: {path} holds names outside the allowed set")
        elif not _is_number(value, rule):
            raise LeakBlocked(f"blocked a result: {path} must be one {rule.__name__}, got a {type(value).__name__}")


def train_meta_schema(global_names: frozenset[str]) -> dict:
    """What the meta of a ``train`` result may hold (see ROUND_METRICS in common.py)."""
    return {
        MetaKey.NUM_STEPS_CURRENT_ROUND: int, NUM_EXAMPLES_KEY: int,
        MetaKey.INITIAL_METRICS: {"val_dice_personalized": float},
        METRICS_KEY: ROUND_METRICS, FP16_KEY: frozenset(global_names), MetaKey.FILTER_HISTORY: _OUR_FILTERS,
    }


FINAL_DATA_SCHEMA: dict = {**{m: FINAL_STATS for m in FINAL_MODELS}, **FINAL_STATUS, **FINAL_NUMBERS}
FINAL_META_SCHEMA: dict = {MetaKey.FILTER_HISTORY: _OUR_FILTERS}


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
        check_allowed(dxo.meta, train_meta_schema(model_facts(fl_ctx, self.config_file).global_names), "meta")
        return super().process(shareable, fl_ctx)

    def process_dxo(self, dxo: DXO, shareable: Shareable, fl_ctx: FLContext) -> DXO | None:
        allowed = model_facts(fl_ctx, self.config_file).global_names
        foreign = sorted(set(dxo.data) - allowed)
        if foreign:
            self.log_error(fl_ctx, f"BLOCKED result: {len(foreign)} non-global key(s), e.g. {foreign[:3]}")
            raise LeakBlocked(f"blocked a result carrying {len(foreign)} non-global parameter(s): {foreign[:3]}")
        return None


class MetricsOnlyFilter(DXOFilter):
    """Client side, on the way out of the final task: the allow-listed test metrics only.

    The final evaluation reports ``{global|personalized: {n, n_empty, dice, hd95, n_fg, dice_fg,
    empty_fp}, export: onnx|none|failed}`` (FINAL_* in common.py; scalars only, never per-image
    lists); the model, its path and error details stay at the
    site (they are in the site's log). Any other name, type or word blocks the result.
    """

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
        check_allowed(dxo.meta, FINAL_META_SCHEMA, "meta")
        check_allowed(dxo.data, FINAL_DATA_SCHEMA, "data")
        return shareable

    def process_dxo(self, dxo: DXO, shareable: Shareable, fl_ctx: FLContext) -> DXO | None:
        return None


class SitePolicyFilter(Filter):
    """A site's own policy (``local/privacy.json``), applied to every job whatever its config says.

    Site-scope result filters run on every task's result before the job's own filters. This one
    dispatches on the task name: a ``train`` result must pass GlobalOnlyFilter, a ``final_eval``
    result MetricsOnlyFilter; any other task's result is blocked (fails closed), and so is a job
    without a pFedSAM YAML (the registry that names the global parameters cannot be read).

    Arguments:
      train_tasks (list): task names of federated rounds.
      final_tasks (list): task names of the final evaluation.
      config_file (str): the job's YAML in the app's config folder.
    """

    def __init__(self, train_tasks: list | None = None, final_tasks: list | None = None,
                 config_file: str = CONFIG_FILE) -> None:
        super().__init__()
        self.train_tasks = set(train_tasks or ["train"])
        self.final_tasks = set(final_tasks or ["final_eval"])
        self.global_only = GlobalOnlyFilter(config_file)
        self.metrics_only = MetricsOnlyFilter()

    def process(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        task = fl_ctx.get_prop(FLContextKey.TASK_NAME)
        if task in self.train_tasks:
            return self.global_only.process(shareable, fl_ctx)
        if task in self.final_tasks:
            return self.metrics_only.process(shareable, fl_ctx)
        if shareable.get_return_code() != ReturnCode.OK:
            return make_reply(shareable.get_return_code())
        raise LeakBlocked(f"site policy: results of task '{task}' may not leave this site")


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


class AllowListTBReceiver(TBAnalyticsReceiver):
    """Server TensorBoard receiver that writes only allow-listed scalar tags (TB_TAGS in common.py).

    Analytics events reach the server outside task results (no result filter sees them); a site
    streaming other tags, non-scalars or non-finite values gets them dropped and logged.
    """

    def _convert_to_records(self, analytic_data, fl_ctx: FLContext) -> list:
        kept = []
        for record in super()._convert_to_records(analytic_data, fl_ctx):
            value = record.value
            if record.tag in TB_TAGS and _is_number(value, float) and np.isfinite(float(value)):
                kept.append(record)
            else:
                self.log_warning(fl_ctx, f"dropped a TensorBoard record outside the allow-list: "
                                         f"{str(record.tag)[:60]!r}", fire_event=False)
        return kept
