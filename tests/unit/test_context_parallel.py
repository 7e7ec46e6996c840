"""Context-parallel split / un-split: exact round trips, hand-checked indices, Megatron parity."""

from __future__ import annotations

import pytest
import torch

from megatron_revisual.parallel.context_parallel import (
    cp_rank_indices,
    cp_split,
    cp_split_bshd,
    cp_unsplit,
    cp_unsplit_bshd,
    pad_for_cp,
    pad_packed,
    unpad_packed,
)

# packed layouts (sequence lengths), odd ones included so that padding is needed
LAYOUTS = [[8, 4], [5], [7, 1, 12, 3], [1, 1, 1], [17, 30, 9, 2, 11]]


def test_pad_for_cp_rounds_each_sequence_up():
    padded, cu = pad_for_cp([5, 8, 1, 0], cp_size=2)
    assert padded.tolist() == [8, 8, 4, 0]
    assert cu.tolist() == [0, 8, 16, 20, 20] and cu.dtype == torch.int32
    assert pad_for_cp([5, 8], cp_size=1)[0].tolist() == [5, 8]  # no split, no padding
    assert pad_for_cp([5, 8], cp_size=2, tp_size=2)[0].tolist() == [8, 8]
    assert pad_for_cp([9], cp_size=2, tp_size=2)[0].tolist() == [16]
    assert pad_for_cp([3], cp_size=1, tp_size=4)[0].tolist() == [4]


def test_hand_computed_indices_cp2_two_sequences():
    # lengths 8 and 4 -> 4 chunks each: of 2 tokens in sequence 0, of 1 token in sequence 1
    cu = [0, 8, 12]
    assert cp_rank_indices(cu, 2, 0).tolist() == [0, 1, 6, 7, 8, 11]
    assert cp_rank_indices(cu, 2, 1).tolist() == [2, 3, 4, 5, 9, 10]
    # cp=4, one sequence of 16: rank r holds chunks r and 7 - r of 2 tokens
    assert cp_rank_indices([0, 16], 4, 1).tolist() == [2, 3, 12, 13]
    assert cp_rank_indices([0, 16], 4, 3).tolist() == [6, 7, 8, 9]


