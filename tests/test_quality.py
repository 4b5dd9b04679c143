"""qtool.quality: a layer's figures from its sums, the edge cases (all-zero, exact, non-finite weights), the one
aggregation per component, and their JSON (strict, rounded, read back). The sums themselves are tested in
tests/test_verify.py, a whole run's figures against the written files in tests/test_quantize_api.py."""

from __future__ import annotations

import json
import math

import pytest
import torch

from qtool.quality import ComponentQuality, LayerQuality, aggregate, worst
from qtool.quantize import quantize_pending
from qtool.verify import layer_quality, layer_stats


def layer(key="a.weight", signal=100.0, noise=1.0, elements=1000, extreme=30, max_abs_err=0.5, nonfinite=False):
    return LayerQuality(key, (10, 100), "nf4", elements, extreme, signal, noise, max_abs_err, nonfinite)


def test_a_layers_figures():
    """SQNR 10 log10(signal / noise), rel. Frobenius sqrt(noise / signal), extreme share extreme / elements."""
    q = layer(signal=1000.0, noise=1.0, elements=400, extreme=12)
    assert (q.sqnr_db, q.rel_fro, q.extreme_share, q.status) == (30.0, math.sqrt(1e-3), 0.03, "ok")


def test_edge_cases_have_a_status_and_no_number_where_there_is_none():
    """An all-zero weight has no SQNR or relative error ("zero"); an exact one an infinite SQNR and relative error 0
    ("exact"); a weight with NaN or Inf (allowed) no SQNR ("nonfinite"). In JSON: null, strict."""
    zero = layer(signal=0.0, noise=0.0, max_abs_err=0.0)
    exact = layer(noise=0.0, max_abs_err=0.0)
    nan = layer(signal=math.nan, noise=math.nan, nonfinite=True)
    flagged = layer(nonfinite=True)  # e.g. int8 values beyond float16 whose sums came out finite
    assert (zero.status, zero.sqnr_db, zero.rel_fro) == ("zero", None, None)
    assert (exact.status, exact.sqnr_db, exact.rel_fro) == ("exact", math.inf, 0.0)
    assert nan.status == flagged.status == "nonfinite" and math.isnan(nan.sqnr_db) and math.isnan(nan.rel_fro)
    for q in (zero, exact, nan):
        data = json.loads(json.dumps(q.to_dict(), allow_nan=False))
        assert data["sqnr_db"] is None and data["status"] == q.status
    assert exact.to_dict()["rel_fro"] == 0.0 and nan.to_dict()["signal"] is None


def test_edge_cases_from_real_layers():
    """The same statuses from layer_stats of real layers: zeros, a weight its codes hold exactly, a NaN."""
    exact = torch.zeros(4, 64)
    exact[:, 0] = 1.0  # every block holds 1 and zeros: both NF4 codes exactly
    nan = torch.randn(4, 64)
    nan[1, 1] = math.nan
    for weight, status in ((torch.zeros(4, 64), "zero"), (exact, "exact"), (nan, "nonfinite")):
        q = layer_quality(layer_stats(weight, quantize_pending(weight)), "k", shape=(4, 64), method="nf4")
        assert q.status == status and q.elements == 256


def test_to_dict_is_the_documented_layout_rounded_to_6_digits():
    q = layer(signal=2.0, noise=0.0123456789, max_abs_err=0.123456789, elements=3, extreme=1)
    assert q.to_dict() == {
        "key": "a.weight", "shape": [10, 100], "method": "nf4", "status": "ok", "sqnr_db": 22.0952,
        "rel_fro": 0.0785674, "max_abs_err": 0.123457, "extreme_share": 0.333333, "elements": 3, "extreme": 1,
        "signal": 2.0, "noise": 0.0123457,
    }  # fmt: skip


def test_aggregate_weighs_sums_and_leaves_out_nonfinite_layers():
    """Mean / min SQNR over the layers with a finite one; overall SQNR and rel. Frobenius from the summed squares
    (the exact and all-zero layers count there); max of the errors; extreme share of all elements; a non-finite
    layer only counted."""
    layers = [
        layer("a", signal=100.0, noise=1.0, elements=1000, extreme=10, max_abs_err=0.5),  # 20 dB
        layer("b", signal=1000.0, noise=1.0, elements=3000, extreme=50, max_abs_err=0.25),  # 30 dB
        layer("exact", signal=50.0, noise=0.0, elements=500, extreme=5, max_abs_err=0.0),
        layer("zero", signal=0.0, noise=0.0, elements=500, extreme=0, max_abs_err=0.0),
        layer("nan", signal=math.nan, noise=math.nan, elements=7, extreme=7, max_abs_err=9.0, nonfinite=True),
    ]
    q = aggregate(layers)
    assert (q.layers, q.layers_nonfinite, q.sqnr_mean_db, q.sqnr_min_db) == (5, 1, 25.0, 20.0)
    assert math.isclose(q.sqnr_db, 10 * math.log10(1150 / 2))
    assert math.isclose(q.rel_fro, math.sqrt(2 / 1150))
    assert (q.max_abs_err, q.extreme_share) == (0.5, 65 / 5000)
    assert [w.key for w in worst(layers, 5)] == ["a", "b"]


def test_aggregate_without_measurable_layers():
    assert aggregate([]) is None
    only_nan = aggregate([layer(signal=math.nan, noise=math.nan, nonfinite=True)])
    assert only_nan == ComponentQuality(layers=1, layers_nonfinite=1)
    exact = aggregate([layer(noise=0.0, max_abs_err=0.0)])
    assert (exact.sqnr_db, exact.rel_fro, exact.sqnr_mean_db) == (math.inf, 0.0, None)
    assert exact.to_dict()["sqnr_db"] is None  # strict JSON: infinity is null


def test_component_figures_read_back_from_json():
    """from_dict(to_dict()) gives the rounded figures; anything else is refused (qtool.json comes from disk)."""
    q = aggregate([layer(signal=123.456789, noise=1.0), layer(signal=0.0, noise=0.0)])
    data = json.loads(json.dumps(q.to_dict(), allow_nan=False))
    back = ComponentQuality.from_dict(data)
    assert back.to_dict() == data and back.layers == 2 and math.isclose(back.sqnr_db, q.sqnr_db, rel_tol=5e-6)
    bad = [None, [], {**data, "extra": 1}, {k: v for k, v in data.items() if k != "rel_fro"},
           {**data, "layers": True}, {**data, "layers": -1}, {**data, "sqnr_db": "20"},
           {**data, "sqnr_db": math.nan}]  # fmt: skip
    for case in bad:
        with pytest.raises(ValueError):
            ComponentQuality.from_dict(case)
