"""Causal core attention for the language model on the local (non-Transformer-Engine) spec:
padded batches, and packed (THD) rows where each sequence attends only to itself.

A packed row is batch 1 holding sequences back to back, bounded by
`packed_seq_params.cu_seqlens_q` (or `cu_seqlens_q_padded` when sequences carry padding at their
end, e.g. for the context-parallel split or to make the row divisible for sequence
parallelism). Each segment is one causal `scaled_dot_product_attention` call, so the work is
sum(L_i^2), not T^2, and a token never sees another sequence. Padding sits after a segment's
real tokens, so causality alone keeps real tokens from attending to it.

Rotary embeddings under packing (why `qkv_format="thd"` is exact for M-RoPE here)
----------------------------------------------------------------------------------
Megatron-Core's GPTModel (0.19.2) builds M-RoPE frequencies from the per-token position ids
[3, 1, T] (`MultimodalRotaryEmbedding`: one row of frequencies per token, [T, 1, 1, d]), whatever
the packing. The attention then calls `_apply_rotary_pos_emb_thd` with the (padded) cu_seqlens,
which has two cases: when the frequencies cover exactly `cu_seqlens[-1]` tokens it takes
sequence i's rows at offset cu_seqlens[i] (per-token, exact); otherwise it restarts every
sequence at row 0 (1-D rope, wrong for images). With `position_ids.shape[-1] ==
cu_seqlens_padded[-1]` we are always in the exact case, and `check_packed_mrope` enforces it,
plus `apply_rope_fusion=False` (with fusion Megatron hands THD rope to Transformer Engine's
kernel instead of the offset-aware case above). So the same PackedSeqParams (qkv_format "thd")
serves this attention and Transformer Engine's THD attention on GPU, without the vision tower's
trick of calling the packed row "sbhd".

Context parallelism (CP > 1, THD only). The exact case is CP-aware: on CP rank r it splits the
rank's tokens into per-sequence runs of L_i / cp (L_i from the padded cu_seqlens) and gives
sequence i the frequency rows cu[i] + [r*c, (r+1)*c) and cu[i] + [L_i - (r+1)*c, L_i - r*c)
(c = L_i / (2 cp)): exactly chunks r and 2cp-1-r, the rows `parallel.context_parallel.
cp_rank_indices` selects -- PROVIDED the frequencies still cover the whole padded row
(freqs.size(0) == cu_seqlens_padded[-1]). `MultimodalRotaryEmbedding.forward`, however, slices
its output with `get_pos_emb_on_this_cp_rank` whenever its CP group has more than one rank (the
padded-batch rule, as if the row were one sequence); the [T / cp] rows left then fall into the
restart case: wrong. `FullRowMRoPE` is that module without the slice, so under CP every rank
computes the full row's frequencies from the full position ids and the attention picks its rows.
megatron-core 0.19.2 still slices; tests/unit/test_cp_model_inputs.py says when it stops.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from megatron.core.models.common.embeddings.rotary_pos_embedding import MultimodalRotaryEmbedding
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

# Megatron's local softmax fills masked scores with this value (not -inf), so a fully masked
# row gets uniform weights instead of NaN; kept for explicit masks.
_MASKED_SCORE = -10000.0


def segment_bounds(packed_seq_params: PackedSeqParams) -> list[int]:
    """The segment boundaries attention and rope use: the padded cu_seqlens when given."""
    cu = packed_seq_params.cu_seqlens_q_padded
    if cu is None:
        cu = packed_seq_params.cu_seqlens_q
    if cu is None:
        raise ValueError("packed_seq_params carries neither cu_seqlens_q nor cu_seqlens_q_padded")
    return [int(b) for b in cu.tolist()]


class PackedCausalAttention(MegatronModule):
    """Causal softmax attention with GQA, for padded batches and packed rows.

    Drop-in for Megatron's core attention (`DotProductAttention` signature). Without
    packed_seq_params it attends causally over each row, or with `attention_mask` (bool
    [b, 1, sq, sk], True = masked) exactly as given, as Megatron's local attention does.
    With packed_seq_params (qkv_format "thd": [t, heads, d]; "sbhd": [t, 1, heads, d]) it attends
    causally within each segment of the cu_seqlens.
    """

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection=None,
    ) -> None:
        super().__init__(config=config)
        if attn_mask_type is not AttnMaskType.causal:
            raise ValueError(f"the language model's attention is causal; got attn_mask_type={attn_mask_type}")
        dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        if dropout:
            raise ValueError(f"attention_dropout={dropout}: Qwen2.5-VL trains without attention dropout")
        if config.softmax_type != "vanilla":
            raise ValueError(f"softmax_type={config.softmax_type!r} is not supported; use 'vanilla'")
        self.layer_number = layer_number
        self.softmax_scale = softmax_scale or 1.0 / math.sqrt(config.kv_channels)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: torch.Tensor | None = None,
        packed_seq_params: PackedSeqParams | None = None,
    ) -> torch.Tensor:
        """query [s, b, heads, d], key/value [s, b, groups, d] (thd: no b) -> [s, b, heads*d]."""
        if attention_bias is not None:
            raise ValueError("attention_bias is not supported by PackedCausalAttention")
        cp = self.config.context_parallel_size > 1
        if cp and packed_seq_params is None:
            raise NotImplementedError("context parallelism takes packed THD rows")
        if packed_seq_params is None:
            return self._padded(query, key, value, attention_mask)
        if attention_mask is not None:
            raise ValueError("a packed row takes its segments from cu_seqlens, not an attention_mask")
        if query.dim() == 3:  # thd: Megatron squeezed the dummy batch dimension
            query, key, value = (t.unsqueeze(1) for t in (query, key, value))
        tokens, batch = query.shape[:2]
        if batch != 1:
            raise ValueError(f"a packed row has batch 1, got {batch}")
        bounds = segment_bounds(packed_seq_params)
        if cp:
            return self._context_parallel(query, key, value, bounds)
        if bounds[0] != 0 or bounds[-1] != tokens:
            raise ValueError(f"cu_seqlens {bounds} do not cover the {tokens} packed tokens")
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [1, heads, t, d]
        # Each segment's output goes back to [L, 1, heads, d] before the one concatenating copy,
        # so the result is already in Megatron's [t, 1, heads * d] layout.
        out = torch.cat(
            [
                F.scaled_dot_product_attention(
                    q[:, :, s:e], k[:, :, s:e], v[:, :, s:e],
                    is_causal=True, scale=self.softmax_scale, enable_gqa=True,
                ).permute(2, 0, 1, 3)
                for s, e in zip(bounds[:-1], bounds[1:], strict=True)
                if e > s
            ],
            dim=0,
        )
        return out.view(tokens, 1, -1)

    def _context_parallel(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, bounds: list[int]
    ) -> torch.Tensor:
        """CP rank r holds chunks r and 2cp-1-r of every sequence (`cp_rank_indices` order). Keys
        and values of the whole row are all-gathered over the CP group (their gradients summed
        back to their owners) and put in row order; each sequence's local queries then attend to
        the sequence's keys at positions <= their own. Exact, not fast: every rank holds the whole
        row's K/V (Transformer Engine's p2p ring on GPU exchanges them chunk by chunk instead)."""
        from megatron.core import parallel_state as ps

        from megatron_revisual.parallel.context_parallel import (
            all_gather_cp,
            cp_rank_indices,
            cp_unsplit,
        )

        group = ps.get_context_parallel_group()
        cp, rank = ps.get_context_parallel_world_size(), ps.get_context_parallel_rank()
        tokens = query.shape[0]
        if bounds[0] != 0 or bounds[-1] != tokens * cp:
            raise ValueError(f"cu_seqlens {bounds} do not cover {cp} CP ranks x {tokens} tokens")
        k_row, v_row = (cp_unsplit(all_gather_cp(t, group, replicated=False).chunk(cp), bounds, cp, seq_dim=0)
                        for t in (key, value))
        mine = cp_rank_indices(bounds, cp, rank).to(query.device)
        outs, done = [], 0
        for s, e in zip(bounds[:-1], bounds[1:], strict=True):
            n = (e - s) // cp
            if n == 0:
                continue
            where = mine[done:done + n]
            allowed = torch.arange(s, e, device=query.device).unsqueeze(0) <= where.unsqueeze(1)  # [n, L]
            q = query[done:done + n].permute(1, 2, 0, 3)  # [1, heads, n, d]
            k, v = (t[s:e].permute(1, 2, 0, 3) for t in (k_row, v_row))
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=self.softmax_scale, enable_gqa=True)
            outs.append(out.permute(2, 0, 1, 3))
            done += n
        return torch.cat(outs, dim=0).reshape(tokens, 1, -1)

    def _padded(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        sq, b = query.shape[:2]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, heads, s, d]
        if mask is None:
            out = F.scaled_dot_product_attention(
                q, k, v, is_causal=sq > 1, scale=self.softmax_scale, enable_gqa=True
            )
        else:
            bias = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill(mask, _MASKED_SCORE)
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=bias, scale=self.softmax_scale, enable_gqa=True
            )
        return out.permute(2, 0, 1, 3).reshape(sq, b, -1)


class FullRowMRoPE(torch.nn.Module):
    """Megatron's `MultimodalRotaryEmbedding` without its per-CP-rank slice: [T, 1, 1, d]
    frequencies for every token of the full packed row (see the module docstring).

    Wraps the module GPTModel built (it has no parameters or buffers, so no state-dict name
    changes) and ignores the `cp_group` GPTModel passes; `check_packed_mrope` refuses a
    `packed_seq_params.cp_group`, which would make the attention use another group anyway.
    """

    def __init__(self, inner: MultimodalRotaryEmbedding) -> None:
        super().__init__()
        self.inner = inner
        self.inner.cp_group = None  # its forward falls back to this group when given none

    def forward(
        self, position_ids: torch.Tensor, mrope_section: list[int], cp_group=None
    ) -> torch.Tensor:
        return self.inner(position_ids, mrope_section, cp_group=None)


def check_packed_mrope(
    config: TransformerConfig, position_ids: torch.Tensor, packed_seq_params: PackedSeqParams | None
) -> None:
    """Refuse packed inputs for which Megatron would silently apply wrong rotary positions (see
    the module docstring): M-RoPE frequencies must cover exactly the padded packed row, and under
    CP every segment must split into 2 * cp equal chunks."""
    if packed_seq_params is None or packed_seq_params.qkv_format != "thd":
        return
    cp = config.context_parallel_size
    bounds = segment_bounds(packed_seq_params)
    total = bounds[-1]
    if cp > 1:
        lengths = [e - s for s, e in zip(bounds[:-1], bounds[1:], strict=True)]
        bad = [n for n in lengths if n % (2 * cp)]
        if bad:
            raise ValueError(
                f"context parallelism {cp} needs every packed segment to be a multiple of 2 * cp = "
                f"{2 * cp}; got segment lengths {lengths} (pack with cp_size={cp})"
            )
        if packed_seq_params.cp_group is not None:
            # TE attention would switch to that group while the rope keeps the model's CP group.
            raise ValueError("packed_seq_params.cp_group (dynamic CP) is not supported")
    if config.mrope_section is None:
        # Plain rope numbers every sequence from 0 through Megatron's restart case, unless the
        # rope length (max_seqlen * cp) happens to equal the row: then the offset case numbers
        # sequence i from cu[i]. That coincidence needs CP > 1 and several sequences.
        rope_len = max(packed_seq_params.max_seqlen_q or 0, packed_seq_params.max_seqlen_kv or 0) * cp
        if cp > 1 and len(bounds) > 2 and rope_len == total:
            raise ValueError(
                f"max_seqlen * cp = {rope_len} equals the packed row's {total} tokens: Megatron's "
                "THD rope would not restart positions per sequence; raise max_seqlen_q/kv by one"
            )
        return
    if config.apply_rope_fusion:
        raise ValueError(
            "apply_rope_fusion=True sends THD rope to Transformer Engine's fused kernel, not Megatron's "
            "per-token (offset) path that M-RoPE needs: set apply_rope_fusion=False for packed batches"
        )
    if position_ids.dim() != 3 or position_ids.shape[1] != 1 or position_ids.shape[-1] != total:
        raise ValueError(
            f"packed M-RoPE position_ids must be [3, 1, {total}] (the padded packed row"
            f"{', every CP rank' if cp > 1 else ''}), got {tuple(position_ids.shape)}"
        )
