"""PackedCausalAttention against an explicit softmax(QK^T) reference: causal within each packed
segment with GQA, padding invisible to real tokens, and the padded-batch path."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_revisual.models.qwen25_vl.packed_attention import (
    PackedCausalAttention,
    check_packed_mrope,
)

HEADS, GROUPS, DIM = 4, 2, 8


def _config(**kw) -> TransformerConfig:
    return TransformerConfig(num_layers=1, hidden_size=HEADS * DIM, num_attention_heads=HEADS,
                             num_query_groups=GROUPS, attention_dropout=0.0, hidden_dropout=0.0,
                             use_cpu_initialization=True, **kw)


def _attention() -> PackedCausalAttention:
    return PackedCausalAttention(_config(), 1, AttnMaskType.causal, "self")


def _reference(q, k, v, allowed):
    """q [t, H, d], k/v [t, G, d], allowed [t, t] bool -> [t, H*d] (float64)."""
    rep = HEADS // GROUPS
    k, v = k.repeat_interleave(rep, 1).double(), v.repeat_interleave(rep, 1).double()
    scores = torch.einsum("qhd,khd->hqk", q.double(), k) / DIM**0.5
    probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
    return torch.einsum("hqk,khd->qhd", probs, v).reshape(q.shape[0], -1)


def _qkv(t, gen):
    return (torch.randn(t, HEADS, DIM, generator=gen), torch.randn(t, GROUPS, DIM, generator=gen),
            torch.randn(t, GROUPS, DIM, generator=gen))


def test_packed_segments_are_causal_and_separate():
    gen = torch.Generator().manual_seed(0)
    bounds = [0, 5, 6, 13, 20]
    q, k, v = _qkv(20, gen)
    seg = torch.zeros(20, dtype=torch.long)
    for i, (s, e) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        seg[s:e] = i
    idx = torch.arange(20)
    allowed = (seg[:, None] == seg[None, :]) & (idx[None, :] <= idx[:, None])
    cu = torch.tensor(bounds, dtype=torch.int32)
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu)
    out = _attention()(q, k, v, None, packed_seq_params=params)
    assert out.shape == (20, 1, HEADS * DIM)
    assert (out[:, 0].double() - _reference(q, k, v, allowed)).abs().max() < 1e-5
    # the sbhd layout ([t, 1, heads, d], as the vision tower passes it) gives the same result
    sbhd = _attention()(q[:, None], k[:, None], v[:, None], None,
                        packed_seq_params=dataclasses.replace(params, qkv_format="sbhd"))
    assert torch.equal(sbhd, out)


def test_padding_after_each_sequence_is_not_attended():
    gen = torch.Generator().manual_seed(1)
    real, padded = [0, 3, 8], [0, 4, 12]  # sequence 0: 3 real + 1 pad; sequence 1: 5 real + 3 pad
    params = PackedSeqParams(
        qkv_format="thd",
        cu_seqlens_q=torch.tensor(real, dtype=torch.int32), cu_seqlens_kv=torch.tensor(real, dtype=torch.int32),
        cu_seqlens_q_padded=torch.tensor(padded, dtype=torch.int32),
        cu_seqlens_kv_padded=torch.tensor(padded, dtype=torch.int32),
    )
    q, k, v = _qkv(12, gen)
    real_rows = torch.tensor([0, 1, 2, 4, 5, 6, 7, 8])
    out = _attention()(q, k, v, None, packed_seq_params=params)[:, 0]
    # garbage in the padding slots does not reach real tokens
    noisy = [t.clone() for t in (q, k, v)]
    for t in noisy:
        t[[3, 9, 10, 11]] = 1e3
    out_noisy = _attention()(*noisy, None, packed_seq_params=params)[:, 0]
    assert torch.equal(out[real_rows], out_noisy[real_rows])
    # and the real tokens equal each unpadded sequence on its own
    for s, e in ((0, 3), (4, 9)):
        alone = _attention()(q[s:e], k[s:e], v[s:e], None, packed_seq_params=PackedSeqParams(
            qkv_format="thd", cu_seqlens_q=torch.tensor([0, e - s], dtype=torch.int32)))[:, 0]
        assert (alone - out[s:e]).abs().max() < 1e-6


def test_padded_batch_causal_and_explicit_mask():
    gen = torch.Generator().manual_seed(2)
    s, b = 7, 3
    q = torch.randn(s, b, HEADS, DIM, generator=gen)
    k, v = (torch.randn(s, b, GROUPS, DIM, generator=gen) for _ in range(2))
    causal = torch.ones(s, s, dtype=torch.bool).tril()
    out = _attention()(q, k, v, None)
    assert out.shape == (s, b, HEADS * DIM)
    for row in range(b):
        want = _reference(q[:, row], k[:, row], v[:, row], causal)
        assert (out[:, row].double() - want).abs().max() < 1e-5
    # an explicit Megatron mask (True = masked) is used as given: here, a sliding window of 2
    window = causal & ~torch.ones(s, s, dtype=torch.bool).tril(-2)
    masked = _attention()(q, k, v, (~window).expand(b, 1, s, s))
    for row in range(b):
        want = _reference(q[:, row], k[:, row], v[:, row], window)
        assert (masked[:, row].double() - want).abs().max() < 1e-5


def test_check_packed_mrope_refuses_positions_megatron_would_restart():
    cu = torch.tensor([0, 4, 10], dtype=torch.int32)
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu)
    config = _config(mrope_section=[2, 1, 1])
    check_packed_mrope(config, torch.zeros(3, 1, 10, dtype=torch.long), params)  # exact case
    with pytest.raises(ValueError, match=r"must be \[3, 1, 10\] .* got \(3, 1, 8\)"):
        check_packed_mrope(config, torch.zeros(3, 1, 8, dtype=torch.long), params)
    with pytest.raises(ValueError, match="apply_rope_fusion"):
        check_packed_mrope(dataclasses.replace(config, apply_rope_fusion=True),
                           torch.zeros(3, 1, 10, dtype=torch.long), params)
    with pytest.raises(ValueError, match="attn_mask_type"):
        PackedCausalAttention(_config(), 1, AttnMaskType.no_mask, "self")
