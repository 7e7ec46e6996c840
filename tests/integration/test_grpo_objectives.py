"""The GRPO objective options end to end on the tiny model: GSPO, KL in the reward, and a
sequence-level rollout-correction test, in 3 steps of `revisual train` (transformers engine,
2 gloo ranks).

    .venv/bin/python -m pytest tests/integration/test_grpo_objectives.py -s
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
OVERRIDES = [
    "stages=[mrl]",
    # The random model ends a response only when it happens to sample EOS, and a step whose
    # responses all run to the cap has equal rewards and no update: 8 prompts x n=4 samples of up
    # to 24 tokens stop early often enough that one of the first 3 steps trains.
    "mrl.steps=4",
    "mrl.rollout.engine=transformers",
    "mrl.rollout_batch_size=8",
    "mrl.global_batch_size=4",
    "mrl.rollout.n=4",
    "mrl.rollout.max_response_length=24",
    "mrl.rl.kl_coef=0.05",
    "mrl.rl.kl_in_reward=true",
    "mrl.rl.policy_loss=gspo",
    "mrl.rl.loss_agg=seq-mean-token-mean",
    "mrl.rl.rollout_correction={seq: reject, seq_upper: 1.001}",
    "mrl.rl.reward_weights={efficient_length: 1.0, accuracy: 0.0}",
    "mrl.rl.length_budget=12",
    "mrl.rl.pad.ratio=0.75",
    "mrl.validation.every=0",
    "mrl.optim={lr: 1.0e-3, lr_decay_style: constant, lr_warmup_steps: 0}",
    "checkpoint.every=0",
    "logging.wandb=false",
    "logging.progress_bar=false",
]


@pytest.fixture(scope="module")
def rows(tmp_path_factory) -> dict[int, dict]:
    out = tmp_path_factory.mktemp("objectives")
    cmd = [sys.executable, "-m", "megatron_revisual.cli", "train", str(ROOT / "configs" / "tiny_cpu_demo.yaml"),
           f"output_dir={out}", *OVERRIDES]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise AssertionError(f"revisual train exited {proc.returncode}:\n{proc.stderr[-6000:]}")
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return {r["global_step"]: r for r in map(json.loads, filter(None, lines)) if "event" not in r}


def test_kl_moves_from_the_loss_to_the_reward(rows):
    assert sorted(rows) == [1, 2, 3, 4]
    # step 1: the policy is the reference, so KL is exactly 0; it grows once the policy moved
    assert rows[1]["reward/kl_penalty"] == 0.0
    first_update = min(s for s, row in rows.items() if "updates" in row)
    assert first_update < 4, "no update in the first 3 steps: every response ran to the cap"
    assert all(rows[s]["reward/kl_penalty"] > 0.0 for s in rows if s > first_update)
    for row in rows.values():
        assert "kl" not in row  # not in the loss
        assert row["reward/with_kl_penalty"] == pytest.approx(row["reward/overall"] - row["reward/kl_penalty"],
                                                              abs=1e-6)


def test_gspo_and_the_sequence_test_ran(rows):
    # a step whose rewards are all equal (every response as long) has nothing to train on
    trained = {s: row for s, row in rows.items() if "updates" in row}
    assert len(trained) >= 1 and all(rows[s]["skipped_step"] == 1.0 for s in rows if s not in trained)
    for s, row in trained.items():
        assert row["pg_clipfrac_lower"] == 0.0, s  # GSPO has no dual clip
        # fp32 in both engines: geometric-mean ratios within 1e-3 of 1, nothing rejected
        assert row["rollout_corr/seq_ratio_mean"] == pytest.approx(1.0, abs=1e-4), s
        assert row["rollout_corr/seq_rejected_fraction"] == 0.0, s
        assert "rollout_corr/tis_capped_fraction" not in row, s  # TIS is off: no dead metric
