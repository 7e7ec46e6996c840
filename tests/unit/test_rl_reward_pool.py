"""A reward that raises, hangs, crashes its process or returns NaN scores 0 for that sample only."""

import os
import time

import pytest

from megatron_revisual.rl.reward_pool import RewardPool
from megatron_revisual.rl.rewards import RewardConfig, RewardSample

TIMEOUT_S = 2.0


def misbehaving_reward(sample: str) -> float | dict[str, float]:
    # Module level, so that worker processes can unpickle it by name.
    if sample == "raise":
        raise ValueError("bad LaTeX")
    if sample == "hang":
        time.sleep(3600)
    if sample == "crash":
        os._exit(3)
    if sample == "nan":
        return float("nan")
    if sample == "dict":
        return {"overall": 0.5, "accuracy": 1.0}
    return float(len(sample))


def test_failures_do_not_stop_the_batch() -> None:
    batch = ["a", "raise", "bb", "hang", "ccc", "crash", "nan", "dddd", "dict"]
    with RewardPool(misbehaving_reward, num_workers=2, timeout_s=TIMEOUT_S) as pool:
        start = time.monotonic()
        result = pool.score(batch)
        elapsed = time.monotonic() - start
        assert result.overall == [1.0, 0.0, 2.0, 0.0, 3.0, 0.0, 0.0, 4.0, 0.5]
        assert result.scores[8] == {"overall": 0.5, "accuracy": 1.0}
        assert (result.num_errors, result.num_timeouts, result.num_crashes) == (2, 1, 1)
        assert result.failures[1] == "ValueError: bad LaTeX"
        assert result.failures[3] == "timed out after 2 s"
        assert result.failures[5] == "worker died (exit code 3)"
        assert "non-finite" in result.failures[6]
        # The hung worker was killed at its deadline, not waited for.
        assert elapsed < 30.0
        metrics = result.metrics()
        assert metrics["reward/timeouts"] == 1.0 and metrics["reward/errors"] == 2.0
        assert metrics["reward/overall"] == pytest.approx(10.5 / 9)

        # The replaced workers serve the next batch.
        again = pool.score(["xy", "hang", "z"])
        assert again.overall == [2.0, 0.0, 1.0] and again.num_timeouts == 1


def test_reward_config_pool_end_to_end() -> None:
    samples = [
        RewardSample(response=r"<think>2+2=4</think> \boxed{4}", ground_truth="4"),
        RewardSample(response=r"<think>2+2=5</think> \boxed{5}", ground_truth="4"),
        RewardSample(response=r"\boxed{\frac{1}{2}}", ground_truth="0.5"),
    ]
    config = RewardConfig(preset="revisual_math", grader="mathruler")
    with RewardPool.for_config(config, num_workers=2, timeout_s=30.0) as pool:
        result = pool.score(samples)
    # 0.80 accuracy + 0.05 repetition (1.0 when nothing repeats); no self-critique or image words
    assert result.overall == pytest.approx([0.85, 0.05, 0.85])
    assert result.num_failed == 0


def test_closed_pool_refuses_work() -> None:
    pool = RewardPool(misbehaving_reward, num_workers=1, timeout_s=TIMEOUT_S)
    pool.close()
    with pytest.raises(RuntimeError, match="closed"):
        pool.score(["a"])
