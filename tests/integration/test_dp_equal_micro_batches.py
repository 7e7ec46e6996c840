"""Every DP rank runs the same number of forward passes, whatever its data: the FP8 deadlock.

Transformer Engine's delayed FP8 recipe all-reduces the amax history over TP x DP x CP at every
autocast exit of a forward with gradients (Megatron enters that context once per forward of a
TransformerBlock, `fp8_utils.get_fp8_context`). A DP rank that packed more micro-batches than
its peer issues an all-reduce the peer never joins: NCCL hangs. Transformer Engine cannot run
here, so a stand-in is hooked where Megatron enters the FP8 context: on every exit with
gradients it all-reduces one number over Megatron's amax reduction group and counts it (a mock
of TE's reduction; the model's FP8 flags are set on the built CPU model so that Megatron takes
that path, its layers stay the local spec). `TORCH_DISTRIBUTED_DEBUG=DETAIL` makes gloo check
that every rank calls the same collective with the same shapes.

DP rank 0 holds three packed rows, rank 1 one. One SFT update (`sft_loop.sft_update`) and one
GRPO step (`compute_log_probs` of the policy, `grpo_update` with KL) run at DP 2 with the
stand-in, and the same rows on one rank without it: the per-rank forward counts must be equal
(rank 1 runs filler rows), and losses, metrics and every updated weight (SGD) equal the single
rank's. Without the filler rows (the code before the fix) rank 0's second amax all-reduce meets
rank 1's gradient reduction: the ranks deadlock and the run times out (seen once: both ranks
stuck until the harness's timeout).
"""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from megatron_revisual.config import load_config
from megatron_revisual.parallel import run_distributed

ROOT = Path(__file__).resolve().parents[2]
LENGTHS = [(9, 14), (5, 21), (11, 6), (7, 12)]  # (prompt, response) tokens of the four sequences
SPLIT = {0: [0, 1, 2], 1: [3]}  # DP rank -> its sequences, one packed row each


@dataclasses.dataclass(frozen=True)
class _Row:
    packed: object


def _install_amax_stand_in(counts: dict[str, int]) -> None:
    """The stand-in for TE's amax all-reduce, where Megatron's TransformerBlock enters FP8."""
    import megatron.core.transformer.transformer_block as block
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    @contextmanager
    def fp8_context(config, layer_no=-1, is_init=False):
        yield
        if torch.is_grad_enabled():
            counts["training_forwards"] += 1
            group = ps.get_amax_reduction_group(with_context_parallel=True,
                                                tp_only_amax_red=config.tp_only_amax_red)
            dist.all_reduce(torch.ones(1), op=dist.ReduceOp.MAX, group=group)
        else:
            counts["forward_only"] += 1

    block.get_fp8_context = fp8_context


def _samples(cfg) -> list:
    from megatron_revisual.train.grpo_step import PolicySample

    g = torch.Generator().manual_seed(3)
    ids = lambda n: torch.randint(3, 600, (n,), generator=g)  # noqa: E731
    v = cfg.model.vision
    width = v.in_channels * v.temporal_patch_size * v.patch_size**2
    out = [PolicySample(prompt_ids=ids(p), response_ids=ids(r), advantage=a)
           for (p, r), a in zip(LENGTHS, (1.0, -0.5, 0.8, -1.2), strict=True)]
    # the first has an image (grid 1 x 4 x 6: 6 merged tokens)
    out[0] = dataclasses.replace(out[0], prompt_ids=torch.cat([ids(2), torch.full((6,), cfg.model.image_token_id),
                                                               ids(1)]),
                                 pixel_values=torch.randn(24, width, generator=g),
                                 image_grid_thw=torch.tensor([[1, 4, 6]]))
    return out


