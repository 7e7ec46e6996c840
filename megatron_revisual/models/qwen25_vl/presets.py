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
