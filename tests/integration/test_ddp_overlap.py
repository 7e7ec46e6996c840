"""Megatron DDP's overlapped communication (`parallel.overlap_grad_reduce`,
`parallel.overlap_param_gather`, `parallel.ddp_bucket_size`) on 2 gloo ranks at DP 2.

- The options reach Megatron's `DistributedDataParallelConfig`, the small bucket size gives
  several buckets, and the forward pre-hooks that gather parameters are installed.
- Three cold-start SFT steps of the demo config (`revisual train`, TP 1 x DP 2, the same
  buckets) with both overlaps on give the losses and gradient norms of a run with them off, and the HF export at the
  stage's end holds the same weights. With overlapped parameter gathering the last optimizer
  step leaves each rank's parameters partly stale until a forward gathers them, so the export
  (and checkpoint saves, and the weight sync into the rollout engines) must force the gather
  first (`train.builders.params_gathered`); without it the exported weights differ.
- After GRPO updates with both overlaps on, the engines' log-probs still match Megatron's.

    .venv/bin/python -m pytest tests/integration/test_ddp_overlap.py -s
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_revisual.parallel import run_distributed

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
# Both runs use the same small buckets: the bucket layout decides the distributed optimizer's
# shards and so the summation order of the gradient norm (a 1e-7 difference that 200 steps at
# the demo's learning rate grow into visibly different runs); overlap alone must change nothing.
DP2 = ["parallel.tensor_model_parallel_size=1", "parallel.sequence_parallel=false", "parallel.ddp_bucket_size=200000"]
OVERLAP = ["parallel.overlap_grad_reduce=true", "parallel.overlap_param_gather=true"]


def ddp_rank(cfg) -> dict:
    from megatron_revisual.models.qwen25_vl.provider import build_qwen25_vl
    from megatron_revisual.train.builders import params_gathered, wrap_ddp

    ddp = wrap_ddp(cfg, build_qwen25_vl(cfg, pre_process=True, post_process=True))
    c = ddp.ddp_config
    hooks = len(ddp.remove_forward_pre_hook_handles)
    with params_gathered(ddp):
        inside = len(ddp.remove_forward_pre_hook_handles)
    return {"overlap_grad_reduce": c.overlap_grad_reduce, "overlap_param_gather": c.overlap_param_gather,
            "bucket_size": c.bucket_size, "use_distributed_optimizer": c.use_distributed_optimizer,
            "buckets": sum(len(g.buckets) for g in ddp.bucket_groups), "hooks": hooks, "hooks_inside": inside,
            "hooks_after": len(ddp.remove_forward_pre_hook_handles),
            "grad_sync_func": ddp.config.grad_sync_func == ddp.start_grad_sync}


def test_overlap_options_reach_megatron_ddp(tmp_path):
    from megatron_revisual.config import load_config
    from megatron_revisual.testing.tiny_checkpoint import make_tiny_checkpoint

    hf = make_tiny_checkpoint(tmp_path / "hf")
    cfg = load_config(ROOT / "configs" / "tiny_cpu_demo.yaml", [*DP2, *OVERLAP, f"model.hf_path={hf}"])
    ranks = run_distributed(ddp_rank, world_size=2, args=(cfg,), timeout_s=300)
    for r in ranks:
        assert r["overlap_grad_reduce"] and r["overlap_param_gather"] and r["use_distributed_optimizer"]
        assert r["bucket_size"] == 200_000 and r["buckets"] > 1
        assert r["hooks"] > 0 and r["hooks_inside"] == 0 and r["hooks_after"] == r["hooks"]
        assert r["grad_sync_func"]


def _train(out: Path, extra: list[str],
           stages: tuple[str, ...] = ("stages=[cold_start]", "cold_start.train_iters=3")) -> list[dict]:
    cmd = [sys.executable, "-m", "megatron_revisual.cli", "train", str(ROOT / "configs" / "tiny_cpu_demo.yaml"),
           f"output_dir={out}", *stages, "checkpoint.every=0", "logging.wandb=false", *DP2, *extra]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-6000:]
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def _sft(out: Path, extra: list[str]) -> list[dict]:
    return [row for row in _train(out, extra) if "loss" in row]


def _weights(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted((out / "hf" / "cold_start").glob("*.safetensors"))
    assert files
    return {k: v for f in files for k, v in load_file(f).items()}


def test_overlapped_communication_keeps_losses_and_exported_weights(tmp_path):
    base = _sft(tmp_path / "off", [])
    ours = _sft(tmp_path / "on", OVERLAP)
    assert len(base) == 3 and base[-1]["loss"] < base[0]["loss"]
    for a, b in zip(ours, base, strict=True):
        print(f"step {b['stage_step']}: loss {b['loss']:.6f} / {a['loss']:.6f}, "
              f"grad norm {b['grad_norm']:.6f} / {a['grad_norm']:.6f}")
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
    ref, got = _weights(tmp_path / "off"), _weights(tmp_path / "on")
    assert ref.keys() == got.keys()
    worst = max((got[k].float() - ref[k].float()).abs().max().item() for k in ref)
    print(f"exported weights: max |diff| {worst:.3e} over {len(ref)} tensors")
    assert worst <= 1e-5  # a stale shard would differ by a whole step (lr 3e-3)


def test_engines_get_the_updated_weights_with_overlapped_param_gather(tmp_path):
    """Two cold-start steps, then 3 MRL steps with both overlaps: after every update the weight
    sync must hand the engines the new parameters, so the engines' and Megatron's log-probs of
    the next rollout agree (~2e-7). Syncing without forcing the gather gave 1.8e-3 to 6.5e-3
    from the second step on (the engines got each rank's stale half). The barely trained model
    earns no reward: the rehearsal's reward noise gives it advantages, so every step updates."""
    rows = _train(tmp_path / "run", OVERLAP, ("stages=[cold_start,mrl]", "cold_start.train_iters=2", "mrl.steps=3",
                                              "mrl.rollout_batch_size=4", "mrl.global_batch_size=4",
                                              "rehearsal.reward_noise=0.5"))
    mrl = [r for r in rows if r.get("stage") == "mrl" and "rollout/logprob_diff_mean" in r]
    assert [r["stage_step"] for r in mrl] == [1, 2, 3]
    assert all("skipped_step" not in r for r in mrl)  # every step updated
    for r in mrl:
        print(f"mrl step {r['stage_step']}: engine vs Megatron |log-prob diff| mean "
              f"{r['rollout/logprob_diff_mean']:.2e}")
        assert r["rollout/logprob_diff_mean"] <= 1e-5
