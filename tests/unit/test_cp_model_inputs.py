"""What Megatron-Core's THD rope does under context parallelism, and what we refuse.

`_apply_rotary_pos_emb_thd` reads only `cp_group.size()` / `cp_group.rank()`, so a stub group
stands in for each CP rank here (no processes). Finding: given frequencies for the WHOLE padded
packed row, it rotates rank r's tokens (chunks r and 2cp-1-r of every sequence, our
`cp_rank_indices` order) with exactly those tokens' rows; given the frequencies Megatron's
`MultimodalRotaryEmbedding` hands it under CP (sliced as if the row were one sequence) it does not,
which is why the model uses `FullRowMRoPE` (checked against megatron-core 0.19.2).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from megatron.core.models.common.embeddings.rope_utils import (
    _apply_rotary_pos_emb_bshd,
    _apply_rotary_pos_emb_thd,
)
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_revisual.models.qwen25_vl.packed_attention import FullRowMRoPE, check_packed_mrope
from megatron_revisual.parallel.context_parallel import cp_rank_indices, cp_unsplit

CP = 2


@dataclasses.dataclass
class _Group:
    """The two methods of a process group the rope reads."""

    world: int
    me: int

    def size(self) -> int:
        return self.world

    def rank(self) -> int:
        return self.me


def _row(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    cu = torch.tensor([0, 8, 12, 24], dtype=torch.int32)  # every segment a multiple of 2 * CP
    total, heads, dim = int(cu[-1]), 2, 8
    q = torch.randn(total, heads, dim, generator=gen)
    # per-token angles that are NOT a function of the index within a sequence (as for images)
    freqs = torch.rand(total, 1, 1, dim, generator=gen) * 6.0
    return cu, q, freqs


def test_thd_rope_with_full_row_freqs_rotates_each_cp_rank_with_its_own_rows():
    cu, q, freqs = _row()
    full = _apply_rotary_pos_emb_bshd(q.unsqueeze(1), freqs).squeeze(1)  # per-token reference
    assert torch.equal(_apply_rotary_pos_emb_thd(q, cu, freqs, cp_group=_Group(1, 0)), full)
    parts = []
    for rank in range(CP):
        idx = cp_rank_indices(cu, CP, rank)
        got = _apply_rotary_pos_emb_thd(q[idx], cu, freqs, cp_group=_Group(CP, rank))
        assert torch.equal(got, full[idx])
        parts.append(got)
    assert torch.equal(cp_unsplit(parts, cu, CP, seq_dim=0), full)


def test_megatrons_mrope_slices_under_cp_and_full_row_mrope_does_not(monkeypatch):
    """Why `FullRowMRoPE` exists. Megatron-Core's `MultimodalRotaryEmbedding` slices its output
    for the CP rank as if the packed row were one sequence; THD rope then rotates with wrong rows.
    When this test's first assertion fails, Megatron no longer slices: delete FullRowMRoPE."""
    from megatron.core.models.common.embeddings import rotary_pos_embedding

    cu, q, _ = _row(1)
    total, dim = int(cu[-1]), q.shape[-1]
    sliced_by_megatron = []

    def slice_for_cp_rank(emb, seq_dim, group):
        # Megatron's get_pos_emb_on_this_cp_rank (its index tensor is pinned memory: GPU only):
        # the row as ONE sequence of 2 * CP chunks, keeping chunks r and 2CP-1-r
        sliced_by_megatron.append(group.rank())
        chunks = emb.view(2 * CP, total // (2 * CP), *emb.shape[1:])
        return chunks[[group.rank(), 2 * CP - 1 - group.rank()]].flatten(0, 1)

    monkeypatch.setattr(rotary_pos_embedding, "get_pos_emb_on_this_cp_rank", slice_for_cp_rank)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: torch.device("cpu"))
    megatron_mrope = rotary_pos_embedding.MultimodalRotaryEmbedding(kv_channels=dim, rotary_percent=1.0)
    full_row_mrope = FullRowMRoPE(
        rotary_pos_embedding.MultimodalRotaryEmbedding(kv_channels=dim, rotary_percent=1.0)
    )
    section = [2, 1, 1]  # t, h, w: dim / 2 frequencies
    # image-like positions: not a function of the index within a sequence
    positions = torch.randint(0, 40, (3, 1, total), generator=torch.Generator().manual_seed(2))
    freqs = megatron_mrope(positions, section)  # CP = 1: every token's row
    assert freqs.shape == (total, 1, 1, dim)
    full = _apply_rotary_pos_emb_bshd(q.unsqueeze(1), freqs).squeeze(1)
    for rank in range(CP):
        idx = cp_rank_indices(cu, CP, rank)
        group = _Group(CP, rank)
        ours = full_row_mrope(positions, section, cp_group=group)
        assert torch.equal(ours, freqs)
        assert torch.equal(_apply_rotary_pos_emb_thd(q[idx], cu, ours, cp_group=group), full[idx])
        theirs = megatron_mrope(positions, section, cp_group=group)
        assert sliced_by_megatron == [rank]
        assert theirs.shape[0] == total // CP
        wrong = _apply_rotary_pos_emb_thd(q[idx], cu, theirs, cp_group=group)
        assert (wrong - full[idx]).abs().max() > 0.1
        sliced_by_megatron.clear()


