"""FLARE components without a FLARE run: the validating aggregator and the DXO filters.

A fake engine gives the components what a real job gives them (the job's YAML in the app's
config folder, a run folder, other components by id); the model behind the YAML is the
``tiny`` backbone, so the registry's global and local names are the real ones.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from nvflare.apis.dxo import DXO, DataKind, MetaKey, from_shareable
from nvflare.apis.fl_constant import ReservedKey, ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable
from nvflare.app_common.abstract.model import make_model_learnable
from nvflare.app_common.app_constant import AppConstants

from pfedsam.flare.aggregation import check_contribution, weighted_mean
from pfedsam.flare.aggregator import GlobalWeightsAggregator, NotEnoughSites, ReportWriter
from pfedsam.flare.common import FP16_KEY, NUM_EXAMPLES_KEY, model_facts
from pfedsam.flare.filters import Fp16Dequantizer, Fp16Quantizer, GlobalKeyCheck, GlobalOnlyFilter
from pfedsam.flare.report import RunReport

torch.set_num_threads(1)

TINY = {"backbone": "tiny", "train": {"device": "cpu", "num_threads": 1}, "federation": {"min_clients": 1}}


class _Workspace:
    def __init__(self, root: Path) -> None:
        self.root = root

    def get_app_config_dir(self, job_id: str) -> str:
        return str(self.root / "app" / "config")

    def get_app_dir(self, job_id: str) -> str:
        return str(self.root / "app")

    def get_app_custom_dir(self, job_id: str) -> str:
        return str(self.root / "app" / "custom")

    def get_run_dir(self, job_id: str) -> str:
        return str(self.root)

    def get_root_dir(self) -> str:
        return str(self.root)


class _Engine:
    def __init__(self, root: Path, components: dict | None = None) -> None:
        self.workspace = _Workspace(root)
        self.components = components or {}
        self.events: list[str] = []
        self.clients: list[str] = []  # the federation's sites (those sending nothing are "missing")

    def get_workspace(self) -> _Workspace:
        return self.workspace

    def get_component(self, cid: str):
        return self.components.get(cid)

    def get_clients(self) -> list:
        return [type("Client", (), {"name": n})() for n in self.clients]

    def fire_event(self, event_type: str, fl_ctx: FLContext) -> None:
        self.events.append(event_type)


class _Job:
    """One fake job: its YAML on disk, an engine, and contexts for a given round."""

    def __init__(self, root: Path, job_id: str, overrides: dict) -> None:
        config_dir = root / "app" / "config"
        config_dir.mkdir(parents=True)
        (config_dir / "pfedsam.yaml").write_text(yaml.safe_dump(overrides))
        self.job_id = job_id
        self.report = ReportWriter()
        self.engine = _Engine(root, {"report_writer": self.report})

    def ctx(self, current_round: int | None = None, global_weights: dict | None = None) -> FLContext:
        ctx = FLContext()
        ctx.set_prop(ReservedKey.ENGINE, self.engine, private=True, sticky=False)
        ctx.set_prop(ReservedKey.RUN_NUM, self.job_id, private=False, sticky=False)
        if current_round is not None:
            ctx.set_prop(AppConstants.CURRENT_ROUND, current_round, private=True, sticky=False)
        if global_weights is not None:
            ctx.set_prop(AppConstants.GLOBAL_MODEL, make_model_learnable(global_weights, {}), private=True,
                         sticky=False)
        return ctx


@pytest.fixture(scope="module")
def job(tmp_path_factory) -> _Job:
    return _Job(tmp_path_factory.mktemp("job"), "unit-job", TINY)


@pytest.fixture(scope="module")
def fp16_job(tmp_path_factory) -> _Job:
    fed = {"min_clients": 1, "compression": "fp16"}
    return _Job(tmp_path_factory.mktemp("job16"), "unit-job-fp16", {**TINY, "federation": fed})


@pytest.fixture(scope="module")
def facts(job):
    return model_facts(job.ctx())


def _g0(facts) -> dict[str, np.ndarray]:
    return {k: v.copy() for k, v in facts.initial_global.items()}


def _perturbed(facts, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: (v + rng.normal(0, 0.01, v.shape)).astype(np.float32) for k, v in _g0(facts).items()}


def _result(weights: dict, site: str, rnd: int | None, steps=4, kind=DataKind.WEIGHTS, examples=None) -> Shareable:
    examples = steps if examples is None else examples
    meta = {MetaKey.NUM_STEPS_CURRENT_ROUND: steps, NUM_EXAMPLES_KEY: examples}
    s = DXO(data_kind=kind, data=weights, meta=meta).to_shareable()
    s.set_peer_props({ReservedKey.IDENTITY_NAME: site})
    if rnd is not None:
        s.add_cookie(AppConstants.CONTRIBUTION_ROUND, rnd)
    return s


# -- the registry behind the YAML ----------------------------------------------------------------------
def test_facts_partition_global_and_local(facts):
    assert facts.global_names and facts.local_names
    assert not facts.global_names & facts.local_names
    assert set(facts.initial_global) == set(facts.global_names)
    assert all(v.dtype == np.float32 for v in facts.initial_global.values())


# -- aggregation rules (pure) --------------------------------------------------------------------------
def _first(names) -> str:
    return sorted(names)[0]


def _bad_unknown(w, f):
    w["not.a.parameter"] = np.zeros(3, np.float32)


def _bad_local(w, f):
    name = _first(f.local_names)
    w[name] = np.zeros(1, np.float32)


def _bad_missing(w, f):
    del w[_first(w)]


def _bad_shape(w, f):
    name = _first(w)
    w[name] = np.zeros(w[name].size + 1, np.float32)


def _bad_dtype(w, f):
    name = _first(w)
    w[name] = w[name].astype(np.float64)


def _bad_nan(w, f):
    name = _first(w)
    w[name] = w[name].copy()
    w[name].flat[0] = np.nan


def _bad_inf(w, f):
    name = _first(w)
    w[name] = w[name].copy()
    w[name].flat[-1] = -np.inf


def _bad_list(w, f):
    name = _first(w)
    w[name] = w[name].tolist()


# (case id, mutation of a valid contribution, contribution round, steps, words the reason must contain)
REJECTIONS = [
    ("unknown_key", _bad_unknown, 1, 4, "unknown"),
    ("local_key", _bad_local, 1, 4, "local"),
    ("missing_key", _bad_missing, 1, 4, "misses"),
    ("shape", _bad_shape, 1, 4, "shape"),
    ("dtype", _bad_dtype, 1, 4, "dtype"),
    ("nan", _bad_nan, 1, 4, "NaN"),
    ("inf", _bad_inf, 1, 4, "Inf"),
    ("not_an_array", _bad_list, 1, 4, "not an array"),
    ("wrong_round", None, 0, 4, "round 0"),
    ("zero_steps", None, 1, 0, "positive"),
    ("negative_steps", None, 1, -2, "positive"),
    ("steps_not_a_number", None, 1, "4", "positive"),
    ("steps_missing", None, 1, None, "positive"),
]


@pytest.mark.parametrize("case,mutate,rnd,steps,words", REJECTIONS, ids=[c[0] for c in REJECTIONS])
def test_check_contribution_rejects(facts, case, mutate, rnd, steps, words):
    weights = _perturbed(facts, 1)
    if mutate:
        mutate(weights, facts)
    reason = check_contribution(weights, facts.initial_global, facts.local_names, rnd, 1, steps)
    assert reason is not None and words in reason, f"{case}: {reason!r}"


def test_check_contribution_accepts_a_valid_one(facts):
    assert check_contribution(_perturbed(facts, 1), facts.initial_global, facts.local_names, 1, 1, 4) is None


@pytest.mark.parametrize("weights", [[1.0, 1.0], [1.0, 3.0], [2.0, 5.0, 13.0]])
def test_weighted_mean(facts, weights):
    sites = [_perturbed(facts, i) for i in range(len(weights))]
    out = weighted_mean(list(zip(sites, weights, strict=True)))
    total = sum(weights)
    for name in facts.global_names:
        expected = sum(np.float64(w) * s[name] for s, w in zip(sites, weights, strict=True)) / total
        np.testing.assert_allclose(out[name], expected, rtol=1e-6, atol=1e-7)
        assert out[name].dtype == np.float32


# -- the aggregator component --------------------------------------------------------------------------
def _aggregate(job: _Job, g0: dict, results: list[Shareable], current_round: int = 1) -> tuple[list[bool], dict]:
    agg = GlobalWeightsAggregator()
    job.report.report = RunReport()
    accepted = [agg.accept(r, job.ctx(current_round, g0)) for r in results]
    out = from_shareable(agg.aggregate(job.ctx(current_round, g0)))
    agg.reset(job.ctx(current_round, g0))
    assert out.data_kind == DataKind.WEIGHTS
    return accepted, out.data


@pytest.mark.parametrize("steps", [[4, 4], [1, 3], [2, 5, 13]])
def test_aggregator_weights_by_num_steps(job, facts, steps):
    g0 = _g0(facts)
    sent = [_perturbed(facts, i + 10) for i in range(len(steps))]
    results = [_result(w, f"site-{i + 1}", 1, n) for i, (w, n) in enumerate(zip(sent, steps, strict=True))]
    accepted, out = _aggregate(job, g0, results)
    assert all(accepted)
    assert set(out) == set(facts.global_names)
    for name in facts.global_names:
        expected = sum(np.float64(n) * w[name] for w, n in zip(sent, steps, strict=True)) / sum(steps)
        np.testing.assert_allclose(out[name], expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("case,mutate,rnd,steps,words", REJECTIONS, ids=[c[0] for c in REJECTIONS])
def test_aggregator_rejects_and_round_goes_on(job, facts, case, mutate, rnd, steps, words):
    g0 = _g0(facts)
    good, bad = _perturbed(facts, 21), _perturbed(facts, 22)
    if mutate:
        mutate(bad, facts)
    accepted, out = _aggregate(job, g0, [_result(bad, "site-bad", rnd, steps), _result(good, "site-good", 1, 3)])
    assert accepted == [False, True], case
    for name in facts.global_names:  # the mean of the one accepted contribution
        np.testing.assert_array_equal(out[name], good[name])
    entry = job.report.report.data["rounds"][0]["sites"]
    assert entry["site-bad"]["accepted"] is False and words in entry["site-bad"]["reason"]
    assert entry["site-good"]["accepted"] is True and entry["site-good"]["reason"] is None


@pytest.mark.parametrize(
    "case,result",
    [
        ("metrics_kind", lambda f: _result({"dice": 0.5}, "site-x", 1, 4, DataKind.METRICS)),
        ("not_a_dxo", lambda f: _bare({"w": np.zeros(2, np.float32)}, "site-x", 1)),
    ],
)
def test_aggregator_rejects_non_weights(job, facts, case, result):
    accepted, out = _aggregate(job, _g0(facts), [result(facts), _result(_perturbed(facts, 5), "site-ok", 1)])
    assert accepted == [False, True], case


def _bare(payload: dict, site: str, rnd: int) -> Shareable:
    s = Shareable()
    s.update(payload)
    s.set_peer_props({ReservedKey.IDENTITY_NAME: site})
    s.add_cookie(AppConstants.CONTRIBUTION_ROUND, rnd)
    return s


def test_aggregator_rejects_a_second_result_from_the_same_site(job, facts):
    first, second = _perturbed(facts, 1), _perturbed(facts, 2)
    accepted, out = _aggregate(job, _g0(facts), [_result(first, "site-1", 1), _result(second, "site-1", 1)])
    assert accepted == [True, False]
    np.testing.assert_array_equal(out[_first(facts.global_names)], first[_first(facts.global_names)])


def test_aggregator_all_rejected_stops_the_run(job, facts):
    """Fewer accepted than min_clients: no aggregate of what is left, a clear error, the report says why."""
    g0 = _g0(facts)
    local = _perturbed(facts, 3)
    _bad_local(local, facts)
    results = [_result(_perturbed(facts, 1), "site-1", 0), _result(local, "site-2", 1),
               _result(_perturbed(facts, 2), "site-3", 1, 0)]
    agg = GlobalWeightsAggregator()
    job.report.report = RunReport()
    assert [agg.accept(r, job.ctx(1, g0)) for r in results] == [False, False, False]
    with pytest.raises(NotEnoughSites, match="only 0 contribution"):
        agg.aggregate(job.ctx(1, g0))
    assert "min_clients" in job.report.report.data["stopped"]


def test_aggregator_reset_between_rounds(job, facts):
    agg = GlobalWeightsAggregator()
    g0 = _g0(facts)
    assert agg.accept(_result(_perturbed(facts, 1), "site-1", 1), job.ctx(1, g0))
    agg.aggregate(job.ctx(1, g0))
    agg.reset(job.ctx(1, g0))
    second = _perturbed(facts, 2)
    assert agg.accept(_result(second, "site-1", 2), job.ctx(2, g0)), "the same site may contribute next round"
    out = from_shareable(agg.aggregate(job.ctx(2, g0))).data
    name = _first(facts.global_names)
    np.testing.assert_array_equal(out[name], second[name])


# -- filters -------------------------------------------------------------------------------------------
def _global_only(facts) -> Shareable:
    return _result(_perturbed(facts, 7), "site-1", 1)


@pytest.mark.parametrize(
    "case,extra",
    [
        ("local_key", lambda f: {_first(f.local_names): np.zeros(1, np.float32)}),
        ("unknown_key", lambda f: {"secret.tensor": np.zeros(4, np.float32)}),
        ("frozen_key", lambda f: {"sam.image_encoder.anything": np.zeros(2, np.float32)}),
    ],
)
def test_client_filter_blocks_non_global_keys(job, facts, case, extra):
    weights = _perturbed(facts, 7)
    weights.update(extra(facts))
    with pytest.raises(Exception, match="non-global"):
        GlobalOnlyFilter().process(_result(weights, "site-1", 1), job.ctx())


def test_client_filter_blocks_other_data_kinds(job, facts):
    with pytest.raises(Exception, match="only global WEIGHTS"):
        GlobalOnlyFilter().process(_result({"dice": 0.5}, "site-1", 1, 4, DataKind.METRICS), job.ctx())


def test_client_filter_passes_global_only_result_unchanged(job, facts):
    result = _global_only(facts)
    before = {k: v.copy() for k, v in from_shareable(result).data.items()}
    out = from_shareable(GlobalOnlyFilter().process(result, job.ctx()))
    assert set(out.data) == set(facts.global_names)
    for name, value in before.items():
        np.testing.assert_array_equal(out.data[name], value)


def test_client_filter_blocks_a_result_that_is_not_a_dxo(job, facts):
    with pytest.raises(Exception, match="not a DXO"):
        GlobalOnlyFilter().process(_bare({_first(facts.local_names): np.zeros(1, np.float32)}, "site-1", 1),
                                   job.ctx())


MARK = 12345.0  # fills the smuggled local parameter, so a leak is found wherever it hides


def _smuggled(facts) -> dict:
    return {_first(facts.local_names): np.full(3, MARK, np.float32)}


def _carries_mark(obj) -> bool:
    if isinstance(obj, np.ndarray):
        return bool(np.any(obj == MARK))
    if isinstance(obj, dict):
        return any(_carries_mark(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return any(_carries_mark(v) for v in obj)
    return False


def _leak_extra_key(s: Shareable, facts) -> None:
    s["smuggled"] = _smuggled(facts)


def _leak_meta(s: Shareable, facts) -> None:
    dxo = from_shareable(s)
    dxo.set_meta_prop("smuggled", _smuggled(facts))
    dxo.update_shareable(s)


def _leak_error_reply(s: Shareable, facts) -> None:
    dxo = from_shareable(s)
    dxo.data.update(_smuggled(facts))
    dxo.update_shareable(s)
    s.set_return_code(ReturnCode.EXECUTION_EXCEPTION)


@pytest.mark.parametrize("case,smuggle", [("extra_shareable_key", _leak_extra_key), ("array_in_meta", _leak_meta),
                                          ("error_reply_with_data", _leak_error_reply)])
def test_client_filter_lets_no_local_value_out(job, facts, case, smuggle):
    """Fail closed: a local value hidden anywhere in the result is blocked (raise) or stripped."""
    result = _global_only(facts)
    smuggle(result, facts)
    try:
        out = GlobalOnlyFilter().process(result, job.ctx())
    except Exception:
        return
    assert not _carries_mark(dict(out)), f"{case}: a local parameter left the site"


def test_server_check_refuses_a_local_key(job, facts):
    weights = _perturbed(facts, 8)
    _bad_local(weights, facts)
    with pytest.raises(Exception, match="non-global"):
        GlobalKeyCheck().process(_result(weights, "site-1", 1), job.ctx())


def test_server_check_passes_global_only_result(job, facts):
    out = from_shareable(GlobalKeyCheck().process(_global_only(facts), job.ctx()))
    assert set(out.data) == set(facts.global_names)


def test_fp16_round_trip(fp16_job, facts):
    sent = _perturbed(facts, 9)
    wire = Fp16Quantizer().process(_result(sent, "site-1", 1), fp16_job.ctx())
    wire_dxo = from_shareable(wire)
    assert all(v.dtype == np.float16 for v in wire_dxo.data.values())
    assert sorted(wire_dxo.get_meta_prop(FP16_KEY)) == sorted(sent)
    wire_bytes = sum(v.nbytes for v in wire_dxo.data.values())
    assert wire_bytes * 2 == sum(v.nbytes for v in sent.values())

    back = from_shareable(Fp16Dequantizer().process(wire, fp16_job.ctx()))
    assert FP16_KEY not in back.meta
    assert back.get_meta_prop(MetaKey.NUM_STEPS_CURRENT_ROUND) == 4
    for name, value in sent.items():
        assert back.data[name].dtype == np.float32
        np.testing.assert_allclose(back.data[name], value, rtol=1e-3, atol=1e-4)


def test_fp16_chain_feeds_the_aggregator(fp16_job, facts):
    """client: GlobalOnly -> quantize; server: dequantize -> key check -> aggregator accepts."""
    g0 = _g0(facts)
    result = _result(_perturbed(facts, 9), "site-1", 1)
    for f in (GlobalOnlyFilter(), Fp16Quantizer(), Fp16Dequantizer(), GlobalKeyCheck()):
        result = f.process(result, fp16_job.ctx())
    assert GlobalWeightsAggregator().accept(result, fp16_job.ctx(1, g0))


def test_fp16_is_a_no_op_when_compression_is_off(job, facts):
    sent = _perturbed(facts, 9)
    out = from_shareable(Fp16Quantizer().process(_result(sent, "site-1", 1), job.ctx()))
    assert FP16_KEY not in out.meta
    assert all(v.dtype == np.float32 for v in out.data.values())


def test_report_markdown_gives_each_round_wall_time_once():
    report = RunReport({"name": "t"})
    for rnd, seconds in ((0, 12.5), (1, 7.25)):
        report.start_round(rnd)
        for site in ("site-1", "site-2", "site-3"):
            report.add_contribution(rnd, site, ["a"], 8, {"val_dice_personalized": 0.5}, True, num_steps=3)
        report.end_round(rnd, True)
        report.data["rounds"][rnd]["wall_time_s"] = seconds
    text = report.to_markdown()
    assert text.count("12.5") == 1 and text.count("7.25") == 1
    assert "| 0 | 3 | 0 | yes | 12.5" in text
    assert "wall time" not in text.split("## Sites per round")[1]
