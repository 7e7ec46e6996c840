"""Policy loss (every clip branch, each aggregation), KL estimators, entropy schedule."""

import math

import pytest
import torch

from megatron_revisual.rl.losses import aggregate_loss, entropy_coefficient, kl_penalty, policy_loss

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


def test_entropy_schedule_exponential_with_warmup() -> None:
    got = [entropy_coefficient(s) for s in (0, 19, 20, 21, 22, 120)]
    assert got == pytest.approx([0.0, 0.0, 0.02, 0.0197, 0.0194045, 0.004412178209], abs=1e-12)
    # the floor: 0.02 * 0.985^50 = 0.0093938 < 0.01
    assert entropy_coefficient(70, minimum=0.01) == 0.01
    assert entropy_coefficient(3, warmup_steps=0, init=0.1, decay=0.5) == pytest.approx(0.0125)


def test_entropy_schedule_linear() -> None:
    def lin(step: int, **kw: float) -> float:
        return entropy_coefficient(step, schedule="linear", total_steps=100, warmup_steps=0, **kw)

    assert [lin(s) for s in (0, 50, 100, 150)] == pytest.approx([0.02, 0.01, 0.0, 0.0])
    assert [lin(s, minimum=0.005) for s in (50, 200)] == pytest.approx([0.0125, 0.005])
    assert entropy_coefficient(10, schedule="linear", total_steps=100, warmup_steps=10) == 0.02


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
