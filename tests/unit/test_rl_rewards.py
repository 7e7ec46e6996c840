"""Rewards on a table of real-looking responses, the length rewards and the composition."""

import pytest

from megatron_revisual.rl.rewards import (
    RewardConfig,
    RewardSample,
    accuracy_reward,
    compute_reward,
    efficient_length_reward,
    efficient_length_reward_sigmoid,
    extract_answer,
    format_reward,
)

_STEP = (
    "We expand the product and collect the terms, then check the sign of each factor carefully. "
)
LONG_REASONING = _STEP * 180  # ~3,000 words, about 4k tokens

# (response, ground truth, accuracy, format)
TABLE = [
    # correct / incorrect boxed answers
    (r"<think>2+2=4</think> The answer is \boxed{4}.", "4", 1.0, 1.0),
    (r"<think>2+2=5</think> \boxed{5}", "4", 0.0, 1.0),
    (r"<think>..</think> \boxed{A}", "C", 0.0, 1.0),
    (r"<think>option B fits</think> \boxed{B}", "B", 1.0, 1.0),
    (r"<think>..</think> \boxed{\text{(C)}}", "C", 1.0, 1.0),
    # LaTeX fractions vs decimals and other equal forms
    (r"<think>half</think> \boxed{\frac{1}{2}}", "0.5", 1.0, 1.0),
    (r"\boxed{0.5}", r"\frac{1}{2}", 1.0, 0.0),
    (r"<think>x</think>\boxed{\dfrac{1}{2}}", "1/2", 1.0, 1.0),
    (r"\boxed{\frac{2}{4}}", r"\frac12", 1.0, 0.0),
    (r"\boxed{-\frac{1}{2}}", "-0.5", 1.0, 0.0),
    (r"\boxed{-\frac{1}{2}}", "0.5", 0.0, 0.0),
    (r"\boxed{0.3333}", r"\frac{1}{3}", 0.0, 0.0),
    (r"\boxed{2\sqrt{2}}", r"\sqrt{8}", 1.0, 0.0),
    (r"\boxed{\frac{\sqrt{3}}{2}}", r"\frac{\sqrt3}{2}", 1.0, 0.0),
    (r"\boxed{3\pi}", r"3\pi", 1.0, 0.0),
    (r"\boxed{3}", r"3\pi", 0.0, 0.0),
    (r"\boxed{x=3}", "3", 1.0, 0.0),
    (r"\boxed{10\%}", "0.1", 1.0, 0.0),
    (r"\boxed{(1, 2)}", "(1,2)", 1.0, 0.0),
    (r"\boxed{5\text{ cm}}", "5", 1.0, 0.0),
    (r"\boxed{1,000}", "1000", 1.0, 0.0),
    # multiple boxed: the last one counts; an unclosed (truncated) last one is skipped
    (r"<think>first try \boxed{3}</think> final \boxed{4}", "4", 1.0, 1.0),
    (r"<think>a</think> \boxed{4} hmm wait, actually \boxed{3}", "4", 0.0, 1.0),
    (r"<think>long</think> \boxed{4} and then \boxed{5", "4", 1.0, 1.0),
    (r"\boxed{12} <answer>13</answer>", "12", 1.0, 0.0),
    # answer tags and "the answer is" fallbacks
    (r"<think>compute</think><answer>12</answer>", "12", 1.0, 0.0),
    (r"<think>compute</think><answer>13</answer>", "12", 0.0, 0.0),
    (r"<answer>$\frac{1}{3}$</answer>", "1/3", 1.0, 0.0),
    (r"So the answer is 7.", "7", 1.0, 0.0),
    (r"Therefore, the final answer is $\frac{3}{4}$.", "0.75", 1.0, 0.0),
    (r"I computed it twice, so the answer is 0.5.", "1/2", 1.0, 0.0),
    (r"<think>Let me compute.</think> The final answer: 12", "12", 1.0, 0.0),
    (r"The answer is \(\sqrt{2}\).", r"\sqrt{2}", 1.0, 0.0),
    (r"\boxed{} so the answer is 6", "6", 1.0, 0.0),
    # missing or misplaced tags
    (r"<think>I am not sure</think> I cannot solve this.", "4", 0.0, 0.0),
    (r"<think>reasoning... so \boxed{4}", "4", 1.0, 0.0),
    (r"reasoning </think> \boxed{4}", "4", 1.0, 0.0),
    (r"\boxed{4} <think>check</think>", "4", 1.0, 0.0),
    (r"$x = 2$", "2", 0.0, 0.0),
    # tag spacing (Qwen2.5-VL-32B), surrounding whitespace, non-ASCII text
    (r"< think >a</ think > \boxed{4}", "4", 1.0, 1.0),
    ("\n<think>\nstep\n</think>\n\n\\boxed{4}\n", "4", 1.0, 1.0),
    (r"<think>因为 x=2</think>答案是 \boxed{2}", "2", 1.0, 1.0),
    # very long responses: answered, and truncated before any answer
    ("<think>" + LONG_REASONING + "</think> So \\boxed{42}.", "42", 1.0, 1.0),
    ("<think>" + LONG_REASONING, "42", 0.0, 0.0),
]


