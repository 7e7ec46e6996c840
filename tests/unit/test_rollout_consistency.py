"""rollout.consistency: the engine-vs-Megatron log-prob gap, on hand-computed numbers."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_revisual.rollout.consistency import LogprobGapError, logprob_consistency, pad_ragged


def test_padded_tensors_with_mask():
    engine = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.25, 9.0]])
    megatron = torch.tensor([[-1.1, -2.0, -2.7], [-0.5, -0.05, -7.0]])
    mask = torch.tensor([[True, True, True], [True, True, False]])  # 9.0 vs -7.0 is padding
    m = logprob_consistency(engine, megatron, mask)
    diffs = [0.1, 0.0, 0.3, 0.0, 0.2]
    assert m["rollout/logprob_tokens"] == 5
    assert m["rollout/logprob_abs_diff_mean"] == pytest.approx(sum(diffs) / 5, abs=1e-6)
    assert m["rollout/logprob_abs_diff_max"] == pytest.approx(0.3, abs=1e-6)
    ratio = [abs(math.exp(d) - 1) for d in (-0.1, 0.0, 0.3, 0.0, 0.2)]
    assert m["rollout/prob_ratio_error_mean"] == pytest.approx(sum(ratio) / 5, abs=1e-6)
    assert m["rollout/prob_ratio_error_max"] == pytest.approx(math.exp(0.3) - 1, abs=1e-6)


def test_ragged_rows_and_prefix():
    m = logprob_consistency([[-1.0], [-2.0, -3.0]], [[-1.0], [-2.5, -3.0]], prefix="eval/")
    assert m == {
        "eval/logprob_abs_diff_mean": pytest.approx(0.5 / 3),
        "eval/logprob_abs_diff_max": pytest.approx(0.5),
        "eval/prob_ratio_error_mean": pytest.approx((1 - math.exp(-0.5)) / 3),
        "eval/prob_ratio_error_max": pytest.approx(1 - math.exp(-0.5)),
        "eval/logprob_tokens": 3.0,
    }


def test_pad_ragged():
    values, mask = pad_ragged([[1.0, 2.0], [], [3.0]])
    assert values.tolist() == [[1.0, 2.0], [0.0, 0.0], [3.0, 0.0]]
    assert mask.tolist() == [[True, True], [False, False], [True, False]]
    assert values.dtype == torch.float64


def test_large_gap_raises_with_the_numbers():
    engine, megatron = [[-1.0, -1.0]], [[-1.0, -1.5]]
    assert logprob_consistency(engine, megatron, raise_if_mean_above=0.3, raise_if_max_above=0.6)
    with pytest.raises(LogprobGapError, match=r"mean \|diff\| 2\.500e-01 > 1\.0e-01") as err:
        logprob_consistency(engine, megatron, raise_if_mean_above=0.1)
    assert err.value.metrics["rollout/logprob_abs_diff_max"] == pytest.approx(0.5)
    with pytest.raises(LogprobGapError, match=r"max \|diff\| 5\.000e-01 > 1\.0e-02"):
        logprob_consistency(engine, megatron, raise_if_max_above=1e-2)


def test_non_finite_counts_as_infinite_gap():
    m = logprob_consistency([[-1.0, float("nan")]], [[-1.0, -2.0]])
    assert m["rollout/logprob_abs_diff_max"] == math.inf
    with pytest.raises(LogprobGapError):
        logprob_consistency([[-1.0, -math.inf]], [[-1.0, -2.0]], raise_if_max_above=1.0)


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="differ in shape"):
        logprob_consistency(
            torch.zeros(2, 3), torch.zeros(2, 4), torch.ones(2, 3, dtype=torch.bool)
        )
    with pytest.raises(ValueError, match="rows \\[1\\] have different lengths"):
        logprob_consistency([[0.0, 0.0], [0.0]], [[0.0, 0.0], [0.0, 0.0]])
    with pytest.raises(ValueError, match="pass mask="):
        logprob_consistency(torch.zeros(1, 2), torch.zeros(1, 2))
    with pytest.raises(ValueError, match="no tokens"):
        logprob_consistency(
            torch.zeros(1, 2), torch.zeros(1, 2), torch.zeros(1, 2, dtype=torch.bool)
        )
