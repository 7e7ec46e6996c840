"""`revisual plan` (`launch.planner`): per-GPU parameter, gradient and optimizer bytes of the H100
recipes against hand counts, the fit verdicts and suggestions, and the launchers' refusal."""

from __future__ import annotations

from pathlib import Path

import pytest

from megatron_revisual.cli import main
from megatron_revisual.config import load_config
from megatron_revisual.launch.footprint import GIB
from megatron_revisual.launch.plan import LaunchError, make_plan, validate_plan
from megatron_revisual.launch.planner import (
    local_parameters,
    plan_pipeline_stages,
    plan_run,
    plan_stage,
)

ROOT = Path(__file__).resolve().parents[2]
R3B, R7B, R32B = (str(ROOT / "configs" / f"qwen25_vl_{n}.yaml") for n in ("3b_8xh100", "7b_8xh100", "32b_4x8xh100"))
RELEASED_7B = str(ROOT / "configs" / "revisual_r1_released_7b_8xh100.yaml")

# Hand counts per GPU (TP-split weights divided, norms / row-parallel biases / patch embedding
# whole, vocabulary 152064 padded to a multiple of 128 x TP).
# 7B, TP 4: a layer 3584*(3584+2*512) + (3584+2*512) + 3584*3584 + 3*3584*18944 = 233,050,624
# split / 4 + 2*3584 norms = 58,269,824; x 28 = 1,631,555,072; embedding and output layer
# 2 * 152064*3584/4 = 272,498,688; final norm 3,584 -> 1,904,057,344. Vision (d 1280, i 3420,
# 32 blocks): a block's split part 3*1280^2 + 3*1280 + 1280^2 + 2*(3420*1280 + 3420) + 1280*3420
# = 19,697,080 / 4 + 4*1280 = 4,929,390, x 32 = 157,740,480; patch 1280*3*2*14*14 = 1,505,280;
# merger 1280 + (5120^2 + 5120)/4 + 3584*5120/4 + 3584 = 11,147,264 -> 170,393,024.
SEVEN_B = 1_904_057_344 + 170_393_024
# 32B, TP 8, PP 2 (30 + 34 layers): a layer 5120*(5120+2*1024) + 7168 + 5120^2 + 3*5120*27648
# = 487,595,008 / 8 + 2*5120 = 60,959,616; the vocabulary pads to 152,576: 152576*5120/8 =
# 97,648,640. Stage 0: 30 layers + embedding = 1,926,437,120, vision (i 3456) 32 * (19,835,392/8
# + 5120) + 1,505,280 + (1280 + 3,277,440 + 3,276,800 + 5120) = 87,571,328. Stage 1: 34 layers +
# output layer + final norm = 2,170,280,704.
THIRTY_TWO_B = [1_926_437_120 + 87_571_328, 2_170_280_704]


def test_parameters_per_gpu_match_hand_counts():
    (seven,) = local_parameters(load_config(R7B))
    assert seven.total == SEVEN_B
    assert [c.total for c in local_parameters(load_config(R32B))] == THIRTY_TWO_B


def test_7b_parameter_gradient_and_optimizer_bytes():
    plan = plan_stage(load_config(R7B), "cold_start")
    assert plan.params_gib * GIB == pytest.approx(SEVEN_B * 2)  # bf16
    assert plan.grads_gib * GIB == pytest.approx(SEVEN_B * 4)  # fp32 main grads
    assert plan.optimizer_gib * GIB == pytest.approx(SEVEN_B * 12 / 2)  # DP 2 shards fp32 master + 2 moments
    assert plan.reference_gib == 0 and plan.engine_gib == 0 and plan.fits


def test_32b_bytes_are_those_of_its_fullest_pipeline_stage():
    cfg = load_config(R32B)
    # stage 0 holds two micro-batches in flight, but the recipe recomputes full layers: its
    # fullest stage is then stage 1 (more layers, the output layer, the logits)
    assert plan_stage(cfg, "cold_start").pipeline_stage == 1
    cold = plan_pipeline_stages(cfg, "cold_start")[0]
    assert cold.params_gib * GIB == pytest.approx(THIRTY_TWO_B[0] * 2)
    assert cold.optimizer_gib * GIB == pytest.approx(THIRTY_TWO_B[0] * 12 / 2)
    mrl = plan_stage(cfg, "mrl")  # stage 1: more layers, the logits, the reference model's half
    assert mrl.pipeline_stage == 1
    assert mrl.reference_gib * GIB == pytest.approx(THIRTY_TWO_B[1] * 2)


def test_grpo_peak_is_the_larger_of_training_and_rollout():
    plan = plan_stage(load_config(R7B), "mrl")
    assert plan.kind == "grpo" and plan.reference_gib * GIB == pytest.approx(SEVEN_B * 2)
    assert plan.engine_gib == pytest.approx(0.55 * 79.2)  # of the memory CUDA reports
    assert plan.rollout_peak_gib == pytest.approx(plan.resident_gib + 0.55 * 79.2)
    assert plan.peak_gib == max(plan.train_peak_gib, plan.rollout_peak_gib)
    frozen = plan_stage(load_config(R7B, ["mrl.freeze_vision_tower=true"]), "mrl")
    assert (plan.grads_gib - frozen.grads_gib) * GIB == pytest.approx(170_393_024 * 4)


