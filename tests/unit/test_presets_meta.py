"""The 3B / 7B / 32B presets built on the meta device: our Megatron model and transformers'
Qwen2_5_VLForConditionalGeneration from the same config have exactly the same parameters, and
the mapping pairs every HF tensor with one of ours, shape for shape. Meta tensors hold no data,
so the full 32B model costs well under a second to build.
"""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

from megatron_revisual.config import ModelConfig, VisionConfig
from megatron_revisual.convert.hf_load import mapping_context
from megatron_revisual.convert.mapping import padded_vocab_size, to_megatron
from megatron_revisual.models.qwen25_vl.hf_mapping import qwen25_vl_rules
from megatron_revisual.models.qwen25_vl.presets import PRESETS, hf_config_dict, model_fields_from_hf
from megatron_revisual.parallel import run_distributed

# transformers' Qwen2_5_VLForConditionalGeneration parameter counts (tied lm_head counted once);
# the Hub model cards round them to 3.75B, 8.29B and 33.5B.
HF_PARAMETERS = {
    "qwen25_vl_3b": 3_754_622_976,
    "qwen25_vl_7b": 8_292_166_656,
    "qwen25_vl_32b": 33_452_718_336,
}


def _build_on_meta(names: list[str]) -> dict:
    """On one gloo rank (TP = PP = 1): each preset's parameter names, shapes and devices."""
    from megatron_revisual.config import RunConfig
    from megatron_revisual.models.qwen25_vl.provider import build_qwen25_vl

    out = {}
    for name in names:
        cfg = RunConfig(model=PRESETS[name]())
        # Megatron allocates with a bare torch.empty (no device) under use_cpu_initialization, the
        # CPU default, so the meta context applies; initialisation on meta tensors is a no-op.
        with torch.device("meta"):
            model = build_qwen25_vl(cfg, pre_process=True, post_process=True)
        out[name] = {n: (tuple(p.shape), p.device.type) for n, p in model.named_parameters()}
    return out


@pytest.fixture(scope="module")
def ours() -> dict:
    return run_distributed(_build_on_meta, world_size=1, args=(list(PRESETS),), timeout_s=600)[0]


def _hf_model_and_shapes(model_cfg: ModelConfig):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from megatron_revisual.testing.tiny_checkpoint import checkpoint_tensor_shapes

    config = Qwen2_5_VLConfig(**hf_config_dict(model_cfg))
    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration(config)
    return model, checkpoint_tensor_shapes(config)  # checkpoint (Hub) names


@pytest.mark.parametrize("preset", list(PRESETS))
def test_meta_parameter_counts_and_mapping_match_hf(preset, ours):
    model_cfg = PRESETS[preset]()
    params = ours[preset]
    hf_model, hf_shapes = _hf_model_and_shapes(model_cfg)

    # Qwen's vocabularies are multiples of 128: no padding at TP=1.
    assert padded_vocab_size(model_cfg.vocab_size, 1) == model_cfg.vocab_size
    assert params["language_model.embedding.word_embeddings.weight"][0] == (model_cfg.vocab_size, model_cfg.hidden_size)

    ours_total = sum(torch.Size(shape).numel() for shape, _ in params.values())
    hf_total = sum(p.numel() for p in hf_model.parameters())
    assert ours_total == hf_total == HF_PARAMETERS[preset]
    # Only modules that pin device="cpu" (our RMSNorm, the vision patch embedding) escape the
    # meta context: a few MB out of billions.
    off_meta = [n for n, (_, device) in params.items() if device != "meta"]
    assert all(n.endswith(("norm.weight", "patch_embed.weight")) for n in off_meta), off_meta

    rules = qwen25_vl_rules(
        num_layers=model_cfg.num_layers,
        vision_depth=model_cfg.vision.depth,
        tie_word_embeddings=model_cfg.tie_word_embeddings,
    )
    hf_use = Counter(name for rule in rules for name in rule.hf)
    assert set(hf_use) == set(hf_shapes) and set(hf_use.values()) == {1}
    assert {rule.megatron for rule in rules} == set(params)
    ctx = mapping_context(model_cfg, tp_size=1)
    for rule in rules:
        hf = [torch.empty(hf_shapes[name], device="meta") for name in rule.hf]
        mapped = to_megatron(rule, hf, ctx, tp_rank=0)
        assert tuple(mapped.shape) == params[rule.megatron][0], rule.megatron


@pytest.mark.parametrize("preset", list(PRESETS))
def test_hf_config_dict_round_trips(preset, tmp_path):
    model_cfg = PRESETS[preset]()
    (tmp_path / "config.json").write_text(json.dumps(hf_config_dict(model_cfg)))
    back = ModelConfig(**{**model_fields_from_hf(tmp_path), "name": model_cfg.name, "hf_path": None})
    assert back == model_cfg


def test_hf_config_dict_text_only_and_head_dim(tmp_path):
    from transformers import Qwen2Config

    text = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                       ffn_hidden_size=96, vocab_size=384, kv_channels=32, mrope_section=[4, 6, 6],
                       tie_word_embeddings=True)
    d = hf_config_dict(text)
    assert d["model_type"] == "qwen2" and d["head_dim"] == 32 and "vision_config" not in d
    assert Qwen2Config(**d).head_dim == 32
    (tmp_path / "config.json").write_text(json.dumps(d))
    back = model_fields_from_hf(tmp_path)
    assert (back["kv_channels"], back["tie_word_embeddings"], back["vision"]) == (32, True, None)

    # HF Qwen2.5-VL derives head_dim from hidden_size / heads; another head_dim cannot be written.
    vl = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                     ffn_hidden_size=96, vocab_size=384, kv_channels=32, mrope_section=[4, 6, 6],
                     vision=VisionConfig(depth=2))
    with pytest.raises(ValueError, match=r"model.kv_channels=32 differs from hidden_size // num_attention_heads = 16"):
        hf_config_dict(vl)
