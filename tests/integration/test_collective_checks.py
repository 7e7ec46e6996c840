"""The rehearsal's collective checks (`parallel.collective_checks`) on 2 DP ranks holding 3 and 1
packed rows: with the equal-count schedule they pass and count 3 forwards on each rank; with the
agreement turned off (the bug put back), the FP8 amax stand-in fails within its timeout naming the
group and the call (where NCCL would hang), and without the stand-in the per-step check names
the ranks' unequal forward counts."""

from __future__ import annotations

import pytest
from test_dp_equal_micro_batches import SPLIT, _cfg, _Row, _samples

from megatron_revisual.parallel import RankError, run_distributed

pytestmark = pytest.mark.integration


def _rank(cfg, *, stand_in: bool, equal_counts: bool) -> dict:
    import torch
    from megatron.core import parallel_state as ps

    from megatron_revisual.config.schema import RehearsalConfig
    from megatron_revisual.convert.hf_load import SafetensorsReader, load_hf_weights
    from megatron_revisual.data.packing import Sample, pack_sequences
    from megatron_revisual.models.qwen25_vl.provider import build_qwen25_vl
    from megatron_revisual.models.qwen25_vl.rope_index import mrope_config
    from megatron_revisual.parallel.collective_checks import CollectiveChecks
    from megatron_revisual.train import schedule
    from megatron_revisual.train.builders import build_optimizer, wrap_ddp
    from megatron_revisual.train.grpo_step import build_policy_batches, compute_log_probs
    from megatron_revisual.train.sft_loop import sft_update

    if not equal_counts:
        schedule.agreed_micro_batch_count = lambda count: count
    checks = CollectiveChecks.install(RehearsalConfig(collective_checks=True, fp8_amax_stand_in=stand_in,
                                                      collective_timeout_s=10.0))
    model = build_qwen25_vl(cfg, pre_process=True, post_process=True)
    load_hf_weights(model, SafetensorsReader(cfg.model.hf_path), cfg.model, tp_rank=0, tp_size=1)
    ddp = wrap_ddp(cfg, model)
    optimizer, _ = build_optimizer(cfg, [ddp])
    samples = _samples(cfg)
    rows = [_Row(pack_sequences([Sample(input_ids=torch.cat([samples[i].prompt_ids, samples[i].response_ids]),
                                        pixel_values=samples[i].pixel_values,
                                        image_grid_thw=samples[i].image_grid_thw)],
                                config=mrope_config(cfg.model)))
            for i in SPLIT[ps.get_data_parallel_rank()]]
    # a forward-only pass (old log-probs), then a training step
    compute_log_probs(ddp, build_policy_batches([samples[i] for i in SPLIT[ps.get_data_parallel_rank()]],
                                                config=mrope_config(cfg.model), micro_batch_size=1))
    sft_update(ddp, optimizer, None, rows, tokens=100.0)
    return checks.end_of_step("cold_start", 1)


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    from megatron_revisual.testing.tiny_checkpoint import make_tiny_checkpoint

    return _cfg(make_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "hf", seed=4), dp=2)


def test_equal_counts_pass_the_checks(cfg, monkeypatch):
    monkeypatch.setenv("TORCH_DISTRIBUTED_DEBUG", "DETAIL")
    ranks = run_distributed(_rank, world_size=2, args=(cfg,), kwargs={"stand_in": True, "equal_counts": True},
                            timeout_s=300)
    assert ranks == [{"checks/forwards_with_grad": 3.0, "checks/forwards_without_grad": 3.0}] * 2


def test_unequal_counts_fail_the_amax_stand_in_naming_the_group_and_the_call(cfg, monkeypatch):
    monkeypatch.setenv("TORCH_DISTRIBUTED_DEBUG", "DETAIL")
    with pytest.raises(RankError) as e:
        run_distributed(_rank, world_size=2, args=(cfg,), kwargs={"stand_in": True, "equal_counts": False},
                        timeout_s=150)
    message = str(e.value)
    assert "CollectiveMismatch" in message and "rank 0: the FP8 amax all-reduce" in message
    assert "over the amax group of ranks [0, 1]) of this rank's forward 2 with gradients" in message
    assert "found no peer within 10 s" in message


def test_unequal_counts_without_a_collective_fail_the_step_check(cfg):
    with pytest.raises(RankError) as e:
        run_distributed(_rank, world_size=2, args=(cfg,), kwargs={"stand_in": False, "equal_counts": False},
                        timeout_s=300)
    message = str(e.value)
    assert "[cold_start] step 1: the ranks of one amax group (TP x DP x CP) ran different numbers of forward" in message
    assert "rank 0: (3, 3), rank 1: (1, 1)" in message
