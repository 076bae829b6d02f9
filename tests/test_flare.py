"""FLARE components: aggregation rules, the aggregator, the key filters and fp16 transport."""

from __future__ import annotations

import numpy as np
import pytest
from nvflare.apis.dxo import DXO, DataKind, MetaKey, from_shareable
from nvflare.apis.fl_constant import ReservedKey
from nvflare.apis.fl_context import FLContext
from nvflare.app_common.abstract.model import make_model_learnable
from nvflare.app_common.app_constant import AppConstants

from pfedsam.flare import aggregator as aggregator_module
from pfedsam.flare import filters as filters_module
from pfedsam.flare.aggregation import check_contribution, weighted_mean
from pfedsam.flare.aggregator import GlobalWeightsAggregator
from pfedsam.flare.common import ModelFacts
from pfedsam.flare.filters import Fp16Dequantizer, Fp16Quantizer, GlobalKeyCheck, GlobalOnlyFilter, LeakBlocked

REF = {"dec.w": np.ones((2, 3), np.float32), "dec.b": np.zeros(3, np.float32)}
LOCAL = frozenset({"lmoe.neck.router.weight"})


def _with(**changes):
    out = {k: v.copy() for k, v in REF.items()}
    for k, v in changes.items():
        if v is None:
            out.pop(k.replace("__", "."))
        else:
            out[k.replace("__", ".")] = v
    return out


NAN = np.ones((2, 3), np.float32)
NAN[0, 0] = np.nan
INF = np.zeros(3, np.float32)
INF[1] = np.inf

# weights, contribution round, current round, steps, expected reason fragment (None = accepted)
CONTRIBUTION_CASES = [
    (_with(), 3, 3, 10, None),
    (_with(), 2, 3, 10, "result is for round 2"),
    (_with(lmoe__neck__router__weight=np.zeros((4, 8), np.float32)), 3, 3, 10, "local parameter"),
    (_with(extra__w=np.zeros(1, np.float32)), 3, 3, 10, "unknown parameter"),
    (_with(dec__b=None), 3, 3, 10, "misses 1 global parameter"),
    (_with(dec__w=np.ones((3, 2), np.float32)), 3, 3, 10, "has shape (3, 2)"),
    (_with(dec__w=np.ones((2, 3), np.float64)), 3, 3, 10, "has dtype float64"),
    (_with(dec__w=NAN), 3, 3, 10, "NaN or Inf"),
    (_with(dec__b=INF), 3, 3, 10, "NaN or Inf"),
    (_with(), 3, 3, 0, "positive number"),
    (_with(), 3, 3, None, "positive number"),
]


@pytest.mark.parametrize("weights,contribution_round,current,steps,reason", CONTRIBUTION_CASES)
def test_check_contribution(weights, contribution_round, current, steps, reason):
    got = check_contribution(weights, REF, LOCAL, contribution_round, current, steps)
    if reason is None:
        assert got is None
    else:
        assert got is not None and reason in got


def test_weighted_mean_by_steps():
    a = {"w": np.full(2, 1.0, np.float32)}
    b = {"w": np.full(2, 4.0, np.float32)}
    out = weighted_mean([(a, 10), (b, 30)])
    np.testing.assert_allclose(out["w"], [3.25, 3.25])
    assert out["w"].dtype == np.float32


class _Engine:
    def __init__(self, components):
        self.components = components

    def get_component(self, cid):
        return self.components.get(cid)


def _ctx(rnd=1):
    ctx = FLContext()
    ctx.set_prop(AppConstants.CURRENT_ROUND, rnd, private=True, sticky=False)
    ctx.set_prop(AppConstants.GLOBAL_MODEL, make_model_learnable({k: v.copy() for k, v in REF.items()}, {}),
                 private=True, sticky=False)
    return ctx


def _result(site, weights, steps, rnd=1):
    s = DXO(DataKind.WEIGHTS, data=weights, meta={MetaKey.NUM_STEPS_CURRENT_ROUND: steps}).to_shareable()
    s.set_peer_props({ReservedKey.IDENTITY_NAME: site})
    s.add_cookie(AppConstants.CONTRIBUTION_ROUND, rnd)
    return s


@pytest.fixture
def facts(monkeypatch):
    value = ModelFacts(global_names=frozenset(REF), local_names=LOCAL, initial_global=REF)
    monkeypatch.setattr(aggregator_module, "model_facts", lambda *a, **k: value)
    monkeypatch.setattr(filters_module, "model_facts", lambda *a, **k: value)
    return value


def test_aggregator_weighted_mean_and_rejections(facts, monkeypatch):
    agg = GlobalWeightsAggregator(report_id="")
    ctx = _ctx()
    assert agg.accept(_result("site-1", _with(dec__w=np.full((2, 3), 2.0, np.float32)), 10), ctx)
    assert agg.accept(_result("site-2", _with(dec__w=np.full((2, 3), 6.0, np.float32)), 30), ctx)
    assert not agg.accept(_result("site-3", _with(lmoe__neck__router__weight=np.zeros(2, np.float32)), 5), ctx)
    assert not agg.accept(_result("site-4", _with(dec__w=NAN), 5), ctx)
    assert not agg.accept(_result("site-5", _with(), 5, rnd=0), ctx)
    assert not agg.accept(_result("site-1", _with(), 5), ctx)  # second result from the same site
    out = from_shareable(agg.aggregate(ctx)).data
    np.testing.assert_allclose(out["dec.w"], np.full((2, 3), 5.0))  # (2*10 + 6*30) / 40
    agg.reset(ctx)


def test_aggregator_all_rejected_keeps_global(facts):
    agg = GlobalWeightsAggregator(report_id="")
    ctx = _ctx()
    assert not agg.accept(_result("site-1", _with(dec__w=NAN), 10), ctx)
    out = from_shareable(agg.aggregate(ctx)).data
    for k in REF:
        np.testing.assert_array_equal(out[k], REF[k])


@pytest.mark.parametrize("flt", [GlobalOnlyFilter(), GlobalKeyCheck()])
def test_key_filters_block_local_keys(facts, flt):
    ok = DXO(DataKind.WEIGHTS, data=_with()).to_shareable()
    assert set(from_shareable(flt.process(ok, FLContext())).data) == set(REF)
    leaky = DXO(DataKind.WEIGHTS, data=_with(lmoe__neck__router__weight=np.zeros(2, np.float32))).to_shareable()
    with pytest.raises(LeakBlocked, match="non-global"):
        flt.process(leaky, FLContext())


def test_client_filter_fails_closed_on_other_kinds(facts):
    with pytest.raises(LeakBlocked, match="only global WEIGHTS"):
        GlobalOnlyFilter().process(DXO(DataKind.COLLECTION, data={"x": {"y": 1}}).to_shareable(), FLContext())


@pytest.mark.parametrize("compression,wire_dtype", [("fp16", np.float16), ("none", np.float32)])
def test_fp16_round_trip(monkeypatch, compression, wire_dtype):
    class Cfg:
        class federation:
            pass

    Cfg.federation.compression = compression
    monkeypatch.setattr(filters_module, "job_config", lambda *a, **k: Cfg)
    weights = {"w": np.linspace(-2, 2, 12, dtype=np.float32).reshape(3, 4)}
    wire = Fp16Quantizer().process(DXO(DataKind.WEIGHTS, data=weights).to_shareable(), FLContext())
    assert from_shareable(wire).data["w"].dtype == wire_dtype
    back = from_shareable(Fp16Dequantizer().process(wire, FLContext())).data["w"]
    assert back.dtype == np.float32
    np.testing.assert_allclose(back, weights["w"], atol=1e-3)
