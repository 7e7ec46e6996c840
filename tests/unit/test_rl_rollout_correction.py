"""Rollout correction (token TIS, sequence reject / mask) by hand, its packing into GRPO
micro-batches, and gradients of the corrected loss."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_revisual.config.schema import RolloutCorrectionConfig as RC
from megatron_revisual.rl.losses import policy_loss
from megatron_revisual.rl.rollout_correction import (
    CORRECTION_SUMS,
    correction_metrics,
    rollout_correction,
)
from megatron_revisual.train.grpo_step import (
    PolicySample,
    apply_rollout_correction,
    attach_log_probs,
    build_policy_batches,
)

# row 0: log r = 0.5, 0, -0.1 -> r = 1.6487213, 1, 0.9048374; geometric mean e^(0.4 / 3) = 1.1426308
# row 1: log r = -0.8, 0      -> r = 0.4493290, 1;            geometric mean e^(-0.4)   = 0.6703200
OLD = [[-1.0, -2.0, -0.5], [-1.0, -1.0, 0.0]]
ROLLOUT = [[-1.5, -2.0, -0.4], [-0.2, -1.0, 0.0]]
MASK = [[1, 1, 1], [1, 1, 0]]
R = [[math.exp(0.5), 1.0, math.exp(-0.1)], [math.exp(-0.8), 1.0, 0.0]]
RHO = [math.exp(0.4 / 3), math.exp(-0.4)]


def _run(config: RC):
    return rollout_correction(torch.tensor(OLD), torch.tensor(ROLLOUT), torch.tensor(MASK), config)


def test_token_tis_caps_the_ratio_at_c() -> None:
    weights, keep, sums, maxima = _run(RC(tis_cap=1.5))
    assert weights.tolist() == [pytest.approx([1.5, 1.0, R[0][2]]), pytest.approx([R[1][0], 1.0, 0.0])]
    assert keep.tolist() == [[True, True, True], [True, True, False]]
    metrics = correction_metrics(sums, maxima, RC(tis_cap=1.5))
    assert metrics == pytest.approx({
        "rollout_corr/ratio_mean": (R[0][0] + 1 + R[0][2] + R[1][0] + 1) / 5,  # 1.0005775
        "rollout_corr/ratio_max": R[0][0],
        "rollout_corr/tis_capped_fraction": 1 / 5,
    })


def test_sequence_reject_drops_rows_outside_the_geometric_bounds() -> None:
    # bounds [1 / 1.2, 1.2]: row 0 (1.143) stays, row 1 (0.670) goes; kept rows are not weighted
    config = RC(seq="reject", seq_upper=1.2)
    weights, keep, sums, maxima = _run(config)
    assert weights is None
    assert keep.tolist() == [[True, True, True], [False, False, False]]
    assert dict(zip(CORRECTION_SUMS, sums.tolist(), strict=True))["seq_rejected"] == 1.0
    assert correction_metrics(sums, maxima, config) == pytest.approx({
        "rollout_corr/ratio_mean": (R[0][0] + 1 + R[0][2] + R[1][0] + 1) / 5,
        "rollout_corr/ratio_max": R[0][0],
        "rollout_corr/seq_ratio_mean": (RHO[0] + RHO[1]) / 2,
        "rollout_corr/seq_ratio_max": RHO[0],
        "rollout_corr/seq_rejected_fraction": 0.5,
    })
    # an explicit lower bound keeps row 1 and drops row 0
    _, keep, _, _ = _run(RC(seq="reject", seq_upper=1.1, seq_lower=0.5))
    assert keep.tolist() == [[False, False, False], [True, True, False]]


def test_sequence_mask_weights_kept_rows_by_their_geometric_mean() -> None:
    weights, keep, _, _ = _run(RC(seq="mask", seq_upper=1.2))
    assert weights.tolist() == [pytest.approx([RHO[0]] * 3), [0.0, 0.0, 0.0]]
    assert keep[1].tolist() == [False, False, False]


def test_tis_with_reject_zeroes_rejected_rows() -> None:
    weights, keep, _, _ = _run(RC(tis_cap=1.5, seq="reject", seq_upper=1.2))
    assert weights.tolist() == [pytest.approx([1.5, 1.0, R[0][2]]), [0.0, 0.0, 0.0]]


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (RC(tis_cap=0.0), "tis_cap=0.0 must be > 0"),
        (RC(seq="reject"), "seq='reject' needs seq_upper > 1"),
        (RC(seq="mask", seq_upper=2.0, tis_cap=2.0), "weighted twice"),
        (RC(seq_upper=2.0), "seq_upper=2.0 has no effect while seq is null"),
        (RC(seq="reject", seq_upper=2.0, seq_lower=1.5), r"seq_lower=1.5 must be in \(0, 1\)"),
    ],
)
def test_bad_options_are_named(config: RC, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _run(config)


def test_corrected_loss_gradcheck() -> None:
    # the weights and the mask come from the rollout; the gradient flows through log pi only
    old = torch.tensor(OLD, dtype=torch.float64)
    for config in (RC(tis_cap=1.5), RC(seq="mask", seq_upper=1.2), RC(tis_cap=1.5, seq="reject", seq_upper=1.2)):
        weights, keep, _, _ = rollout_correction(old, torch.tensor(ROLLOUT, dtype=torch.float64),
                                                 torch.tensor(MASK), config)
        log_probs = (old + torch.tensor([[0.1, -0.05, 0.02], [0.3, -0.2, 0.0]], dtype=torch.float64)).requires_grad_()
        adv = torch.tensor([1.0, -1.0], dtype=torch.float64)
        w = None if weights is None else weights.double()

        def loss(lp: torch.Tensor, w=w, keep=keep, adv=adv) -> torch.Tensor:
            return policy_loss(lp, old, adv, keep, is_weights=w)[0]

        assert torch.autograd.gradcheck(loss, (log_probs,))


def test_packed_micro_batches_carry_weights_and_lose_rejected_sequences() -> None:
    t = torch.tensor
    samples = [
        PolicySample(prompt_ids=t([11, 12]), response_ids=t([21, 22, 23]), advantage=1.0,
                     rollout_log_probs=t(ROLLOUT[0])),
        PolicySample(prompt_ids=t([31]), response_ids=t([41, 42]), advantage=-1.0,
                     rollout_log_probs=t(ROLLOUT[1][:2])),
    ]
    (mb,) = build_policy_batches(samples, config=None, micro_batch_tokens=16)
    # row 11 12 21 22 23 | 31 41 42: loss at 1, 2, 3 (sample 0) and 5, 6 (sample 1)
    old = torch.zeros_like(mb.advantages)
    old[0, [1, 2, 3]] = t(OLD[0])
    old[0, [5, 6]] = t(OLD[1][:2])
    (mb,) = attach_log_probs([mb], old=[old])
    (out,), sums, maxima = apply_rollout_correction([mb], RC(tis_cap=1.5, seq="reject", seq_upper=1.2))
    assert out.packed.loss_mask[0].tolist() == [0, 1, 1, 1, 0, 0, 0, 0]
    assert out.sequence_index[0].tolist() == [-1, 0, 0, 0, -1, -1, -1, -1]
    assert out.is_weights[0].tolist() == pytest.approx([0, 1.5, 1.0, R[0][2], 0, 0, 0, 0])
    assert out.num_tokens == 3
    assert dict(zip(CORRECTION_SUMS, sums.tolist(), strict=True)) == pytest.approx(
        {"tokens": 5, "ratio": R[0][0] + 1 + R[0][2] + R[1][0] + 1, "tis_capped": 1, "sequences": 2,
         "seq_ratio": RHO[0] + RHO[1], "seq_rejected": 1}
    )
    assert maxima.tolist() == pytest.approx([R[0][0], RHO[0]])
    with pytest.raises(ValueError, match="needs old and rollout log-probs"):
        apply_rollout_correction([attach_log_probs(build_policy_batches(samples[:1], config=None,
                                                                         micro_batch_tokens=16))[0]],
                                 RC(tis_cap=2.0))
