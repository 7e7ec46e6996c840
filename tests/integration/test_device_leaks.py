"""No host tensor reaches the GPU path of one cold-start SFT step and one GRPO update.

On a GPU the model's parameters live on CUDA and every collective runs on NCCL, which refuses
host tensors; here both are stood in for by `fake_cuda.py` beside this test (a mock: there is no GPU): each
tensor carries a logical device, an op mixing "cuda" and host tensors raises `DeviceLeak` as
CUDA would, and a collective given a host tensor raises as NCCL would. The parameters are put on
the fake GPU as `model.cuda()` would, the compute device is set to "cuda", and then the real
code runs on 2 gloo ranks (DP 2, Megatron DDP, distributed optimizer): `SFTLoop.step` on
conversations with and without an image, and `compute_log_probs` + `grpo_update` with KL on
rollouts with and without an image.

The numbers must equal those of the same step run without the fake (it changes no value), and
the mechanism must catch the two mistakes this test exists for: a batch left on the host
(`to_device` undone) and a host tensor handed to a collective (`all_reduce` through gloo only).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from megatron_revisual.config import load_config
from megatron_revisual.parallel import RankError, run_distributed

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def _rollouts(cfg) -> list:
    from megatron_revisual.train.grpo_step import PolicySample

    g = torch.Generator().manual_seed(3)
    ids = lambda n: torch.randint(3, 600, (n,), generator=g)  # noqa: E731
    v = cfg.model.vision
    patch_dim = v.in_channels * v.temporal_patch_size * v.patch_size**2
    image = torch.full((6,), cfg.model.image_token_id)  # grid 1 x 4 x 6, merge 2 -> 6 tokens
    return [
        PolicySample(prompt_ids=ids(9), response_ids=ids(14), advantage=1.0),
        PolicySample(prompt_ids=torch.cat([ids(3), image, ids(4)]), response_ids=ids(7), advantage=-0.5,
                     pixel_values=torch.randn(24, patch_dim, generator=g), image_grid_thw=torch.tensor([[1, 4, 6]])),
        PolicySample(prompt_ids=ids(5), response_ids=ids(21), advantage=0.8),
        PolicySample(prompt_ids=torch.cat([ids(2), image, ids(2)]), response_ids=ids(5), advantage=-1.0,
                     pixel_values=torch.randn(24, patch_dim, generator=g), image_grid_thw=torch.tensor([[1, 4, 6]])),
    ]


def _steps(cfg, hf_dir: Path, fake: bool, put_back: str | None) -> dict:
    """One SFT step and one GRPO update on fresh models; their metrics."""
    import contextlib

    from fake_cuda import fake_cuda
    from megatron.core import parallel_state as ps

    from megatron_revisual.convert.hf_load import SafetensorsReader, load_hf_weights
    from megatron_revisual.models.qwen25_vl.provider import build_qwen25_vl
    from megatron_revisual.models.qwen25_vl.rope_index import mrope_config
    from megatron_revisual.parallel.device import set_compute_device
    from megatron_revisual.train import grpo_step, schedule
    from megatron_revisual.train.builders import build_optimizer, wrap_ddp
    from megatron_revisual.train.grpo_loop import logprob_gaps
    from megatron_revisual.train.grpo_step import (
        attach_log_probs,
        build_policy_batches,
        compute_log_probs,
        grpo_update,
    )
    from megatron_revisual.train.sft_loop import SFTLoop
    from megatron_revisual.train.stage_common import StageContext

    if put_back == "batch left on the host":
        schedule.to_device = lambda obj, device=None: obj
    elif put_back == "host tensor into a collective":
        def gloo_only(tensor, op=torch.distributed.ReduceOp.SUM, group=None):
            torch.distributed.all_reduce(tensor, op=op, group=group)
            return tensor

        grpo_step.all_reduce = gloo_only

    with fake_cuda() if fake else contextlib.nullcontext() as mode:
        set_compute_device("cuda" if fake else None)

        def model():
            m = build_qwen25_vl(cfg, pre_process=True, post_process=True)
            load_hf_weights(m, SafetensorsReader(hf_dir), cfg.model, tp_rank=0, tp_size=1)
            m = mode.to_cuda(m) if fake else m
            ddp = wrap_ddp(cfg, m)
            return (ddp, *build_optimizer(cfg, [ddp]))

        sft = SFTLoop(StageContext(cfg=cfg, name="cold_start", stage_cfg=cfg.cold_start, start_hf=Path(hf_dir)))
        sft.attach(*model())
        sft_metrics = sft.step(1, 1)

        policy, optimizer, _ = model()
        dp, rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
        batches = build_policy_batches(_rollouts(cfg)[rank::dp], config=mrope_config(cfg.model), micro_batch_tokens=40)
        old = compute_log_probs(policy, batches)
        assert all(o.device.type == "cpu" for o in old)  # log-probs come back to the host
        batches = attach_log_probs(batches,
                                   old=[o + 0.1 * mb.packed.loss_mask for o, mb in zip(old, batches, strict=True)],
                                   ref=[o - 0.2 * mb.packed.loss_mask for o, mb in zip(old, batches, strict=True)])
        grpo_metrics = grpo_update(policy, optimizer, batches, kl_coef=0.1, entropy_coef=0.01)
        # the GRPO loop's own DP reduction of host statistics (it does not use the loop's state)
        diff = logprob_gaps([(rank, torch.tensor([0.1, 0.3 + rank]))], num_engines=2)
        set_compute_device(None)
    return {"sft": sft_metrics, "grpo": grpo_metrics, "logprob_diff": diff}


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory):
    from megatron_revisual.data.synthetic import arithmetic_rows, image_rows, write_rows
    from megatron_revisual.testing.tiny_checkpoint import make_tiny_checkpoint

    base = tmp_path_factory.mktemp("device_leaks")
    hf_dir = make_tiny_checkpoint(base / "tiny", seed=4)
    sft_path = write_rows(arithmetic_rows(6, seed=1) + image_rows(2, seed=2, task="colour", options=2),
                          base / "sft.jsonl")
    cfg = load_config(ROOT / "configs" / "tiny_cpu_demo.yaml", [
        f"output_dir={base / 'run'}", f"model.hf_path={hf_dir}", "prepare.tiny_model=false",
        "cluster.devices_per_node=2", "parallel.tensor_model_parallel_size=1", "parallel.sequence_parallel=false",
        f"cold_start.data.path={sft_path}", "cold_start.global_batch_size=8", "optim.lr_warmup_steps=0",
    ])
    return cfg, hf_dir


def _run(setup, fake: bool, put_back: str | None = None) -> list[dict]:
    cfg, hf_dir = setup
    return run_distributed(_steps, world_size=2, args=(cfg, hf_dir, fake, put_back), timeout_s=600)


def test_one_sft_step_and_one_grpo_update_keep_to_the_device(setup):
    faked = _run(setup, fake=True)
    plain = _run(setup, fake=False)
    for rank in (0, 1):
        sft, grpo = faked[rank]["sft"], faked[rank]["grpo"]
        print(f"rank {rank}: sft loss {sft['loss']:.5f}, grpo loss {grpo['loss']:.5f}, kl {grpo['kl']:.5f}")
        # the step ran and trained: images in both, every sample's tokens counted
        assert sft["sft/sequences"] == 8 and sft["skipped_non_finite"] == 0.0
        assert grpo["num_sequences"] == 4 and grpo["num_tokens"] == 14 + 7 + 21 + 5
        assert grpo["kl"] > 0 and grpo["update_successful"] == 1.0
        # |diff| tokens 0.1, 0.3 on rank 0 and 0.1, 1.3 on rank 1: mean 0.45, max 1.3 on both
        assert faked[rank]["logprob_diff"] == pytest.approx(
            {"rollout/logprob_diff_mean": 0.45, "rollout/logprob_diff_max": 1.3,
             "rollout/logprob_diff_max/engine0": 0.3, "rollout/logprob_diff_max/engine1": 1.3})
        for step in ("sft", "grpo", "logprob_diff"):  # the fake changes no number
            assert faked[rank][step] == pytest.approx(plain[rank][step], rel=0, abs=0), step


@pytest.mark.parametrize(("put_back", "message"), [
    ("batch left on the host", "tensors on cuda and on the host"),
    ("host tensor into a collective", "on NCCL got a host tensor"),
])
def test_the_leak_check_fails_on_the_mistakes_it_guards_against(setup, put_back, message):
    with pytest.raises(RankError, match=message):
        _run(setup, fake=True, put_back=put_back)
