"""Config loading, dotted overrides and validation: values land typed, bad input names the field."""

from pathlib import Path

import pytest

from megatron_revisual.cli import main
from megatron_revisual.config import (
    ConfigError,
    ConfigValidationError,
    config_from_dict,
    dump_config,
    load_config,
)

ROOT = Path(__file__).resolve().parents[2]
SEVEN_B = ROOT / "configs" / "qwen25_vl_7b_8xh100.yaml"


def test_preset_and_overrides_are_typed():
    cfg = load_config(
        SEVEN_B,
        ["optim.lr=1e-6", "train.train_iters=7", "parallel.sequence_parallel=false", "model.vision.depth=8",
         "model.vision.fullatt_block_indexes=[3, 7]"],
    )
    assert cfg.optim.lr == 1e-6 and isinstance(cfg.optim.lr, float)
    assert cfg.train.train_iters == 7
    assert cfg.parallel.sequence_parallel is False
    # the preset supplies the sizes, the file and overrides win where given
    assert (cfg.model.hidden_size, cfg.model.num_layers, cfg.model.num_query_groups) == (3584, 28, 4)
    assert cfg.model.vision.depth == 8 and cfg.model.vision.hidden_size == 1280
    assert cfg.model.vision.fullatt_block_indexes == [3, 7]
    assert cfg.data_parallel_size == 2


@pytest.mark.parametrize(
    "preset, sizes",
    [
        ("qwen25_vl_3b", (2048, 36, 16, 2, 11008, 151936, True, 3420)),
        ("qwen25_vl_7b", (3584, 28, 28, 4, 18944, 152064, False, 3420)),
        ("qwen25_vl_32b", (5120, 64, 40, 8, 27648, 152064, False, 3456)),
    ],
)
def test_presets_match_released_sizes(preset, sizes):
    cfg = config_from_dict({"model": {"preset": preset}})
    m = cfg.model
    got = (m.hidden_size, m.num_layers, m.num_attention_heads, m.num_query_groups, m.ffn_hidden_size,
           m.vocab_size, m.tie_word_embeddings, m.vision.intermediate_size)
    assert got == sizes
    assert m.head_dim == 128 and m.mrope_section == [16, 24, 24] and m.rotary_base == 1e6
    assert m.vision.fullatt_block_indexes == [7, 15, 23, 31] and m.vision.depth == 32


def test_tp_not_dividing_kv_groups_names_legal_values():
    with pytest.raises(ConfigValidationError) as e:
        load_config(SEVEN_B, ["parallel.tensor_model_parallel_size=8"])
    assert ("parallel.tensor_model_parallel_size=8 does not divide model.num_query_groups=4; use one of [1, 2, 4]"
            in str(e.value))


def test_3b_tp4_rejected():
    with pytest.raises(ConfigValidationError, match=r"num_query_groups=2; use one of \[1, 2\]"):
        load_config(None, ["model.preset=qwen25_vl_3b", "parallel.tensor_model_parallel_size=4",
                           "cluster.devices_per_node=8"])


def test_all_problems_reported_together():
    with pytest.raises(ConfigValidationError) as e:
        load_config(SEVEN_B, ["parallel.pipeline_model_parallel_size=3", "train.global_batch_size=100",
                              "train.micro_batch_size=3"])
    problems = e.value.problems
    assert any("pipeline_model_parallel_size=3 does not divide model.num_layers=28; "
               "use one of [1, 2, 4, 7, 14, 28]" in p
               for p in problems)
    assert any("world size 8" in p and "= 12" in p for p in problems)


def test_batch_and_sp_and_cp_checks():
    with pytest.raises(ConfigValidationError) as e:
        load_config(SEVEN_B, ["train.global_batch_size=10", "parallel.tensor_model_parallel_size=1",
                              "parallel.context_parallel_size=2", "train.seq_length=30"])
    text = str(e.value)
    assert "parallel.sequence_parallel=true needs tensor_model_parallel_size > 1" in text
    assert "train.seq_length=30 must be divisible by 2 x context_parallel_size=4" in text
    assert "train.global_batch_size=10 is not divisible by train.micro_batch_size=1 x data-parallel size 4" in text