def test_a_layout_that_does_not_fit_gets_a_change_that_fits():
    # the 3B recipe recomputes because its 32k-token cold-start rows need more than 80 GiB at TP 2
    cfg = load_config(R3B, ["train.recompute_granularity=null", "train.recompute_method=null",
                            "train.recompute_num_layers=null"])
    plans = {p.stage: p for p in plan_run(cfg)}
    assert not plans["cold_start"].fits and plans["cold_start"].peak_gib > 79.2
    assert plans["cold_start"].suggestion.startswith("train.recompute_granularity=full")
    assert plans["mrl"].fits and plans["mrl"].suggestion is None
    assert all(p.fits for p in plan_run(load_config(R3B)))
    # 128k-token rows already recomputing: the loss alone needs 56 GiB at TP 2; CP 2 halves it
    long_rows = {p.stage: p for p in plan_run(load_config(R3B, ["cold_start.max_length=131072"]))}["cold_start"]
    assert not long_rows.fits and long_rows.suggestion.startswith("parallel.context_parallel_size=2 (peak 51.")
    # a GPU too small for anything the planner can change
    tiny_gpu = plan_run(load_config(R7B), gpu_gib=16)
    assert not tiny_gpu[0].fits and "use more GPUs" in tiny_gpu[0].suggestion


def test_cli_exit_codes(capsys):
    assert main(["plan", R7B]) == 0
    out = capsys.readouterr().out
    assert "[cold_start] (sft)" in out and "fits" in out and "DOES NOT FIT" not in out
    assert main(["plan", R3B, "train.recompute_granularity=null", "train.recompute_method=null",
                 "train.recompute_num_layers=null"]) == 1
    assert "to fit: train.recompute_granularity=full" in capsys.readouterr().out


def test_launchers_refuse_a_recipe_that_does_not_fit():
    with pytest.raises(LaunchError, match=r"cold_start: peak 8\d\.\d GiB; to fit: train.recompute_granularity=full"):
        validate_plan(make_plan(R3B, ["train.recompute_granularity=null", "train.recompute_method=null",
                                      "train.recompute_num_layers=null"], nodes=1, gpus_per_node=8))
    assert validate_plan(make_plan(R7B, nodes=1, gpus_per_node=8)).parallel.tensor_model_parallel_size == 4


@pytest.mark.parametrize("recipe", [R3B, R7B, R32B, RELEASED_7B])
def test_every_gpu_recipe_fits_with_the_reserve_and_a_4_gib_margin(recipe, capsys):
    """79.2 GiB per H100, 3 GiB reserved (CUDA context, NCCL, workspaces); each stage's peak leaves
    at least 4 GiB, and each GRPO stage's engine share is at most the largest the plan allows."""
    cfg = load_config(recipe)
    for plan in plan_run(cfg):
        assert plan.gpu_gib == 79.2 and plan.reserve_gib == 3.0 and plan.min_margin_gib == 4.0
        assert plan.margin_gib == pytest.approx(79.2 - 3.0 - plan.peak_gib)
        assert plan.fits and plan.margin_gib >= 4.0, (plan.stage, plan.margin_gib)
        if plan.kind == "grpo":
            share = getattr(cfg, plan.stage).rollout.gpu_memory_utilization
            assert share <= plan.largest_engine_share, (plan.stage, share, plan.largest_engine_share)
    assert main(["plan", recipe]) == 0
    out = capsys.readouterr().out
    assert out.count("reserve (CUDA, NCCL, workspaces)         3.00 GiB") == len(cfg.stages)
    assert out.count(": fits") == len(cfg.stages) and "margin" in out


def test_the_margin_decides_the_fit_and_the_engine_share_is_derived_from_it():
    mrl = plan_stage(load_config(R7B), "mrl")  # the rollout binds: resident state + 0.55 x 79.2
    resident = mrl.resident_gib
    assert mrl.largest_engine_share == pytest.approx(int((79.2 - 3 - 4 - resident) / 79.2 * 100) / 100)
    squeezed = plan_stage(load_config(R7B), "mrl", reserve_gib=mrl.margin_gib + mrl.reserve_gib - 3.9)
    assert squeezed.margin_gib == pytest.approx(3.9) and not squeezed.fits
    # a larger engine share than the plan allows does not fit, and the plan names the share that does
    over = {p.stage: p for p in plan_run(load_config(R7B, ["mrl.rollout.gpu_memory_utilization=0.65"]))}["mrl"]
    assert not over.fits
    assert over.suggestion.startswith(f"mrl.rollout.gpu_memory_utilization={mrl.largest_engine_share} (peak ")
