"""Prioritized Advantage Distillation (PAD): train only on responses whose advantage carries signal.

Standard GRPO stalls when whole groups get the same reward: their advantages are 0 and so are
their gradients. PAD keeps the responses with informative advantages and re-samples the batch
from them, favouring large ``|A|``. Two published variants exist and differ in every detail, so
both are implemented and selected by ``mode``:

``mode="paper"`` (arXiv 2506.04207, Sec. 3.2, Algorithm 1)
    E  = { i : T_low <= |A_i| <= T_high }                        (bounds inclusive)
    p_i = softmax(|A_i| / tau) over E                             (uniform fallback, see below)
    k' = min(ceil(rho * N), |E|), drawn without replacement
    tau is annealed over training (``pad_tau``: linear 1.0 -> 0.3 by default).

``mode="released"`` (released code, ``verl/trainer/ray_trainer.py``, ``use_pad``)
    A_i = sum_t A_{i,t} over response tokens, / response length if ``normalize_by_length``
    E  = { i : T_low < |A_i| < T_high }                          (bounds exclusive)
    p_i = |A_i|^alpha / sum_E |A_j|^alpha
    k  = int(rho * N) drawn with replacement (the released default), or min(k, |E|) without.

Differences from the released code, all below float32 resolution or in corner cases it crashes
on: it adds 1e-8 to response lengths and to ``|A|`` before the power; here lengths are clamped
to >= 1 and ``|A|^alpha`` is computed as ``(|A| / max|A|)^alpha``, which is the same distribution
without overflow. ``|A| > T_low >= 0`` on E, so no term is 0 ** alpha.

Uniform fallback: if the weights are not finite, or fewer than ``k'`` of them are positive
(softmax underflow for a tiny ``tau``) so that ``k'`` draws without replacement are impossible,
E is sampled uniformly and ``pad/uniform_fallback`` is set.

An empty selection (E empty, or ``k == 0``) is not an error: ``pad_step`` reports
``skipped=True`` with its metrics and logs a warning, and the caller skips the update for that
step. The released code calls ``exit(1)`` there.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Literal

import torch

__all__ = [
    "PadMode",
    "PadResult",
    "effective_indices",
    "pad_probabilities",
    "pad_sample_count",
    "pad_select",
    "pad_step",
    "pad_tau",
    "sequence_advantages",
]

logger = logging.getLogger(__name__)

PadMode = Literal["paper", "released"]
_MODES = ("paper", "released")


def sequence_advantages(
    token_advantages: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    normalize_by_length: bool,
) -> torch.Tensor:
    """Per-response advantage ``[B]`` from token advantages ``[B, T]`` (released code).

    ``A_i = sum_t m_{i,t} A_{i,t}``, divided by ``max(1, sum_t m_{i,t})`` when
    ``normalize_by_length``. With GRPO's constant-per-response token advantages the normalised
    form returns the response's scalar advantage.
    """
    if token_advantages.shape != response_mask.shape or token_advantages.dim() != 2:
        raise ValueError(
            f"token_advantages and response_mask must both be [B, T], got "
            f"{tuple(token_advantages.shape)} and {tuple(response_mask.shape)}"
        )
    mask = response_mask.to(torch.float64)
    total = (token_advantages.to(torch.float64) * mask).sum(dim=-1)
    if normalize_by_length:
        total = total / mask.sum(dim=-1).clamp(min=1.0)
    return total.to(torch.float32)


def _check_mode_args(mode: str, t_low: float, t_high: float, tau: float, alpha: float) -> None:
    if mode not in _MODES:
        raise ValueError(f"unknown PAD mode {mode!r}; use one of {_MODES}")
    if not 0.0 <= t_low <= t_high:
        raise ValueError(
            f"PAD thresholds need 0 <= t_low <= t_high, got t_low={t_low}, t_high={t_high}"
        )
    # No dead flags: each variant has exactly one sharpness knob.
    if mode == "paper" and alpha != 1.0:
        raise ValueError(
            f"alpha={alpha} has no effect in mode='paper' (it uses tau); leave alpha=1.0"
        )
    if mode == "released" and tau != 1.0:
        raise ValueError(
            f"tau={tau} has no effect in mode='released' (it uses alpha); leave tau=1.0"
        )
    if mode == "paper" and not tau > 0.0:
        raise ValueError(f"tau must be > 0, got {tau}")
    if mode == "released" and not alpha >= 0.0:
        raise ValueError(f"alpha must be >= 0, got {alpha}")


def effective_indices(
    seq_advantages: torch.Tensor, *, mode: PadMode, t_low: float, t_high: float
) -> torch.Tensor:
    """Indices of the effective set E: inclusive bounds for ``paper``, exclusive for ``released``."""
    _check_mode_args(mode, t_low, t_high, 1.0, 1.0)
    a = seq_advantages.detach().abs().to(torch.float64)
    if mode == "paper":
        keep = (a >= t_low) & (a <= t_high)
    else:
        keep = (a > t_low) & (a < t_high)
    return torch.nonzero(keep, as_tuple=False).view(-1)


def pad_probabilities(
    seq_advantages: torch.Tensor,
    *,
    mode: PadMode,
    t_low: float,
    t_high: float,
    tau: float = 1.0,
    alpha: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(E, p)``: effective indices and their sampling probabilities (float64, sums to 1).

    paper: ``p = softmax(|A_E| / tau)``; released: ``p = |A_E|^alpha / sum |A_E|^alpha``.
    Non-finite weights fall back to uniform. Both are empty when E is empty.
    """
    _check_mode_args(mode, t_low, t_high, tau, alpha)
    idx = effective_indices(seq_advantages, mode=mode, t_low=t_low, t_high=t_high)
    a = seq_advantages.detach().abs().to(torch.float64)[idx]
    if idx.numel() == 0:
        return idx, a
    if mode == "paper":
        weights = torch.softmax(a / tau, dim=0)
    else:
        # Divide by the max before the power: same distribution, no overflow for large alpha.
        weights = (a / a.max()) ** alpha
        weights = weights / weights.sum()
    if not bool(torch.isfinite(weights).all()) or not float(weights.sum()) > 0.0:
        weights = torch.full_like(a, 1.0 / a.numel())
    return idx, weights


