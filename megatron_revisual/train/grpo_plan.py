"""The GRPO step's typed values and its pure decisions, unit-testable without a runner:

    rollout -> rewards -> `select_samples` (advantages, PAD, mini-batches) -> `deal` (this DP
    rank's share) -> update plan (`UpdatePlan`) -> updates -> weight sync

`GRPOLoop.step` (train.grpo_loop) runs them in that order with the engines and the model; the
functions here take the stage's config sections and public values only, and return new values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from megatron_revisual.rl.advantages import grpo_advantages
from megatron_revisual.rl.pad import PAD
from megatron_revisual.rollout.colocated import balance
from megatron_revisual.train.stage_common import mean

__all__ = ["Rewards", "Rollout", "Selection", "UpdatePlan", "deal", "planned_updates_per_step", "reward_metrics",
           "select_samples"]


@dataclass(frozen=True)
class Rollout:
    records: list[Any]  # the step's prompt records
    samples: list[Any]  # RolloutSample, ordered by (request, sample)
    metrics: dict[str, float]
    engine_of_request: tuple[int, ...] = ()  # the engine that served each request


@dataclass(frozen=True)
class Rewards:
    values: torch.Tensor  # [N] float32, one per sample
    metrics: dict[str, float]


@dataclass(frozen=True)
class Selection:
    advantages: torch.Tensor  # [N]
    minis: list[list[int]]  # sample indices per optimizer update; [] when the step is skipped
    metrics: dict[str, float]


@dataclass(frozen=True)
class UpdatePlan:
    batches: list[list[Any]]  # this DP rank's PolicyMicroBatches per optimizer update
    kl_in_loss: bool
    metrics: dict[str, float]


def reward_metrics(scores: list[dict[str, float]]) -> dict[str, float]:
    """The mean of every reward term over the step's samples, as `reward/<term>`."""
    return {f"reward/{k}": mean([sc.get(k, 0.0) for sc in scores]) for k in sorted({k for sc in scores for k in sc})}


def select_samples(samples: list[Any], rewards: Rewards, *, n: int, normalize_std: bool, pad: PAD | None,
                   stage_step: int, global_step: int, generator: torch.Generator | None,
                   global_batch_size: int, dp: int) -> Selection:
    """Group-normalised advantages (groups of `n` consecutive samples), the samples PAD keeps
    (without PAD: every non-zero advantage), samples without response tokens dropped, in
    mini-batches of `global_batch_size` prompts' samples (a tail too short to give each of the
    `dp` ranks one joins the previous); none when too few to give every DP rank one."""
    advantages = grpo_advantages(rewards.values, n, normalize_std=normalize_std)
    metrics = {"adv/mean": float(advantages.mean()), "adv/abs_mean": float(advantages.abs().mean()),
               "adv/max": float(advantages.max()), "adv/min": float(advantages.min())}
    if pad is not None:
        result = pad.select(advantages, stage_step=stage_step, generator=generator, step=global_step)
        metrics.update(result.metrics)
        chosen = result.indices.tolist()
    else:
        chosen = [i for i in range(len(samples)) if float(advantages[i]) != 0.0]
    chosen = [i for i in chosen if samples[i].token_ids]
    per_update = global_batch_size * n
    minis = [chosen[k : k + per_update] for k in range(0, len(chosen), per_update)]
    if len(minis) > 1 and len(minis[-1]) < dp:  # a tail too short to give every DP rank one
        tail = minis.pop()  # (not `minis[-2] += minis.pop()`: the store would miss after the pop)
        minis[-1] += tail
    if not minis or len(minis[0]) < dp:
        minis = []
    return Selection(advantages=advantages, minis=minis, metrics=metrics)


def deal(samples: list[Any], chosen: list[int], dp: int, dp_rank: int) -> tuple[list[int], float]:
    """This DP rank's share of `chosen` (sample indices): counts within one of each other,
    balanced by prompt + response tokens; and the largest rank's tokens over the mean."""
    tokens = [len(samples[i].prompt_token_ids) + len(samples[i].token_ids) for i in chosen]
    groups = balance(tokens, dp)
    loads = [sum(tokens[k] for k in g) for g in groups]
    mean_load = sum(loads) / dp
    return [chosen[k] for k in groups[dp_rank]], (max(loads) / mean_load if mean_load else 1.0)


def planned_updates_per_step(stage: Any) -> int:
    """Optimizer updates of one step when PAD keeps as many samples as it may
    (`PAD.most_samples`; all N without PAD), in mini-batches of global_batch_size prompts x n
    (the LR schedule's and the linear entropy schedule's length)."""
    n_samples = stage.rollout_batch_size * stage.rollout.n
    pad = stage.rl.pad
    samples = PAD.from_config(pad, stage.steps).most_samples(n_samples) if pad.enabled else n_samples
    return stage.rl.ppo_epochs * max(1, math.ceil(samples / (stage.global_batch_size * stage.rollout.n)))