@pytest.mark.parametrize("cp_size", [1, 2, 4])
@pytest.mark.parametrize("lengths", LAYOUTS)
def test_packed_round_trip_is_exact(cp_size, lengths):
    gen = torch.Generator().manual_seed(sum(lengths) * 10 + cp_size)
    cu = torch.tensor([0, *lengths]).cumsum(0)
    total = int(cu[-1])
    hidden = torch.randn(total, 1, 6, generator=gen)  # Megatron's [t, b, h]
    tokens = torch.randint(0, 1000, (1, total), generator=gen)

    hidden_pad, cu_pad = pad_packed(hidden, cu, cp_size, seq_dim=0)
    tokens_pad, cu_pad_t = pad_packed(tokens, cu, cp_size, seq_dim=1, value=-1)
    assert torch.equal(cu_pad, cu_pad_t)
    assert (cu_pad.diff() % (2 * cp_size if cp_size > 1 else 1) == 0).all()
    assert (tokens_pad == -1).sum() == int(cu_pad[-1]) - total

    hidden_parts = [cp_split(hidden_pad, cu_pad, cp_size, r, seq_dim=0) for r in range(cp_size)]
    token_parts = [cp_split(tokens_pad, cu_pad, cp_size, r, seq_dim=1) for r in range(cp_size)]
    assert all(p.shape[0] == int(cu_pad[-1]) // cp_size for p in hidden_parts)
    # every padded token is on exactly one rank
    held = torch.cat([cp_rank_indices(cu_pad, cp_size, r) for r in range(cp_size)])
    assert torch.equal(held.sort().values, torch.arange(int(cu_pad[-1])))

    assert torch.equal(
        unpad_packed(cp_unsplit(hidden_parts, cu_pad, cp_size, 0), cu, cu_pad, 0), hidden
    )
    assert torch.equal(
        unpad_packed(cp_unsplit(token_parts, cu_pad, cp_size, 1), cu, cu_pad, 1), tokens
    )


@pytest.mark.parametrize("cp_size", [2, 4])
def test_mrope_positions_split_like_tokens(cp_size):
    # token k of sequence i is encoded as 1000 * i + k; its M-RoPE position on axis a is
    # 100 * a + k: after the split, each rank's positions must belong to its tokens
    lengths = [7, 1, 12, 3]
    cu = torch.tensor([0, *lengths]).cumsum(0)
    seq_of = torch.arange(len(lengths)).repeat_interleave(torch.tensor(lengths))
    within = torch.arange(int(cu[-1])) - cu[:-1].repeat_interleave(torch.tensor(lengths))
    tokens = (1000 * seq_of + within).view(1, -1)
    positions = (100 * torch.arange(3).view(3, 1, 1) + within.view(1, 1, -1)).contiguous()

    tokens_pad, cu_pad = pad_packed(tokens, cu, cp_size, seq_dim=1, value=-1)
    positions_pad, _ = pad_packed(positions, cu, cp_size, seq_dim=-1, value=-1)
    for rank in range(cp_size):
        tok = cp_split(tokens_pad, cu_pad, cp_size, rank, seq_dim=1)
        pos = cp_split(positions_pad, cu_pad, cp_size, rank, seq_dim=-1)
        assert pos.shape == (3, 1, int(cu_pad[-1]) // cp_size)
        real = tok[0] >= 0
        for axis in range(3):
            assert torch.equal(pos[axis, 0, real], 100 * axis + tok[0, real] % 1000)
        assert (pos[:, 0, ~real] == -1).all()
        # and the indices say the same
        index = cp_rank_indices(cu_pad, cp_size, rank)
        assert torch.equal(pos, positions_pad[..., index])


@pytest.mark.filterwarnings("ignore:Transformer Engine and Apex are not installed")
@pytest.mark.parametrize("cp_size", [1, 2, 4])
def test_bshd_equals_megatron_get_batch_on_this_cp_rank(cp_size, monkeypatch):
    from megatron.core import utils

    gen = torch.Generator().manual_seed(cp_size)
    b, s = 3, 8 * cp_size
    batch = {
        "tokens": torch.randint(0, 100, (b, s), generator=gen),
        "labels": torch.randint(0, 100, (b, s), generator=gen),
        "position_ids": torch.arange(s).expand(b, s).contiguous(),
        "attention_mask": torch.rand(b, 1, s, s, generator=gen) > 0.5,
    }
    # Megatron asks the CP group it is given for its size and rank: a stand-in group answers.
    cp_group = object()

    def size_of(group: object) -> int:
        assert group is cp_group
        return cp_size

    monkeypatch.setattr(torch.distributed, "get_world_size", size_of)
    for rank in range(cp_size):
        monkeypatch.setattr(torch.distributed, "get_rank", lambda group, r=rank: r)
        want = utils.get_batch_on_this_cp_rank(
            {k: v.clone() for k, v in batch.items()}, is_hybrid_cp=False, cp_group=cp_group
        )
        for key, value in batch.items():
            seq_dim = 2 if key == "attention_mask" else 1
            assert torch.equal(cp_split_bshd(value, cp_size, rank, seq_dim), want[key]), key
    # un-split inverts it, also for M-RoPE [3, b, s] positions split on the last dim
    mrope = torch.randint(0, 50, (3, b, s), generator=gen)
    parts = [cp_split_bshd(mrope, cp_size, r, seq_dim=-1) for r in range(cp_size)]
    assert torch.equal(cp_unsplit_bshd(parts, cp_size, seq_dim=-1), mrope)


def test_errors_name_the_numbers():
    with pytest.raises(ValueError, match=r"lengths \[5\].*2 \* cp_size = 4"):
        cp_rank_indices([0, 8, 13], 2, 0)
    with pytest.raises(ValueError, match="cp_rank=2 outside"):
        cp_rank_indices([0, 8], 2, 2)
    with pytest.raises(ValueError, match="has 7 tokens"):
        cp_split(torch.zeros(1, 7), [0, 8], 2, 0, seq_dim=1)
    with pytest.raises(ValueError, match="expected 4"):
        cp_unsplit([torch.zeros(4), torch.zeros(3)], [0, 8], 2, seq_dim=0)
