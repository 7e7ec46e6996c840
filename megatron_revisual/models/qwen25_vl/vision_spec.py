"""Layer spec of the Qwen2.5-VL vision tower, and the attention that keeps tokens in their window.

A vision layer is a Megatron-Core `TransformerLayer`: RMSNorm -> SelfAttention (fused QKV with
bias, 2D rope, bidirectional) -> RMSNorm -> SwiGLU MLP with bias. Which tokens may attend to
which comes from `PackedSeqParams.cu_seqlens_q`: windows for windowed layers, whole frames for
full-attention layers (the tower builds both and hands each layer its own).

The sequence stays in `sbhd` layout ([tokens, 1, heads, head_dim]) rather than `thd`: Megatron
applies rope per `thd` sequence and, under context parallelism, slices positions per CP rank,
while the vision tower runs whole on every rank with per-token 2D rope angles.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import (
    TransformerLayer,
    TransformerLayerSubmodules,
)

from megatron_revisual.parallel.norm import RMSNorm

AttentionBackend = Literal["local", "transformer_engine"]


class SegmentedDotProductAttention(MegatronModule):
    """Bidirectional softmax attention within each segment of `packed_seq_params.cu_seqlens_q`.

    Takes Megatron's core-attention constructor and call signature, so it drops into a
    `SelfAttention` spec. Each segment (a window or a frame) is one `scaled_dot_product_attention`
    call, as Hugging Face's non-flash path does, so memory grows with the segment, not with the
    square of all tokens. Plain torch: runs on CPU and GPU alike, without a fused varlen kernel.
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
        if attn_mask_type is not AttnMaskType.no_mask:
            raise ValueError(
                f"vision attention is bidirectional within segments; got attn_mask_type={attn_mask_type}"
            )
        dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        if dropout:
            raise ValueError(
                f"attention_dropout={dropout}: the Qwen2.5-VL vision tower has no attention dropout"
            )
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
        """query, key, value: [tokens, 1, heads_per_rank, head_dim] -> [tokens, 1, heads*head_dim]."""
        if packed_seq_params is None or packed_seq_params.cu_seqlens_q is None:
            raise ValueError("vision attention needs packed_seq_params.cu_seqlens_q (segment bounds)")
        if attention_mask is not None or attention_bias is not None:
            raise ValueError("vision attention takes its segments from cu_seqlens, not a mask or bias")
        tokens, batch = query.shape[:2]
        if batch != 1:
            raise ValueError(f"vision attention expects one packed sequence (batch 1), got {batch}")
        bounds = packed_seq_params.cu_seqlens_q.tolist()
        if bounds[0] != 0 or bounds[-1] != tokens:
            raise ValueError(f"cu_seqlens {bounds[:3]}...{bounds[-1:]} do not cover {tokens} tokens")
        # [1, heads, tokens, head_dim], the layout scaled_dot_product_attention expects
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        out = torch.cat(
            [
                F.scaled_dot_product_attention(
                    q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], scale=self.softmax_scale
                )
                for s, e in zip(bounds[:-1], bounds[1:], strict=True)
            ],
            dim=2,
        )
        return out.permute(2, 0, 1, 3).reshape(tokens, 1, -1)


def vision_core_attention(backend: AttentionBackend = "local") -> type:
    """The core-attention module of the vision layers: the one place a fused kernel plugs in."""
    if backend == "local":
        return SegmentedDotProductAttention
    if backend == "transformer_engine":
        raise NotImplementedError(
            "the vision tower's Transformer Engine attention (THD varlen over the window / frame "
            "cu_seqlens, with rope applied before the CP split) is not built yet; use "
            "backend='local', which runs on GPU too, one SDPA call per window"
        )
    raise ValueError(f"unknown vision attention backend {backend!r}; use 'local' or 'transformer_engine'")


def vision_layer_spec(backend: AttentionBackend = "local") -> ModuleSpec:
    """One vision layer from Megatron-Core's local (non-TE) parallel linears and our RMSNorm."""
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=RMSNorm,
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": AttnMaskType.no_mask},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=ColumnParallelLinear,
                    core_attention=vision_core_attention(backend),
                    linear_proj=RowParallelLinear,
                    q_layernorm=IdentityOp,
                    k_layernorm=IdentityOp,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=RMSNorm,
            mlp=ModuleSpec(
                module=MLP,
                submodules=MLPSubmodules(
                    linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear
                ),
            ),
            mlp_bda=get_bias_dropout_add,
        ),
    )
