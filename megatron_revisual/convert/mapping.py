"""The declarative map between Hugging Face tensors and ours: the rule kinds and their splits.

A model family's table of rules is the family's (`models.qwen25_vl.hf_mapping` for Qwen2.5-VL /
Qwen2), reached through `models.registry`; this module is what every table is made of. A `Rule`
names a Megatron parameter (global layer numbers), the HF tensor(s) it is made of and a
`Kind` saying how the layouts relate. `to_megatron` turns HF tensors into one tensor-parallel
rank's shard; `to_hf` turns the shards of all TP ranks back into the HF tensors. The same table
serves in-memory loading, the converter and streaming weights to the inference engine, for the
local and the Transformer Engine layer specs alike (`te_names` renames the fused norm weights).

Kinds (TP = tensor-parallel size, r = rank):
- REPLICATED: identical on every rank (norms, row-parallel biases).
- COLUMN: split along dim 0 (output features); ROW: split along dim 1 (input features).
- QKV: HF q, k, v -> Megatron's fused linear_qkv, laid out per query group as
  [q heads of group 0, k_0, v_0, q heads of group 1, k_1, v_1, ...]; rank r holds groups
  [r*G/TP, (r+1)*G/TP), a contiguous slice. Weights and biases alike.
- QKV_FUSED: as QKV, but HF stores [q; k; v] in one tensor (the vision tower's `attn.qkv`).
- GATE_UP: HF gate and up -> Megatron linear_fc1 = [gate; up] per rank: rank r holds
  [gate_r; up_r], NOT a contiguous slice of the full [gate; up].
- VOCAB: embedding / output rows, zero-padded to the padded vocabulary, split along dim 0;
  export truncates the padding.
- PATCH: the vision Conv3d kernel [hidden, C, T, P, P] as a linear weight [hidden, C*T*P*P]
  (stride == kernel, so the convolution is exactly this matmul), replicated.
"""

from __future__ import annotations

import dataclasses
import enum
import re
from dataclasses import dataclass

import torch


class Kind(enum.Enum):
    REPLICATED = "replicated"
    COLUMN = "column"
    ROW = "row"
    QKV = "qkv"
    QKV_FUSED = "qkv_fused"
    GATE_UP = "gate_up"
    VOCAB = "vocab"
    PATCH = "patch"


@dataclass(frozen=True)
class AttentionShape:
    num_heads: int
    num_query_groups: int
    head_dim: int


@dataclass(frozen=True)
class MappingContext:
    tp_size: int
    lm: AttentionShape
    vision: AttentionShape | None
    vocab_size: int
    padded_vocab_size: int


@dataclass(frozen=True)
class Rule:
    megatron: str
    hf: tuple[str, ...]
    kind: Kind
    attention: str = "lm"  # which AttentionShape a QKV rule uses: "lm" or "vision"


def padded_vocab_size(vocab_size: int, tp_size: int, divisible_by: int = 128) -> int:
    """Megatron's rule: pad the vocabulary to a multiple of divisible_by x TP."""
    multiple = divisible_by * tp_size
    return -(-vocab_size // multiple) * multiple


def _chunk(t: torch.Tensor, dim: int, tp: int, rank: int, name: str) -> torch.Tensor:
    if t.shape[dim] % tp:
        raise ValueError(f"{name}: dim {dim} of shape {tuple(t.shape)} is not divisible by TP={tp}")
    return t.chunk(tp, dim=dim)[rank].contiguous()


def _qkv_fuse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, a: AttentionShape) -> torch.Tensor:
    """[q; k; v] in HF order -> Megatron's per-group interleave (full, all groups)."""
    g, hd = a.num_query_groups, a.head_dim
    heads_per_group = a.num_heads // g
    tail = q.shape[1:]
    q = q.reshape(g, heads_per_group * hd, *tail)
    k = k.reshape(g, hd, *tail)
    v = v.reshape(g, hd, *tail)
    return torch.cat([q, k, v], dim=1).reshape(-1, *tail)


def _qkv_split(fused: torch.Tensor, a: AttentionShape) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g, hd = a.num_query_groups, a.head_dim
    heads_per_group = a.num_heads // g
    tail = fused.shape[1:]
    per_group = fused.reshape(g, (heads_per_group + 2) * hd, *tail)
    q, k, v = per_group.split([heads_per_group * hd, hd, hd], dim=1)
    return q.reshape(-1, *tail), k.reshape(-1, *tail), v.reshape(-1, *tail)


def _check_shapes(rule: Rule, hf: list[torch.Tensor], ctx: MappingContext) -> None:
    if len(hf) != len(rule.hf):
        raise ValueError(f"{rule.megatron}: expected {len(rule.hf)} HF tensors {rule.hf}, got {len(hf)}")
    if rule.kind in (Kind.QKV, Kind.QKV_FUSED):
        a = _attention(rule, ctx)
        rows = [(a.num_heads + 2 * a.num_query_groups) * a.head_dim]
        if rule.kind is Kind.QKV:
            rows = [a.num_heads * a.head_dim, a.num_query_groups * a.head_dim, a.num_query_groups * a.head_dim]
        for name, t, want in zip(rule.hf, hf, rows, strict=True):
            if t.shape[0] != want:
                raise ValueError(
                    f"{name}: shape {tuple(t.shape)} has {t.shape[0]} rows; expected {want} for "
                    f"{a.num_heads} heads, {a.num_query_groups} query groups of head_dim {a.head_dim}"
                )
    if rule.kind is Kind.VOCAB and hf[0].shape[0] != ctx.vocab_size:
        raise ValueError(f"{rule.hf[0]}: shape {tuple(hf[0].shape)}; expected {ctx.vocab_size} rows (vocab_size)")


