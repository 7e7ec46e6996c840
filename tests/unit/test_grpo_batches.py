"""`train.grpo_step.build_policy_batches` on a hand-made example: exact loss masks, label
alignment of advantages and log-probs, and micro-batch grouping."""

from __future__ import annotations

import pytest
import torch

from megatron_revisual.train.grpo_step import (
    PolicySample,
    attach_log_probs,
    build_policy_batches,
    response_values,
)


def _samples() -> list[PolicySample]:
    t = torch.tensor
    return [
        # prompt [11, 12, 13], response [21, 22]
        PolicySample(prompt_ids=t([11, 12, 13]), response_ids=t([21, 22]), advantage=1.5,
                     old_log_probs=t([-0.1, -0.2])),
        # prompt [31, 32], response [41, 42, 43]
        PolicySample(prompt_ids=t([31, 32]), response_ids=t([41, 42, 43]), advantage=-0.5,
                     old_log_probs=t([-1.0, -2.0, -3.0])),
        PolicySample(prompt_ids=t([51]), response_ids=t([61]), advantage=2.0,
                     old_log_probs=t([-4.0])),
    ]


def test_one_row_masks_and_alignment():
    (mb,) = build_policy_batches(_samples()[:2], config=None, micro_batch_tokens=10, pad_to_multiple_of=4)
    p = mb.packed
    # row: 11 12 13 21 22 | 31 32 41 42 43 | pad pad (12 = 10 padded to a multiple of 4)
    assert p.input_ids[0].tolist() == [11, 12, 13, 21, 22, 31, 32, 41, 42, 43, 0, 0]
    assert p.labels[0].tolist() == [12, 13, 21, 22, 0, 32, 41, 42, 43, 0, 0, 0]
    # only positions predicting a response token carry loss: 2, 3 (-> 21, 22) and 6, 7, 8
    assert p.loss_mask[0].tolist() == [0, 0, 1, 1, 0, 0, 1, 1, 1, 0, 0, 0]
    assert mb.advantages[0].tolist() == [0, 0, 1.5, 1.5, 0, 0, -0.5, -0.5, -0.5, 0, 0, 0]
    assert mb.old_log_probs[0].tolist() == pytest.approx([0, 0, -0.1, -0.2, 0, 0, -1, -2, -3, 0, 0, 0])
    assert mb.ref_log_probs is None
    assert mb.sequence_index[0].tolist() == [-1, -1, 0, 0, -1, -1, 1, 1, 1, -1, -1, -1]
    assert (mb.num_tokens, mb.num_sequences, mb.sample_index) == (5, 2, (0, 1))
    # the label at every loss position is the response token whose log-prob sits there
    assert p.labels[0][p.loss_mask[0].bool()].tolist() == [21, 22, 41, 42, 43]
    back = response_values([mb], [mb.old_log_probs])
    assert back[1].tolist() == [-1.0, -2.0, -3.0]


def test_grouping_by_tokens_and_by_size():
    by_tokens = build_policy_batches(_samples(), config=None, micro_batch_tokens=6)
    assert [mb.sample_index for mb in by_tokens] == [(0,), (1,), (2,)]  # 5 + 5 > 6, 5 + 2 > 6
    by_tokens = build_policy_batches(_samples(), config=None, micro_batch_tokens=7)
    assert [mb.sample_index for mb in by_tokens] == [(0,), (1, 2)]
    # row 31 32 41 42 43 | 51 61: loss at 1, 2, 3 and 5 (51 predicts 61)
    assert by_tokens[1].advantages[0].tolist() == [0, -0.5, -0.5, -0.5, 0, 2.0, 0]
    by_size = build_policy_batches(_samples(), config=None, micro_batch_size=2)
    assert [mb.sample_index for mb in by_size] == [(0, 1), (2,)]
    with pytest.raises(ValueError, match="sample 0 has 5 tokens"):
        build_policy_batches(_samples(), config=None, micro_batch_tokens=4)
    with pytest.raises(ValueError, match="exactly one"):
        build_policy_batches(_samples(), config=None)


def test_attach_and_bad_input():
    (mb,) = build_policy_batches(_samples(), config=None, micro_batch_size=3)
    ref = torch.arange(mb.row_length, dtype=torch.float32).unsqueeze(0)
    (with_ref,) = attach_log_probs([mb], ref=[ref])
    assert torch.equal(with_ref.ref_log_probs, ref) and torch.equal(with_ref.old_log_probs, mb.old_log_probs)
    bad = PolicySample(prompt_ids=torch.tensor([1]), response_ids=torch.tensor([2, 3]), advantage=0.0,
                       old_log_probs=torch.tensor([0.0]))
    with pytest.raises(ValueError, match="old_log_probs has 1 entries for 2 response tokens"):
        build_policy_batches([bad], config=None, micro_batch_size=1)
