"""The released heuristic terms by hand (both self-critique versions), and the fast circular-pattern
count against `re`."""

import random
import re
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_revisual.rl.reward_terms import (
    _BUT_CIRCLE,
    _MAYBE_BUT_WAIT,
    _SO_MAYBE_CIRCLE,
    _count_backref_circles,
    _count_maybe_but_wait,
    image_revisit_reward,
    repetition_reward,
    self_critique_reward,
    weighted_self_critique_reward,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("But wait, maybe I made a mistake.", 0.35),  # but 2 + wait 2 + maybe 1 + mistake 2 = 7
        ("Hmm. I think so. Let me check. Perhaps.", 0.2),  # I think 1 + let me check 1 + perhaps 2
        ("I reconsider the sum.", 0.1),  # "I reconsider" and "reconsider" both match
        ("Butter is not a keyword; the debut either.", 0.0),  # whole words only
        ("wait " * 25, 1.0),  # capped
        ("", 0.0),
    ],
)
def test_self_critique(text: str, expected: float) -> None:
    assert self_critique_reward(text) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # initial 1 ("the image shows") -> 0.2; revisits 2 ("looking at the image again" and
        # "the image.{1,30}shows") -> 0.3 cap; revisit sentence then "I see that" -> 0.3
        (
            "The image shows a triangle. Looking at the image again, I see that the angle is 30 degrees.",
            0.8,
        ),
        (
            "As shown in the diagram, x = 2. The figure has two lines.",
            0.4,
        ),  # 3 initial refs, capped 0.4
        ("Taking another look. Nothing new.", 0.3),  # one revisit, no correction after it
        ("We solve 2x = 4, so x = 2.", 0.0),
    ],
)
def test_image_revisit(text: str, expected: float) -> None:
    assert image_revisit_reward(text) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("A b c. A b c. A b c.", 0.7),  # 2 duplicate sentences (0.2) + 2 repeated 5-grams (0.1)
        ("x is 5 But wait x is 5", 0.9),  # one "X But wait ... X" circle
        ("So maybe A. So maybe B.", 0.9),  # "So maybe ... So maybe"
        (
            "maybe x is 2. But wait, maybe x is 2",
            0.8,
        ),  # circle 0.1 + maybe-but-wait 0.2, capped 0.2
        ("Wait, maybe 3. Wait, maybe 4.", 1.0),
        ("The sum is 10. The product is 21.", 1.0),
    ],
)
def test_repetition(text: str, expected: float) -> None:
    assert repetition_reward(text) == pytest.approx(expected)


def test_repetition_text_variant_counts_wait_maybe_loops() -> None:
    assert repetition_reward(
        "Wait, maybe 3. Wait, maybe 4.", wait_maybe_loops=True
    ) == pytest.approx(0.9)


def test_repetition_penalty_floor() -> None:
    text = "Wait, but it is 5. " * 40
    assert repetition_reward(text) == 0.0  # 0.5 + 0.3 + 0.2 = 1


def test_long_single_line_is_fast() -> None:
    # `re` needs about 9 s for this 16k-character line (cubic backtracking).
    rng = random.Random(0)
    words = "the angle so we have area but wait maybe perhaps actually value of x".split()
    line = " ".join(rng.choice(words) for _ in range(3000))
    start = time.perf_counter()
    assert _count_backref_circles(line) > 0
    # and the "maybe X. But wait ... maybe X" pattern needs >10 s in `re` on this one
    loop = " ".join(f"maybe x{i} is {i}. But wait, it is {i + 1}." for i in range(400))
    assert _count_maybe_but_wait(loop) == 0
    assert time.perf_counter() - start < 2.0


tokens = st.sampled_from(
    [
        "But",
        "but",
        "BUT",
        "wait",
        "Wait",
        "actually",
        "maybe",
        "perhaps",
        "So",
        "so",
        "x",
        "ab",
        "Ab",
        "ab.",
        ".",
        " ",
        "  ",
        "\t",
        "\n",
        " \n",
        "so maybe  ",
        "but  wait",
        "maybe\n\nBut wait",
        "Σ",
        "İ",
    ]
)


