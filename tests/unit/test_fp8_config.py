"""FP8 settings: typed in config, validated, and mapped onto the language model's
TransformerConfig only (the vision tower's config never gets them)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from megatron_revisual.config import (
    ConfigError,
    ConfigValidationError,
    config_from_dict,
    load_config,
)
from megatron_revisual.config.validate import validate_config
from megatron_revisual.models.qwen25_vl.provider import fp8_fields, transformer_config
from megatron_revisual.models.qwen25_vl.vision import vision_transformer_config

ROOT = Path(__file__).resolve().parents[2]
SEVEN_B = ROOT / "configs" / "qwen25_vl_7b_8xh100.yaml"


def cfg_with(precision: dict, **model):
    cfg = config_from_dict({"model": {"preset": "qwen25_vl_7b", **model}, "precision": precision})
    validate_config(cfg)
    return cfg


@pytest.mark.parametrize(
    "precision, expected",
    [
        ({"fp8": "hybrid"},
         {"fp8": "hybrid", "fp8_recipe": "delayed", "fp8_amax_history_len": 1, "fp8_amax_compute_algo": "most_recent"}),
        ({"fp8": "e4m3", "fp8_recipe": "delayed", "fp8_amax_history_len": 1024, "fp8_amax_compute_algo": "max",
          "fp8_margin": 2},
         {"fp8": "e4m3", "fp8_recipe": "delayed", "fp8_amax_history_len": 1024, "fp8_amax_compute_algo": "max",
          "fp8_margin": 2}),
        ({"fp8": "hybrid", "fp8_recipe": "tensorwise", "first_last_layers_bf16": True, "num_layers_at_end_in_bf16": 2},
         {"fp8_recipe": "tensorwise", "first_last_layers_bf16": True, "num_layers_at_start_in_bf16": 1,
          "num_layers_at_end_in_bf16": 2}),
        ({"fp8": "e4m3", "fp8_recipe": "mxfp8", "fp8_param": True},
         {"fp8_recipe": "mxfp8", "fp8_param": True, "fp8_wgrad": True}),
        ({"fp8": "e4m3", "fp8_recipe": "blockwise"},
         {"fp8_recipe": "blockwise", "fp8_wgrad": True, "fp8_param": False, "tp_only_amax_red": False}),
    ],
)
def test_language_config_gets_fp8_and_vision_config_does_not(precision, expected):
    cfg = cfg_with(precision)
    language = transformer_config(cfg)
    for name, value in expected.items():
        assert getattr(language, name) == value, name
    assert language.fp8 == precision["fp8"] and language.params_dtype == torch.bfloat16
    vision = vision_transformer_config(cfg.model.vision, cfg.parallel, torch.bfloat16)
    assert vision.fp8 is None and vision.fp8_param is False and vision.params_dtype == torch.bfloat16


def test_fp8_fields_cover_every_precision_field():
    cfg = cfg_with({"fp8": "hybrid"})
    fields = fp8_fields(cfg.precision)
    assert set(fields) == set(type(cfg.precision).__dataclass_fields__)
    assert fp8_fields(cfg_with({}).precision) == {}  # no FP8: Megatron's defaults untouched
    assert transformer_config(cfg_with({})).fp8 is None


def test_overrides_are_typed():
    cfg = load_config(SEVEN_B, ["precision.fp8=hybrid", "precision.fp8_recipe=tensorwise", "precision.fp8_margin=1"])
    assert (cfg.precision.fp8, cfg.precision.fp8_recipe, cfg.precision.fp8_margin) == ("hybrid", "tensorwise", 1)
    assert load_config(SEVEN_B, ["precision.fp8=null"]).precision.fp8 is None


@pytest.mark.parametrize(
    "override, message",
    [
        ("precision.fp8=e5m2", "precision.fp8='e5m2' is not allowed; use one of ['e4m3', 'hybrid']"),
        ("precision.fp8_recipe=custom",
         "precision.fp8_recipe='custom' is not allowed; use one of ['delayed', 'tensorwise', 'mxfp8', 'blockwise']"),
        ("model.layer_backend=te",
         "model.layer_backend='te' is not allowed; use one of ['auto', 'local', 'transformer_engine']"),
    ],
)
def test_illegal_values_name_the_field_and_the_legal_ones(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(SEVEN_B, [override])
    assert message in str(e.value)


FP8_WGRAD_REFUSED = (
    "precision.fp8_wgrad=false has no effect with Transformer Engine 2.20: Megatron-Core hands it to "
    "DelayedScaling as override_linear_precision, a field TE removed in 2.0 (its pydantic recipe "
    "drops it silently), and the other recipes never read it; weight gradients run in FP8 "
    "whatever it says. Leave it out (true)"
)


@pytest.mark.parametrize(
    "precision, model, message",
    [
        ({"fp8": "e4m3"}, {"layer_backend": "local"},
         "precision.fp8='e4m3' runs through Transformer Engine but model.layer_backend='local'; "
         "use one of ['auto', 'transformer_engine']"),
        ({"fp8": "hybrid"}, {"params_dtype": "fp32"},
         "precision.fp8='hybrid' needs model.params_dtype='bf16'; got 'fp32'"),
        ({"fp8_recipe": "tensorwise"}, {},
         "precision.fp8_recipe='tensorwise' has no effect while precision.fp8 is null; "
         "set precision.fp8 to one of ['e4m3', 'hybrid'] or leave it out"),
        ({"fp8": "hybrid", "fp8_recipe": "tensorwise", "fp8_amax_history_len": 16}, {},
         "precision.fp8_amax_history_len=16 only applies to precision.fp8_recipe='delayed' (got 'tensorwise')"),
        ({"fp8": "hybrid", "first_last_layers_bf16": True}, {},
         "precision.first_last_layers_bf16=true is not supported with precision.fp8_recipe='delayed'; "
         "use one of ['tensorwise', 'mxfp8', 'blockwise']"),
        ({"fp8": "hybrid", "fp8_recipe": "blockwise", "first_last_layers_bf16": True,
          "num_layers_at_start_in_bf16": 29}, {},
         "precision.num_layers_at_start_in_bf16=29 must be in [0, 28] (layers per pipeline stage)"),
        ({"fp8": "hybrid", "num_layers_at_end_in_bf16": 3}, {},
         "precision.num_layers_at_end_in_bf16=3 has no effect while precision.first_last_layers_bf16 is false"),
        ({"fp8": "hybrid", "fp8_amax_history_len": 0}, {},
         "precision.fp8_amax_history_len=0 must be >= 1"),
        ({"fp8": "hybrid", "fp8_wgrad": False}, {}, FP8_WGRAD_REFUSED),
        ({"fp8": "e4m3", "fp8_recipe": "tensorwise", "fp8_wgrad": False}, {}, FP8_WGRAD_REFUSED),
    ],
)
def test_validation_errors(precision, model, message):
    with pytest.raises(ConfigValidationError) as e:
        cfg_with(precision, **model)
    assert message in e.value.problems


def test_every_problem_is_reported_at_once():
    with pytest.raises(ConfigValidationError) as e:
        cfg_with({"fp8": "e4m3"}, layer_backend="local", params_dtype="fp16")
    assert len(e.value.problems) == 2
