"""PAD: both variants by hand (boundaries, empty set, k), the tau schedule, the planned update
count, and properties."""

import logging
import math
from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_revisual.rl.pad import (
    PAD,
    effective_indices,
    pad_probabilities,
    pad_sample_count,
    pad_step,
)

# Values exact in binary, so the boundary comparisons below are exact too.
ADV = torch.tensor([0.0, 0.25, -0.5, 0.75, 1.0, -0.125])


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def pad_select(seq_advantages: torch.Tensor, **kwargs) -> torch.Tensor:
    return pad_step(seq_advantages, **kwargs).indices


def test_effective_set_boundaries_paper_inclusive_released_exclusive() -> None:
    # |A| = 0, .25, .5, .75, 1, .125 with T_low = .25, T_high = .75
    assert effective_indices(ADV, mode="paper", t_low=0.25, t_high=0.75).tolist() == [1, 2, 3]
    assert effective_indices(ADV, mode="released", t_low=0.25, t_high=0.75).tolist() == [2]


def test_paper_probabilities_are_softmax_of_abs_over_tau() -> None:
    idx, p = pad_probabilities(ADV, mode="paper", t_low=0.25, t_high=0.75)
    assert idx.tolist() == [1, 2, 3]
    # e^.25, e^.5, e^.75 normalised
    assert p.tolist() == pytest.approx([0.25427521259, 0.32649583580, 0.41922895161], abs=1e-10)
    _, p = pad_probabilities(ADV, mode="paper", t_low=0.25, t_high=0.75, tau=0.5)
    assert p.tolist() == pytest.approx([0.18632372323, 0.30719588572, 0.50648039106], abs=1e-10)


def test_released_probabilities_are_powers_of_abs() -> None:
    adv = torch.tensor([0.5, -0.25, 0.75, 1.0, 0.0])
    idx, p = pad_probabilities(adv, mode="released", t_low=0.0, t_high=1.0, alpha=2.0)
    assert idx.tolist() == [0, 1, 2]  # 1.0 and 0.0 sit on the exclusive bounds
    # .25, .0625, .5625 over .875
    assert p.tolist() == pytest.approx([2 / 7, 1 / 14, 9 / 14], abs=1e-12)


def test_paper_selects_k_prime_without_replacement() -> None:
    # k' = min(ceil(0.5 * 6), |E| = 3) = 3: the whole effective set, whatever the draw order
    sel = pad_select(ADV, mode="paper", t_low=0.25, t_high=0.75, ratio=0.5, generator=gen())
    assert sorted(sel.tolist()) == [1, 2, 3]
    # ceil(0.3 * 6) = ceil(1.8) = 2 distinct members of E
    sel = pad_select(ADV, mode="paper", t_low=0.25, t_high=0.75, ratio=0.3, generator=gen())
    assert len(sel) == 2 and len(set(sel.tolist())) == 2 and set(sel.tolist()) <= {1, 2, 3}


def test_released_selects_int_rho_n_with_replacement() -> None:
    sel = pad_select(
        ADV, mode="released", t_low=0.25, t_high=0.75, ratio=1.0, replacement=True, generator=gen()
    )
    assert sel.tolist() == [2] * 6  # int(1.0 * 6) draws from E = {2}
    sel = pad_select(
        ADV, mode="released", t_low=0.25, t_high=0.75, ratio=1.0, replacement=False, generator=gen()
    )
    assert sel.tolist() == [2]  # min(6, |E| = 1)


def test_sample_counts() -> None:
    assert (
        pad_sample_count(10, 8, mode="paper", ratio=0.3, replacement=False) == 3
    )  # not ceil(3.0000000000000004)
    assert pad_sample_count(10, 2, mode="paper", ratio=0.3, replacement=False) == 2
    # released: its float64 int(N * rho), float noise included (int(28.999999999999996))
    assert pad_sample_count(100, 50, mode="released", ratio=0.29, replacement=True) == 28
    assert pad_sample_count(45, 50, mode="released", ratio=1.4, replacement=True) == 62
    assert pad_sample_count(10, 4, mode="released", ratio=1.0, replacement=True) == 10
    assert pad_sample_count(10, 4, mode="released", ratio=1.0, replacement=False) == 4
    assert pad_sample_count(10, 0, mode="released", ratio=1.0, replacement=True) == 0


