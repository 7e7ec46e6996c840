"""Every reward preset and both graders against hand-computed term values on one table.

Each row gives the terms by hand (comments say how they were counted); the test builds the
expected score dict of each preset from them with the released weights written out here:

    ours              0.8 accuracy + 0.1 format + 0.1 efficient length (budget 1000 tokens)
    revisual_math_v1  0.85 accuracy + 0.05 (keyword self-critique + image revisit + repetition/5)
    revisual_math     0.80 accuracy + 0.05 (weighted self-critique + image revisit + repetition/6)
    revisual_text     0.85 accuracy + 0.10 repetition/6 + 0.05 weighted self-critique

``acc`` is ours' extraction (last closed boxed, answer tag, "the answer is"); ``rel`` is the
released one (last ``\\boxed{`` only). The two ``math.py`` presets see the response with the
whitespace around ``<``, ``>`` and ``/`` removed; ``revisual_text`` sees it as it is, so rows where
that matters give ``text_rep``.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from megatron_revisual.rl.rewards import RewardConfig, RewardSample, compute_reward

_STEP = "We expand the product and collect the terms, then check the sign of each factor carefully. "
LONG = _STEP * 180  # 179 equal sentences after the first: repetition 1 - 0.5 - 0.3 = 0.2


@dataclass(frozen=True, kw_only=True)
class Row:
    response: str
    truth: str
    tokens: int = 100  # for ours' efficient length: clip(0.005 * (1000 - L) + 0.5, 0, 1)
    acc: float  # ours' extraction, math-verify
    rel: float  # released extraction, math-verify
    fmt: float
    mr: tuple[float, float] | None = None  # (acc, rel) under mathruler, where they differ
    critique: float = 0.0  # keyword self-critique (older math.py)
    weighted: float = 0.0  # weighted self-critique (current math.py / text.py)
    revisit: float = 0.0
    rep5: float = 1.0  # repetition, five circular patterns
    rep6: float = 1.0  # repetition, six circular patterns
    text_rep: float | None = None  # rep6 on the unnormalised response (revisual_text)


ROWS = [
    # think tags and boxed answers
    Row(response=r"<think>2+2=4</think> The answer is \boxed{4}.", truth="4", acc=1, rel=1, fmt=1),
    Row(response=r"<think>2+2=5</think> \boxed{5}", truth="4", acc=0, rel=0, fmt=1),
    Row(response=r"\boxed{7} without any think tags", truth="7", acc=1, rel=1, fmt=0),
    Row(response=r"<think>因为 x=2</think>答案是 \boxed{2}", truth="2", acc=1, rel=1, fmt=1),
    # 32B tag spacing: ours normalises the tags, the released math.py every < > /
    Row(response=r"< think >a</ think > \boxed{4}", truth="4", acc=1, rel=1, fmt=1),
    # unclosed and multiple boxed: ours falls back to the previous closed one, released does not
    Row(response=r"<think>long</think> \boxed{4} and then \boxed{5", truth="4", acc=1, rel=0, fmt=1),
    Row(response=r"<think>a</think> \boxed{4} hmm, actually \boxed{3}", truth="4", acc=0, rel=0, fmt=1),
    # (the format pattern \boxed\{.*\} is satisfied by the "}" inside the unclosed box)
    Row(response=r"<think>x</think> \boxed{\frac{1}{2", truth="1/2", acc=0, rel=0, fmt=1),
    # answer tags and phrases: only ours reads them (the released fallbacks never run)
    Row(response=r"<think>compute</think><answer>12</answer>", truth="12", acc=1, rel=0, fmt=0),
    Row(response="So the answer is 7.", truth="7", acc=1, rel=0, fmt=0),
    Row(response=r"\boxed{} so the answer is 6", truth="6", acc=1, rel=0, fmt=0),
    Row(response=r"<think>I am not sure</think> I cannot solve this.", truth="4", acc=0, rel=0, fmt=0),
    # LaTeX fractions
    Row(response=r"<think>half of one</think> \boxed{\frac{1}{2}}", truth="0.5", acc=1, rel=1, fmt=1),
    Row(response=r"\boxed{\dfrac{1}{2}}", truth="1/2", acc=1, rel=1, fmt=0),
    Row(response=r"\boxed{\frac{2}{4}}", truth=r"\frac12", acc=1, rel=1, fmt=0, mr=(0, 0)),
    Row(response=r"\boxed{0.3333}", truth=r"\frac{1}{3}", acc=0, rel=0, fmt=0),
    Row(response=r"\boxed{1 / 2}", truth=r"\frac{1}{2}", acc=1, rel=1, fmt=0),
    # percentages: math-verify reads 50\% as 0.5, mathruler drops the % sign
    Row(response=r"\boxed{50\%}", truth="0.5", acc=1, rel=1, fmt=0, mr=(0, 0)),
    Row(response=r"\boxed{0.5}", truth=r"50\%", acc=1, rel=1, fmt=0, mr=(0, 0)),
    Row(response=r"\boxed{10\%}", truth="10", acc=1, rel=1, fmt=0),
    # sets: math-verify ignores the order, mathruler does not
    Row(response=r"\boxed{\{2,1\}}", truth=r"\{1,2\}", acc=1, rel=1, fmt=0, mr=(0, 0)),
    Row(response=r"\boxed{\{1,2\}}", truth=r"\{1,2\}", acc=1, rel=1, fmt=0),
    Row(response=r"\boxed{(1, 2)}", truth="(1,2)", acc=1, rel=1, fmt=0),
    # units and other equal forms
    Row(response=r"\boxed{5\text{ cm}}", truth="5", acc=1, rel=1, fmt=0),
    Row(response=r"\boxed{30^\circ}", truth="30", acc=1, rel=1, fmt=0),
    Row(response=r"\boxed{1,000}", truth="1000", acc=1, rel=1, fmt=0),
    Row(response=r"\boxed{x=3}", truth="3", acc=1, rel=1, fmt=0),
    Row(response=r"\boxed{\text{(C)}}", truth="C", acc=1, rel=1, fmt=0),
    # self-critique. Keywords: but 2 + wait 2 + maybe 1 + mistake 2 + "let me check" 1 = 8 -> 0.4.
    # Weighted: mistake .12 + wait .06 + but .04 + maybe .03; "I made a mistake" opens a
    # reflection, but "Let me check: 3+4=7." is no correction -> 0.25.
    Row(response=r"<think>But wait, maybe I made a mistake. Let me check: 3+4=7.</think> \boxed{7}",
        truth="7", acc=1, rel=1, fmt=1, critique=0.4, weighted=0.25),
    # Weighted: incorrect .12 + one sequence ("This is incorrect." -> "The correct answer is") .25
    Row(response=r"<think>I computed 6. This is incorrect. The correct answer is 5.</think> \boxed{5}",
        truth="5", acc=1, rel=1, fmt=1, weighted=0.37),
    # Keywords: wait 2 -> 0.1. Weighted: wait .06 + verify .08 + hold on .06, and 5 sentences
    # whose last three (from 5 // 2) hold 3 hits against 0 -> +0.1 structure ("I should verify"
    # opens no reflection: the released pattern wants "I should <me|> verify", two spaces).
    Row(response=r"<think>Add 2 and 3. Then add 4. Now we have 9. Wait, I should verify. "
                 r"Hold on, it is 9.</think> \boxed{9}",
        truth="9", acc=1, rel=1, fmt=1, critique=0.1, weighted=0.3),
    # repetition: one "X But wait X" circle (0.1); keywords but 2 + wait 2; weighted .04 + .06
    Row(response=r"<think>x is 5 But wait x is 5</think> \boxed{5}", truth="5", acc=1, rel=1, fmt=1,
        critique=0.2, weighted=0.1, rep5=0.9, rep6=0.9),
    # "Wait, maybe ... Wait, maybe" is the sixth pattern only. Keywords (wait 2 + maybe 1) x 2 =
    # 6 -> 0.3; weighted: wait .06 * 1.5 + maybe .03 * 1.5 = 0.135
    Row(response=r"<think>Wait, maybe 3. Wait, maybe 4.</think> \boxed{4}", truth="4", acc=1, rel=1,
        fmt=1, critique=0.3, weighted=0.135, rep5=1.0, rep6=0.9),
    # "maybe X. But wait ... maybe X" (0.2) plus the empty-group But-wait circle (0.1), capped
    # at 0.2; keywords maybe 2 + but 2 + wait 2; weighted maybe .045 + but .04 + wait .06
    Row(response=r"<think>maybe x is 2. But wait, maybe x is 2</think> \boxed{2}", truth="2", acc=1,
        rel=1, fmt=1, critique=0.3, weighted=0.145, rep5=0.8, rep6=0.8),
    # "We use a / b" twice is a repeated 5-gram (0.05) only where the spaces stay (text.py)
    Row(response=r"We use a / b here. We use a / b there. So \boxed{7}", truth="7", acc=1, rel=1,
        fmt=0, text_rep=0.95),
    # image revisit: "the image shows" (0.2); revisits "looking at the image again" and
    # "the image.{1,30}shows" (0.3 cap); a revisit sentence followed by "I see that" (0.3)
    Row(response=r"<think>The image shows a triangle. Looking at the image again, I see that the angle is "
                 r"30 degrees.</think> \boxed{30}",
        truth="30", acc=1, rel=1, fmt=1, revisit=0.8),
    # "the figure" (0.2) and the released "but.{1,30}figure" inside "attribute" (0.3)
    Row(response=r"<think>I attribute the figure to Euler.</think> \boxed{1}", truth="1", acc=1, rel=1,
        fmt=1, revisit=0.5),
    # length: at the budget, past it, overlong with an answer, and truncated before any answer
    Row(response=r"<think>ok</think> \boxed{3}", truth="3", tokens=1000, acc=1, rel=1, fmt=1),
    Row(response=r"<think>ok</think> \boxed{3}", truth="3", tokens=1050, acc=1, rel=1, fmt=1),
    Row(response="<think>" + LONG + r"</think> So \boxed{42}.", truth="42", tokens=4100, acc=1, rel=1,
        fmt=1, rep5=0.2, rep6=0.2),
    Row(response="<think>" + LONG, truth="42", tokens=4096, acc=0, rel=0, fmt=0, rep5=0.2, rep6=0.2),
]


def _expected(row: Row, preset: str, grader: str) -> dict[str, float]:
    acc, rel = (row.acc, row.rel) if grader == "math_verify" or row.mr is None else row.mr
    if preset == "ours":
        length = min(1.0, max(0.0, 0.005 * (1000 - row.tokens) + 0.5))
        terms = {"accuracy": acc, "format": row.fmt, "efficient_length": length}
        weights = {"accuracy": 0.8, "format": 0.1, "efficient_length": 0.1}
    elif preset == "revisual_math_v1":
        terms = {"accuracy": rel, "self_critique": row.critique, "image_revisit": row.revisit,
                 "repetition": row.rep5}
        weights = {"accuracy": 0.85, "self_critique": 0.05, "image_revisit": 0.05, "repetition": 0.05}
    elif preset == "revisual_math":
        terms = {"accuracy": rel, "self_critique": row.weighted, "image_revisit": row.revisit,
                 "repetition": row.rep6}
        weights = {"accuracy": 0.80, "self_critique": 0.05, "image_revisit": 0.05, "repetition": 0.05}
    else:
        rep = row.rep6 if row.text_rep is None else row.text_rep
        terms = {"accuracy": rel, "repetition": rep, "self_critique": row.weighted}
        weights = {"accuracy": 0.85, "repetition": 0.10, "self_critique": 0.05}
    return {**terms, "format": row.fmt, "overall": sum(w * terms[k] for k, w in weights.items())}


def _config(preset: str, grader: str) -> RewardConfig:
    if preset == "ours":
        return RewardConfig(weights={"accuracy": 0.8, "format": 0.1, "efficient_length": 0.1},
                            length_budget=1000, grader=grader)
    return RewardConfig(preset=preset, grader=grader)


def test_table_is_large_enough() -> None:
    assert len(ROWS) >= 30


@pytest.mark.parametrize("grader", ["math_verify", "mathruler"])
@pytest.mark.parametrize("row", ROWS, ids=[str(i) for i in range(len(ROWS))])
def test_every_preset_on_the_table(row: Row, grader: str) -> None:
    sample = RewardSample(response=row.response, ground_truth=row.truth, response_length=row.tokens)
    for preset in ("ours", "revisual_math_v1", "revisual_math", "revisual_text"):
        got = compute_reward(sample, _config(preset, grader))
        assert got == pytest.approx(_expected(row, preset, grader), abs=1e-12), preset


def test_revisual_math_length_term_is_the_released_use_efficient_reward() -> None:
    # 0.80 accuracy + 0.05 (critique + revisit + repetition + l1); l1 = clip(0.005 (1000 - 1050) + 0.5)
    sample = RewardSample(response=r"<think>ok</think> \boxed{3}", ground_truth="3", response_length=1050)
    got = compute_reward(sample, RewardConfig(preset="revisual_math", length_budget=1000))
    assert got["efficient_length"] == pytest.approx(0.25)
    assert got["overall"] == pytest.approx(0.80 + 0.05 * (0.0 + 0.0 + 1.0 + 0.25))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"preset": "revisual_math", "weights": {"accuracy": 1.0}},
         "weights has no effect with preset='revisual_math'"),
        ({"preset": "revisual_text", "length_budget": 100},
         "length_budget=100 has no effect with preset='revisual_text'"),
        ({"preset": "revisual_math_v1", "length_budget": 100}, "has no effect with preset='revisual_math_v1'"),
        ({"preset": "revisual_math", "length_budget": 0}, "length_budget=0 must be > 0"),
        ({"preset": "released"}, r"preset='released' is unknown; use one of \['ours', 'revisual_math'"),
        ({"grader": "sympy"}, r"grader='sympy' is unknown; use one of \['math_verify', 'mathruler'\]"),
    ],
)
def test_bad_preset_options_are_named(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RewardConfig(**kwargs)
