"""The `revisual train` config sections: recipes, `base:` files, `${output_dir}`, and the
checks that run before any process starts."""

from __future__ import annotations

from pathlib import Path

import pytest

from megatron_revisual.config import (
    ConfigError,
    ConfigValidationError,
    load_config,
    read_raw_config,
)

ROOT = Path(__file__).resolve().parents[2]
RECIPES = {
    "qwen25_vl_3b_8xh100": (2, 1, 8),
    "qwen25_vl_7b_8xh100": (4, 1, 8),
    "qwen25_vl_32b_4x8xh100": (8, 2, 32),
}


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_h100_recipes_carry_the_paper_hyper_parameters(name):
    cfg = load_config(ROOT / "configs" / f"{name}.yaml", ["model.hf_path=null"])
    tp, pp, world = RECIPES[name]
    assert (cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size,
            cfg.cluster.world_size) == (tp, pp, world)
    assert cfg.stages == ["cold_start", "mrl", "trl"]
    cs = cfg.cold_start
    assert (cs.optim["lr"], cs.optim["lr_decay_style"], cs.lr_warmup_fraction, cs.epochs, cs.max_length) == (
        2e-5, "cosine", 0.05, 5, 32768)
    for g in (cfg.mrl, cfg.trl):  # paper Table 5
        assert g.optim["lr"] == 1e-6
        assert (g.global_batch_size, g.rollout_batch_size, g.rollout.n) == (128, 512, 8)
        assert (g.rollout.temperature, g.rollout.top_p) == (1.0, 0.95)
        assert (g.rollout.max_prompt_length, g.rollout.max_response_length) == (8192, 8192)
        assert (g.rl.entropy_coef, g.rl.entropy_decay, g.rl.entropy_decay_style, g.rl.entropy_warmup_steps) == (
            0.02, 0.985, "exp", 140)
        assert (g.rl.kl_kind, g.rl.kl_coef, g.rl.pad.tau) == ("low_var_kl", 2e-3, 0.3)
        assert cfg.cluster.world_size % g.rollout.tensor_parallel_size == 0
    assert cfg.mrl.validation.temperature == 0.3
    assert sum(cfg.mrl.rl.reward_weights.values()) == pytest.approx(1.0)


def test_fp8_choice_per_recipe():
    fp8 = {n: load_config(ROOT / "configs" / f"{n}.yaml", ["model.hf_path=null"]).precision for n in RECIPES}
    assert fp8["qwen25_vl_3b_8xh100"].fp8 is None
    assert (fp8["qwen25_vl_7b_8xh100"].fp8, fp8["qwen25_vl_7b_8xh100"].fp8_recipe) == ("hybrid", "delayed")
    assert (fp8["qwen25_vl_32b_4x8xh100"].fp8_recipe, fp8["qwen25_vl_32b_4x8xh100"].first_last_layers_bf16) == (
        "tensorwise", True)


def test_base_file_is_merged_section_by_section(tmp_path):
    (tmp_path / "base.yaml").write_text("name: a\noptim: {lr: 1.0, clip_grad: 3.0}\nstages: [mrl]\n")
    (tmp_path / "top.yaml").write_text("base: base.yaml\noptim: {lr: 2.0}\nname: b\n")
    raw = read_raw_config(tmp_path / "top.yaml")
    assert raw == {"name": "b", "optim": {"lr": 2.0, "clip_grad": 3.0}, "stages": ["mrl"]}
    (tmp_path / "loop.yaml").write_text("base: loop.yaml\n")
    with pytest.raises(ConfigError, match="includes itself"):
        read_raw_config(tmp_path / "loop.yaml")


def test_output_dir_is_substituted_after_overrides(tmp_path):
    raw = read_raw_config(ROOT / "configs" / "tiny_cpu_demo.yaml", [f"output_dir={tmp_path}"])
    assert raw["model"]["hf_path"] == f"{tmp_path}/hf_tiny"
    assert raw["mrl"]["data"]["path"] == f"{tmp_path}/data/mrl.parquet"
    with pytest.raises(ConfigError, match=r"\$\{nope\}.*no top-level scalar 'nope'"):
        read_raw_config(None, ["name=${nope}"])


def _tiny(tmp_path, *overrides):
    from megatron_revisual.testing.tiny_checkpoint import make_tiny_checkpoint

    hf = tmp_path / "hf"
    if not hf.exists():
        make_tiny_checkpoint(hf, seed=0)
    return load_config(ROOT / "configs" / "tiny_cpu_demo.yaml", [f"output_dir={tmp_path}", *overrides])


def test_stage_checks_name_the_numbers(tmp_path):
    with pytest.raises(ConfigValidationError) as e:
        _tiny(tmp_path, f"model.hf_path={tmp_path}/hf", "mrl.rollout.n=1", "mrl.rollout_batch_size=12",
              "mrl.micro_batch_tokens=100", "trl.rollout.tensor_parallel_size=3",
              "mrl.rl.reward_weights={accuracy: 1.0, speling: 0.5}", "stages=[cold_start, mrl, mrl]",
              "cold_start.optim={lr: 1.0e-3, lr_sceduler: cosine}")
    text = str(e.value)
    for expected in (
        "mrl.rollout.n=1 must be >= 2",
        "mrl.rollout_batch_size=12 prompts is not a multiple of mrl.global_batch_size=8",
        "mrl.micro_batch_tokens=100 is smaller than the longest sample (rollout.max_prompt_length + "
        "max_response_length = 160)",
        "trl.rollout.tensor_parallel_size=3 must divide the world size 2; use one of [1, 2]",
        "mrl.rl.reward_weights: unknown terms ['speling']",
        "lists a stage twice",
        "cold_start.optim: unknown fields ['lr_sceduler']",
    ):
        assert expected in text, expected


def test_listed_stage_needs_its_section(tmp_path):
    with pytest.raises(ConfigValidationError, match="stages lists 'trl' but the config has no 'trl' section"):
        _tiny(tmp_path, f"model.hf_path={tmp_path}/hf", "trl=null")


def test_tiny_demo_config_is_valid(tmp_path):
    cfg = _tiny(tmp_path, f"model.hf_path={tmp_path}/hf")
    assert cfg.stages == ["cold_start", "mrl", "trl"]
    assert cfg.mrl.rollout.engine == "vllm" and cfg.logging.wandb_mode == "offline"


def test_training_refuses_layouts_its_steps_cannot_run(tmp_path):
    from megatron_revisual.config.validate import validate_for_training

    cfg = _tiny(tmp_path, f"model.hf_path={tmp_path}/hf", "parallel.context_parallel_size=2", "train.seq_length=64",
                "parallel.tensor_model_parallel_size=1", "parallel.sequence_parallel=false")
    assert cfg.parallel.context_parallel_size == 2  # loads: model tests and conversion use CP
    with pytest.raises(ConfigValidationError, match="context_parallel_size=2: the packed SFT / GRPO steps"):
        validate_for_training(cfg)
    with pytest.raises(ConfigValidationError, match="stages is empty"):
        validate_for_training(_tiny(tmp_path, f"model.hf_path={tmp_path}/hf", "stages=[]"))
