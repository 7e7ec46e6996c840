"""Log-probs and entropy on one process (no TP group): values and analytic gradients."""

import pytest
import torch

from megatron_revisual.rl.logprobs import (
    vocab_parallel_entropy,
    vocab_parallel_log_probs,
    vocab_parallel_log_probs_and_entropy,
)


def _reference(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    logp = torch.log_softmax(logits, dim=-1)
    return logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1), -(logp.exp() * logp).sum(-1)


def test_hand_computed_uniform_and_two_way() -> None:
    # uniform over 4: log p = -log 4, H = log 4; logits (0, log 3): p = (1/4, 3/4)
    lp, h = vocab_parallel_log_probs_and_entropy(torch.zeros(1, 4), torch.tensor([2]))
    assert lp.tolist() == pytest.approx([-1.3862944], abs=1e-6)
    assert h.tolist() == pytest.approx([1.3862944], abs=1e-6)
    lp, h = vocab_parallel_log_probs_and_entropy(
        torch.tensor([[0.0, 1.0986123]]), torch.tensor([1])
    )
    assert lp.item() == pytest.approx(-0.2876821, abs=1e-6)  # log 3/4
    assert h.item() == pytest.approx(0.5623351, abs=1e-6)  # -(1/4 log 1/4 + 3/4 log 3/4)


def test_matches_log_softmax_fp32() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 7, 50, generator=g) * 4
    targets = torch.randint(0, 50, (2, 7), generator=g)
    lp, h = vocab_parallel_log_probs_and_entropy(logits, targets)
    ref_lp, ref_h = _reference(logits, targets)
    assert torch.allclose(lp, ref_lp, atol=1e-6, rtol=0)
    assert torch.allclose(h, ref_h, atol=1e-6, rtol=0)
    assert torch.equal(vocab_parallel_log_probs(logits, targets), lp)
    assert torch.equal(vocab_parallel_entropy(logits), h)


def test_gradients_pass_gradcheck_fp64() -> None:
    g = torch.Generator().manual_seed(1)
    logits = (torch.randn(3, 11, generator=g, dtype=torch.float64) * 2).requires_grad_(True)
    targets = torch.randint(0, 11, (3,), generator=g)
    assert torch.autograd.gradcheck(
        lambda z: vocab_parallel_log_probs_and_entropy(z, targets), (logits,)
    )
    assert torch.autograd.gradcheck(lambda z: vocab_parallel_log_probs(z, targets), (logits,))
    assert torch.autograd.gradcheck(lambda z: vocab_parallel_entropy(z), (logits,))


def test_bf16_logits_give_fp32_outputs_and_bf16_grad() -> None:
    logits = torch.randn(4, 16).to(torch.bfloat16).requires_grad_(True)
    targets = torch.arange(4)
    lp, h = vocab_parallel_log_probs_and_entropy(logits, targets)
    assert lp.dtype == h.dtype == torch.float32
    ref_lp, ref_h = _reference(logits.detach().float(), targets)
    assert torch.allclose(lp, ref_lp, atol=1e-6) and torch.allclose(h, ref_h, atol=1e-6)
    (lp.sum() + h.sum()).backward()
    assert logits.grad is not None and logits.grad.dtype == torch.bfloat16


def test_temperature_gradients_pass_gradcheck_fp64() -> None:
    g = torch.Generator().manual_seed(4)
    logits = (torch.randn(3, 11, generator=g, dtype=torch.float64) * 2).requires_grad_(True)
    targets = torch.randint(0, 11, (3,), generator=g)
    lp, h = vocab_parallel_log_probs_and_entropy(logits, targets, temperature=0.7)
    ref_lp, ref_h = _reference(logits.detach() / 0.7, targets)
    assert torch.allclose(lp, ref_lp, atol=1e-12) and torch.allclose(h, ref_h, atol=1e-12)
    assert torch.autograd.gradcheck(
        lambda z: vocab_parallel_log_probs_and_entropy(z, targets, temperature=0.7), (logits,)
    )
    with pytest.raises(ValueError, match="temperature=0"):
        vocab_parallel_log_probs_and_entropy(logits, targets, temperature=0.0)


