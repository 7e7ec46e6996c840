"""One GRPO step (`train.grpo_step`) gives the same numbers at (TP, PP) = (2, 2) as at (1, 1),
and the same at (1, 1) whether the step is cut into three micro-batches or one.

Tiny Qwen2.5-VL whose vocabulary (832) is padded differently per layout (896 at TP=1, 1024 at
TP=2): the padded logit columns must be masked or the log-probs differ. Four fixed synthetic
rollouts (one with an image), responses of different lengths, fixed advantages. Old log-probs
come from `compute_log_probs` in each layout (compared), then get a fixed offset so that some
tokens clip; reference log-probs are the old ones with another offset so the KL term has a
gradient. One `grpo_update` with SGD: loss and metrics compared within 1e-5, and the updated
weights of a few tensors, gathered back to HF names with `convert.export.stream_hf_tensors`.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from megatron_revisual.config import load_config
from megatron_revisual.parallel import run_distributed

ROOT = Path(__file__).resolve().parents[2]
WATCHED = (
    "model.layers.0.self_attn.q_proj.weight",
    "model.layers.1.mlp.down_proj.weight",
    "visual.blocks.0.attn.qkv.weight",
    "lm_head.weight",
)
UPDATE = {"clip_low": 0.2, "clip_high": 0.25, "clip_dual": 3.0, "kl_coef": 0.1, "kl_kind": "low_var_kl",
          "entropy_coef": 0.01}
# micro-batch layouts: three rows of different lengths (pipeline shapes vary), or one row
SPLITS = {"three": {"micro_batch_tokens": 40}, "one": {"micro_batch_size": 4}}


def _samples(cfg) -> list:
    from megatron_revisual.train.grpo_step import PolicySample

    g = torch.Generator().manual_seed(7)
    ids = lambda n: torch.randint(3, 600, (n,), generator=g)  # noqa: E731
    image_tokens = torch.full((6,), cfg.model.image_token_id)  # grid 1 x 4 x 6, merge 2 -> 6
    v = cfg.model.vision
    patch_dim = v.in_channels * v.temporal_patch_size * v.patch_size**2
    return [
        PolicySample(prompt_ids=ids(9), response_ids=ids(14), advantage=1.0),
        PolicySample(prompt_ids=torch.cat([ids(3), image_tokens, ids(4)]), response_ids=ids(7), advantage=-0.5,
                     pixel_values=torch.randn(24, patch_dim, generator=g), image_grid_thw=torch.tensor([[1, 4, 6]])),
        PolicySample(prompt_ids=ids(5), response_ids=ids(21), advantage=0.8),
        PolicySample(prompt_ids=ids(11), response_ids=ids(3), advantage=-1.2),
    ]


def _rank(cfg, runs: list[tuple[str, str]]) -> dict:
    """For each (micro-batch split, loss aggregation): a fresh model, old log-probs, one update."""
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )

    from megatron_revisual.convert.export import stream_hf_tensors
    from megatron_revisual.convert.hf_load import SafetensorsReader, load_hf_weights
    from megatron_revisual.models.qwen25_vl.provider import build_qwen25_vl
    from megatron_revisual.models.qwen25_vl.rope_index import mrope_config
    from megatron_revisual.train.builders import build_optimizer
    from megatron_revisual.train.grpo_step import (
        attach_log_probs,
        build_policy_batches,
        compute_log_probs,
        grpo_update,
        response_values,
    )

    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    mine = list(range(dp_rank, 4, dp))  # this DP rank's share of the step's samples
    out = {}
    for split, agg in runs:
        model = build_qwen25_vl(cfg, pre_process=ps.is_pipeline_first_stage(), post_process=ps.is_pipeline_last_stage())
        load_hf_weights(model, SafetensorsReader(cfg.model.hf_path), cfg.model,
                        tp_rank=ps.get_tensor_model_parallel_rank(), tp_size=ps.get_tensor_model_parallel_world_size())
        config = model.config
        model = DistributedDataParallel(config, DistributedDataParallelConfig(grad_reduce_in_fp32=True), model)
        config.finalize_model_grads_func = finalize_model_grads
        config.no_sync_func = model.no_sync
        optimizer, _ = build_optimizer(cfg, [model])

        batches = build_policy_batches([_samples(cfg)[i] for i in mine], config=mrope_config(cfg.model),
                                       **SPLITS[split])
        old = compute_log_probs(model, batches)
        # fixed offsets of the old log-probs, from the target token id (the same whatever row it
        # lands in): +-0.3 so some ratios leave [0.8, 1.25], -1.2 on every third id so some
        # ratios pass the dual clip's 3; the reference 0.1 below the true old log-probs
        masks = [mb.packed.loss_mask for mb in batches]
        offsets = [m * torch.where(mb.packed.labels % 3 == 0, -1.2, 0.3 * (1 - 2 * (mb.packed.labels % 2)))
                   for m, mb in zip(masks, batches, strict=True)]
        batches = attach_log_probs(batches, old=[o + d for o, d in zip(old, offsets, strict=True)],
                                   ref=[o - 0.1 * m for o, m in zip(old, masks, strict=True)])
        metrics = grpo_update(model, optimizer, batches, **UPDATE, agg=agg)
        weights = {n: t.clone() for n, t in stream_hf_tensors(model, cfg.model) if n in WATCHED}
        old_by_sample = {mine[i]: v for i, v in response_values(batches, old).items()}
        out[f"{split}/{agg}"] = {"rows": [mb.row_length for mb in batches], "old": old_by_sample,
                                 "metrics": metrics, "weights": weights}
    return out


def _cfg(hf_dir: Path, tp: int, pp: int, dp: int = 1):
    return load_config(ROOT / "configs" / "tiny_cpu_demo.yaml", [
        f"model.hf_path={hf_dir}", f"parallel.tensor_model_parallel_size={tp}",
        f"parallel.pipeline_model_parallel_size={pp}", "parallel.sequence_parallel=false",
        "parallel.use_distributed_optimizer=false",
        f"cluster.devices_per_node={tp * pp * dp}", "optim.optimizer=sgd", "optim.lr=0.5",
        "optim.lr_warmup_steps=0", "optim.lr_decay_style=constant", "optim.clip_grad=1.0",
        "train.global_batch_size=4", "train.micro_batch_size=1",
    ])


@pytest.mark.integration
def test_grpo_step_same_at_tp2_pp2_and_any_micro_batching(tmp_path):
    from safetensors.torch import load_file

    from megatron_revisual.testing.tiny_checkpoint import TinySpec, make_tiny_checkpoint

    hf_dir = make_tiny_checkpoint(tmp_path / "tiny", seed=5, spec=TinySpec(vocab_multiple=832))
    initial = load_file(hf_dir / "model.safetensors")
    cfg11 = _cfg(hf_dir, 1, 1)
    assert cfg11.model.vocab_size == 832
    runs = [(split, agg) for agg in ("token-mean", "seq-mean-token-mean") for split in SPLITS]
    (base,) = run_distributed(_rank, world_size=1, args=(cfg11, runs), timeout_s=600)
    layered = run_distributed(_rank, world_size=4, tp=2, pp=2, args=(_cfg(hf_dir, 2, 2), runs[:1]), timeout_s=600)
    data_parallel = run_distributed(_rank, world_size=2, args=(_cfg(hf_dir, 1, 1, dp=2), runs[:1]), timeout_s=600)
    # samples of 23, 20, 26 and 14 tokens; DP rank 0 gets samples 0 and 2 (two rows), rank 1 1 and 3 (one)
    assert base["three/token-mean"]["rows"] == [23, 20, 40] and base["one/token-mean"]["rows"] == [83]
    assert [x["three/token-mean"]["rows"] for x in data_parallel] == [[23, 26], [34]]
    dp_old = {**data_parallel[0]["three/token-mean"]["old"], **data_parallel[1]["three/token-mean"]["old"]}
    for x in data_parallel:
        x["three/token-mean"]["old"] = dp_old

    ref = base["three/token-mean"]
    print("\n" + ", ".join(f"{k}={v:.4g}" for k, v in ref["metrics"].items()))
    assert ref["metrics"]["pg_clipfrac_higher"] > 0 and ref["metrics"]["pg_clipfrac_lower"] > 0
    assert ref["metrics"]["kl"] > 0 and ref["metrics"]["num_tokens"] == 45
    assert ref["metrics"]["num_sequences"] == 4
    # the two aggregations weigh tokens differently (4 sequences of 14, 7, 21 and 3 tokens)
    seq_ref = base["three/seq-mean-token-mean"]
    assert abs(seq_ref["metrics"]["pg_loss"] - ref["metrics"]["pg_loss"]) > 1e-3
    check(ref, [("one micro-batch", base["one/token-mean"])]
          + [(f"tp2pp2 rank {r}", x["three/token-mean"]) for r, x in enumerate(layered)]
          + [(f"dp2 rank {r}", x["three/token-mean"]) for r, x in enumerate(data_parallel)], initial)
    check(seq_ref, [("seq-mean, one micro-batch", base["one/seq-mean-token-mean"])], initial)


def check(ref: dict, candidates: list[tuple[str, dict]], initial: dict) -> None:
    """Old log-probs, metrics and updated weights of every candidate equal the reference run's."""
    assert sorted(ref["weights"]) == sorted(WATCHED)
    update = {name: ref["weights"][name] - initial[name] for name in WATCHED}
    for name in WATCHED:  # the step moved every watched tensor (the vision tower least: ~5e-5)
        assert update[name].abs().max() > 1e-5, name
    for label, got in candidates:
        assert sorted(got["old"]) == [0, 1, 2, 3]
        for i, want in ref["old"].items():
            assert (got["old"][i] - want).abs().max().item() <= 1e-5, f"{label}: old log-probs of sample {i} differ"
        for key in ("loss", "pg_loss", "kl", "entropy", "pg_clipfrac_higher", "pg_clipfrac_lower", "ppo_kl",
                    "grad_norm", "num_tokens", "num_sequences"):
            assert got["metrics"][key] == pytest.approx(ref["metrics"][key], abs=1e-5), f"{label}: {key}"
        for name in WATCHED:
            diff = (got["weights"][name] - ref["weights"][name]).abs().max().item()
            assert diff <= 1e-5, f"{label}: {name} differs by {diff:.2e}"
            # and the update itself, relative to its size (1e-5 absolute alone is loose for it)
            rel = ((got["weights"][name] - initial[name] - update[name]).abs().max() / update[name].abs().max()).item()
            assert rel <= 1e-3, f"{label}: update of {name} differs by {rel:.2e} relative"
