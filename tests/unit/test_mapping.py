"""The declarative HF <-> Megatron mapping: layouts by hand, round trips at every TP, coverage."""

import pytest
import torch

from megatron_revisual.convert.mapping import (
    AttentionShape,
    Kind,
    MappingContext,
    Rule,
    padded_vocab_size,
    to_hf,
    to_hf_patch,
    to_megatron,
)
from megatron_revisual.models.qwen25_vl.hf_mapping import qwen25_vl_rules


def ctx(tp: int, *, heads=4, groups=2, head_dim=2, vocab=10, padded=None) -> MappingContext:
    return MappingContext(
        tp_size=tp,
        lm=AttentionShape(heads, groups, head_dim),
        vision=AttentionShape(2, 2, 2),
        vocab_size=vocab,
        padded_vocab_size=padded or padded_vocab_size(vocab, tp, divisible_by=4),
    )


def rows(n: int, cols: int = 1) -> torch.Tensor:
    """Row i is filled with the value i, so layouts can be read off the first column."""
    return torch.arange(n, dtype=torch.float32).unsqueeze(1).expand(n, cols).clone()


def test_qkv_interleave_by_hand():
    # 4 heads in 2 groups, head_dim 2: q rows 0..7, k rows 100..103, v rows 200..203
    q, k, v = rows(8), rows(4) + 100, rows(4) + 200
    rule = Rule("qkv", ("q", "k", "v"), Kind.QKV)
    full = to_megatron(rule, [q, k, v], ctx(1), 0)[:, 0].tolist()
    assert full == [0, 1, 2, 3, 100, 101, 200, 201, 4, 5, 6, 7, 102, 103, 202, 203]
    # TP=2: one query group per rank
    assert to_megatron(rule, [q, k, v], ctx(2), 1)[:, 0].tolist() == [4, 5, 6, 7, 102, 103, 202, 203]


def test_vision_fused_qkv_by_hand():
    # 2 heads = 2 groups, head_dim 2; HF fused [q; k; v]
    fused = rows(12)
    rule = Rule("vqkv", ("qkv",), Kind.QKV_FUSED, "vision")
    assert to_megatron(rule, [fused], ctx(1), 0)[:, 0].tolist() == [0, 1, 4, 5, 8, 9, 2, 3, 6, 7, 10, 11]


def test_gate_up_shards_are_not_contiguous_slices():
    gate, up = rows(4), rows(4) + 10
    rule = Rule("fc1", ("gate", "up"), Kind.GATE_UP)
    assert to_megatron(rule, [gate, up], ctx(2), 0)[:, 0].tolist() == [0, 1, 10, 11]
    assert to_megatron(rule, [gate, up], ctx(2), 1)[:, 0].tolist() == [2, 3, 12, 13]


def test_vocab_padding_and_truncation():
    emb = rows(10, 3)
    rule = Rule("emb", ("e",), Kind.VOCAB)
    c = ctx(2)  # padded to a multiple of 4 x 2 = 8 -> 16
    assert c.padded_vocab_size == 16
    shards = [to_megatron(rule, [emb], c, r) for r in range(2)]
    assert [s.shape[0] for s in shards] == [8, 8]
    assert shards[1][2:].abs().sum() == 0  # rows 10..15 are zero padding
    assert torch.equal(to_hf(rule, shards, c)[0], emb)


@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("kind", list(Kind))
def test_round_trip(kind, tp):
    g = torch.Generator().manual_seed(0)
    heads, groups, head_dim = 8, 4, 2
    c = ctx(tp, heads=heads, groups=groups, head_dim=head_dim)
    if kind is Kind.QKV:
        hf = [torch.randn(heads * head_dim, 6, generator=g), torch.randn(groups * head_dim, 6, generator=g),
              torch.randn(groups * head_dim, 6, generator=g)]
        names = ("q", "k", "v")
    elif kind is Kind.QKV_FUSED:
        c = MappingContext(tp_size=tp, lm=c.lm, vision=AttentionShape(4, 4, 2), vocab_size=10,
                           padded_vocab_size=c.padded_vocab_size)
        hf, names = [torch.randn(3 * 4 * 2, 6, generator=g)], ("qkv",)
    elif kind is Kind.GATE_UP:
        hf, names = [torch.randn(8, 6, generator=g), torch.randn(8, 6, generator=g)], ("gate", "up")
    elif kind is Kind.VOCAB:
        hf, names = [torch.randn(10, 6, generator=g)], ("e",)
    elif kind is Kind.PATCH:
        kernel = torch.randn(5, 3, 2, 4, 4, generator=g)
        w = to_megatron(Rule("p", ("k",), kind), [kernel], c, 0)
        assert w.shape == (5, 96)
        # stride == kernel: the conv over one patch is this matmul over the flattened patch
        patch = torch.randn(3, 2, 4, 4, generator=g)
        conv = torch.nn.functional.conv3d(patch[None], kernel, stride=(2, 4, 4)).flatten()
        torch.testing.assert_close(w @ patch.flatten(), conv, rtol=1e-5, atol=1e-5)
        assert torch.equal(to_hf_patch(w, 3, 2, 4), kernel)
        return
    else:
        hf, names = [torch.randn(8, 8, generator=g)], ("w",)
    rule = Rule("m", names, kind, "vision" if kind is Kind.QKV_FUSED else "lm")
    shards = [to_megatron(rule, hf, c, r) for r in range(tp)]
    back = to_hf(rule, shards, c)
    assert len(back) == len(hf)
    for a, b in zip(back, hf, strict=True):
        assert torch.equal(a, b)


def test_bias_round_trip_1d():
    q, k, v = torch.arange(16.0), torch.arange(8.0) + 100, torch.arange(8.0) + 200
    rule = Rule("b", ("q", "k", "v"), Kind.QKV)
    c = ctx(2, heads=8, groups=4, head_dim=2)
    shards = [to_megatron(rule, [q, k, v], c, r) for r in range(2)]
    assert shards[0].tolist()[:8] == [0, 1, 2, 3, 100, 101, 200, 201]
    assert all(torch.equal(a, b) for a, b in zip(to_hf(rule, shards, c), [q, k, v], strict=True))


def test_bad_shapes_name_the_tensor():
    rule = Rule("qkv", ("q_proj.weight", "k_proj.weight", "v_proj.weight"), Kind.QKV)
    with pytest.raises(ValueError, match=r"k_proj.weight: shape \(6, 3\) has 6 rows; expected 4"):
        to_megatron(rule, [rows(8, 3), rows(6, 3), rows(4, 3)], ctx(1), 0)
    with pytest.raises(ValueError, match="is not divisible by TP=4"):
        to_megatron(Rule("w", ("w",), Kind.COLUMN), [rows(6)], ctx(4, groups=4), 0)


def test_rules_cover_each_hf_name_once():
    rules = qwen25_vl_rules(num_layers=3, vision_depth=2, tie_word_embeddings=True)
    hf = [n for r in rules for n in r.hf]
    meg = [r.megatron for r in rules]
    assert len(hf) == len(set(hf)) and len(meg) == len(set(meg))
    assert "lm_head.weight" not in hf  # tied
    # per LM layer: q,k,v weights + biases, o, gate, up, down, 2 norms = 12; per vision block: 12
    assert len(hf) == 1 + 3 * 12 + 1 + 1 + 2 * 12 + 5
    text = qwen25_vl_rules(num_layers=3, vision_depth=None, tie_word_embeddings=False, text_only=True)
    assert not any(n.startswith("visual.") for r in text for n in r.hf)
    assert text[-1].hf == ("lm_head.weight",)
