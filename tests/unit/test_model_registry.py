"""The model registry: a ModelConfig names its family, an HF config.json's model_type finds
it, presets come from the families, and a second family is one registration."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from megatron_revisual.config import ConfigValidationError, load_config, validate_config
from megatron_revisual.models import registry
from megatron_revisual.models.qwen25_vl.family import FAMILY

ROOT = Path(__file__).resolve().parents[2]


def test_the_builtin_family_serves_the_recipes_and_the_presets():
    cfg = load_config(ROOT / "configs" / "qwen25_vl_7b_8xh100.yaml")
    assert cfg.model.family == "qwen2_5_vl" and registry.model_family(cfg.model) is FAMILY
    assert registry.preset_names() == {"qwen25_vl_3b": "qwen2_5_vl", "qwen25_vl_7b": "qwen2_5_vl",
                                       "qwen25_vl_32b": "qwen2_5_vl"}
    assert registry.preset("qwen25_vl_7b").num_layers == 28
    with pytest.raises(KeyError, match=r"model.preset='qwen3' is unknown; use one of \['qwen25_vl_32b'"):
        registry.preset("qwen3")
    # the family's mapping table: 28 layers x 7 language rules + embedding, norm, lm_head, and the tower
    rules = FAMILY.hf_rules(cfg.model, "local")
    assert rules[0].megatron == "language_model.embedding.word_embeddings.weight"
    assert sum(r.megatron.startswith("language_model.decoder.layers.") for r in rules) == 28 * 7


def test_an_hf_checkpoint_finds_its_family_by_model_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(
        {"model_type": "qwen2", "num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4,
         "num_key_value_heads": 2, "intermediate_size": 128, "vocab_size": 300}))
    fields = registry.fields_from_hf(tmp_path)
    assert fields["family"] == "qwen2_5_vl" and fields["num_layers"] == 2 and fields["vision"] is None
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="model_type is 'llama'; expected 'qwen2_5_vl' or 'qwen2'"):
        registry.fields_from_hf(tmp_path)


def test_an_unregistered_family_is_a_config_error_naming_the_field():
    with pytest.raises(ConfigValidationError, match=r"model.family='qwen3_vl' is not a registered model family; "
                                                    r"use one of \['qwen2_5_vl'\]"):
        load_config(ROOT / "configs" / "qwen25_vl_7b_8xh100.yaml", ["model.family=qwen3_vl"])


def test_a_second_family_is_one_registration(monkeypatch):
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    built = []
    other = dataclasses.replace(
        FAMILY, name="other_vl", hf_model_types=("other_vl",), presets={"other_tiny": lambda: "tiny"},
        build=lambda cfg, **kw: built.append(kw) or "model",
    )
    registry.register_family(other)
    assert registry.known_families() == ["other_vl", "qwen2_5_vl"]
    assert registry.preset("other_tiny") == "tiny"
    cfg = load_config(ROOT / "configs" / "qwen25_vl_7b_8xh100.yaml", ["model.family=other_vl"])
    validate_config(cfg)  # registered: valid (load_config validated it too)
    assert registry.model_family(cfg.model).build(cfg, pre_process=True, post_process=False) == "model"
    assert built == [{"pre_process": True, "post_process": False}]
