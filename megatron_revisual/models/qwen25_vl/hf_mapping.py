"""The Hugging Face <-> Megatron mapping rules of Qwen2.5-VL (and, text only, Qwen2): which HF
tensors each of our parameters is made of and how they are laid out (`convert.mapping.Kind`).

`convert.mapping` is the generic machinery (rule kinds, splits and merges over TP, the
Transformer Engine renames); this table is the family's. Load, export and the weight sync all
read it through `models.registry`.
"""

from __future__ import annotations

from typing import Literal

from megatron_revisual.convert.mapping import Kind, Rule, te_names

__all__ = ["qwen25_vl_rules"]


def qwen25_vl_rules(
    *,
    num_layers: int,
    vision_depth: int | None,
    tie_word_embeddings: bool,
    text_only: bool = False,
    layer_backend: Literal["local", "transformer_engine"] = "local",
) -> list[Rule]:
    """Every rule of a Qwen2.5-VL (or, with text_only, Qwen2) model, global layer numbers.

    Megatron names are those of our model: `language_model.*` (Megatron GPTModel) and
    `vision_model.*`, as the language model's `layer_backend` names them (see `te_names`).
    HF names are the checkpoint (Hub) names: `model.*`, `lm_head.*`, `visual.*`.
    """
    if layer_backend not in ("local", "transformer_engine"):
        raise ValueError(f"layer_backend={layer_backend!r}; use 'local' or 'transformer_engine'")
    rules = _local_rules(num_layers, vision_depth, tie_word_embeddings, text_only)
    return te_names(rules) if layer_backend == "transformer_engine" else rules


def _local_rules(
    num_layers: int, vision_depth: int | None, tie_word_embeddings: bool, text_only: bool
) -> list[Rule]:
    lm = "language_model"
    rules = [Rule(f"{lm}.embedding.word_embeddings.weight", ("model.embed_tokens.weight",), Kind.VOCAB)]
    for i in range(num_layers):
        m, h = f"{lm}.decoder.layers.{i}", f"model.layers.{i}"
        attn = f"{h}.self_attn"
        rules += [
            Rule(f"{m}.input_layernorm.weight", (f"{h}.input_layernorm.weight",), Kind.REPLICATED),
            Rule(
                f"{m}.self_attention.linear_qkv.weight",
                (f"{attn}.q_proj.weight", f"{attn}.k_proj.weight", f"{attn}.v_proj.weight"),
                Kind.QKV,
            ),
            Rule(
                f"{m}.self_attention.linear_qkv.bias",
                (f"{attn}.q_proj.bias", f"{attn}.k_proj.bias", f"{attn}.v_proj.bias"),
                Kind.QKV,
            ),
            Rule(f"{m}.self_attention.linear_proj.weight", (f"{attn}.o_proj.weight",), Kind.ROW),
            Rule(f"{m}.pre_mlp_layernorm.weight", (f"{h}.post_attention_layernorm.weight",), Kind.REPLICATED),
            Rule(
                f"{m}.mlp.linear_fc1.weight",
                (f"{h}.mlp.gate_proj.weight", f"{h}.mlp.up_proj.weight"),
                Kind.GATE_UP,
            ),
            Rule(f"{m}.mlp.linear_fc2.weight", (f"{h}.mlp.down_proj.weight",), Kind.ROW),
        ]
    rules.append(Rule(f"{lm}.decoder.final_layernorm.weight", ("model.norm.weight",), Kind.REPLICATED))
    if not tie_word_embeddings:
        rules.append(Rule(f"{lm}.output_layer.weight", ("lm_head.weight",), Kind.VOCAB))
    if text_only:
        return rules
    if vision_depth is None:
        raise ValueError("vision_depth is required unless text_only=True")
    v = "vision_model"
    rules.append(Rule(f"{v}.patch_embed.weight", ("visual.patch_embed.proj.weight",), Kind.PATCH))
    for i in range(vision_depth):
        m, h = f"{v}.decoder.layers.{i}", f"visual.blocks.{i}"
        rules += [
            Rule(f"{m}.input_layernorm.weight", (f"{h}.norm1.weight",), Kind.REPLICATED),
            Rule(f"{m}.self_attention.linear_qkv.weight", (f"{h}.attn.qkv.weight",), Kind.QKV_FUSED, "vision"),
            Rule(f"{m}.self_attention.linear_qkv.bias", (f"{h}.attn.qkv.bias",), Kind.QKV_FUSED, "vision"),
            Rule(f"{m}.self_attention.linear_proj.weight", (f"{h}.attn.proj.weight",), Kind.ROW),
            Rule(f"{m}.self_attention.linear_proj.bias", (f"{h}.attn.proj.bias",), Kind.REPLICATED),
            Rule(f"{m}.pre_mlp_layernorm.weight", (f"{h}.norm2.weight",), Kind.REPLICATED),
            Rule(
                f"{m}.mlp.linear_fc1.weight",
                (f"{h}.mlp.gate_proj.weight", f"{h}.mlp.up_proj.weight"),
                Kind.GATE_UP,
            ),
            Rule(
                f"{m}.mlp.linear_fc1.bias",
                (f"{h}.mlp.gate_proj.bias", f"{h}.mlp.up_proj.bias"),
                Kind.GATE_UP,
            ),
            Rule(f"{m}.mlp.linear_fc2.weight", (f"{h}.mlp.down_proj.weight",), Kind.ROW),
            Rule(f"{m}.mlp.linear_fc2.bias", (f"{h}.mlp.down_proj.bias",), Kind.REPLICATED),
        ]
    rules += [
        Rule(f"{v}.merger.norm.weight", ("visual.merger.ln_q.weight",), Kind.REPLICATED),
        Rule(f"{v}.merger.linear_fc1.weight", ("visual.merger.mlp.0.weight",), Kind.COLUMN),
        Rule(f"{v}.merger.linear_fc1.bias", ("visual.merger.mlp.0.bias",), Kind.COLUMN),
        Rule(f"{v}.merger.linear_fc2.weight", ("visual.merger.mlp.2.weight",), Kind.ROW),
        Rule(f"{v}.merger.linear_fc2.bias", ("visual.merger.mlp.2.bias",), Kind.REPLICATED),
    ]
    return rules
