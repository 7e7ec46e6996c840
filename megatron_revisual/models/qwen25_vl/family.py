"""Qwen2.5-VL (and, without a vision tower, Qwen2) as a `models.registry.ModelFamily`.

Everything outside `models/` reaches this package through the registry; each entry imports its
module when called, so reading a config imports no model code.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from megatron_revisual.models.qwen25_vl.presets import PRESETS
from megatron_revisual.models.registry import ModelFamily

__all__ = ["FAMILY"]


def _build(cfg: Any, *, pre_process: bool, post_process: bool, vp_stage: int | None = None) -> Any:
    from megatron_revisual.models.qwen25_vl.provider import build_qwen25_vl

    return build_qwen25_vl(cfg, pre_process=pre_process, post_process=post_process, vp_stage=vp_stage)


def _hf_rules(model: Any, layer_backend: str = "local") -> list[Any]:
    from megatron_revisual.models.qwen25_vl.hf_mapping import qwen25_vl_rules

    return qwen25_vl_rules(
        num_layers=model.num_layers,
        vision_depth=model.vision.depth if model.vision is not None else None,
        tie_word_embeddings=model.tie_word_embeddings,
        text_only=model.vision is None,
        layer_backend=layer_backend,
    )


def _fields_from_hf(hf_dir: str | Path) -> dict[str, Any]:
    from megatron_revisual.models.qwen25_vl.presets import model_fields_from_hf

    return model_fields_from_hf(hf_dir)


def _hf_config(model: Any) -> dict[str, Any]:
    from megatron_revisual.models.qwen25_vl.presets import hf_config_dict

    return hf_config_dict(model)


def _position_config(model: Any) -> Any:
    from megatron_revisual.models.qwen25_vl.rope_index import mrope_config

    return mrope_config(model)


def _position_ids(model: Any, input_ids: Any, image_grid_thw: Any, attention_mask: Any) -> Any:
    """[3, B, T] M-RoPE positions with a vision tower, else [B, T] plain positions."""
    import torch

    if model.vision is None:
        return torch.arange(input_ids.shape[1]).expand_as(input_ids).contiguous()
    from megatron_revisual.models.qwen25_vl.rope_index import mrope_config, rope_index

    positions, _ = rope_index(input_ids, image_grid_thw, attention_mask=attention_mask, config=mrope_config(model))
    return positions


def _split_for_context_parallel(tensor: Any, packed_seq_params: Any) -> Any:
    from megatron_revisual.models.qwen25_vl.model import split_for_context_parallel

    return split_for_context_parallel(tensor, packed_seq_params)


def _segment_bounds(packed_seq_params: Any) -> Any:
    from megatron_revisual.models.qwen25_vl.packed_attention import segment_bounds

    return segment_bounds(packed_seq_params)


FAMILY = ModelFamily(
    name="qwen2_5_vl",
    hf_model_types=("qwen2_5_vl", "qwen2"),
    presets=PRESETS,
    build=_build,
    hf_rules=_hf_rules,
    fields_from_hf=_fields_from_hf,
    hf_config=_hf_config,
    position_config=_position_config,
    position_ids=_position_ids,
    split_for_context_parallel=_split_for_context_parallel,
    segment_bounds=_segment_bounds,
)
