"""Group-relative advantages for GRPO (paper Sec. 3.2; released code
`verl/trainer/core_algos.py::compute_grpo_outcome_advantage`).

For a group of ``G`` responses to the same prompt with scalar rewards ``r_1..r_G``:

    A_i = (r_i - mean(r)) / (std(r) + eps)          (GRPO)
    A_i =  r_i - mean(r)                             (Dr. GRPO, ``normalize_std=False``)

``std`` is the unbiased (n - 1) sample standard deviation, as ``torch.std`` computes it in the
released code, and ``eps`` is 1e-6 there as well. A group whose rewards are all equal gets
advantage exactly 0 for every member: these are the "gradient stagnation" samples PAD filters
out. That is enforced, not left to rounding: in the peers' float32 the mean of eight rewards of
0.9 is one ulp off 0.9, and dividing that by std + eps (~1e-6) gives -0.056 for every member.

Groups are contiguous: rows ``[g * G, (g + 1) * G)`` belong to prompt ``g``. That is the order the
rollout engine returns ``n`` samples per prompt in; reorder before calling if batches were
shuffled.
"""

from __future__ import annotations

import torch

__all__ = ["grpo_advantages", "token_advantages"]


def grpo_advantages(
    rewards: torch.Tensor,
    group_size: int,
    *,
    eps: float = 1e-6,
    normalize_std: bool = True,
) -> torch.Tensor:
    """Per-response GRPO advantages, shape ``[N]`` (float32), for rewards of shape ``[N]``.

    ``A_i = (r_i - mean_g) / (std_g + eps)`` with the unbiased group std, or ``r_i - mean_g`` when
    ``normalize_std`` is False (Dr. GRPO, arXiv 2503.20783).
    """
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [N], got shape {tuple(rewards.shape)}")
    if group_size < 2:
        # The unbiased std needs two samples, and GRPO with one sample has no baseline at all.
        raise ValueError(f"group_size must be >= 2 for GRPO, got {group_size}")
    n = rewards.numel()
    if n % group_size != 0:
        raise ValueError(
            f"{n} rewards do not split into groups of {group_size}; "
            f"N must be a multiple of group_size (e.g. {n - n % group_size} or "
            f"{n + group_size - n % group_size})"
        )
    # float64 so that hand-computed values match to the last digit on any input dtype.
    grouped = rewards.detach().to(torch.float64).view(-1, group_size)
    centered = grouped - grouped.mean(dim=1, keepdim=True)
    if normalize_std:
        centered = centered / (grouped.std(dim=1, unbiased=True, keepdim=True) + eps)
    all_equal = grouped.amax(dim=1, keepdim=True) == grouped.amin(dim=1, keepdim=True)
    centered = centered.masked_fill(all_equal, 0.0)
    return centered.view(-1).to(torch.float32)


def token_advantages(seq_advantages: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """Broadcast per-response advantages ``[B]`` to response tokens ``[B, T]`` (0 on padding),
    as the released code's ``scores.unsqueeze(-1) * response_mask``."""
    if seq_advantages.dim() != 1 or response_mask.dim() != 2:
        raise ValueError(
            f"expected seq_advantages [B] and response_mask [B, T], got "
            f"{tuple(seq_advantages.shape)} and {tuple(response_mask.shape)}"
        )
    if seq_advantages.shape[0] != response_mask.shape[0]:
        raise ValueError(
            f"batch sizes differ: seq_advantages has {seq_advantages.shape[0]} rows, "
            f"response_mask has {response_mask.shape[0]}"
        )
    return seq_advantages.unsqueeze(-1) * response_mask.to(seq_advantages.dtype)
