"""Accuracy, breakdowns, WeMath's four-dimensional metrics and the markdown table, on
hand-made records with known numbers."""

from __future__ import annotations

import pytest

from megatron_revisual.evaluation.metrics import (
    markdown_report,
    summarize,
    summarize_dataset,
    wemath_metrics,
)


def _rec(dataset, correct, *, subsets=(), parsed=True, error=None, group=None, step=None):
    return {
        "dataset": dataset,
        "correct": correct,
        "parsed": parsed,
        "error": error,
        "subsets": list(subsets),
        "group": group,
        "step": step,
    }


def _wemath(group, steps, subs, multi):
    rows = [
        _rec("wemath", ok, group=group, step=f"{steps}steps_{i}")
        for i, ok in enumerate(subs, start=1)
    ]
    return rows + [_rec("wemath", multi, group=group, step=f"{steps}steps_multi")]


def test_accuracy_and_breakdown_counts():
    records = [
        _rec("mathvista", True, subsets=["geometry"]),
        _rec("mathvista", False, subsets=["geometry"], parsed=False),
        _rec("mathvista", True, subsets=["algebra", "geometry"]),
        _rec("mathvista", False, subsets=["algebra"], parsed=False, error="HTTP 400"),
    ]
    out = summarize_dataset("mathvista", records)
    assert (out["correct"], out["total"], out["accuracy"]) == (2, 4, 0.5)
    assert out["unparsed"] == 1 and out["errors"] == 1
    assert out["sub_metrics"] == {
        "algebra": {"accuracy": 0.5, "correct": 1, "total": 2},
        "geometry": {"accuracy": 2 / 3, "correct": 2, "total": 3},
    }
    assert "wemath" not in out


def test_overall_average_is_mean_of_datasets_and_pooled_accuracy():
    records = [_rec("geo3k", True), _rec("geo3k", False)] + [
        _rec("mathvision", ok) for ok in (True, True, True, False)
    ]
    s = summarize(records, ["geo3k", "mathvision"])
    assert s["datasets"]["geo3k"]["accuracy"] == 0.5
    assert s["datasets"]["mathvision"]["accuracy"] == 0.75
    assert s["overall"]["average"] == pytest.approx(0.625)
    assert (s["overall"]["correct"], s["overall"]["total"]) == (4, 6)
    assert s["overall"]["accuracy"] == pytest.approx(4 / 6)


def test_empty_dataset_has_no_accuracy():
    s = summarize([], ["geo3k"])
    assert s["datasets"]["geo3k"]["accuracy"] is None and s["overall"]["average"] is None


def test_wemath_four_dimensional_metrics():
    records = (
        _wemath("2steps_1", 2, [True, True], True)  # CM strict & loose
        + _wemath("2steps_2", 2, [True, False], True)  # RM strict, CM loose
        + _wemath("2steps_3", 2, [False, False], True)  # RM strict & loose
        + _wemath("2steps_4", 2, [True, True], False)  # IG
        + _wemath("3steps_1", 3, [True, False, True], False)  # IK
        + _wemath("3steps_2", 3, [False, False, False], False)  # IK
        + _wemath("3steps_3", 3, [True, True, True], True)  # CM strict & loose
        + _wemath("3steps_4", 3, [True, True], True)[:2]  # incomplete: left out
    )
    m = wemath_metrics(records)
    assert m["problems"] == 7 and m["incomplete_problems"] == 1
    assert m["counts"] == {
        "IK": 2,
        "IG": 1,
        "CM_strict": 2,
        "CM_loose": 3,
        "RM_strict": 2,
        "RM_loose": 1,
    }
    assert m["strict"]["IK"] == pytest.approx(2 / 7)
    assert m["strict"]["IG"] == pytest.approx(1 / 7)
    assert m["strict"]["CM"] == pytest.approx(2 / 7)
    assert m["strict"]["RM"] == pytest.approx(2 / 4)  # RM / (CM + RM)
    assert m["loose"]["CM"] == pytest.approx(3 / 7)
    assert m["loose"]["RM"] == pytest.approx(1 / 4)
    # score = (N - 0.5 IG - RM - IK) / N
    assert m["strict"]["score"] == pytest.approx((7 - 0.5 - 2 - 2) / 7)
    assert m["loose"]["score"] == pytest.approx((7 - 0.5 - 1 - 2) / 7)
    # one-step accuracy over the sub-problems of complete problems; S2 / S3 the multi-steps
    assert m["S1"] == pytest.approx(10 / 17)
    assert m["S2"] == pytest.approx(3 / 4)
    assert m["S3"] == pytest.approx(1 / 3)


def test_wemath_in_dataset_summary_and_markdown():
    records = _wemath("2steps_1", 2, [True, True], False)
    for r in records:
        r["subsets"] = ["two-step" if r["step"].endswith("multi") else "one-step"]
    s = summarize(records, ["wemath"])
    w = s["datasets"]["wemath"]["wemath"]
    assert w["counts"]["IG"] == 1 and w["strict"]["score"] == pytest.approx(0.5)
    table = markdown_report("m", s)
    assert "| wemath | 66.67 | 2 | 3 | 0 | 0 |" in table
    assert "| strict | 50.00 | 0.00 | 100.00 | 0.00 | - |" in table
    assert "| one-step | 100.00 | 2 | 2 |" in table
