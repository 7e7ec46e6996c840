"""benchmarks/gpu_check.py --tiny: the GPU check script's own code, on the tiny model on CPU, so
it cannot rot between the runs on real GPUs. Every check prints its JSON line; on this CPU
machine Transformer Engine is absent and its check must say so, not pass."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def test_gpu_check_tiny_runs_every_check():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # this checkout's package, whatever is installed
    done = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--tiny"], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, env=env)
    lines = [json.loads(x) for x in done.stdout.splitlines() if x.startswith('{"check"')]
    by_name = {x["check"]: x for x in lines}
    assert list(by_name) == ["setup", "logits_vs_transformers", "sft_packed_steps", "checkpoint_async_roundtrip",
                             "grpo_steps", "te_fp8",
                             "vllm_generate_sleep_sync"], done.stdout[-3000:] + done.stderr[-3000:]
    for name in ("setup", "logits_vs_transformers", "sft_packed_steps", "checkpoint_async_roundtrip", "grpo_steps",
                 "vllm_generate_sleep_sync"):
        assert by_name[name]["status"] == "passed", by_name[name]
    assert done.returncode == 0
    logits, sft, grpo = by_name["logits_vs_transformers"], by_name["sft_packed_steps"], by_name["grpo_steps"]
    assert logits["mean_abs_diff_over_mean_abs_logit"] <= 1e-4 and logits["argmax_agreement"] == 1.0
    assert len(sft["losses"]) == 5 and sft["losses"][-1] < sft["losses"][0]
    assert [s["samples"] for s in grpo["steps"]] == [16, 16] and all(s["grad_norm"] > 0 for s in grpo["steps"])
    vllm = by_name["vllm_generate_sleep_sync"]
    assert vllm["logprob_diff_mean_after_sync"] <= 1e-3
    # a second engine started in the process after the first closed, synced, samples the same
    assert vllm["restart_same_samples"] is True and vllm["restart_seconds"] > 0
    te = by_name["te_fp8"]["status"]
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        assert te == "skipped: transformer_engine missing"
    else:
        assert te in ("passed", "failed")
