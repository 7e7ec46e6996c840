"""Named Qwen2.5-VL sizes, and reading sizes from a Hugging Face config.json.

Sizes are the released checkpoints' (Qwen/Qwen2.5-VL-{3B,7B,32B}-Instruct config.json plus the
transformers defaults the 3B file leaves out).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from megatron_revisual.config.schema import ModelConfig, VisionConfig


def qwen25_vl_3b() -> ModelConfig:
    return ModelConfig(
        name="qwen25_vl_3b",
        num_layers=36,
        hidden_size=2048,
        num_attention_heads=16,
        num_query_groups=2,
        ffn_hidden_size=11008,
        vocab_size=151936,
        tie_word_embeddings=True,
        vision=VisionConfig(intermediate_size=3420),
    )


def qwen25_vl_7b() -> ModelConfig:
    return ModelConfig(
        name="qwen25_vl_7b",
        num_layers=28,
        hidden_size=3584,
        num_attention_heads=28,
        num_query_groups=4,
        ffn_hidden_size=18944,
        vocab_size=152064,
        vision=VisionConfig(intermediate_size=3420),
    )


def qwen25_vl_32b() -> ModelConfig:
    return ModelConfig(
        name="qwen25_vl_32b",
        num_layers=64,
        hidden_size=5120,
        num_attention_heads=40,
        num_query_groups=8,
        ffn_hidden_size=27648,
        vocab_size=152064,
        vision=VisionConfig(intermediate_size=3456),
    )


PRESETS: dict[str, Callable[[], ModelConfig]] = {
    "qwen25_vl_3b": qwen25_vl_3b,
    "qwen25_vl_7b": qwen25_vl_7b,
    "qwen25_vl_32b": qwen25_vl_32b,
}


def hf_config_dict(model: ModelConfig) -> dict[str, Any]:
    """The Hugging Face config.json of `model` (the inverse of `model_fields_from_hf`).

    Qwen2.5-VL in transformers 5's layout (text fields under `text_config`, as `save_pretrained`
    writes them; `model_fields_from_hf` also reads the released flat layout), or a flat Qwen2
    config for a text-only model. `Qwen2_5_VLConfig(**d)` / `Qwen2Config(**d)` build it. Token ids
    that belong to the tokenizer (bos/eos/pad, vision start/end) are left to transformers'
    defaults, which are Qwen's; a converter should copy them from the source checkpoint.
    """
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": float(model.rotary_base)}
    text: dict[str, Any] = {
        "vocab_size": model.vocab_size,
        "hidden_size": model.hidden_size,
        "intermediate_size": model.ffn_hidden_size,
        "num_hidden_layers": model.num_layers,
        "num_attention_heads": model.num_attention_heads,
        "num_key_value_heads": model.num_query_groups,
        "hidden_act": "silu",
        "max_position_embeddings": model.max_position_embeddings,
        "rms_norm_eps": model.layernorm_epsilon,
        "use_sliding_window": False,
        "max_window_layers": model.num_layers,
        "attention_dropout": 0.0,
        "rope_parameters": rope,
    }
    dtype = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[model.params_dtype]
    if model.vision is None:
        if model.kv_channels is not None:  # Qwen2 reads head_dim from its config
            text["head_dim"] = model.kv_channels
        return {
            "model_type": "qwen2",
            "architectures": ["Qwen2ForCausalLM"],
            **text,
            "tie_word_embeddings": model.tie_word_embeddings,
            "dtype": dtype,
        }
    # transformers' Qwen2.5-VL text attention always uses hidden_size // heads as head_dim.
    if model.head_dim != model.hidden_size // model.num_attention_heads:
        raise ValueError(
            f"model.kv_channels={model.kv_channels} differs from hidden_size // num_attention_heads = "
            f"{model.hidden_size // model.num_attention_heads}, which HF Qwen2.5-VL cannot express"
        )
    rope["mrope_section"] = list(model.mrope_section)
    v = model.vision
    return {
        "model_type": "qwen2_5_vl",
        "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        "text_config": text,
        "vision_config": {
            "depth": v.depth,
            "hidden_size": v.hidden_size,
            "num_heads": v.num_heads,
            "intermediate_size": v.intermediate_size,
            "hidden_act": "silu",
            "in_channels": v.in_channels,
            "patch_size": v.patch_size,
            "temporal_patch_size": v.temporal_patch_size,
            "spatial_merge_size": v.spatial_merge_size,
            "window_size": v.window_size,
            "fullatt_block_indexes": list(v.fullatt_block_indexes),
            "tokens_per_second": v.tokens_per_second,
            "out_hidden_size": model.hidden_size,
        },
        "image_token_id": model.image_token_id,
        "video_token_id": model.video_token_id,
        "tie_word_embeddings": model.tie_word_embeddings,
        "dtype": dtype,
    }


def model_fields_from_hf(hf_dir: str | Path) -> dict[str, Any]:
    """ModelConfig fields read from an HF Qwen2.5-VL or Qwen2 checkpoint's config.json."""
    path = Path(hf_dir) / "config.json"
    try:
        cfg = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no config.json (model.hf_path must be an HF model directory)") from None
    model_type = cfg.get("model_type")
    if model_type not in ("qwen2_5_vl", "qwen2"):
        raise ValueError(f"{path}: model_type is {model_type!r}; expected 'qwen2_5_vl' or 'qwen2'")
    text = cfg.get("text_config", cfg) if model_type == "qwen2_5_vl" else cfg
    rope = text.get("rope_parameters") or text.get("rope_scaling") or {}
    heads = text["num_attention_heads"]
    fields: dict[str, Any] = {
        "name": "hf",
        "hf_path": str(hf_dir),
        "num_layers": text["num_hidden_layers"],
        "hidden_size": text["hidden_size"],
        "num_attention_heads": heads,
        "num_query_groups": text.get("num_key_value_heads", heads),
        "ffn_hidden_size": text["intermediate_size"],
        "vocab_size": text["vocab_size"],
        "kv_channels": text.get("head_dim"),
        "tie_word_embeddings": bool(cfg.get("tie_word_embeddings", text.get("tie_word_embeddings", False))),
        "rotary_base": float(rope.get("rope_theta", text.get("rope_theta", 1_000_000.0))),
        "max_position_embeddings": text.get("max_position_embeddings", 128_000),
        "layernorm_epsilon": text.get("rms_norm_eps", 1e-6),
        "vision": None,
    }
    for key in ("image_token_id", "video_token_id"):
        if key in cfg:
            fields[key] = cfg[key]
    if "mrope_section" in rope:
        fields["mrope_section"] = list(rope["mrope_section"])
    if model_type == "qwen2_5_vl":
        v = cfg["vision_config"]
        defaults = VisionConfig()
        fields["vision"] = VisionConfig(
            depth=v.get("depth", defaults.depth),
            hidden_size=v.get("hidden_size", defaults.hidden_size),
            num_heads=v.get("num_heads", defaults.num_heads),
            intermediate_size=v.get("intermediate_size", defaults.intermediate_size),
            patch_size=v.get("patch_size", defaults.patch_size),
            temporal_patch_size=v.get("temporal_patch_size", defaults.temporal_patch_size),
            spatial_merge_size=v.get("spatial_merge_size", defaults.spatial_merge_size),
            window_size=v.get("window_size", defaults.window_size),
            fullatt_block_indexes=list(v.get("fullatt_block_indexes", defaults.fullatt_block_indexes)),
            in_channels=v.get("in_chans", v.get("in_channels", defaults.in_channels)),
            tokens_per_second=v.get("tokens_per_second", defaults.tokens_per_second),
        )
    return fields
