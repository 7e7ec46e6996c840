"""Context parallelism in the training steps: an SFT step (`train.sft_loop.sft_update`) and a
GRPO update (`train.grpo_step.grpo_update`, PAD-selected samples, KL to a reference, entropy
bonus, clipped ratios) at CP 2 on 2 gloo ranks give the losses and gradients of CP 1.

The tiny Qwen2.5-VL (QKV x4, so attention is far from uniform) on packed THD rows: one sequence
holds two images (grids 1x4x6 and 1x4x4), another one image, two are text only; every sequence
is longer than a CP chunk (L / 4), and one row packs three sequences. At CP 2 each rank holds
chunks r and 3 - r of every sequence; our local-spec attention all-gathers K/V over the CP group
with the causal per-segment mask of that order; the images go through the vision tower once,
split over the two ranks; the log-probs are gathered back to whole rows for the loss. Compared:
loss and metrics within 1e-5, every parameter's gradient within 1e-4 of its largest entry, and
compute_log_probs (the old and reference log-probs) within 1e-5.

    .venv/bin/python -m pytest tests/integration/test_cp_training.py -s
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch

from megatron_revisual.config import load_config
from megatron_revisual.parallel import run_distributed

pytestmark = [pytest.mark.integration]

ROOT = Path(__file__).resolve().parents[2]
UPDATE = {"clip_low": 0.2, "clip_high": 0.25, "clip_dual": 3.0, "kl_coef": 0.1, "kl_kind": "low_var_kl",
          "entropy_coef": 0.01, "agg": "seq-mean-token-mean"}


def _samples(cfg) -> list:
    from megatron_revisual.train.grpo_step import PolicySample

    g = torch.Generator().manual_seed(11)
    ids = lambda n: torch.randint(3, 600, (n,), generator=g)  # noqa: E731
    v = cfg.model.vision
    width = v.in_channels * v.temporal_patch_size * v.patch_size**2
    image = lambda n: torch.full((n,), cfg.model.image_token_id)  # noqa: E731
    pixels = lambda n: torch.randn(n, width, generator=g)  # noqa: E731
    return [
        PolicySample(prompt_ids=ids(9), response_ids=ids(14), advantage=1.0),
        # two images in one sequence: 24 patches -> 6 tokens, 16 patches -> 4 tokens
        PolicySample(prompt_ids=torch.cat([ids(2), image(6), ids(3), image(4), ids(2)]), response_ids=ids(9),
                     advantage=-0.7, pixel_values=pixels(40), image_grid_thw=torch.tensor([[1, 4, 6], [1, 4, 4]])),
        PolicySample(prompt_ids=ids(5), response_ids=ids(21), advantage=0.8),
        PolicySample(prompt_ids=torch.cat([ids(3), image(6), ids(4)]), response_ids=ids(7), advantage=-1.2,
                     pixel_values=pixels(24), image_grid_thw=torch.tensor([[1, 4, 6]])),
        PolicySample(prompt_ids=ids(6), response_ids=ids(5), advantage=0.02),  # PAD drops it (|A| < 0.1)
        PolicySample(prompt_ids=ids(11), response_ids=ids(12), advantage=0.4),
    ]


def _model(cfg):
    from megatron.core import parallel_state as ps

    from megatron_revisual.convert.hf_load import SafetensorsReader, load_hf_weights
    from megatron_revisual.models.qwen25_vl.provider import build_qwen25_vl
    from megatron_revisual.train.builders import build_optimizer, wrap_ddp

    model = build_qwen25_vl(cfg, pre_process=True, post_process=True)
    load_hf_weights(model, SafetensorsReader(cfg.model.hf_path), cfg.model,
                    tp_rank=ps.get_tensor_model_parallel_rank(), tp_size=ps.get_tensor_model_parallel_world_size())
    ddp = wrap_ddp(cfg, model)
    optimizer, scheduler = build_optimizer(cfg, [ddp])
    return ddp, optimizer, scheduler


def _grads(ddp) -> dict[str, torch.Tensor]:
    """Every parameter's gradient, TP shards gathered back to the whole tensor."""
    from megatron.core import parallel_state as ps

    out = {}
    for name, p in ddp.named_parameters():
        if not p.requires_grad:
            continue
        g = p.main_grad.detach().clone()
        if getattr(p, "tensor_model_parallel", False) and ps.get_tensor_model_parallel_world_size() > 1:
            parts = [torch.empty_like(g) for _ in range(ps.get_tensor_model_parallel_world_size())]
            torch.distributed.all_gather(parts, g, group=ps.get_tensor_model_parallel_group())
            if "mlp.linear_fc1" in name:  # gated MLP: each shard is [gate_r; up_r]
                halves = [part.chunk(2, dim=0) for part in parts]
                parts = [h[0] for h in halves] + [h[1] for h in halves]
            g = torch.cat(parts, dim=p.partition_dim)
        out[name] = g
    return out


