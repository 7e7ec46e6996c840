"""GRPO advantages: hand-computed groups (unbiased std, eps 1e-6) and Dr. GRPO."""

import pytest
import torch

from megatron_revisual.rl.advantages import grpo_advantages, token_advantages


def test_one_correct_of_four() -> None:
    # mean 0.25; unbiased std sqrt((0.75^2 + 3 * 0.25^2) / 3) = 0.5
    adv = grpo_advantages(torch.tensor([1.0, 0.0, 0.0, 0.0]), group_size=4)
    assert adv.dtype == torch.float32
    assert adv.tolist() == pytest.approx(
        [1.499997000006, -0.499999000002, -0.499999000002, -0.499999000002], abs=1e-7
    )


def test_groups_are_independent_and_constant_group_is_zero() -> None:
    # group 1: all equal -> 0 / (0 + eps) = 0; group 2: mean 0.5, std sqrt(0.5 / 2) = 0.5, +-0.5 / 0.500001
    adv = grpo_advantages(torch.tensor([1.0, 1.0, 1.0, 0.0, 0.5, 1.0]), group_size=3)
    assert adv.tolist() == pytest.approx(
        [0.0, 0.0, 0.0, -0.999998000004, 0.0, 0.999998000004], abs=1e-7
    )


@pytest.mark.parametrize("normalize_std", [True, False])
def test_all_equal_groups_are_exactly_zero(normalize_std: bool) -> None:
    # the peers compute in float32: eight rewards of 0.9 give -0.056 each there
    peers = torch.full((1, 8), 0.9)
    peer_adv = (peers - peers.mean(1, keepdim=True)) / (peers.std(1, keepdim=True) + 1e-6)
    assert peer_adv[0, 0].item() == pytest.approx(-0.0560, abs=1e-4)
    assert grpo_advantages(torch.full((8,), 0.9), 8, normalize_std=normalize_std).tolist() == [0.0] * 8
    for size in range(2, 17):
        for value in (0.9, 0.85, 0.1, 0.95, 1 / 3, 0.8 + 0.05 * 0.3):
            adv = grpo_advantages(torch.full((2 * size,), value), size, normalize_std=normalize_std)
            assert adv.tolist() == [0.0] * (2 * size), (size, value)


def test_eps_is_added_to_std() -> None:
    adv = grpo_advantages(torch.tensor([0.0, 1.0]), group_size=2, eps=0.5)
    # mean 0.5, std sqrt(0.5) = 0.70710678; (+-0.5) / 1.20710678
    assert adv.tolist() == pytest.approx([-0.41421356, 0.41421356], abs=1e-7)


def test_dr_grpo_skips_std() -> None:
    adv = grpo_advantages(
        torch.tensor([1.0, 0.0, 0.0, 0.0, 3.0, 1.0, 2.0, 2.0]), group_size=4, normalize_std=False
    )
    assert adv.tolist() == pytest.approx([0.75, -0.25, -0.25, -0.25, 1.0, -1.0, 0.0, 0.0])


def test_token_advantages_broadcast_and_mask() -> None:
    out = token_advantages(torch.tensor([2.0, -1.0]), torch.tensor([[1, 1, 0], [1, 0, 0]]))
    assert out.tolist() == [[2.0, 2.0, 0.0], [-1.0, 0.0, 0.0]]


@pytest.mark.parametrize(
    ("rewards", "group_size", "message"),
    [
        (torch.zeros(4), 1, "group_size must be >= 2"),
        (torch.zeros(5), 2, "multiple of group_size"),
        (torch.zeros(2, 2), 2, "1-D"),
    ],
)
def test_bad_input_is_named(rewards: torch.Tensor, group_size: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        grpo_advantages(rewards, group_size)