def _attention(rule: Rule, ctx: MappingContext) -> AttentionShape:
    a = ctx.lm if rule.attention == "lm" else ctx.vision
    if a is None:
        raise ValueError(f"{rule.megatron}: no {rule.attention} attention shape in the mapping context")
    return a


def to_megatron(rule: Rule, hf: list[torch.Tensor], ctx: MappingContext, tp_rank: int) -> torch.Tensor:
    """This TP rank's shard of the Megatron parameter `rule.megatron` from its HF tensors."""
    _check_shapes(rule, hf, ctx)
    tp, name = ctx.tp_size, rule.megatron
    k = rule.kind
    if k is Kind.REPLICATED:
        return hf[0].clone()
    if k is Kind.PATCH:
        return hf[0].reshape(hf[0].shape[0], -1).clone()
    if k is Kind.COLUMN:
        return _chunk(hf[0], 0, tp, tp_rank, name)
    if k is Kind.ROW:
        return _chunk(hf[0], 1, tp, tp_rank, name)
    if k is Kind.VOCAB:
        t = hf[0]
        pad = ctx.padded_vocab_size - t.shape[0]
        if pad:
            t = torch.cat([t, t.new_zeros(pad, *t.shape[1:])])
        return _chunk(t, 0, tp, tp_rank, name)
    if k is Kind.GATE_UP:
        gate, up = hf
        return torch.cat([_chunk(gate, 0, tp, tp_rank, name), _chunk(up, 0, tp, tp_rank, name)])
    a = _attention(rule, ctx)
    q, kk, v = hf if k is Kind.QKV else _split_hf_fused(hf[0], a)
    if a.num_query_groups % tp:
        raise ValueError(f"{name}: TP={tp} does not divide {a.num_query_groups} query groups")
    return _chunk(_qkv_fuse(q, kk, v, a), 0, tp, tp_rank, name)


def _split_hf_fused(t: torch.Tensor, a: AttentionShape) -> list[torch.Tensor]:
    return list(t.split([a.num_heads * a.head_dim, a.num_query_groups * a.head_dim, a.num_query_groups * a.head_dim]))


def _cat(shards: list[torch.Tensor], dim: int) -> torch.Tensor:
    return shards[0] if len(shards) == 1 else torch.cat(shards, dim=dim)


def to_hf(rule: Rule, shards: list[torch.Tensor], ctx: MappingContext) -> list[torch.Tensor]:
    """The HF tensors of `rule` from the shards of all TP ranks (in rank order)."""
    if len(shards) != ctx.tp_size:
        raise ValueError(f"{rule.megatron}: got {len(shards)} shards for TP={ctx.tp_size}")
    k = rule.kind
    if k is Kind.REPLICATED:
        return [shards[0]]
    if k is Kind.PATCH:
        raise ValueError(f"{rule.megatron}: PATCH needs the HF kernel shape; use to_hf_patch")
    # A single shard is returned as a view: a streaming export then holds 1x the largest
    # tensor (the 1 GB embedding of 7B), not 2x.
    if k is Kind.COLUMN:
        return [_cat(shards, 0)]
    if k is Kind.ROW:
        return [_cat(shards, 1)]
    if k is Kind.VOCAB:
        return [_cat(shards, 0)[: ctx.vocab_size]]
    if k is Kind.GATE_UP:
        halves = [s.chunk(2, dim=0) for s in shards]
        return [torch.cat([h[0] for h in halves]), torch.cat([h[1] for h in halves])]
    q, kk, v = _qkv_split(torch.cat(shards, dim=0), _attention(rule, ctx))
    return [q, kk, v] if k is Kind.QKV else [torch.cat([q, kk, v])]


def to_hf_patch(weight: torch.Tensor, in_channels: int, temporal_patch: int, patch: int) -> torch.Tensor:
    return weight.reshape(weight.shape[0], in_channels, temporal_patch, patch, patch)


# Transformer Engine's spec fuses each pre-norm into the linear after it (LayerNormLinear), so
# the norm weight lives in that module; layouts are unchanged, only names move. Language-model
# layers only: the vision tower keeps its own spec on every backend.
TE_LANGUAGE_LAYER_RENAMES = {
    "input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
    "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight",
}
_LANGUAGE_LAYER = re.compile(r"^(language_model\.decoder\.layers\.\d+)\.(.+)$")


def te_names(rules: list[Rule]) -> list[Rule]:
    """`rules` (local-spec names) with the Megatron names the Transformer Engine spec gives."""
    renamed = []
    for rule in rules:
        match = _LANGUAGE_LAYER.match(rule.megatron)
        if match and match.group(2) in TE_LANGUAGE_LAYER_RENAMES:
            rule = dataclasses.replace(rule, megatron=f"{match.group(1)}.{TE_LANGUAGE_LAYER_RENAMES[match.group(2)]}")
        renamed.append(rule)
    return renamed
