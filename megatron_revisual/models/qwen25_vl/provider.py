"""RunConfig -> Megatron-Core configs and the Qwen2.5-VL model of one pipeline stage.

The Qwen2 decoder is Megatron's GPT with RMSNorm, SwiGLU, GQA with QKV bias and no other
linear biases, M-RoPE (plain rope for text-only Qwen2), theta 1e6. Layer specs are picked by
the backend: the local spec with our SP-capable RMSNorm on CPU; the Transformer Engine spec
on GPU is not written yet and raises.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_revisual.config.schema import RunConfig
from megatron_revisual.convert.mapping import padded_vocab_size

TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


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
    )


def build_qwen25_vl(
    cfg: RunConfig, *, pre_process: bool, post_process: bool, vp_stage: int | None = None
):
    """The Qwen2.5-VL (or text-only Qwen2) model of this rank's pipeline stage, random init."""
    from megatron_revisual.models.qwen25_vl.model import Qwen25VLModel
    from megatron_revisual.models.qwen25_vl.vision import vision_transformer_config
    from megatron_revisual.parallel.specs import local_gpt_block_spec

    if torch.cuda.is_available():
        raise NotImplementedError("the Transformer Engine layer spec for GPUs is not written yet")
    m = cfg.model
    config = transformer_config(cfg)
    vision_config = None
    if m.vision is not None and pre_process:
        vision_config = vision_transformer_config(m.vision, cfg.parallel, TORCH_DTYPES[m.params_dtype])
    return Qwen25VLModel(
        language_config=config,
        language_spec=local_gpt_block_spec(config, vp_stage=vp_stage),
        vision_config=vision_config,
        model=m,
        vocab_size=padded_vocab_size(m.vocab_size, cfg.parallel.tensor_model_parallel_size),
        max_sequence_length=cfg.train.seq_length,
        pre_process=pre_process,
        post_process=post_process,
        vp_stage=vp_stage,
    )
