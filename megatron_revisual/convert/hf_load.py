"""Load a Hugging Face Qwen2.5-VL / Qwen2 checkpoint into our (sharded) Megatron model in memory.

Every parameter of this rank's model is filled through `convert.mapping` from the HF tensors it
is made of, read lazily one at a time from the safetensors files; a parameter without a rule,
a missing HF tensor or a shape mismatch is an error naming both sides.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch

from megatron_revisual.config.schema import ModelConfig
from megatron_revisual.convert.mapping import (
    AttentionShape,
    MappingContext,
    Rule,
    padded_vocab_size,
    to_megatron,
)
from megatron_revisual.convert.safetensors_io import HFCheckpoint

# The one reader of HF checkpoints (lazy, one tensor at a time, named errors).
SafetensorsReader = HFCheckpoint


def mapping_context(model: ModelConfig, tp_size: int) -> MappingContext:
    vision = None
    if model.vision is not None:
        v = model.vision
        vision = AttentionShape(v.num_heads, v.num_heads, v.hidden_size // v.num_heads)
    return MappingContext(
        tp_size=tp_size,
        lm=AttentionShape(model.num_attention_heads, model.num_query_groups, model.head_dim),
        vision=vision,
        vocab_size=model.vocab_size,
        padded_vocab_size=padded_vocab_size(model.vocab_size, tp_size),
    )


def model_rule_list(model: ModelConfig, layer_backend: str = "local") -> list[Rule]:
    """The mapping's rules for this model config (its family's table), in mapping (export) order."""
    from megatron_revisual.models.registry import model_family

    return model_family(model).hf_rules(model, layer_backend)


def model_rules(model: ModelConfig, layer_backend: str = "local") -> dict[str, Rule]:
    """The mapping's rules for this model config, by Megatron name."""
    return {r.megatron: r for r in model_rule_list(model, layer_backend)}


def model_layer_backend(param_names: Iterable[str]) -> str:
    """Which layer spec built a model: Transformer Engine fuses the norms into the linears."""
    te = any(
        n.startswith("language_model.decoder.layers.") and n.endswith("layer_norm_weight")
        for n in param_names
    )
    return "transformer_engine" if te else "local"


_LM_LAYER = re.compile(r"^language_model\.decoder\.layers\.(\d+)\.(.*)$")


def global_param_names(model: torch.nn.Module) -> dict[str, str]:
    """This stage's parameter names -> global names (language layers renumbered across PP)."""
    lm_layers = model.language_model.decoder.layers
    names = {}
    for name, _ in model.named_parameters():
        match = _LM_LAYER.match(name)
        if match:
            layer = lm_layers[int(match.group(1))]
            name_global = f"language_model.decoder.layers.{layer.layer_number - 1}.{match.group(2)}"
        else:
            name_global = name
        names[name] = name_global
    return names


def load_hf_weights(
    model: torch.nn.Module, reader: SafetensorsReader, model_cfg: ModelConfig, *, tp_rank: int, tp_size: int
) -> int:
    """Copy the HF checkpoint into this rank's parameters; returns how many were filled."""
    params = dict(model.named_parameters())
    rules = model_rules(model_cfg, model_layer_backend(params))
    ctx = mapping_context(model_cfg, tp_size)
    filled = 0
    for local, name in global_param_names(model).items():
        rule = rules.get(name)
        if rule is None and name == "language_model.output_layer.weight" and model_cfg.tie_word_embeddings:
            # A later pipeline stage's copy of the tied embedding.
            rule = rules["language_model.embedding.word_embeddings.weight"]
        if rule is None:
            raise KeyError(f"parameter {local} (global {name}) has no rule in convert.mapping")
        shard = to_megatron(rule, [reader.get(n) for n in rule.hf], ctx, tp_rank)
        param = params[local]
        if shard.shape != param.shape:
            raise ValueError(
                f"{', '.join(rule.hf)} -> {local}: mapped shape {tuple(shard.shape)} but the model "
                f"parameter is {tuple(param.shape)} (TP rank {tp_rank} of {tp_size})"
            )
        with torch.no_grad():
            param.copy_(shard.to(param.dtype))
        filled += 1
    return filled