def pad_sample_count(
    num_sequences: int, num_effective: int, *, mode: PadMode, ratio: float, replacement: bool
) -> int:
    """How many draws PAD makes: paper ``min(ceil(rho N), |E|)``; released ``int(rho N)``, capped
    at ``|E|`` only without replacement. 0 when E is empty.

    ``rho * N`` is rounded to 9 decimals first, so float noise does not move it across an
    integer: 0.29 * 100 gives 29 here, where the released ``int(N * rho)`` gives 28.
    """
    if not ratio > 0.0:
        raise ValueError(f"PAD ratio (rho) must be > 0, got {ratio}")
    if num_effective == 0:
        return 0
    if mode == "paper":
        # 0.3 * 10 is 3.0000000000000004 in floating point, and ceil of that would be 4.
        return min(math.ceil(round(ratio * num_sequences, 9)), num_effective)
    k = int(round(ratio * num_sequences, 9))
    return k if replacement else min(k, num_effective)


def pad_select(
    seq_advantages: torch.Tensor,
    *,
    mode: PadMode,
    t_low: float,
    t_high: float,
    ratio: float,
    tau: float = 1.0,
    alpha: float = 1.0,
    replacement: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Indices (LongTensor, drawn order) of the responses PAD trains on; empty if none.

    ``seq_advantages`` is ``[N]`` (signed; PAD uses ``|A|``). ``mode`` is ``"paper"`` or
    ``"released"``; see the module docstring for each variant's formulas. The paper variant
    always draws without replacement, so ``replacement=True`` is rejected there.
    """
    return _select(
        seq_advantages,
        mode=mode,
        t_low=t_low,
        t_high=t_high,
        ratio=ratio,
        tau=tau,
        alpha=alpha,
        replacement=replacement,
        generator=generator,
    )[0]


def _select(
    seq_advantages: torch.Tensor,
    *,
    mode: PadMode,
    t_low: float,
    t_high: float,
    ratio: float,
    tau: float,
    alpha: float,
    replacement: bool,
    generator: torch.Generator | None,
) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """``(selected, effective, used_uniform_fallback)``."""
    if seq_advantages.dim() != 1:
        raise ValueError(f"seq_advantages must be [N], got shape {tuple(seq_advantages.shape)}")
    if mode == "paper" and replacement:
        raise ValueError(
            "mode='paper' draws without replacement (Algorithm 1); use replacement=False"
        )
    idx, probs = pad_probabilities(
        seq_advantages, mode=mode, t_low=t_low, t_high=t_high, tau=tau, alpha=alpha
    )
    k = pad_sample_count(
        seq_advantages.numel(), idx.numel(), mode=mode, ratio=ratio, replacement=replacement
    )
    if k == 0:
        return idx.new_empty(0), idx, False
    fallback = False
    if not replacement and int((probs > 0).sum()) < k:
        probs = torch.full_like(probs, 1.0 / probs.numel())
        fallback = True
    drawn = torch.multinomial(probs, num_samples=k, replacement=replacement, generator=generator)
    return idx[drawn], idx, fallback


def pad_tau(step: int, total_steps: int, *, start: float = 1.0, end: float = 0.3) -> float:
    """Linear temperature schedule for the paper variant: ``start`` at step 0, ``end`` from
    ``total_steps`` on: ``tau = start + (end - start) * min(step / total_steps, 1)``."""
    if total_steps <= 0:
        raise ValueError(f"total_steps must be > 0, got {total_steps}")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if not (start > 0.0 and end > 0.0):
        raise ValueError(f"tau must stay > 0: start={start}, end={end}")
    return start + (end - start) * min(step / total_steps, 1.0)


@dataclass(frozen=True)
class PadResult:
    """What one PAD step decided. ``skipped`` means: do not update the policy this step."""

    indices: torch.Tensor
    skipped: bool
    metrics: dict[str, float] = field(default_factory=dict)


def pad_step(
    seq_advantages: torch.Tensor,
    *,
    mode: PadMode,
    t_low: float,
    t_high: float,
    ratio: float,
    tau: float = 1.0,
    alpha: float = 1.0,
    replacement: bool = False,
    generator: torch.Generator | None = None,
    step: int | None = None,
) -> PadResult:
    """``pad_select`` plus the metrics the trainer logs, and the empty-set policy.

    Metrics: ``pad/effective_count`` |E|, ``pad/selected_count`` (with multiplicity),
    ``pad/mean_abs_adv_before`` (over all N), ``pad/mean_abs_adv_after`` (over the selection,
    0 if empty), ``pad/skipped``, ``pad/uniform_fallback``, and ``pad/tau`` or ``pad/alpha``.
    """
    selected, effective, fallback = _select(
        seq_advantages,
        mode=mode,
        t_low=t_low,
        t_high=t_high,
        ratio=ratio,
        tau=tau,
        alpha=alpha,
        replacement=replacement,
        generator=generator,
    )
    a = seq_advantages.detach().abs().to(torch.float64)
    skipped = selected.numel() == 0
    metrics = {
        "pad/effective_count": float(effective.numel()),
        "pad/selected_count": float(selected.numel()),
        "pad/mean_abs_adv_before": float(a.mean()) if a.numel() else 0.0,
        "pad/mean_abs_adv_after": 0.0 if skipped else float(a[selected].mean()),
        "pad/skipped": float(skipped),
        "pad/uniform_fallback": float(fallback),
    }
    metrics["pad/tau" if mode == "paper" else "pad/alpha"] = tau if mode == "paper" else alpha
    if skipped:
        # INFO, not a warning: once a model answers every prompt right (or wrong) all groups
        # agree and this happens every step; pad/skipped and the progress line record it
        where = f"step {step}: " if step is not None else ""
        logger.info(
            "%sPAD selected no responses (|E|=%d of N=%d, mode=%s, thresholds %s..%s, ratio=%s); "
            "skipping this update",
            where,
            effective.numel(),
            seq_advantages.numel(),
            mode,
            t_low,
            t_high,
            ratio,
        )
    return PadResult(indices=selected, skipped=skipped, metrics=metrics)
