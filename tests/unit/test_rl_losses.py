"""Policy loss (every clip branch, each aggregation, importance weights), GSPO, KL estimators,
entropy schedule."""

import math

import pytest
import torch

from megatron_revisual.rl.losses import (
    aggregate_loss,
    entropy_coefficient,
    gspo_policy_loss,
    kl_penalty,
    policy_loss,
)

# Row 0: tokens t0..t2 (+ padding); row 1: t3, t4; row 2: a padding row from micro-batch filling.
#   t0 A=+1 r=1.5 -> max(-1.5, -1.25) = -1.25            clipped high
#   t1 A=+1 r=0.5 -> max(-0.5, -0.8)  = -0.5             unclipped (ratio below 1 - eps: no clip for A>0)
#   t2 A=-1 r=0.5 -> max(0.5, 0.8)    =  0.8             clipped high (counted by l1 < l2)
#   t3 A=-1 r=5   -> min(max(5, 1.25), 3) = 3            dual clip
#   t4 A=-2 r=1.1 -> 2.2                                  inside the trust region
RATIOS = [[1.5, 0.5, 0.5, 1.0], [5.0, 1.1, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0]]
ADVS = [[1.0, 1.0, -1.0, 9.0], [-1.0, -2.0, 9.0, 9.0], [4.0, 4.0, 4.0, 4.0]]
MASK = [[1, 1, 1, 0], [1, 1, 0, 0], [0, 0, 0, 0]]


def _inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    log_probs = torch.log(torch.tensor(RATIOS)).requires_grad_(True)
    return log_probs, torch.zeros(3, 4), torch.tensor(ADVS), torch.tensor(MASK)


@pytest.mark.parametrize(
    ("agg", "expected"),
    [
        ("token-mean", (-1.25 - 0.5 + 0.8 + 3.0 + 2.2) / 5),  # 0.85
        ("seq-mean-token-mean", ((-1.25 - 0.5 + 0.8) / 3 + (3.0 + 2.2) / 2) / 2),  # 1.141667
        ("seq-mean-token-sum", ((-1.25 - 0.5 + 0.8) + (3.0 + 2.2)) / 2),  # 2.125
    ],
)
def test_policy_loss_aggregations(agg: str, expected: float) -> None:
    loss, metrics = policy_loss(*_inputs(), agg=agg)
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert metrics["pg_loss"].item() == pytest.approx(expected, abs=1e-6)
    # metrics are token means whatever the aggregation
    assert metrics["pg_clipfrac_higher"].item() == pytest.approx(2 / 5)
    assert metrics["pg_clipfrac_lower"].item() == pytest.approx(1 / 5)
    ppo_kl = -(math.log(1.5) + 2 * math.log(0.5) + math.log(5) + math.log(1.1)) / 5
    assert metrics["ppo_kl"].item() == pytest.approx(ppo_kl, abs=1e-6)  # -0.144784
    assert not metrics["ppo_kl"].requires_grad


