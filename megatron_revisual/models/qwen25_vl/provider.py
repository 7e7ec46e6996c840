"""RunConfig -> Megatron-Core configs and the Qwen2.5-VL model of one pipeline stage.

The Qwen2 decoder is Megatron's GPT with RMSNorm, SwiGLU, GQA with QKV bias and no other
linear biases, M-RoPE (plain rope for text-only Qwen2), theta 1e6. Layer specs are picked by
the backend: the local spec with our SP-capable RMSNorm on CPU, whose language-model attention
is `PackedCausalAttention` (SDPA; padded batches and packed THD rows alike); the Transformer
Engine spec (`te_specs.py`, fused layernorm-linear, TE attention with THD) on a GPU with TE,
chosen by `layer_backend`. FP8 (`cfg.precision`) goes into the language `TransformerConfig`
only; the vision tower's config never gets it.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import torch
import torch.nn.functional as F
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_revisual.config.schema import PrecisionConfig, RunConfig
from megatron_revisual.config.validate import LayerBackend, resolve_layer_backend
from megatron_revisual.convert.mapping import padded_vocab_size
from megatron_revisual.models.common import TORCH_DTYPES


def layer_backend(cfg: RunConfig) -> LayerBackend:
    """The language model's layer backend on this machine: `cfg.model.layer_backend`, with `auto`
    meaning Transformer Engine when a GPU is visible and TE is installed. Raises
    ConfigValidationError when the request (or FP8) cannot run here. Never imports TE."""
    cuda = torch.cuda.is_available()
    # find_spec locates the package without importing it (and is skipped without a GPU).
    te = cuda and importlib.util.find_spec("transformer_engine") is not None
    return resolve_layer_backend(cfg, cuda_available=cuda, te_installed=te)


def fp8_fields(precision: PrecisionConfig) -> dict[str, Any]:
    """The language `TransformerConfig`'s FP8 fields; empty without FP8 (Megatron's defaults).

    `tp_only_amax_red` stays Megatron's False: the delayed recipe's amax is reduced over
    TP x DP x CP, so every DP replica quantizes with the same scales (the replicas compute the
    same function of the same weights, and a checkpoint's amax history is every rank's). That
    reduction is one small all-reduce per forward with gradients, which is safe because every DP
    rank runs the same number of forwards (`train.schedule`); reducing over TP only would hide a
    count mismatch there, not fix it (CP attention and MoE dispatch would still hang on one)."""
    if precision.fp8 is None:
        return {}
    p = precision
    return {
        "fp8": p.fp8,
        "fp8_recipe": p.fp8_recipe,
        "fp8_margin": p.fp8_margin,
        "fp8_amax_history_len": p.fp8_amax_history_len,
        "fp8_amax_compute_algo": p.fp8_amax_compute_algo,
        "fp8_wgrad": p.fp8_wgrad,
        "fp8_param": p.fp8_param,
        "first_last_layers_bf16": p.first_last_layers_bf16,
        "num_layers_at_start_in_bf16": p.num_layers_at_start_in_bf16,
        "num_layers_at_end_in_bf16": p.num_layers_at_end_in_bf16,
    }


def transformer_config(cfg: RunConfig) -> TransformerConfig:
    m, p = cfg.model, cfg.parallel
    dtype = TORCH_DTYPES[m.params_dtype]
    return TransformerConfig(
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        num_attention_heads=m.num_attention_heads,
        num_query_groups=m.num_query_groups,
        ffn_hidden_size=m.ffn_hidden_size,
        kv_channels=m.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=m.layernorm_epsilon,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=m.add_qkv_bias,
        # Qwen2.5-VL trains without dropout; RL log-prob recomputation must be deterministic.
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tensor_model_parallel_size=p.tensor_model_parallel_size,
        pipeline_model_parallel_size=p.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=p.virtual_pipeline_model_parallel_size,
        num_layers_in_first_pipeline_stage=p.num_layers_in_first_pipeline_stage,
        context_parallel_size=p.context_parallel_size,
        sequence_parallel=p.sequence_parallel,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=m.params_dtype == "bf16",
        fp16=m.params_dtype == "fp16",
        use_cpu_initialization=not torch.cuda.is_available(),
        mrope_section=list(m.mrope_section) if m.vision is not None else None,
        recompute_granularity=cfg.train.recompute_granularity,
        recompute_method=cfg.train.recompute_method,
        recompute_num_layers=cfg.train.recompute_num_layers,
        # Language layers only: the vision tower, merger and output layer stay in bf16.
        **fp8_fields(cfg.precision),
    )


def build_qwen25_vl(
    cfg: RunConfig, *, pre_process: bool, post_process: bool, vp_stage: int | None = None
):
    """The Qwen2.5-VL (or text-only Qwen2) model of this rank's pipeline stage, random init."""
    from megatron_revisual.models.qwen25_vl.model import Qwen25VLModel
    from megatron_revisual.models.qwen25_vl.packed_attention import PackedCausalAttention
    from megatron_revisual.models.qwen25_vl.vision import vision_transformer_config
    from megatron_revisual.parallel.specs import local_gpt_block_spec

    backend = layer_backend(cfg)
    m = cfg.model
    config = transformer_config(cfg)
    if backend == "transformer_engine":
        from megatron_revisual.models.qwen25_vl.te_specs import te_gpt_block_spec

        language_spec = te_gpt_block_spec(config, vp_stage=vp_stage)
    else:
        language_spec = local_gpt_block_spec(
            config, vp_stage=vp_stage, core_attention=PackedCausalAttention
        )
    vision_config = None
    if m.vision is not None and pre_process:
        vision_config = vision_transformer_config(m.vision, cfg.parallel, TORCH_DTYPES[m.params_dtype])
    return Qwen25VLModel(
        language_config=config,
        language_spec=language_spec,
        vision_config=vision_config,
        model=m,
        vocab_size=padded_vocab_size(m.vocab_size, cfg.parallel.tensor_model_parallel_size),
        max_sequence_length=cfg.train.seq_length,
        pre_process=pre_process,
        post_process=post_process,
        vp_stage=vp_stage,
    )