def test_temperature_divides_bf16_logits_after_the_fp32_promotion(monkeypatch) -> None:
    """The training step's log-probs at a sampling temperature (`grpo_step.
    token_log_probs_and_entropy`): bf16 logits, as a GPU's output layer gives them, equal the
    float32 reference of the same (exactly representable) values divided by T, to float32
    rounding. Dividing in bf16 first re-rounds z / T (up to 2^-9 of each logit): ~1e-2 off."""
    from megatron.core import parallel_state as ps

    from megatron_revisual.train.schedule import token_log_probs_and_entropy

    monkeypatch.setattr(ps, "get_tensor_model_parallel_rank", lambda: 0)  # one process: TP 1
    g = torch.Generator().manual_seed(5)
    logits = (torch.randn(64, 96, generator=g) * 6).to(torch.bfloat16).requires_grad_(True)
    targets = torch.randint(0, 80, (64,), generator=g)
    t = 0.7
    lp, h = token_log_probs_and_entropy(logits, targets, vocab_size=80, temperature=t)
    # columns >= 80 are TP padding: -inf, no probability
    ref_lp, ref_h = _reference(logits.detach().float()[:, :80] / t, targets)
    assert (lp - ref_lp).abs().max() < 2e-5 and (h - ref_h).abs().max() < 2e-5
    bf16_first, _ = _reference((logits.detach()[:, :80] / t).float(), targets)
    assert (bf16_first - ref_lp).abs().max() > 1e-2  # what the old order gave
    # the gradient is float32 maths rounded once to bf16
    lp.sum().backward()
    z = logits.detach().float().requires_grad_(True)
    zp = (z / t).masked_fill(torch.arange(96) >= 80, float("-inf"))
    torch.log_softmax(zp, -1).gather(-1, targets.unsqueeze(-1)).sum().backward()
    want = z.grad.to(torch.bfloat16)
    assert logits.grad.dtype == torch.bfloat16
    assert (logits.grad.float() - want.float()).abs().max() <= 2 ** -8 * want.float().abs().max()


def test_shape_mismatch_is_named() -> None:
    with pytest.raises(
        ValueError, match=r"logits \(2, 5\) must be targets \(3,\) plus a vocab dim"
    ):
        vocab_parallel_log_probs(torch.zeros(2, 5), torch.zeros(3, dtype=torch.long))


def test_masked_vocab_padding_gets_zero_probability_and_gradient() -> None:
    # Two real tokens and two padding columns set to -inf (vocab padded for TP).
    logits = torch.tensor([[0.0, 1.0986123, float("-inf"), float("-inf")]], requires_grad=True)
    lp, h = vocab_parallel_log_probs_and_entropy(logits, torch.tensor([1]))
    assert lp.item() == pytest.approx(-0.2876821, abs=1e-6)
    assert h.item() == pytest.approx(0.5623351, abs=1e-6)
    (lp + h).sum().backward()
    assert torch.isfinite(logits.grad).all()
    assert logits.grad[0, 2:].tolist() == [0.0, 0.0]


def test_chunked_over_tokens_gives_the_same_bits_and_bounds_the_memory(monkeypatch):
    """The statistics and the gradient are computed in chunks of tokens: any chunking gives the
    same bits, and the peak memory of forward + backward stays at about 4 [T, V] float32 tensors
    (the logits, their gradient, and what autograd needs around them; a plain x.exp().sum()
    peaks at 4 as well), where computing the whole row at once peaked at 9.25."""
    import numpy as np
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import MemoryProfileTimeline

    from megatron_revisual.rl import logprobs

    g = torch.Generator().manual_seed(0)
    tokens, vocab = 4096, 1024
    base = torch.randn(1, tokens, vocab, generator=g) * 3
    base[..., -5:] = float("-inf")  # TP padding columns
    targets = torch.randint(0, vocab - 5, (1, tokens), generator=g)

    def run(chunk_elements: int):
        monkeypatch.setattr(logprobs, "CHUNK_ELEMENTS", chunk_elements)
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True,
                     with_stack=True) as prof:
            x = base.clone().requires_grad_(True)
            lp, h = logprobs.vocab_parallel_log_probs_and_entropy(x, targets)
            (lp * torch.linspace(0, 1, tokens) + 0.3 * h).sum().backward()
        _, sizes = MemoryProfileTimeline(prof._memory_profile())._coalesce_timeline(torch.device("cpu"))
        return (lp, h, x.grad), float(np.array(sizes).sum(1).max()) / (tokens * vocab * 4)

    whole, whole_peak = run(1 << 30)
    chunked, chunked_peak = run(1 << 17)  # 128 tokens per chunk
    assert logprobs.chunk_rows(vocab) == 128
    for a, b in zip(whole, chunked, strict=True):
        assert torch.equal(a, b)
    assert whole_peak > 7.0 and chunked_peak < 4.5, (whole_peak, chunked_peak)