def _rank(cfg, stand_in: bool) -> dict:
    from megatron.core import parallel_state as ps

    from megatron_revisual.convert.hf_load import SafetensorsReader, load_hf_weights
    from megatron_revisual.data.packing import Sample, pack_sequences
    from megatron_revisual.models.qwen25_vl.provider import build_qwen25_vl
    from megatron_revisual.models.qwen25_vl.rope_index import mrope_config
    from megatron_revisual.train.builders import build_optimizer, wrap_ddp
    from megatron_revisual.train.grpo_step import (
        attach_log_probs,
        build_policy_batches,
        compute_log_probs,
        grpo_update,
    )
    from megatron_revisual.train.sft_loop import sft_update

    counts = {"training_forwards": 0, "forward_only": 0}
    if stand_in:
        _install_amax_stand_in(counts)
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    mine = SPLIT[dp_rank] if dp > 1 else [0, 1, 2, 3]
    samples = _samples(cfg)
    rope = mrope_config(cfg.model)

    def policy():
        model = build_qwen25_vl(cfg, pre_process=True, post_process=True)
        load_hf_weights(model, SafetensorsReader(cfg.model.hf_path), cfg.model, tp_rank=0, tp_size=1)
        if stand_in:  # Megatron's FP8 path, entered through the stand-in above
            model.config.fp8, model.config.fp8_recipe = "e4m3", "delayed"
        ddp = wrap_ddp(cfg, model)
        optimizer, _ = build_optimizer(cfg, [ddp])
        return ddp, optimizer

    out = {}
    # SFT: the whole sequence is the target; the step's mean NLL over all four sequences
    model, optimizer = policy()
    rows = [_Row(pack_sequences([Sample(input_ids=torch.cat([samples[i].prompt_ids, samples[i].response_ids]),
                                        pixel_values=samples[i].pixel_values,
                                        image_grid_thw=samples[i].image_grid_thw)],
                                config=rope, pad_to_multiple_of=16))
            for i in mine]
    tokens = float(sum(len(s.prompt_ids) + len(s.response_ids) - 1 for s in samples))
    total, ok, grad_norm, _ = sft_update(model, optimizer, None, rows, tokens=tokens)
    out["sft"] = {"loss": total / tokens, "grad_norm": grad_norm, "ok": ok,
                  "weights": {n: p.detach().clone() for n, p in model.module.named_parameters()}}
    sft_counts = dict(counts)

    # GRPO: old log-probs, then one update with KL to a reference 0.1 below them
    model, optimizer = policy()
    batches = build_policy_batches([samples[i] for i in mine], config=rope, micro_batch_size=1,
                                   pad_to_multiple_of=16)
    old = compute_log_probs(model, batches)
    batches = attach_log_probs(batches, old=old, ref=[o - 0.1 * mb.packed.loss_mask
                                                      for o, mb in zip(old, batches, strict=True)])
    metrics = grpo_update(model, optimizer, batches, kl_coef=0.1, entropy_coef=0.01)
    out["grpo"] = {**metrics, "weights": {n: p.detach().clone() for n, p in model.module.named_parameters()}}
    out["counts"] = {"sft": sft_counts, "grpo": {k: counts[k] - sft_counts[k] for k in counts}}
    return out


def _cfg(hf_dir: Path, dp: int):
    return load_config(ROOT / "configs" / "tiny_cpu_demo.yaml", [
        f"model.hf_path={hf_dir}", "parallel.tensor_model_parallel_size=1", "parallel.sequence_parallel=false",
        "parallel.use_distributed_optimizer=false", f"cluster.devices_per_node={dp}", "optim.optimizer=sgd",
        "optim.lr=0.5", "optim.lr_warmup_steps=0", "optim.lr_decay_style=constant", "optim.clip_grad=100.0",
    ])


@pytest.mark.integration
def test_dp_ranks_with_unequal_rows_run_equal_forwards_and_train_as_one_rank(tmp_path, monkeypatch):
    from megatron_revisual.testing.tiny_checkpoint import make_tiny_checkpoint

    hf_dir = make_tiny_checkpoint(tmp_path / "tiny", seed=4)
    (single,) = run_distributed(_rank, world_size=1, args=(_cfg(hf_dir, 1), False), timeout_s=300)
    monkeypatch.setenv("TORCH_DISTRIBUTED_DEBUG", "DETAIL")  # gloo checks every collective's ranks
    # ~20 s when the counts agree; with unequal counts the ranks deadlock (as NCCL would)
    ranks = run_distributed(_rank, world_size=2, args=(_cfg(hf_dir, 2), True), timeout_s=150)

    # rank 0's three rows and rank 1's one: rank 1 ran two filler rows in every pass
    for rank in ranks:
        assert rank["counts"]["sft"] == {"training_forwards": 3, "forward_only": 0}
        assert rank["counts"]["grpo"] == {"training_forwards": 3, "forward_only": 3}
    assert single["sft"]["ok"] and single["grpo"]["update_successful"] == 1.0
    for key in ("loss", "grad_norm"):
        for rank in ranks:
            assert rank["sft"][key] == pytest.approx(single["sft"][key], abs=1e-5), key
    for key in ("loss", "pg_loss", "kl", "entropy", "ppo_kl", "grad_norm", "num_tokens", "num_sequences"):
        for rank in ranks:
            assert rank["grpo"][key] == pytest.approx(single["grpo"][key], abs=1e-5), key
    assert single["grpo"]["num_tokens"] == 53 and single["grpo"]["num_sequences"] == 4
    for stage in ("sft", "grpo"):
        want = single[stage]["weights"]
        for rank in ranks:
            assert sorted(rank[stage]["weights"]) == sorted(want)
            for name, w in want.items():
                diff = (rank[stage]["weights"][name] - w).abs().max().item()
                assert diff <= 1e-5, f"{stage}: {name} differs by {diff:.2e}"