@pytest.mark.parametrize(
    ("response", "truth", "accuracy", "fmt"), TABLE, ids=[str(i) for i in range(len(TABLE))]
)
def test_reward_table(response: str, truth: str, accuracy: float, fmt: float) -> None:
    assert accuracy_reward(response, truth) == accuracy
    assert format_reward(response) == fmt


def test_table_is_large_enough() -> None:
    assert len(TABLE) >= 30


def test_extracted_answers() -> None:
    assert extract_answer(r"\boxed{\frac{a}{\sqrt{b}}} tail") == r"\frac{a}{\sqrt{b}}"
    assert extract_answer("so the answer is 0.5.") == "0.5"  # the released pattern gives "0"
    assert extract_answer("<answer> 3 </answer> <answer>$4$</answer>") == "4"
    assert extract_answer("no answer here") is None


@pytest.mark.parametrize(
    ("length", "expected"),
    [(0, 1.0), (900, 1.0), (950, 0.75), (1000, 0.5), (1050, 0.25), (1100, 0.0), (5000, 0.0)],
)
def test_efficient_length_reward(length: int, expected: float) -> None:
    # clip(0.005 * (1000 - L) + 0.5, 0, 1)
    assert efficient_length_reward(length, 1000) == pytest.approx(expected)


def test_efficient_length_reward_released_constants() -> None:
    # the released text.py defaults: alpha 0.001, delta 0.95
    assert efficient_length_reward(1000, 1000, alpha=0.001, delta=0.95) == pytest.approx(0.95)
    assert efficient_length_reward(1100, 1000, alpha=0.001, delta=0.95) == pytest.approx(0.85)


@pytest.mark.parametrize(
    ("length", "expected"),
    [
        (1000, 0.5),
        (0, 0.9999546021312976),
        (2000, 4.5397868702434395e-05),
        (1100, 0.2689414213699951),
        (10**9, 0.0),
    ],
)
def test_efficient_length_reward_sigmoid(length: int, expected: float) -> None:
    assert efficient_length_reward_sigmoid(length, 1000) == pytest.approx(expected, abs=1e-12)


def test_ours_composes_the_configured_terms() -> None:
    sample = RewardSample(response=r"<think>But wait, 2+2=4.</think> \boxed{4}", ground_truth="4")
    # default: accuracy alone; format is always reported
    assert compute_reward(sample, RewardConfig()) == {"accuracy": 1.0, "format": 1.0, "overall": 1.0}
    weights = {"accuracy": 0.85, "self_critique": 0.05, "image_revisit": 0.05, "repetition": 0.05}
    scores = compute_reward(sample, RewardConfig(weights=weights))
    # self-critique: "but" and "wait" each count twice -> 4 * 0.05; no image words; no repeats
    assert scores == pytest.approx(
        {
            "accuracy": 1.0,
            "self_critique": 0.2,
            "image_revisit": 0.0,
            "repetition": 1.0,
            "format": 1.0,
            "overall": 0.85 + 0.05 * 0.2 + 0.05 * 1.0,
        }
    )


def test_paper_style_composition_with_length() -> None:
    config = RewardConfig(
        weights={"accuracy": 1.0, "format": 0.5, "efficient_length": 0.5}, length_budget=1000
    )
    wrong = RewardSample(
        response=r"<think>x</think> \boxed{3}", ground_truth="4", response_length=1050
    )
    assert compute_reward(wrong, config) == pytest.approx(
        {"accuracy": 0.0, "format": 1.0, "efficient_length": 0.25, "overall": 0.5 + 0.125}
    )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"weights": {"accuracy": 1.0, "bogus": 1.0}}, r"weights: unknown terms \[.bogus.\]"),
        ({"weights": {"efficient_length": 1.0}}, "need length_budget"),
        ({"weights": {"accuracy": 1.0}, "length_budget": 100}, "has no effect"),
    ],
)
def test_config_validation(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RewardConfig(**kwargs)


def test_length_term_without_length_is_an_error() -> None:
    config = RewardConfig(weights={"efficient_length": 1.0}, length_budget=10)
    with pytest.raises(ValueError, match="response_length"):
        compute_reward(RewardSample(response="x", ground_truth="1"), config)
