"""`revisual rehearse`'s shrinking of a recipe: what stays the recipe's (every parallel setting, the
engines' TP and placement, the RL settings), the tiny model's shape, the other layout phase B
resumes at, and that every rehearsal config (both layouts) passes the trainer's validation."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from megatron_revisual.config import config_from_dict, read_raw_config, validate_config
from megatron_revisual.config.loader import apply_override
from megatron_revisual.config.validate import validate_for_training
from megatron_revisual.launch.rehearse import (
    other_layout,
    rehearsal_layers,
    rehearsal_raw_config,
    rehearsal_spec,
)

ROOT = Path(__file__).resolve().parents[2]
RECIPES = ["qwen25_vl_7b_8xh100", "revisual_r1_released_7b_8xh100", "qwen25_vl_3b_8xh100", "qwen25_vl_32b_4x8xh100"]
KEPT_PARALLEL = ("tensor_model_parallel_size", "pipeline_model_parallel_size", "context_parallel_size",
                 "sequence_parallel", "use_distributed_optimizer", "overlap_grad_reduce", "overlap_param_gather",
                 "ddp_bucket_size")


def _recipe(name):
    return config_from_dict(read_raw_config(ROOT / "configs" / f"{name}.yaml"))


def _rehearsal(name, tmp_path, hf_dir):
    raw, changed = rehearsal_raw_config(str(ROOT / "configs" / f"{name}.yaml"), [], out=tmp_path / "a",
                                        hf_dir=hf_dir, data_dir=tmp_path / "data", steps=2)
    return raw, changed


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    from megatron_revisual.testing.tiny_checkpoint import make_tiny_checkpoint

    root = tmp_path_factory.mktemp("rehearse")
    return {name: make_tiny_checkpoint(root / name, spec=rehearsal_spec(_recipe(name))) for name in RECIPES}


@pytest.mark.parametrize("name", RECIPES)
def test_the_rehearsal_keeps_the_recipes_layout_and_rl_settings(name, tmp_path, tiny_models):
    recipe = _recipe(name)
    raw, changed = _rehearsal(name, tmp_path, tiny_models[name])
    cfg = config_from_dict(copy.deepcopy(raw))
    validate_config(cfg)
    validate_for_training(cfg)
    assert cfg.cluster.world_size == recipe.cluster.world_size and cfg.cluster.backend == "gloo"
    for field in KEPT_PARALLEL:
        assert getattr(cfg.parallel, field) == getattr(recipe.parallel, field), field
    for stage in ("mrl", "trl"):
        got, want = getattr(cfg, stage), getattr(recipe, stage)
        assert (got.rollout.tensor_parallel_size, got.rollout.placement) == (want.rollout.tensor_parallel_size,
                                                                              want.rollout.placement)
        assert got.rl.pad == want.rl.pad and got.rl.kl_coef == want.rl.kl_coef
        assert got.rl.rollout_correction == want.rl.rollout_correction
        assert got.rl.reward_preset == want.rl.reward_preset and got.freeze_vision_tower == want.freeze_vision_tower
        assert got.steps == 2 and got.micro_batch_tokens == 288  # two samples a row
    assert cfg.stages == recipe.stages and cfg.rehearsal.collective_checks
    assert cfg.rehearsal.fp8_amax_stand_in == (recipe.precision.fp8 is not None)
    assert cfg.precision.fp8 is None and cfg.model.layer_backend == "local"
    assert any("FP8" in c for c in changed) == (recipe.precision.fp8 is not None)
    # the tiny model keeps the recipe's heads and query groups
    assert (cfg.model.num_attention_heads, cfg.model.num_query_groups) == (recipe.model.num_attention_heads,
                                                                           recipe.model.num_query_groups)
    assert cfg.model.vision.num_heads % recipe.parallel.tensor_model_parallel_size == 0
    # phase B's layout: the same world, another TP (or PP), valid too
    other = copy.deepcopy(raw)
    for item in other_layout(recipe):
        apply_override(other, item)
    moved = config_from_dict(other)
    validate_for_training(moved)
    assert moved.cluster.world_size == cfg.cluster.world_size
    assert moved.parallel.tensor_model_parallel_size == recipe.parallel.tensor_model_parallel_size // 2


def test_the_32b_first_pipeline_stage_stays_the_lighter_one():
    recipe = _recipe("qwen25_vl_32b_4x8xh100")  # 30 of 64 layers on stage 0
    assert rehearsal_layers(recipe) == (4, 1)
    assert rehearsal_layers(_recipe("qwen25_vl_7b_8xh100")) == (2, None)
    spec = rehearsal_spec(recipe)
    assert (spec.num_attention_heads, spec.num_key_value_heads, spec.hidden_size) == (40, 8, 1280)
    assert spec.vision_num_heads == 8  # TP 8 splits the vision tower's heads too


def test_the_world_shrinks_only_in_dp_and_only_when_it_must():
    from megatron_revisual.launch.rehearse import RehearsalError, rehearsal_data_parallel

    # 8 ranks of 1.7 GiB (in-process engine parts) fit 20 GiB: the recipe's DP
    assert rehearsal_data_parallel(_recipe("qwen25_vl_7b_8xh100"), 20.0) == 2
    # the 3B's engines of TP 1 run beside every rank: 8 x 2.9 GiB does not fit, DP 4 -> 2 does
    assert rehearsal_data_parallel(_recipe("qwen25_vl_3b_8xh100"), 20.0) == 2
    assert rehearsal_data_parallel(_recipe("qwen25_vl_3b_8xh100"), 24.0) == 4
    with pytest.raises(RehearsalError, match=r"TP 8 x PP 2 x CP 1 x DP 2 is 32 ranks of about 1.7 GiB = 54.4 GiB"):
        rehearsal_data_parallel(_recipe("qwen25_vl_32b_4x8xh100"), 20.0)