def test_policy_loss_gradient_only_through_unclipped_tokens() -> None:
    log_probs, old, adv, mask = _inputs()
    loss, _ = policy_loss(log_probs, old, adv, mask)
    loss.backward()
    # d(-A r)/d log pi = -A r, over 5 tokens: t1 -> -0.5 / 5, t4 -> 2.2 / 5; clipped tokens 0
    expected = [[0.0, -0.1, 0.0, 0.0], [0.0, 0.44, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]
    assert log_probs.grad.tolist() == [pytest.approx(row, abs=1e-6) for row in expected]


def test_importance_weights_scale_each_token_loss_and_gradient() -> None:
    log_probs, old, adv, mask = _inputs()
    weights = torch.tensor([[0.5, 2.0, 1.0, 0.0], [1.0, 0.25, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    loss, metrics = policy_loss(log_probs, old, adv, mask, is_weights=weights)
    # (-1.25 * 0.5 - 0.5 * 2 + 0.8 * 1 + 3 * 1 + 2.2 * 0.25) / 5
    assert loss.item() == pytest.approx(0.545, abs=1e-6)
    assert metrics["pg_clipfrac_higher"].item() == pytest.approx(2 / 5)  # unweighted shares
    loss.backward()
    # t1: -0.5 * 2 / 5; t4: 2.2 * 0.25 / 5; the weights themselves carry no gradient
    expected = [[0.0, -0.2, 0.0, 0.0], [0.0, 0.11, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]
    assert log_probs.grad.tolist() == [pytest.approx(row, abs=1e-6) for row in expected]


# GSPO: row 0 log-ratios 0.3, -0.1, 0.1 (mean 0.1, s = e^0.1 = 1.1051709, A = +1: clipped to
# 1.0004); row 1 log-ratios -2e-4, 0 (mean -1e-4, s = 0.99990000500, A = -2: inside); row 2 padding.
GSPO_LOG_RATIOS = [[0.3, -0.1, 0.1], [-2e-4, 0.0, 0.0], [0.0, 0.0, 0.0]]
GSPO_ADVS = [1.0, -2.0, 5.0]
GSPO_MASK = [[1, 1, 1], [1, 1, 0], [0, 0, 0]]
S1 = math.exp(-1e-4)


def _gspo_inputs(dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, ...]:
    log_probs = torch.tensor(GSPO_LOG_RATIOS, dtype=dtype).requires_grad_(True)
    return log_probs, torch.zeros(3, 3, dtype=dtype), torch.tensor(GSPO_ADVS, dtype=dtype), torch.tensor(GSPO_MASK)


@pytest.mark.parametrize(
    ("agg", "expected", "grad_row1"),
    [
        # per sequence: -1.0004 and 2 * s1; gradient of row 1 per token: weight * (-A * s1)
        ("seq-mean-token-mean", (-1.0004 + 2 * S1) / 2, 0.25 * 2 * S1),
        ("token-mean", (3 * -1.0004 + 2 * 2 * S1) / 5, 2 * S1 / 5),
        ("seq-mean-token-sum", (3 * -1.0004 + 2 * 2 * S1) / 2, 2 * S1 / 2),
    ],
)
def test_gspo_sequence_ratio_and_its_own_clip_range(agg: str, expected: float, grad_row1: float) -> None:
    log_probs, old, adv, mask = _gspo_inputs(torch.float64)
    loss, metrics = gspo_policy_loss(log_probs, old, adv, mask, agg=agg)
    assert loss.item() == pytest.approx(expected, abs=1e-12)
    assert metrics["pg_clipfrac_higher"].item() == pytest.approx(3 / 5)  # row 0's tokens
    assert metrics["pg_clipfrac_lower"].item() == 0.0
    assert metrics["ppo_kl"].item() == pytest.approx(-(0.3 - 0.1 + 0.1 - 2e-4) / 5, abs=1e-12)
    loss.backward()
    expected_grad = [[0.0, 0.0, 0.0], [grad_row1, grad_row1, 0.0], [0.0, 0.0, 0.0]]
    assert log_probs.grad.tolist() == [pytest.approx(row, abs=1e-12) for row in expected_grad]


@pytest.mark.parametrize("agg", ["seq-mean-token-mean", "token-mean", "seq-mean-token-sum"])
@pytest.mark.parametrize("clip", [(3e-4, 4e-4), (0.5, 0.5)])
def test_gspo_straight_through_gradient_is_the_sequence_objective_gradient(agg: str, clip: tuple) -> None:
    # the value depends on log pi only through each sequence's mean, so finite differences of
    # the value check the straight-through (stop-gradient) construction
    _, old, adv, mask = _gspo_inputs(torch.float64)
    log_probs = torch.tensor([[0.3, -0.1, 0.1], [-2e-4, 1e-4, 0.7], [0.2, 0.0, 0.1]], dtype=torch.float64,
                             requires_grad=True)

    def loss(lp: torch.Tensor) -> torch.Tensor:
        return gspo_policy_loss(lp, old, adv, mask, clip_low=clip[0], clip_high=clip[1], agg=agg)[0]

    assert torch.autograd.gradcheck(loss, (log_probs,), eps=1e-7, atol=1e-7)


def test_ppo_loss_with_importance_weights_passes_gradcheck() -> None:
    old = torch.zeros(2, 3, dtype=torch.float64)
    adv = torch.tensor([1.0, -0.5], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    weights = torch.tensor([[1.5, 1.0, 0.9], [0.45, 1.0, 0.0]], dtype=torch.float64)
    # ratios inside and outside the trust region, away from the kinks
    log_probs = torch.tensor([[0.1, -0.05, 0.5], [-0.1, 0.0, 0.3]], dtype=torch.float64, requires_grad=True)
    for agg in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum"):
        assert torch.autograd.gradcheck(
            lambda lp, agg=agg: policy_loss(lp, old, adv, mask, agg=agg, is_weights=weights)[0], (log_probs,)
        )


def test_log_ratio_preclip_keeps_extremes_finite() -> None:
    log_probs = torch.tensor([[20.0, 20.0, -20.0]])
    adv = torch.tensor([[1.0, -1.0, 1.0]])
    loss, metrics = policy_loss(log_probs, torch.zeros(1, 3), adv, torch.ones(1, 3))
    # log-ratios +-20 are pre-clipped to +-log(1e3): r=1e3, A>0 -> -1.25 (clip); r=1e3, A<0 -> 3 (dual);
    # r=1e-3, A>0 -> max(-1e-3, -0.8) = -1e-3
    assert loss.item() == pytest.approx((-1.25 + 3.0 - 0.001) / 3, abs=1e-6)
    assert metrics["ppo_kl"].item() == pytest.approx(
        -(math.log(1e3) * 2 - math.log(1e3)) / 3, abs=1e-5
    )


def test_per_response_advantages_broadcast() -> None:
    log_probs = torch.log(torch.tensor([[1.1, 0.9], [1.0, 1.0]]))
    loss, _ = policy_loss(log_probs, torch.zeros(2, 2), torch.tensor([1.0, -1.0]), torch.ones(2, 2))
    assert loss.item() == pytest.approx((-1.1 - 0.9 + 1.0 + 1.0) / 4, abs=1e-6)


def test_custom_clip_values() -> None:
    lp = torch.log(torch.tensor([[1.5, 0.5]]))
    loss, m = policy_loss(
        lp,
        torch.zeros(1, 2),
        torch.tensor([[1.0, -1.0]]),
        torch.ones(1, 2),
        clip_low=0.1,
        clip_high=0.4,
    )
    # A=+1 r=1.5 -> -1.4 (clip at 1.4); A=-1 r=0.5 -> 0.9 (clip at 0.9)
    assert loss.item() == pytest.approx((-1.4 + 0.9) / 2, abs=1e-6)
    assert m["pg_clipfrac_higher"].item() == 1.0


def test_aggregation_without_tokens_is_zero() -> None:
    values = torch.ones(2, 3, requires_grad=True)
    for agg in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum"):
        out = aggregate_loss(values, torch.zeros(2, 3), agg)
        assert out.item() == 0.0 and out.requires_grad


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("k1", [0.5, -1.0]),
        ("kl", [0.5, -1.0]),
        ("k2", [0.125, 0.5]),
        ("mse", [0.125, 0.5]),
        ("k3", [0.10653065971, 0.71828182846]),  # e^-0.5 + 0.5 - 1, e^1 - 1 - 1
        ("low_var_kl", [0.10653065971, 0.71828182846]),
    ],
)
def test_kl_estimators(kind: str, expected: list[float]) -> None:
    # d = log pi - log pi_ref = [0.5, -1.0]
    out = kl_penalty(torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -1.0]), kind)
    assert out.dtype == torch.float32
    assert out.tolist() == pytest.approx(expected, abs=1e-6)


def test_k3_is_clamped_at_10() -> None:
    out = kl_penalty(torch.tensor([0.0, 20.0, 1.0]), torch.tensor([20.0, 0.0, 1.0]), "k3")
    assert out.tolist() == pytest.approx([10.0, 10.0, 0.0])


def test_unknown_kl_kind() -> None:
    with pytest.raises(ValueError, match="unknown KL estimator 'k4'"):
        kl_penalty(torch.zeros(1), torch.zeros(1), "k4")


def _released_actor_betas(updates: int, *, init: float, decay: float, warmup: int) -> list[float]:
    """The released actor's rule (dp_actor.py): beta starts at 0 and is re-set after each
    optimizer step u: 0 while u < warmup, init at u == warmup, then times decay."""
    beta, used = 0.0, []
    for u in range(updates):
        used.append(beta)
        beta = 0.0 if u < warmup else init if u == warmup else beta * decay
    return used


def test_entropy_schedule_counts_optimizer_updates_as_released() -> None:
    # warm-up 20 updates: updates 0..20 train with beta 0, update 21 with init (the off-by-one:
    # a schedule that starts at update 20 gives 0.02 there)
    got = [entropy_coefficient(u) for u in (0, 19, 20, 21, 22, 23, 121)]
    assert got == pytest.approx([0.0, 0.0, 0.0, 0.02, 0.0197, 0.0194045, 0.004412178209], abs=1e-12)
    released = _released_actor_betas(400, init=0.02, decay=0.985, warmup=140)
    assert [entropy_coefficient(u, warmup_steps=140) for u in range(400)] == pytest.approx(released, abs=1e-15)
    # the issue's example: Table 5's warm-up of 140 counted in updates, 4 updates per RL step
    # (512 / 128 prompts): RL step 140 (0-based) starts with update 560 -> 0.02 * 0.985^419
    assert entropy_coefficient(140 * 4, warmup_steps=140) == pytest.approx(3.55e-5, rel=1e-2)
    # the floor: 0.02 * 0.985^50 = 0.0093938 < 0.01
    assert entropy_coefficient(71, minimum=0.01) == 0.01
    assert entropy_coefficient(4, warmup_steps=0, init=0.1, decay=0.5) == pytest.approx(0.0125)


def test_entropy_schedule_linear() -> None:
    def lin(update: int, **kw: float) -> float:
        return entropy_coefficient(update, schedule="linear", total_steps=100, warmup_steps=0, **kw)

    # the released linear rule: init after the warm-up, then minus (init - min) / total per update
    assert [lin(u) for u in (0, 1, 51, 101, 151)] == pytest.approx([0.0, 0.02, 0.01, 0.0, 0.0])
    assert [lin(u, minimum=0.005) for u in (51, 201)] == pytest.approx([0.0125, 0.005])
    assert entropy_coefficient(11, schedule="linear", total_steps=100, warmup_steps=10) == 0.02
    assert entropy_coefficient(10, schedule="linear", total_steps=100, warmup_steps=10) == 0.0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"schedule": "linear"}, "needs total_steps"),
        ({"total_steps": 10}, "total_steps has no effect"),
        ({"schedule": "linear", "total_steps": 10, "decay": 0.9}, "decay has no effect"),
        ({"schedule": "cosine"}, "unknown entropy schedule"),
        ({"minimum": 0.5}, "minimum <= init"),
    ],
)
def test_entropy_schedule_rejects_dead_or_bad_options(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        entropy_coefficient(0, **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"clip_dual": 1.0}, "clip_dual must be > 1"),
        ({"clip_low": 1.0}, "clip_low"),
        ({"agg": "sum"}, "unknown loss aggregation"),
    ],
)
def test_policy_loss_rejects_bad_options(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        policy_loss(*_inputs(), **kwargs)
