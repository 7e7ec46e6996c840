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
    A_i = the response's advantage (GRPO's is the same at every token, so the released
          length-normalised token sum is that value)
    E  = { i : T_low < |A_i| < T_high }                          (bounds exclusive)
    p_i = |A_i|^alpha / sum_E |A_j|^alpha
    k  = int(N * rho) in float64, as released (int(45 * 1.4) = 62), drawn with replacement
         (the released default), or min(k, |E|) without.
    When E is empty or k is 0 the released trainer trains on the whole batch, and so does
    this mode (``pad/whole_batch``).

Differences from the released code, all below float32 resolution or in corner cases it crashes
on: it adds 1e-8 to response lengths and to ``|A|`` before the power; here lengths are clamped
to >= 1 and ``|A|^alpha`` is computed as ``(|A| / max|A|)^alpha``, which is the same distribution
without overflow. ``|A| > T_low >= 0`` on E, so no term is 0 ** alpha.

Uniform fallback: if the weights are not finite, or fewer than ``k'`` of them are positive
(softmax underflow for a tiny ``tau``) so that ``k'`` draws without replacement are impossible,
E is sampled uniformly and ``pad/uniform_fallback`` is set.

In paper mode an empty selection (E empty, or ``k' == 0``) is not an error: ``pad_step``
reports ``skipped=True`` with its metrics and logs it, and the caller skips the update for that
step (Algorithm 1 has nothing to train on).

`PAD` is one stage's PAD: the rule above with the stage's settings, its tau schedule and the
most samples a step can keep (what the LR schedule's length is planned from). The trainer
reaches PAD only through it.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Literal

import torch

__all__ = [
    "PAD",
    "PadMode",
    "PadResult",
    "effective_indices",
    "pad_probabilities",
    "pad_sample_count",
    "pad_step",
]

logger = logging.getLogger(__name__)

PadMode = Literal["paper", "released"]
_MODES = ("paper", "released")


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
    """How many draws PAD makes: paper ``min(ceil(rho N), |E|)``; released ``int(N * rho)``,
    capped at ``|E|`` only without replacement. 0 when E is empty.

    paper: ``rho * N`` is rounded to 9 decimals first, so float noise does not move it across an
    integer (``ceil(0.3 * 10)`` is 3, not 4). released: the released trainer's float64
    ``int(N * rho)`` exactly, float noise included (``int(100 * 0.29)`` = 28, ``int(45 * 1.4)`` = 62).
    """
    if not ratio > 0.0:
        raise ValueError(f"PAD ratio (rho) must be > 0, got {ratio}")
    if num_effective == 0:
        return 0
    if mode == "paper":
        # 0.3 * 10 is 3.0000000000000004 in floating point, and ceil of that would be 4.
        return min(math.ceil(round(ratio * num_sequences, 9)), num_effective)
    k = int(num_sequences * ratio)
    return k if replacement else min(k, num_effective)


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
    """Indices (LongTensor, drawn order) of the responses PAD trains on, the metrics the
    trainer logs, and the empty-selection policy: paper skips the step, released trains on the
    whole batch (indices 0..N-1), as each published version does.

    ``seq_advantages`` is ``[N]`` (signed; PAD uses ``|A|``). The paper variant always draws
    without replacement, so ``replacement=True`` is rejected there.

    Metrics: ``pad/effective_count`` |E|, ``pad/selected_count`` (with multiplicity),
    ``pad/mean_abs_adv_before`` (over all N), ``pad/mean_abs_adv_after`` (over the selection,
    0 if empty), ``pad/skipped``, ``pad/whole_batch``, ``pad/uniform_fallback``, and
    ``pad/tau`` or ``pad/alpha``.
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
    whole_batch = selected.numel() == 0 and mode == "released" and a.numel() > 0
    if whole_batch:  # released: "Fallback to original batch"
        selected = torch.arange(a.numel(), dtype=torch.long)
    skipped = selected.numel() == 0
    metrics = {
        "pad/effective_count": float(effective.numel()),
        "pad/selected_count": float(selected.numel()),
        "pad/mean_abs_adv_before": float(a.mean()) if a.numel() else 0.0,
        "pad/mean_abs_adv_after": 0.0 if skipped else float(a[selected].mean()),
        "pad/skipped": float(skipped),
        "pad/whole_batch": float(whole_batch),
        "pad/uniform_fallback": float(fallback),
    }
    metrics["pad/tau" if mode == "paper" else "pad/alpha"] = tau if mode == "paper" else alpha
    if whole_batch:
        where = f"step {step}: " if step is not None else ""
        logger.info("%sPAD selected no responses (|E|=%d of N=%d, mode=released); training on the "
                    "whole batch, as the released trainer does", where, effective.numel(), a.numel())
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


@dataclass(frozen=True, kw_only=True)
class PAD:
    """One stage's PAD (`rl.pad` with the stage's step count): the selection rule with its
    settings, the paper variant's tau schedule, and the most samples one step can keep.

    tau: the paper variant's temperature, reached at the stage's last step when ``tau_start``
    is set (linear from ``tau_start`` at step 1), else constant. alpha: the released variant's
    power. ``total_steps``: the stage's steps (the schedule's length)."""

    mode: PadMode = "paper"
    t_low: float
    t_high: float
    ratio: float
    tau: float = 0.3
    tau_start: float | None = None
    alpha: float = 1.0
    replacement: bool = False
    total_steps: int = 1

    @classmethod
    def from_config(cls, pad: object, total_steps: int) -> PAD:
        """From a `config.schema.PADConfig` (its unset tau / alpha take their defaults)."""
        mode = pad.mode
        return cls(
            mode=mode, t_low=pad.t_low, t_high=pad.t_high, ratio=pad.ratio,
            tau=0.3 if pad.tau is None else pad.tau, tau_start=pad.tau_start if mode == "paper" else None,
            alpha=1.0 if mode == "paper" or pad.alpha is None else pad.alpha,
            replacement=pad.replacement, total_steps=total_steps,
        )

    def tau_at(self, stage_step: int) -> float:
        """The paper variant's temperature at 1-based `stage_step` (1.0 for the released
        variant, which has none)."""
        if self.mode == "released":
            return 1.0
        if self.tau_start is None or self.total_steps <= 1:
            return self.tau
        frac = (stage_step - 1) / (self.total_steps - 1)
        return self.tau_start + frac * (self.tau - self.tau_start)

    def sample_count(self, num_sequences: int, num_effective: int) -> int:
        """How many draws a step with `num_effective` of `num_sequences` in E makes."""
        return pad_sample_count(num_sequences, num_effective, mode=self.mode, ratio=self.ratio,
                                replacement=self.replacement)

    def most_samples(self, num_sequences: int) -> int:
        """The most samples (with multiplicity) one step can train on: paper
        ``min(ceil(rho N), N)``; released ``int(N rho)`` with replacement, never fewer than N
        (the whole-batch fallback), and N without (``min(k, |E|) <= N``, or the fallback)."""
        if self.mode == "paper":
            return self.sample_count(num_sequences, num_sequences)
        k = self.sample_count(num_sequences, num_sequences)
        return max(k, num_sequences)

    def select(self, seq_advantages: torch.Tensor, *, stage_step: int, generator: torch.Generator | None,
               step: int | None = None) -> PadResult:
        """`pad_step` with this stage's settings and the temperature of `stage_step`."""
        return pad_step(seq_advantages, mode=self.mode, t_low=self.t_low, t_high=self.t_high,
                        ratio=self.ratio, tau=self.tau_at(stage_step), alpha=self.alpha,
                        replacement=self.replacement, generator=generator, step=step)
