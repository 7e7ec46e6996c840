"""Policy-gradient loss, KL to the reference, loss aggregation and the entropy-bonus schedule.

Formulas follow the released ReVisual-R1 code (``verl/trainer/core_algos.py``:
``compute_policy_loss``, ``compute_kl``; ``verl/workers/actor/dp_actor.py``:
``_anneal_entropy_coef``; defaults from ``verl/workers/actor/config.py``) and the paper's
Table 5 (entropy coefficient 0.02, minimum 0, decay 0.985).

PPO with asymmetric and dual clipping, per token t (``A`` = advantage, ``r`` = ratio):

    log r   = clamp(log pi - log pi_old, log 1e-3, log 1e3)       (pre-clip: exp never overflows)
    l1      = -A * r
    l2      = -A * exp(clamp(log r, log(1 - eps_low), log(1 + eps_high)))
    l_hi    = max(l1, l2)                                          (standard PPO clip)
    l3      = -A * c_dual
    loss_t  = min(l_hi, l3) if A < 0 else l_hi                     (dual clip, arXiv 1912.09729)

With rollout correction (``rl.rollout_correction``) each token's loss is multiplied by its
importance weight ``w_t`` (detached) before aggregation.

GSPO (arXiv 2507.18071), a sequence-level ratio with the token's gradient (straight-through):

    log s_i = mean_t (log pi - log pi_old)  over response tokens   (pre-clipped as above)
    s_i,t   = sg[s_i] * pi_t / sg[pi_t]      (value s_i; d s_i,t / d log pi_t = s_i)
    loss_t  = max(-A s_i,t, -A clip(s_i,t, 1 - eps_low, 1 + eps_high))      (no dual clip)

Its clip range is in the scale of a per-token geometric mean: 3e-4 / 4e-4 in the paper, not
PPO's 0.2. With ``seq-mean-token-mean`` (the paper's) or ``token-mean`` the gradient is exactly
that of the sequence objective, since every token of a sequence carries the same value.

Metrics (masked token means, whatever the loss aggregation): ``pg_clipfrac_higher`` = share of
tokens with ``l1 < l2`` (the clip is active); ``pg_clipfrac_lower`` = share with ``A < 0`` and
``l_hi > l3`` (0 for GSPO); ``ppo_kl`` = mean of ``-log r`` (the k1 estimate of
KL(pi_old || pi), on the pre-clipped token ratio).
"""

from __future__ import annotations

import math
from typing import Literal

import torch

__all__ = [
    "AGGREGATIONS",
    "KL_KINDS",
    "POLICY_LOSSES",
    "aggregate_loss",
    "entropy_coefficient",
    "gspo_policy_loss",
    "kl_penalty",
    "policy_loss",
]

Aggregation = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"]
AGGREGATIONS: tuple[str, ...] = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")
POLICY_LOSSES: tuple[str, ...] = ("ppo", "gspo")
# k1/k2/k3 in Schulman's naming (http://joschu.net/blog/kl-approx.html); the released code's
# names for the same estimators are accepted as aliases.
KL_KINDS: dict[str, str] = {
    "k1": "k1",
    "kl": "k1",
    "k2": "k2",
    "mse": "k2",
    "k3": "k3",
    "low_var_kl": "k3",
}
_LOG_PRECLIP = (math.log(1e-3), math.log(1e3))
_K3_CLAMP = 10.0


def aggregate_loss(values: torch.Tensor, mask: torch.Tensor, agg: Aggregation) -> torch.Tensor:
    """Reduce a per-token ``[B, T]`` tensor to a scalar over the masked (response) tokens.

    token-mean:          sum_{i,t} m x / sum_{i,t} m
    seq-mean-token-mean: mean_i ( sum_t m x / sum_t m )
    seq-mean-token-sum:  mean_i ( sum_t m x )

    The sequence means run over rows with at least one response token, so padding rows added to
    fill a micro-batch do not dilute the loss. With no response token at all the result is 0
    (still attached to the graph).
    """
    if values.shape != mask.shape:
        raise ValueError(
            f"values {tuple(values.shape)} and mask {tuple(mask.shape)} differ in shape"
        )
    if agg not in AGGREGATIONS:
        raise ValueError(f"unknown loss aggregation {agg!r}; use one of {AGGREGATIONS}")
    m = mask.to(values.dtype)
    masked = values * m
    if agg == "token-mean":
        return masked.sum() / m.sum().clamp(min=1.0)
    if values.dim() != 2:
        raise ValueError(f"{agg} needs [B, T] inputs, got {tuple(values.shape)}")
    tokens = m.sum(dim=-1)
    rows = (tokens > 0).to(values.dtype)
    per_seq = masked.sum(dim=-1)
    if agg == "seq-mean-token-mean":
        per_seq = per_seq / tokens.clamp(min=1.0)
    return (per_seq * rows).sum() / rows.sum().clamp(min=1.0)


