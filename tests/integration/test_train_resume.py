"""Exact resume of `revisual train`: a GRPO run of 4 steps equals, bitwise, a run killed with
SIGKILL right after its step-2 checkpoint and resumed for the last 2 steps.

The run exercises everything a resume must carry: the policy (a dist checkpoint), the
distributed optimizer's shard (Adam moments), the LR schedule, the data position, the RNG
states, the stage, the PAD tau schedule and the entropy coefficient schedule (a count of
optimizer updates), with the frozen reference model (KL), two mini-batches and two PPO epochs
per step, truncated importance sampling against the engine's log-probs, and the real vLLM engine
(seeded rollouts; the resumed engine gets the checkpoint's weights streamed in). The tiny model
starts random, so the reward is the efficient-length term (responses differ in length from the
first step on; accuracy would be 0 for all of them and PAD would skip every update).

    .venv/bin/python -m pytest tests/integration/test_train_resume.py -s
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.vllm, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "configs" / "tiny_cpu_demo.yaml"
GRPO_ONLY = [
    "stages=[mrl]",
    "mrl.steps=4",
    "mrl.rollout_batch_size=8",
    "mrl.global_batch_size=2",  # mini-batches of 2 prompts x n=4 samples
    "mrl.rollout.n=4",
    "mrl.rollout.max_response_length=16",
    "mrl.rl.ppo_epochs=2",
    "mrl.rl.kl_coef=0.01",
    "mrl.rl.entropy_coef=0.01",
    "mrl.rl.entropy_warmup_steps=1",
    "mrl.rl.reward_weights={efficient_length: 1.0, accuracy: 0.0}",
    "mrl.rl.length_budget=8",
    "mrl.rl.pad.tau_start=1.0",
    "mrl.rl.pad.ratio=0.75",
    "mrl.rl.rollout_correction={tis_cap: 2.0}",
    "mrl.validation.every=0",
    "mrl.optim={lr: 1.0e-3, lr_decay_style: cosine, lr_warmup_steps: 1}",
    "checkpoint.every=2",
    "checkpoint.keep_last=1",
    "logging.wandb=false",
]


def _command(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "megatron_revisual.cli", "train", str(RECIPE), f"output_dir={out}",
            *GRPO_ONLY, *extra]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "REVISUAL_ENGINE_THREADS": "1"}


def _run(out: Path, *extra: str, timeout: float = 900) -> subprocess.CompletedProcess:
    proc = subprocess.run(_command(out, *extra), cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"revisual train exited {proc.returncode}:\n{proc.stderr[-6000:]}")
    return proc


def _rows(out: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {r["global_step"]: r for r in rows if "event" not in r}


DETERMINISTIC = ("loss", "pg_loss", "kl", "entropy", "grad_norm", "lr", "reward/overall",
                 "response/length_mean", "pad/selected_count", "pad/tau", "entropy_coef", "updates",
                 "stage_updates", "rollout_corr/ratio_mean", "rollout_corr/ratio_max",
                 "rollout_corr/tis_capped_fraction")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("resume")
    full, killed = base / "full", base / "killed"
    _run(full)
    # the second run: SIGKILL to the whole process group once the step-2 checkpoint is complete
    proc = subprocess.Popen(_command(killed), cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    marker = killed / "checkpoints" / "iter_0000002" / "trainer_state.json"
    deadline = time.monotonic() + 900
    try:
        while not marker.exists():
            if proc.poll() is not None:
                raise AssertionError(f"the run ended before its step-2 checkpoint:\n{proc.stderr.read()[-6000:]}")
            if time.monotonic() > deadline:
                raise AssertionError("no step-2 checkpoint within 900 s")
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not (killed / "DONE.json").exists(), "the run finished before it was killed"
    resumed = _run(killed, "--resume", "auto")
    return {"full": full, "killed": killed, "resumed_log": resumed.stderr}


def test_resumed_run_ends_with_the_same_weights(runs):
    full = json.loads((runs["full"] / "DONE.json").read_text())
    resumed = json.loads((runs["killed"] / "DONE.json").read_text())
    assert full["global_step"] == resumed["global_step"] == 4
    assert resumed["weights_sha256"] == full["weights_sha256"]
    assert "resuming from" in runs["resumed_log"] and "iter_0000002" in runs["resumed_log"]


def test_resumed_steps_repeat_the_uninterrupted_ones_exactly(runs):
    full, resumed = _rows(runs["full"]), _rows(runs["killed"])
    assert sorted(full) == sorted(resumed) == [1, 2, 3, 4]
    for step in (3, 4):
        for key in DETERMINISTIC:
            assert resumed[step][key] == full[step][key], (step, key)
    # the run really trained: updates happened and the step-4 policy moved away from its start
    # ppo_epochs=2 passes over mini-batches of 8 PAD-selected samples
    for s in (1, 2, 3, 4):
        assert full[s]["updates"] == 2 * math.ceil(full[s]["pad/selected_count"] / 8), s
    assert max(full[s]["updates"] for s in (1, 2, 3, 4)) >= 4
    assert full[4]["kl"] > 0 and full[3]["pad/tau"] < full[1]["pad/tau"] == 1.0
    # the entropy bonus counts optimizer updates: 0 for updates 0 and 1 (warm-up 1), then
    # 0.01 * 0.985^(u - 2); a step logs the mean over its updates
    done = 0
    for s in (1, 2, 3, 4):
        k = int(full[s]["updates"])
        betas = [0.0 if u <= 1 else 0.01 * 0.985 ** (u - 2) for u in range(done, done + k)]
        assert full[s]["entropy_coef"] == pytest.approx(sum(betas) / k, abs=1e-12), s
        done += k
        assert full[s]["stage_updates"] == done


def test_tis_metrics_are_logged_every_step(runs):
    full = _rows(runs["full"])
    for s in (1, 2, 3, 4):
        row = full[s]
        # fp32 tiny model in both engines: pi_old / pi_rollout is 1 up to float noise, under C = 2
        assert row["rollout_corr/ratio_mean"] == pytest.approx(1.0, abs=1e-3), s
        assert row["rollout_corr/ratio_max"] == pytest.approx(1.0, abs=1e-2), s
        assert row["rollout_corr/tis_capped_fraction"] == 0.0, s


def test_only_complete_checkpoints_are_kept(runs):
    names = sorted(p.name for p in (runs["killed"] / "checkpoints").iterdir())
    # keep_last=1 plus the stage-end checkpoint (which is also the newest); no partial dirs
    assert names == ["iter_0000004", "latest_checkpointed_iteration.txt"]
    state = json.loads((runs["killed"] / "checkpoints" / "iter_0000004" / "trainer_state.json").read_text())
    assert state["stage_end"] == "mrl" and state["stage_step"] == 4
    assert state["data"]["loader"]["sampler"]["index"] == 32  # 4 steps x 8 prompts
