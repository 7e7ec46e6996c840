"""Transformer Engine layer specs for the language model (GPU only).

Imported only when `provider.layer_backend(cfg)` says "transformer_engine", i.e. on a machine
with a GPU and Transformer Engine; importing it anywhere else raises ImportError. The vision
tower keeps its own spec (`vision_spec.py`) on every backend.

What changes against the local spec (`parallel/specs.py`):
- each pre-norm is fused into the linear after it (`TELayerNormColumnParallelLinear`), so the
  layer's `input_layernorm` / `pre_mlp_layernorm` slots are identities and the norm weights are
  named `self_attention.linear_qkv.layer_norm_weight` / `mlp.linear_fc1.layer_norm_weight`
  (`convert.mapping.te_names` renames the HF mapping accordingly);
- core attention is `TEDotProductAttention`, which takes packed sequences as THD through
  `PackedSeqParams(qkv_format="thd", cu_seqlens_*)` and runs context parallelism;
- the final norm is `TENorm` (RMSNorm from `config.normalization`), still `final_layernorm.weight`.
FP8 is not chosen here: Megatron's TransformerBlock wraps these layers in TE's fp8 autocast when
the language `TransformerConfig` has `fp8` set (`provider.fp8_fields`).
"""

from __future__ import annotations

try:
    import transformer_engine  # noqa: F401  (fail here, with a clear message, not deep in Megatron)
except ImportError as e:  # pragma: no cover - only reached on a machine without TE
    raise ImportError(
        "megatron_revisual.models.qwen25_vl.te_specs needs Transformer Engine (a GPU and the "
        "project's `gpu` extra); on CPU use model.layer_backend='local' or 'auto'"
    ) from e

from megatron.core.extensions.transformer_engine import TENorm
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec
from megatron.core.transformer.transformer_block import (
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_config import TransformerConfig


def te_gpt_block_spec(
    config: TransformerConfig,
    *,
    vp_stage: int | None = None,
    pp_rank: int | None = None,
) -> TransformerBlockSubmodules:
    """The language-model layers of this pipeline stage with Transformer Engine modules, and
    TENorm as the final norm. Layer counting matches `parallel.specs.local_gpt_block_spec`, so
    both backends split the same layers onto the same stages."""
    if config.pipeline_model_parallel_layout is not None:
        raise NotImplementedError(
            "te_gpt_block_spec splits layers evenly; pipeline_model_parallel_layout is not supported"
        )
    if config.normalization != "RMSNorm":
        raise ValueError(f"Qwen2 layers use RMSNorm but config.normalization={config.normalization!r}")
    if config.num_moe_experts:
        raise ValueError(f"Qwen2 layers are dense; config.num_moe_experts={config.num_moe_experts}")
    num_layers = get_num_layers_to_build(config, vp_stage=vp_stage, pp_rank=pp_rank)
    layer = get_gpt_layer_with_transformer_engine_spec(qk_layernorm=config.qk_layernorm)
    return TransformerBlockSubmodules(layer_specs=[layer] * num_layers, layer_norm=TENorm)