def test_empty_effective_set_skips_in_paper_mode_and_logs(caplog: pytest.LogCaptureFixture) -> None:
    zeros = torch.zeros(8)
    assert pad_select(zeros, mode="paper", t_low=0.05, t_high=0.95, ratio=1.0).numel() == 0
    with caplog.at_level(logging.INFO, logger="megatron_revisual.rl.pad"):
        res = pad_step(zeros, mode="paper", t_low=0.05, t_high=0.95, ratio=1.0, step=7)
    assert res.skipped and res.indices.numel() == 0 and res.indices.dtype == torch.long
    assert res.metrics == {
        "pad/effective_count": 0.0,
        "pad/selected_count": 0.0,
        "pad/mean_abs_adv_before": 0.0,
        "pad/mean_abs_adv_after": 0.0,
        "pad/skipped": 1.0,
        "pad/whole_batch": 0.0,
        "pad/uniform_fallback": 0.0,
        "pad/tau": 1.0,
    }
    assert "step 7: PAD selected no responses" in caplog.text


def test_released_mode_trains_on_the_whole_batch_when_nothing_is_in_the_window(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The released trainer's fallback ("Fallback to original batch"): E empty, or k = 0."""
    zeros = torch.zeros(8)
    with caplog.at_level(logging.INFO, logger="megatron_revisual.rl.pad"):
        res = pad_step(zeros, mode="released", t_low=0.05, t_high=0.95, ratio=1.0, replacement=True, step=7)
    assert not res.skipped and res.indices.tolist() == list(range(8)) and res.indices.dtype == torch.long
    assert res.metrics == {
        "pad/effective_count": 0.0,
        "pad/selected_count": 8.0,
        "pad/mean_abs_adv_before": 0.0,
        "pad/mean_abs_adv_after": 0.0,
        "pad/skipped": 0.0,
        "pad/whole_batch": 1.0,
        "pad/uniform_fallback": 0.0,
        "pad/alpha": 1.0,
    }
    assert "step 7: PAD selected no responses" in caplog.text and "whole batch" in caplog.text
    # int(0.1 * 6) = 0 although E = {2} is not empty: the whole batch too
    res = pad_step(ADV, mode="released", t_low=0.25, t_high=0.75, ratio=0.1, replacement=True)
    assert res.indices.tolist() == list(range(6)) and res.metrics["pad/effective_count"] == 1.0
    # paper mode skips the same step
    assert pad_step(ADV, mode="paper", t_low=0.9, t_high=0.95, ratio=0.5).skipped


def test_pad_step_metrics() -> None:
    res = pad_step(ADV, mode="paper", t_low=0.25, t_high=0.75, ratio=0.5, tau=0.65, generator=gen())
    assert not res.skipped
    assert res.metrics["pad/effective_count"] == 3.0
    assert res.metrics["pad/selected_count"] == 3.0
    assert res.metrics["pad/mean_abs_adv_before"] == pytest.approx(2.625 / 6)
    assert res.metrics["pad/mean_abs_adv_after"] == pytest.approx(0.5)
    assert res.metrics["pad/tau"] == 0.65


def _pad(**kw) -> PAD:
    return PAD(**{"t_low": 0.05, "t_high": 10.0, "ratio": 1.0} | kw)


def test_tau_schedule_linear_over_the_stage() -> None:
    pad = _pad(tau_start=1.0, tau=0.3, total_steps=101)
    assert [pad.tau_at(s) for s in (1, 51, 101)] == pytest.approx([1.0, 0.65, 0.3])
    assert _pad(tau_start=2.0, tau=1.0, total_steps=5).tau_at(2) == pytest.approx(1.75)
    assert _pad(tau=0.4, total_steps=50).tau_at(7) == 0.4  # no tau_start: constant
    assert _pad(mode="released", alpha=1.5).tau_at(3) == 1.0


def test_the_planned_update_count_is_the_most_pad_can_keep() -> None:
    """The LR schedule's length (`planned_updates_per_step`) comes from the same count PAD draws."""
    from types import SimpleNamespace

    from megatron_revisual.config.schema import PADConfig
    from megatron_revisual.train.grpo_plan import planned_updates_per_step

    def stage(**pad):
        # N = 5 prompts x 2 = 10 samples; 1 prompt x 2 = 2 samples per update
        return SimpleNamespace(rollout_batch_size=5, rollout=SimpleNamespace(n=2), global_batch_size=1,
                               steps=10, rl=SimpleNamespace(pad=PADConfig(**pad), ppo_epochs=1))

    # paper, ratio 0.25: PAD draws ceil(2.5) = 3 samples -> 2 updates (int(2.5) = 2 gave 1)
    assert PAD.from_config(PADConfig(ratio=0.25), 10).most_samples(10) == 3
    assert planned_updates_per_step(stage(ratio=0.25)) == 2
    # released with replacement, 45 x 1.4: int(62.99999999999999) = 62 draws
    assert PAD.from_config(PADConfig(mode="released", ratio=1.4, replacement=True), 1).most_samples(45) == 62
    assert planned_updates_per_step(stage(mode="released", ratio=1.5, replacement=True)) == 8  # 15 / 2
    # released, ratio < 1: the whole-batch fallback can train on all 10
    assert planned_updates_per_step(stage(mode="released", ratio=0.3)) == 5
    assert planned_updates_per_step(stage(enabled=False)) == 5


def test_tiny_tau_underflow_falls_back_to_uniform() -> None:
    adv = torch.tensor([0.0, 1.0, 900.0])
    res = pad_step(adv, mode="paper", t_low=0.0, t_high=1000.0, ratio=1.0, tau=1.0, generator=gen())
    assert res.metrics["pad/uniform_fallback"] == 1.0  # e^-900 underflows: 3 distinct draws need it
    assert sorted(res.indices.tolist()) == [0, 1, 2]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"mode": "paper", "alpha": 2.0}, "alpha=2.0 has no effect"),
        ({"mode": "released", "tau": 0.5}, "tau=0.5 has no effect"),
        ({"mode": "paper", "replacement": True}, "without replacement"),
        ({"mode": "paper", "t_low": 0.9, "t_high": 0.1}, "t_low <= t_high"),
        ({"mode": "other"}, "unknown PAD mode"),
        ({"mode": "paper", "ratio": 0.0}, "ratio"),
    ],
)
def test_bad_arguments_are_rejected(kwargs: dict, message: str) -> None:
    args = {"t_low": 0.1, "t_high": 0.9, "ratio": 1.0} | kwargs
    with pytest.raises(ValueError, match=message):
        pad_select(ADV, **args)


