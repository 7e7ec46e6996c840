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
        assert (g.rl.kl_kind, g.rl.kl_coef, g.rl.pad.mode, g.rl.pad.tau) == ("low_var_kl", 2e-3, "paper", 0.3)
        assert g.rl.pad.ratio < 1 and not g.rl.pad.replacement  # PAD that can prioritise
        assert cfg.cluster.world_size % g.rollout.tensor_parallel_size == 0
        # TIS where the trainer runs FP8 and the engine bf16
        assert g.rl.rollout_correction.tis_cap == (2.0 if cfg.precision.fp8 else None)
    assert cfg.mrl.validation.temperature == 0.3
    assert (cfg.mrl.rl.reward_preset, cfg.mrl.rl.reward_grader) == ("revisual_math", "math_verify")
    assert cfg.trl.rl.reward_weights == {"accuracy": 0.8, "format": 0.1, "efficient_length": 0.1}


def _flat(node: object, prefix: str = "") -> dict[str, object]:
    if not isinstance(node, dict) or prefix.endswith("reward_weights."):
        return {prefix[:-1]: node}
    return {k: v for key, child in node.items() for k, v in _flat(child, f"{prefix}{key}.").items()}


def test_released_recipe_mirrors_the_released_config():
    from megatron_revisual.config import config_to_dict

    released = load_config(ROOT / "configs" / "revisual_r1_released_7b_8xh100.yaml", ["model.hf_path=null"])
    for g in (released.mrl, released.trl):
        rl = g.rl
        assert (rl.kl_coef, rl.kl_kind, rl.kl_in_reward, rl.entropy_warmup_steps) == (1e-2, "low_var_kl", False, 20)
        assert (rl.entropy_coef, rl.entropy_decay, rl.entropy_decay_style) == (0.02, 0.985, "exp")
        p = rl.pad
        assert (p.mode, p.alpha, p.t_low, p.t_high, p.ratio, p.replacement) == ("released", 1.5, 0.03, 0.97, 1.5, True)
        assert (g.rollout.n, g.rollout.temperature, g.rollout.top_p,
                g.rollout.tensor_parallel_size) == (8, 1.0, 0.95, 4)
        assert (g.rollout_batch_size, g.global_batch_size, g.optim["lr"]) == (512, 128, 1e-6)
        assert rl.reward_grader == "mathruler" and not rl.rollout_correction.enabled
    assert (released.mrl.rl.reward_preset, released.trl.rl.reward_preset) == ("revisual_math", "revisual_text")
    assert (released.mrl.steps, released.mrl.validation.every, released.checkpoint.every) == (200, 5, 5)
    assert released.precision.fp8 is None
    # the paper recipe of the same model differs only where the sources (or FP8) do
    paper = load_config(ROOT / "configs" / "qwen25_vl_7b_8xh100.yaml", ["model.hf_path=null"])
    a, b = _flat(config_to_dict(paper)), _flat(config_to_dict(released))
    # (train.* sizes `revisual demo` only: the released recipe does not set them)
    differ = {k.split(".", 1)[1] if k.startswith(("mrl.", "trl.")) else k for k in a
              if a[k] != b.get(k) and not k.startswith("train.")}
    assert differ == {
        "name", "output_dir", "precision.fp8", "steps", "validation.every",
        "checkpoint.every", "checkpoint.keep_last", "rl.kl_coef", "rl.entropy_warmup_steps",
        "rl.reward_preset", "rl.reward_grader", "rl.reward_weights", "rl.length_budget",
        "rl.pad.mode", "rl.pad.ratio", "rl.pad.tau", "rl.pad.alpha", "rl.pad.replacement",
        "rl.rollout_correction.tis_cap", "rollout.tensor_parallel_size", "rollout.gpu_memory_utilization",
    }