def test_first_stage_override():
    cfg = load_config(SEVEN_B, ["parallel.pipeline_model_parallel_size=4", "parallel.tensor_model_parallel_size=2",
                                "parallel.num_layers_in_first_pipeline_stage=4", "train.global_batch_size=128"])
    assert cfg.parallel.num_layers_in_first_pipeline_stage == 4  # 24 remaining over 3 stages
    with pytest.raises(ConfigValidationError, match="remaining 23 of model.num_layers=28 must split evenly over 3"):
        load_config(SEVEN_B, ["parallel.pipeline_model_parallel_size=4", "parallel.tensor_model_parallel_size=2",
                              "parallel.num_layers_in_first_pipeline_stage=5"])


def test_overlap_param_gather_needs_the_distributed_optimizer_and_overlapped_grads():
    cfg = load_config(SEVEN_B)  # the H100 recipes turn both on
    assert cfg.parallel.overlap_grad_reduce and cfg.parallel.overlap_param_gather
    with pytest.raises(ConfigValidationError) as e:
        load_config(SEVEN_B, ["parallel.overlap_grad_reduce=false", "parallel.ddp_bucket_size=0"])
    assert ("parallel.overlap_param_gather=true needs parallel.use_distributed_optimizer=true and "
            "parallel.overlap_grad_reduce=true") in str(e.value)
    assert "parallel.ddp_bucket_size=0: expected a number of parameters >= 1" in str(e.value)


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.lrr=1", "unknown field 'optim.lrr'; did you mean 'optim.lr'?"),
        ("optim.lr=abc", "optim.lr='abc' must be a number"),
        ("parallel.sequence_parallel=maybe", "parallel.sequence_parallel='maybe' must be true or false"),
        ("train.train_iters=1.5", "train.train_iters=1.5 must be an integer"),
        ("optim.lr_decay_style=exp",
         "optim.lr_decay_style='exp' is not allowed; use one of ['constant', 'linear', 'cosine']"),
        ("model.preset=qwen25_vl_72b", "model.preset='qwen25_vl_72b' is unknown"),
        ("optim", "is not of the form dotted.key=value"),
        ("optim.lr.x=1", "optim.lr is a value"),
    ],
)
def test_bad_overrides_name_field(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(SEVEN_B, [override])
    assert message in str(e.value)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(bad)
    bad.write_text("optim:\n  lr: 1.0\n")
    with pytest.raises(ConfigError, match="'model' section is required"):
        load_config(bad)
    bad.write_text("model:\n  hf_path: /nonexistent/dir\n")
    with pytest.raises(ConfigError, match="model.hf_path: .*no config.json"):
        load_config(bad)


def test_dump_round_trips(tmp_path):
    cfg = load_config(SEVEN_B, ["optim.lr=3e-6"])
    path = tmp_path / "dumped.yaml"
    path.write_text(dump_config(cfg))
    assert load_config(path) == cfg


def test_cli_config_exit_codes(capsys):
    assert main(["config", str(SEVEN_B), "parallel.tensor_model_parallel_size=2"]) == 0
    assert "# layout: world 8 = TP 2 x PP 1 x CP 1 x DP 4" in capsys.readouterr().out
    assert main(["config", str(SEVEN_B), "parallel.tensor_model_parallel_size=8"]) == 2
    assert "use one of [1, 2, 4]" in capsys.readouterr().err


def test_text_only_model_skips_mrope_check():
    # a Qwen2 config.json has no mrope_section; the preset default [16, 24, 24] must not be checked
    cfg = config_from_dict({"model": {"preset": "qwen25_vl_3b", "vision": None, "kv_channels": 32,
                                      "num_attention_heads": 16, "hidden_size": 512}})
    assert cfg.model.vision is None
    from megatron_revisual.config import validate_config

    validate_config(cfg)
    with pytest.raises(ConfigValidationError, match="mrope_section"):
        validate_config(config_from_dict({"model": {"preset": "qwen25_vl_3b", "kv_channels": 32,
                                                    "num_attention_heads": 16, "hidden_size": 512}}))
