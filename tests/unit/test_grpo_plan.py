"""The GRPO step's selection as a pure function (`train.grpo_plan.select_samples`): group
advantages, PAD or the non-zero rule, empty responses out, mini-batches, and the DP floor."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from megatron_revisual.rl.pad import PAD
from megatron_revisual.train.grpo_plan import Rewards, select_samples


def _samples(lengths):
    return [SimpleNamespace(prompt_token_ids=[0, 0], token_ids=[1] * k) for k in lengths]


def test_without_pad_every_nonzero_advantage_with_tokens_in_prompt_sized_mini_batches():
    # 3 prompts x n=2: groups (1, 0), (1, 1), (0, 1); the middle group agrees -> advantage 0
    rewards = Rewards(values=torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 1.0]), metrics={})
    sel = select_samples(_samples([3, 3, 3, 3, 0, 3]), rewards, n=2, normalize_std=False, pad=None,
                         stage_step=1, global_step=1, generator=None, global_batch_size=1, dp=1)
    assert sel.advantages.tolist() == [0.5, -0.5, 0.0, 0.0, -0.5, 0.5]
    # sample 4 has no response token; mini-batches of 1 prompt x 2 samples
    assert sel.minis == [[0, 1], [5]]
    assert sel.metrics["adv/max"] == 0.5 and sel.metrics["adv/min"] == -0.5
    # a tail too short for every DP rank joins the previous mini-batch
    sel = select_samples(_samples([3, 3, 3, 3, 0, 3]), rewards, n=2, normalize_std=False, pad=None,
                         stage_step=1, global_step=1, generator=None, global_batch_size=1, dp=2)
    assert sel.minis == [[0, 1, 5]]
    # fewer samples than DP ranks: nothing to train on
    sel = select_samples(_samples([3, 3, 3, 3, 0, 3]), rewards, n=2, normalize_std=False, pad=None,
                         stage_step=1, global_step=1, generator=None, global_batch_size=1, dp=4)
    assert sel.minis == []


def test_with_released_pad_an_agreeing_batch_trains_whole_and_paper_pad_skips():
    agree = Rewards(values=torch.ones(4), metrics={})  # every group agrees: no |A| in the window
    released = PAD(mode="released", t_low=0.03, t_high=0.97, ratio=1.5, alpha=1.5, replacement=True)
    sel = select_samples(_samples([2, 2, 2, 2]), agree, n=2, normalize_std=True, pad=released, stage_step=1,
                         global_step=1, generator=torch.Generator().manual_seed(0), global_batch_size=2, dp=1)
    assert sel.minis == [[0, 1, 2, 3]] and sel.metrics["pad/whole_batch"] == 1.0
    paper = PAD(mode="paper", t_low=0.03, t_high=0.97, ratio=0.5, tau=0.3)
    sel = select_samples(_samples([2, 2, 2, 2]), agree, n=2, normalize_std=True, pad=paper, stage_step=1,
                         global_step=1, generator=torch.Generator().manual_seed(0), global_batch_size=2, dp=1)
    assert sel.minis == [] and sel.metrics["pad/skipped"] == 1.0