def test_pad_that_cannot_prioritise_warns_with_the_numbers(tmp_path):
    from megatron_revisual.config.validate import ConfigWarning

    with pytest.warns(ConfigWarning) as record:
        _tiny(tmp_path, f"model.hf_path={tmp_path}/hf", "mrl.rl.pad.ratio=1.5", "trl.rl.pad.ratio=1.0")
    text = [str(w.message) for w in record if issubclass(w.category, ConfigWarning)]
    assert len(text) == 2  # mrl at ratio 1.5, trl at 1.0
    assert text[0].startswith(
        "mrl.rl.pad cannot prioritise: mode='paper' with ratio=1.5 >= |E|/N and no replacement draws "
        "min(ceil(ratio x N), |E|) = |E| of the N = 16 x 8 = 128 samples"
    )
    assert "tau=0.3 has no effect" in text[0] and "trl.rl.pad cannot prioritise" in text[1]
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", ConfigWarning)
        _tiny(tmp_path, f"model.hf_path={tmp_path}/hf", "mrl.rl.pad.ratio=0.5", "trl.rl.pad.ratio=0.5")
        _tiny(tmp_path, f"model.hf_path={tmp_path}/hf",
              "mrl.rl.pad={mode: released, ratio: 1.5, alpha: 1.5, replacement: true}",
              "trl.rl.pad={mode: released, ratio: 0.75}")


def test_objective_options_without_effect_are_errors(tmp_path):
    with pytest.raises(ConfigValidationError) as e:
        _tiny(tmp_path, f"model.hf_path={tmp_path}/hf", "mrl.rl.policy_loss=gspo", "mrl.rl.clip_low=0.1",
              "trl.rl.gspo_clip_high=0.001", "mrl.rl.kl_in_reward=true",
              "mrl.rl.rollout_correction={tis_cap: 2.0}", "mrl.rollout.temperature=0.7",
              "trl.rl.rollout_correction={seq: reject}", "mrl.rl.pad={mode: released, tau: 0.3}",
              "trl.rl.pad.replacement=true", "trl.rl.reward_preset=revisual_text")
    text = str(e.value)
    for expected in (
        "mrl.rl.clip_low=0.1 has no effect with mrl.rl.policy_loss='gspo'",
        "trl.rl.gspo_clip_high=0.001 has no effect with trl.rl.policy_loss='ppo'",
        "mrl.rl.kl_in_reward=true has no effect with mrl.rl.kl_coef=0.0",
        "mrl.rl.rollout_correction compares the trainer's log-probs at mrl.rollout.temperature=0.7",
        "trl.rl.rollout_correction.seq='reject' needs seq_upper > 1",
        "mrl.rl.pad.tau=0.3 has no effect with mrl.rl.pad.mode='released'",
        "trl.rl.pad.replacement=True has no effect with trl.rl.pad.mode='paper'",
        "trl.rl.reward_weights has no effect with trl.rl.reward_preset='revisual_text'",
    ):
        assert expected in text, expected


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
        "mrl.rollout_batch_size=12 prompts is not a multiple of mrl.global_batch_size=16",
        "mrl.micro_batch_tokens=100 is smaller than the longest sample (rollout.max_prompt_length + "
        "max_response_length = 160)",
        "trl.rollout.tensor_parallel_size=3 must divide the world size 2; use one of [1, 2]",
        "mrl.rl.reward_weights: unknown terms ['speling']",
        "lists a stage twice",
        "cold_start.optim: unknown fields ['lr_sceduler']",
    ):
        assert expected in text, expected


def test_rollout_and_training_tp_must_nest(tmp_path):
    with pytest.raises(ConfigValidationError) as e:
        _tiny(tmp_path, f"model.hf_path={tmp_path}/hf", "cluster.devices_per_node=6",
              "mrl.rollout.tensor_parallel_size=3", "trl.rollout.engine=transformers",
              "trl.rollout.tensor_parallel_size=2")
    text = str(e.value)
    assert ("mrl.rollout.tensor_parallel_size=3 and parallel.tensor_model_parallel_size=2: one must divide "
            "the other") in text
    assert "trl.rollout.tensor_parallel_size=2: the transformers engine has no tensor parallelism" in text
    assert "trl.rollout.tensor_parallel_size=2 and" not in text  # 2 and 2 nest


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
    validate_for_training(cfg)  # the SFT and GRPO steps split their rows over CP
    with pytest.raises(ConfigValidationError, match="stages is empty"):
        validate_for_training(_tiny(tmp_path, f"model.hf_path={tmp_path}/hf", "stages=[]"))