def _config(**kw) -> TransformerConfig:
    return TransformerConfig(num_layers=1, hidden_size=16, num_attention_heads=2, attention_dropout=0.0,
                             hidden_dropout=0.0, use_cpu_initialization=True, **kw)


def test_check_packed_mrope_under_context_parallelism():
    cu, cu_pad = torch.tensor([0, 5, 10], dtype=torch.int32), torch.tensor([0, 8, 12], dtype=torch.int32)
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                             cu_seqlens_q_padded=cu_pad, cu_seqlens_kv_padded=cu_pad,
                             max_seqlen_q=8, max_seqlen_kv=8)
    config = _config(mrope_section=[2, 1, 1], context_parallel_size=CP)
    check_packed_mrope(config, torch.zeros(3, 1, 12, dtype=torch.long), params)  # the full row
    with pytest.raises(ValueError, match=r"must be \[3, 1, 12\] .*every CP rank.* got \(3, 1, 6\)"):
        check_packed_mrope(config, torch.zeros(3, 1, 6, dtype=torch.long), params)  # a rank's share
    unpadded = dataclasses.replace(params, cu_seqlens_q_padded=None, cu_seqlens_kv_padded=None)
    with pytest.raises(ValueError, match=r"multiple of 2 \* cp = 4; got segment lengths \[5, 5\]"):
        check_packed_mrope(config, torch.zeros(3, 1, 10, dtype=torch.long), unpadded)
    with pytest.raises(ValueError, match="dynamic CP"):
        check_packed_mrope(config, torch.zeros(3, 1, 12, dtype=torch.long),
                           dataclasses.replace(params, cp_group=object()))
    with pytest.raises(ValueError, match="apply_rope_fusion"):
        check_packed_mrope(dataclasses.replace(config, apply_rope_fusion=True),
                           torch.zeros(3, 1, 12, dtype=torch.long), params)
    # plain rope: Megatron restarts positions per sequence unless max_seqlen * cp == the row,
    # as for two sequences of equal padded length 8 at CP=2 (the rope then numbers the second
    # sequence 8..15)
    plain = _config(context_parallel_size=CP)
    check_packed_mrope(plain, torch.zeros(1, 12, dtype=torch.long), params)  # 8 * 2 != 12
    two = torch.tensor([0, 8, 16], dtype=torch.int32)
    equal = dataclasses.replace(params, cu_seqlens_q_padded=two, cu_seqlens_kv_padded=two)
    with pytest.raises(ValueError, match=r"max_seqlen \* cp = 16 equals"):
        check_packed_mrope(plain, torch.zeros(1, 16, dtype=torch.long), equal)
    check_packed_mrope(plain, torch.zeros(1, 16, dtype=torch.long),
                       dataclasses.replace(equal, max_seqlen_q=9, max_seqlen_kv=9))
