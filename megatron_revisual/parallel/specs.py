"""Megatron-Core GPT specs for the local (no Transformer Engine) backend with our RMSNorm.

`get_gpt_layer_local_spec` puts `WrappedTorchNorm` (no sequence parallel) in every norm slot,
and a block built from a bare layer spec gets the same norm as its final norm. These helpers
swap in `RMSNorm` everywhere; pass the block spec to `GPTModel(transformer_layer_spec=...)`.
"""

from __future__ import annotations

import dataclasses

from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_revisual.parallel.norm import RMSNorm


def local_gpt_layer_spec(
    *, qk_layernorm: bool = False, core_attention: type | None = None
) -> ModuleSpec:
    """One transformer layer: local linear/attention modules, RMSNorm in every norm slot.
    `core_attention` replaces Megatron's `DotProductAttention` (which refuses packed rows),
    e.g. `models.qwen25_vl.packed_attention.PackedCausalAttention`."""
    spec = get_gpt_layer_local_spec(normalization="RMSNorm", qk_layernorm=qk_layernorm)
    attention = spec.submodules.self_attention
    qk_norm = RMSNorm if qk_layernorm else IdentityOp
    attention = dataclasses.replace(
        attention,
        submodules=dataclasses.replace(
            attention.submodules,
            q_layernorm=qk_norm,
            k_layernorm=qk_norm,
            core_attention=core_attention or attention.submodules.core_attention,
        ),
    )
    submodules = dataclasses.replace(
        spec.submodules,
        input_layernorm=RMSNorm,
        self_attention=attention,
        pre_mlp_layernorm=RMSNorm,
    )
    return dataclasses.replace(spec, submodules=submodules)


def local_gpt_block_spec(
    config: TransformerConfig,
    *,
    vp_stage: int | None = None,
    pp_rank: int | None = None,
    core_attention: type | None = None,
) -> TransformerBlockSubmodules:
    """The layers of this pipeline stage (counted from `config` and the parallel state) plus
    RMSNorm as the final norm; q/k norms follow `config.qk_layernorm`, which is also what
    Megatron reads to all-reduce their grads; `core_attention` as in `local_gpt_layer_spec`."""
    if config.pipeline_model_parallel_layout is not None:
        raise NotImplementedError(
            "local_gpt_block_spec splits layers evenly; pipeline_model_parallel_layout is not supported"
        )
    if config.normalization != "RMSNorm":
        raise ValueError(
            f"local_gpt_block_spec uses RMSNorm but config.normalization={config.normalization!r}"
        )
    num_layers = get_num_layers_to_build(config, vp_stage=vp_stage, pp_rank=pp_rank)
    layer = local_gpt_layer_spec(qk_layernorm=config.qk_layernorm, core_attention=core_attention)
    return TransformerBlockSubmodules(layer_specs=[layer] * num_layers, layer_norm=RMSNorm)