# --- properties ------------------------------------------------------------------------------
settings.register_profile("rl", max_examples=150, deadline=None)

advantages = st.lists(st.floats(-3.0, 3.0, allow_nan=False, width=32), min_size=1, max_size=64)


@st.composite
def pad_args(draw: st.DrawFn) -> dict:
    mode = draw(st.sampled_from(["paper", "released"]))
    lo = draw(st.floats(0.0, 3.0, allow_nan=False))
    hi = draw(st.floats(lo, 3.5, allow_nan=False))
    num, den = draw(st.integers(1, 40)), draw(st.integers(1, 20))
    args = {
        "mode": mode,
        "t_low": lo,
        "t_high": hi,
        "ratio": num / den,
        "_ratio": Fraction(num, den),
    }
    if mode == "paper":
        args["tau"] = draw(st.floats(0.05, 5.0))
    else:
        args["alpha"] = draw(st.floats(0.0, 4.0))
        args["replacement"] = draw(st.booleans())
    return args


def _expected_effective(values: list[float], mode: str, lo: float, hi: float) -> set[int]:
    a = [abs(v) for v in values]
    if mode == "paper":
        return {i for i, x in enumerate(a) if lo <= x <= hi}
    return {i for i, x in enumerate(a) if lo < x < hi}


@settings(settings.get_profile("rl"))
@given(values=advantages, args=pad_args(), seed=st.integers(0, 2**31 - 1))
def test_selection_properties(values: list[float], args: dict, seed: int) -> None:
    exact_ratio = args.pop("_ratio")
    adv = torch.tensor(values, dtype=torch.float32)
    values = adv.tolist()  # the float32 values PAD sees
    eff = _expected_effective(values, args["mode"], args["t_low"], args["t_high"])
    n = len(values)

    sel = pad_select(adv, generator=gen(seed), **args)
    assert sel.dtype == torch.long
    replacement = args.get("replacement", False)
    if args["mode"] == "paper":
        allowed = min(math.ceil(exact_ratio * n), len(eff))
    else:
        k = int(n * args["ratio"])  # the released float64 product
        allowed = (k if eff else 0) if replacement else min(k, len(eff))
        if allowed == 0:  # released: the whole batch
            assert sel.tolist() == list(range(n))
            return
    assert set(sel.tolist()) <= eff  # never outside E
    assert len(sel) <= allowed  # never more than allowed
    assert len(sel) == allowed  # and exactly that many when possible
    if not replacement:
        assert len(set(sel.tolist())) == len(sel)
    # reproducible with a seeded generator
    assert torch.equal(sel, pad_select(adv, generator=gen(seed), **args))

    prob_args = {k: v for k, v in args.items() if k != "replacement" and k != "ratio"}
    idx, p = pad_probabilities(adv, **prob_args)
    assert set(idx.tolist()) == eff
    if eff:
        assert float(p.sum()) == pytest.approx(1.0, abs=1e-9)
        assert bool((p >= 0).all())