def _rank(cfg, mode: str) -> dict:
    from megatron.core import parallel_state as ps

    from megatron_revisual.data.packing import Sample, pack_sequences
    from megatron_revisual.models.qwen25_vl.rope_index import mrope_config
    from megatron_revisual.rl.pad import pad_step
    from megatron_revisual.train.grpo_step import (
        attach_log_probs,
        build_policy_batches,
        compute_log_probs,
        grpo_update,
        response_values,
    )
    from megatron_revisual.train.sft_loop import sft_update
    from megatron_revisual.train.stage_common import row_multiple

    cp = ps.get_context_parallel_world_size()
    multiple = row_multiple(cfg)  # 2 x CP x TP with sequence parallelism
    samples = _samples(cfg)
    ddp, optimizer, scheduler = _model(cfg)
    if mode == "sft":
        rows = []
        for group in ([0, 1, 2], [3, 5]):
            packed = pack_sequences(
                [Sample(input_ids=torch.cat([samples[i].prompt_ids, samples[i].response_ids]),
                        target_mask=torch.cat([torch.zeros(samples[i].prompt_ids.numel(), dtype=torch.bool),
                                               torch.ones(samples[i].response_ids.numel(), dtype=torch.bool)]),
                        pixel_values=samples[i].pixel_values, image_grid_thw=samples[i].image_grid_thw)
                 for i in group],
                config=mrope_config(cfg.model), pad_to_multiple_of=multiple, cp_size=cp)
            rows.append(_PackedRow(packed))
        tokens = float(sum(int(r.packed.loss_mask.sum()) for r in rows))
        total, ok, grad_norm, _ = sft_update(ddp, optimizer, scheduler, rows, tokens=tokens)
        return {"metrics": {"loss": total / tokens, "grad_norm": grad_norm, "tokens": tokens},
                "rows": [int(r.packed.input_ids.shape[1]) for r in rows], "grads": _grads(ddp), "finite": ok}

    advantages = torch.tensor([s.advantage for s in samples])
    pad = pad_step(advantages, mode="paper", t_low=0.1, t_high=10.0, ratio=1.0, tau=1.0,
                   generator=torch.Generator().manual_seed(3))
    chosen = sorted(pad.indices.tolist())
    batches = build_policy_batches([samples[i] for i in chosen], config=mrope_config(cfg.model),
                                   micro_batch_tokens=64, pad_to_multiple_of=multiple, cp_size=cp)
    old = compute_log_probs(ddp, batches)
    masks = [mb.packed.loss_mask for mb in batches]
    offsets = [m * torch.where(mb.packed.labels % 3 == 0, -1.2, 0.3 * (1 - 2 * (mb.packed.labels % 2)))
               for m, mb in zip(masks, batches, strict=True)]
    batches = attach_log_probs(batches, old=[o + d for o, d in zip(old, offsets, strict=True)],
                               ref=[o - 0.1 * m for o, m in zip(old, masks, strict=True)])
    metrics = grpo_update(ddp, optimizer, batches, scheduler=scheduler, **UPDATE)
    return {"metrics": metrics, "chosen": chosen, "rows": [mb.row_length for mb in batches],
            "old": {chosen[i]: v for i, v in response_values(batches, old).items()}, "grads": _grads(ddp)}


@dataclasses.dataclass(frozen=True)
class _PackedRow:
    """A packed SFT row as `run_packed_schedule` takes it (a dataclass: `to_device` moves it)."""

    packed: Any


def _cfg(hf_dir: Path, cp: int, tp: int = 1):
    return load_config(ROOT / "configs" / "tiny_cpu_demo.yaml", [
        f"model.hf_path={hf_dir}", f"parallel.tensor_model_parallel_size={tp}",
        f"parallel.context_parallel_size={cp}", f"parallel.sequence_parallel={'true' if tp > 1 else 'false'}",
        "parallel.use_distributed_optimizer=false", f"cluster.devices_per_node={cp * tp}",
        "optim.optimizer=sgd", "optim.lr=0.5", "optim.lr_warmup_steps=0", "optim.lr_decay_style=constant",
        "optim.clip_grad=0.0", "train.global_batch_size=4", "train.micro_batch_size=1",
    ])


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    from tests.integration.mixed_batch import scaled_tiny_checkpoint

    return scaled_tiny_checkpoint(tmp_path_factory.mktemp("cp") / "tiny")