@settings(max_examples=400, deadline=None)
@given(st.lists(tokens, max_size=30), st.lists(st.booleans(), min_size=30, max_size=30))
def test_circle_count_equals_regex(parts: list[str], spaces: list[bool]) -> None:
    text = "".join(p + (" " if s else "") for p, s in zip(parts, spaces, strict=False))
    expected = len(re.findall(_BUT_CIRCLE, text, re.IGNORECASE)) + len(
        re.findall(_SO_MAYBE_CIRCLE, text, re.IGNORECASE)
    )
    assert _count_backref_circles(text) == expected
    assert _count_maybe_but_wait(text) == len(_MAYBE_BUT_WAIT.findall(text))


maybe_tokens = st.sampled_from(
    ["maybe", "Maybe", "MAYBE", "x", "ab", "Ab", ".", ". But wait", ".  but\nwait", ". But actually", "But",
     "wait", " ", "  ", "\n", "\t", "maybe\n", "Σ", "σ", "ab."]
)  # fmt: skip


@settings(max_examples=400, deadline=None)
@given(st.lists(maybe_tokens, max_size=30), st.lists(st.booleans(), min_size=30, max_size=30))
def test_maybe_but_wait_count_equals_regex(parts: list[str], spaces: list[bool]) -> None:
    text = "".join(p + (" " if s else "") for p, s in zip(parts, spaces, strict=False))
    assert _count_maybe_but_wait(text) == len(_MAYBE_BUT_WAIT.findall(text))


fold_tokens = st.sampled_from(
    [
        "But",
        "WAIT",
        "Maybe",
        "I think",
        "I reconsider",
        "re-evaluate",
        "self-reflection",
        "İ think",
        "ı think",
        "ſelf-analyſis",
        "\u212aey",
        "The Image shows",
        "looking at the IMAGE again",
        "Actually",
        "I see that",
        ".",
        " ",
        "\n",
        "x",
        "é",
        "Σ",
    ]
)


@settings(max_examples=200, deadline=None)
@given(st.lists(fold_tokens, max_size=25))
def test_case_folding_equals_ignorecase(parts: list[str]) -> None:
    # The terms match folded text case-sensitively; that must count exactly what re.I counts.
    from megatron_revisual.rl import reward_terms as T

    text = " ".join(parts)
    folded = T._fold(text)
    # self-critique: the released one-regex-per-keyword count, under re.I on the raw text
    released = sum(
        w * len(re.findall(rf"\b{re.escape(k)}\b", text, re.IGNORECASE))
        for k, w in T._CRITIQUE_KEYWORDS.items()
    )
    assert T.self_critique_reward(text) == pytest.approx(min(1.0, 0.05 * released))
    for pattern in T._INITIAL_RES + T._REVISIT_RES:
        assert len(pattern.findall(folded)) == len(re.findall(pattern.pattern, text, re.IGNORECASE))
    for pattern in (T._REVISIT_ANY, T._CORRECTION_ANY):
        assert bool(pattern.search(folded)) == bool(re.search(pattern.pattern, text, re.IGNORECASE))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("short", 0.0),  # under 10 characters
        ("Nothing reflective is said here.", 0.0),
        # error .12 + wrong .10 + wait .06 * (1 + 0.5) = 0.31
        ("Wait, an error. Wait, it is wrong.", 0.31),
        # incorrect .12; "This is incorrect." opens, "The correct answer is" follows -> +0.25
        ("I got 6. This is incorrect. The correct answer is 5.", 0.37),
        # the follow-up may come up to 3 sentences later, not 4
        ("This is wrong. A. B. The correct answer is 5.", 0.1 + 0.25),
        ("This is wrong. A. B. C. The correct answer is 5.", 0.1),
        # a starter needs 5 characters; the follow-up does not
        ("We were wrong. I missed it.", 0.10 + 0.25),
        # 6 sentences: hits 0, 0, 0 | 1, 1, 0 -> the second half holds more: +0.1
        ("A b. C d. E f. But g. Maybe h. I j.", 0.04 + 0.03 + 0.1),
        # hits 1, 0 | 0, 1: not more in the second half
        ("But a. B c. D e. Maybe f.", 0.04 + 0.03),
        ("wrong " * 30, 1.0),  # 0.10 * (1 + 0.5 * 29) = 1.55, capped
    ],
)
def test_weighted_self_critique(text: str, expected: float) -> None:
    assert weighted_self_critique_reward(text) == pytest.approx(expected)