def _masked_token_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.to(values.dtype)
    return (values * m).sum() / m.sum().clamp(min=1.0)


def _check_shapes(
    log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    is_weights: torch.Tensor | None,
) -> torch.Tensor:
    """``advantages`` broadcast to ``[B, T]`` once every input is checked."""
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(-1).expand_as(log_probs)
    shapes = [log_probs.shape, old_log_probs.shape, advantages.shape, response_mask.shape]
    if is_weights is not None:
        shapes.append(is_weights.shape)
    if any(shape != shapes[0] for shape in shapes):
        raise ValueError(
            "log_probs, old_log_probs, advantages, response_mask (and is_weights) must share a "
            f"shape, got {[tuple(shape) for shape in shapes]}"
        )
    return advantages


def _weighted(per_token: torch.Tensor, is_weights: torch.Tensor | None) -> torch.Tensor:
    return per_token if is_weights is None else per_token * is_weights.detach()


def policy_loss(
    log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.25,
    clip_dual: float = 3.0,
    agg: Aggregation = "token-mean",
    is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped PPO policy loss (module docstring) and its metrics.

    Shapes: ``[B, T]`` for all inputs; ``advantages`` may also be ``[B]`` (one per response).
    ``is_weights`` (``[B, T]``, optional): rollout-correction weights per token.
    Returns ``(loss, {"pg_loss", "pg_clipfrac_higher", "pg_clipfrac_lower", "ppo_kl"})`` with
    detached metric tensors. Defaults are the released code's (0.2, 0.25, 3.0, token-mean).
    """
    if not 0.0 <= clip_low < 1.0:
        raise ValueError(f"clip_low must be in [0, 1), got {clip_low}")
    if clip_high < 0.0:
        raise ValueError(f"clip_high must be >= 0, got {clip_high}")
    if not clip_dual > 1.0:
        raise ValueError(
            f"clip_dual must be > 1 (it caps the loss at c_dual * |A|), got {clip_dual}"
        )
    advantages = _check_shapes(log_probs, old_log_probs, advantages, response_mask, is_weights)
    log_ratio = torch.clamp(log_probs - old_log_probs, *_LOG_PRECLIP)
    ratio = torch.exp(log_ratio)
    clipped_ratio = torch.exp(
        torch.clamp(log_ratio, math.log(1.0 - clip_low), math.log(1.0 + clip_high))
    )
    loss1 = -advantages * ratio
    loss2 = -advantages * clipped_ratio
    loss3 = -advantages * clip_dual
    loss_hi = torch.maximum(loss1, loss2)
    negative = advantages < 0
    per_token = torch.where(negative, torch.minimum(loss_hi, loss3), loss_hi)

    loss = aggregate_loss(_weighted(per_token, is_weights), response_mask, agg)
    lower = (loss_hi > loss3) & negative
    return loss, _metrics(loss, loss1 < loss2, lower, log_ratio, response_mask)


def _metrics(
    loss: torch.Tensor,
    clipped: torch.Tensor,
    clipped_lower: torch.Tensor,
    log_ratio: torch.Tensor,
    response_mask: torch.Tensor,
) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        return {
            "pg_loss": loss.detach(),
            "pg_clipfrac_higher": _masked_token_mean(clipped.to(log_ratio.dtype), response_mask),
            "pg_clipfrac_lower": _masked_token_mean(
                clipped_lower.to(log_ratio.dtype), response_mask
            ),
            "ppo_kl": _masked_token_mean(-log_ratio.detach(), response_mask),
        }


def gspo_policy_loss(
    log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    clip_low: float = 3e-4,
    clip_high: float = 4e-4,
    agg: Aggregation = "seq-mean-token-mean",
    is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GSPO's sequence-level clipped loss (module docstring); inputs and metrics as
    ``policy_loss``. Defaults: the paper's clip range and aggregation."""
    if not 0.0 <= clip_low < 1.0:
        raise ValueError(f"GSPO clip_low must be in [0, 1), got {clip_low}")
    if clip_high < 0.0:
        raise ValueError(f"GSPO clip_high must be >= 0, got {clip_high}")
    advantages = _check_shapes(log_probs, old_log_probs, advantages, response_mask, is_weights)
    m = response_mask.to(log_probs.dtype)
    diff = (log_probs - old_log_probs).detach()
    seq_log_ratio = (diff * m).sum(dim=-1) / m.sum(dim=-1).clamp(min=1.0)
    seq_log_ratio = torch.clamp(seq_log_ratio, *_LOG_PRECLIP)
    log_ratio = torch.clamp(diff, *_LOG_PRECLIP)  # for ppo_kl only
    ratio = torch.exp(log_probs - log_probs.detach() + seq_log_ratio.unsqueeze(-1))
    loss1 = -advantages * ratio
    loss2 = -advantages * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    per_token = torch.maximum(loss1, loss2)
    loss = aggregate_loss(_weighted(per_token, is_weights), response_mask, agg)
    return loss, _metrics(loss, loss1 < loss2, torch.zeros_like(m, dtype=torch.bool), log_ratio,
                          response_mask)


def kl_penalty(log_probs: torch.Tensor, ref_log_probs: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from sampled-token log-probs, in float32.

    With ``d = log pi - log pi_ref``:
      k1 (``kl``):         d
      k2 (``mse``):        d^2 / 2
      k3 (``low_var_kl``): exp(-d) + d - 1, clamped to [-10, 10] as in the released code.
    """
    resolved = KL_KINDS.get(kind)
    if resolved is None:
        raise ValueError(f"unknown KL estimator {kind!r}; use one of {sorted(KL_KINDS)}")
    if log_probs.shape != ref_log_probs.shape:
        raise ValueError(
            f"log_probs {tuple(log_probs.shape)} and ref_log_probs {tuple(ref_log_probs.shape)} differ"
        )
    diff = log_probs.float() - ref_log_probs.float()
    if resolved == "k1":
        return diff
    if resolved == "k2":
        return 0.5 * diff.square()
    # exp(-d) - (-d) - 1 >= 0; the clamp bounds the loss (and zeroes the gradient) when the
    # policy has drifted far from the reference.
    return torch.clamp(torch.exp(-diff) + diff - 1.0, min=-_K3_CLAMP, max=_K3_CLAMP)


def entropy_coefficient(
    update: int,
    *,
    init: float = 0.02,
    minimum: float = 0.0,
    decay: float | None = None,
    warmup_steps: int = 20,
    schedule: Literal["exp", "linear"] = "exp",
    total_steps: int | None = None,
) -> float:
    """Entropy-bonus coefficient beta of optimizer update ``update`` (0-based, counted over the
    stage), as the released actor applies it.

      update <= warmup_steps:  0
      n = update - warmup_steps - 1
      exp:     max(minimum, init * decay^n)
      linear:  max(minimum, init - n * (init - minimum) / total_steps)

    The released actor (``dp_actor.py::_anneal_entropy_coef``) starts at 0 and, after each
    optimizer step u, sets beta to 0 while u < warmup, to init at u == warmup, and decays it
    after; the update after u uses that value. So update 0 and the warm-up updates train with
    beta = 0 and init is first used by update warmup + 1.
    ``decay`` defaults to 0.985 and belongs to ``exp`` only; ``total_steps`` (the released
    ``total_updates``) to ``linear`` only. Defaults: paper Table 5 (0.02, 0, 0.985); 20 warm-up
    updates and ``exp`` from the released config. The loss adds ``-beta * entropy``.
    """
    if update < 0 or warmup_steps < 0:
        raise ValueError(f"update and warmup_steps must be >= 0, got {update}, {warmup_steps}")
    if not 0.0 <= minimum <= init:
        raise ValueError(f"need 0 <= minimum <= init, got minimum={minimum}, init={init}")
    if schedule == "exp":
        if total_steps is not None:
            raise ValueError("total_steps has no effect with schedule='exp'; leave it None")
        decay = 0.985 if decay is None else decay
        if not 0.0 < decay <= 1.0:
            raise ValueError(f"decay must be in (0, 1], got {decay}")
    elif schedule == "linear":
        if decay is not None:
            raise ValueError("decay has no effect with schedule='linear'; leave it None")
        if total_steps is None or total_steps <= 0:
            raise ValueError(f"schedule='linear' needs total_steps > 0, got {total_steps}")
    else:
        raise ValueError(f"unknown entropy schedule {schedule!r}; use 'exp' or 'linear'")
    n = update - warmup_steps - 1
    if n < 0:
        return 0.0
    if schedule == "exp":
        assert decay is not None
        return max(minimum, init * decay**n)
    assert total_steps is not None
    return max(minimum, init - n * (init - minimum) / total_steps)