def _compare_grads(ref: dict, got: dict, label: str) -> None:
    assert sorted(ref) == sorted(got)
    worst = 0.0
    for name, want in ref.items():
        scale = want.abs().max().item()
        assert scale > 0, f"{name} got no gradient at CP 1"
        rel = (got[name] - want).abs().max().item() / scale
        worst = max(worst, rel)
        assert rel <= 1e-4, f"{label}: gradient of {name} differs by {rel:.2e} of its largest entry"
    print(f"{label}: {len(ref)} gradients, worst difference {worst:.2e} of the tensor's largest entry")


@pytest.mark.parametrize(("mode", "tp"), [("sft", 1), ("grpo", 1), ("grpo", 2)])
def test_cp2_step_matches_cp1(hf_dir, mode, tp):
    """At TP 2 x CP 2 (4 ranks, sequence parallel) as well: each CP rank's tokens divide over
    its TP ranks, the vision tower's images over the CP ranks, and K/V are gathered per TP rank's
    heads."""
    (base,) = run_distributed(_rank, world_size=1, args=(_cfg(hf_dir, 1), mode), timeout_s=600)
    split = run_distributed(_rank, world_size=2 * tp, tp=tp, cp=2, args=(_cfg(hf_dir, 2, tp), mode), timeout_s=600)
    print(f"\n{mode} CP 1: " + ", ".join(f"{k}={v:.6g}" for k, v in base["metrics"].items()))
    for rank, got in enumerate(split):
        label = f"{mode} TP {tp} x CP 2 rank {rank}"
        for key, want in base["metrics"].items():
            assert got["metrics"][key] == pytest.approx(want, abs=1e-5), f"{label}: {key}"
        _compare_grads(base["grads"], got["grads"], label)
    if mode == "grpo":
        assert base["chosen"] == split[0]["chosen"] == [0, 1, 2, 3, 5]  # PAD dropped sample 4
        m = base["metrics"]
        assert m["kl"] > 0 and m["pg_clipfrac_higher"] > 0 and m["pg_clipfrac_lower"] > 0
        for got in split:
            for i, want in base["old"].items():
                assert (got["old"][i] - want).abs().max().item() <= 1e-5, f"old log-probs of sample {i}"
        # rows padded per sequence to a multiple of 2 x CP at CP 2 (x TP with SP)
        assert all(n % (4 * tp) == 0 for n in split[0]["rows"])


@pytest.mark.slow
def test_revisual_train_runs_cold_start_and_mrl_at_cp2(tmp_path):
    """The whole loop at TP 1 x CP 2 (the demo's 2 ranks): SFT steps, rollouts on the colocated
    engines, GRPO updates on CP-split rows, the weight sync (the engines' log-probs of the next
    rollout equal Megatron's, computed at CP 2), checkpoints that record the layout."""
    import json
    import os
    import subprocess
    import sys

    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "megatron_revisual.cli", "train", str(ROOT / "configs" / "tiny_cpu_demo.yaml"),
           f"output_dir={out}", "parallel.tensor_model_parallel_size=1", "parallel.context_parallel_size=2",
           "parallel.sequence_parallel=false", "stages=[cold_start,mrl]", "cold_start.train_iters=30",
           "mrl.steps=2", "mrl.rl.pad.t_low=0.0", "checkpoint.every=0", "logging.wandb=false"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-6000:]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    sft = [r["loss"] for r in rows if r.get("stage") == "cold_start" and "loss" in r]
    assert len(sft) == 30 and sft[-1] < 0.6 * sft[0]
    mrl = [r for r in rows if r.get("stage") == "mrl" and "rollout/logprob_diff_mean" in r]
    assert [r["stage_step"] for r in mrl] == [1, 2]
    for r in mrl:
        assert r["rollout/logprob_diff_mean"] <= 1e-5
    state = json.loads((out / "checkpoints" / "iter_0000032" / "trainer_state.json").read_text())
    assert state["layout"]["cp"] == 2 and state["layout"]["dp"] == 1
