"""Rule-based rewards of the ReVisual-R1 recipe, each a plain function, composed by config.

Terms (all in [0, 1]):

accuracy_reward(response, ground_truth)
    1 if the final answer equals the ground truth under math-verify, else 0. The answer is, in
    order of preference: the last ``\\boxed{...}`` (balanced braces), the last
    ``<answer>...</answer>``, the last "the answer is X" / "final answer: X". Both sides are
    parsed as ``\\boxed{...}`` LaTeX, so "\\frac{1}{2}", "1/2" and "0.5" agree and "3\\pi" is not
    read as 3. An "=" chain counts as its last side only when its other numeric sides agree
    ("x = 5" is 5; "1 = 8 = 1" is nothing: math-verify alone would read it as 1). Extraction
    order follows the released ``examples/reward_function/text.py``; the released code grades
    with ``mathruler``, the paper and this project with math-verify.
format_reward(response)
    1 if the response is ``<think>...</think>`` followed somewhere by ``\\boxed{...}`` (released
    ``math.py``: fullmatch of ``<think>.*</think>.*\\\\boxed\\{.*\\}.*``, DOTALL). Surrounding
    whitespace and whitespace inside the tags (``< /think >``, which Qwen2.5-VL-32B emits) are
    ignored, as the released ``compute_score`` does with its tag clean-up.
efficient_length_reward(length, budget)
    R = clip(alpha * (L_budget - L) + delta, 0, 1), alpha 0.005, delta 0.5 (paper, Sec. 3.3).
    The released ``text.py`` ships the same formula as ``length_reward_l1_max`` with
    alpha 0.001, delta 0.95.
efficient_length_reward_sigmoid(length, budget)
    R = 1 / (1 + exp(k * (L / L_budget - 1))), k = 10. ASSUMPTION: the issue names a
    "length-normalised sigmoid variant" without a formula; this one is 0.5 at the budget, as the
    linear form is with delta 0.5, and depends on L only through L / L_budget.
self_critique, image_revisit, repetition
    The released heuristics, see ``reward_terms``.

``compute_reward`` sums ``weight * term`` over ``RewardConfig.weights`` into ``"overall"``.
``RELEASED_MRL_WEIGHTS`` is the released multimodal recipe (``math.py::compute_score``):
0.85 accuracy + 0.05 each of self-critique, image revisit and repetition.
"""

from __future__ import annotations

import math
import re
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from megatron_revisual.rl.reward_terms import (
    image_revisit_reward,
    repetition_reward,
    self_critique_reward,
)

__all__ = [
    "RELEASED_MRL_WEIGHTS",
    "REWARD_TERMS",
    "RewardConfig",
    "RewardSample",
    "accuracy_reward",
    "answers_match",
    "compute_reward",
    "efficient_length_reward",
    "efficient_length_reward_sigmoid",
    "extract_answer",
    "final_expression",
    "format_reward",
    "graded_expression",
    "image_revisit_reward",
    "repetition_reward",
    "self_critique_reward",
    "warmup",
]

# --- answer extraction -----------------------------------------------------------------------
_TAG_SPACING = re.compile(r"<\s*(/?)\s*(think|answer)\s*>")
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
# The value runs to the end of the line or to a sentence-ending period (one followed by
# whitespace or the end), so "0.5" keeps its decimal point. The released pattern stops at the
# first ".", which turns "the answer is 0.5." into "0".
_ANSWER_IS = re.compile(
    r"(?:final\s+answer|the\s+answer)\s*(?:is|:|=)\s*:?\s*(.+?)\s*(?:\.(?=\s|$)|\n|$)",
    re.IGNORECASE,
)
_BOXED = "\\boxed"


def _normalize_tags(response: str) -> str:
    return _TAG_SPACING.sub(r"<\1\2>", response.strip())


def _last_boxed(response: str) -> str | None:
    """Content of the last ``\\boxed{...}`` with balanced braces, or None."""
    start = response.rfind(_BOXED + "{")
    while start >= 0:
        depth = 0
        for i in range(start + len(_BOXED), len(response)):
            if response[i] == "{":
                depth += 1
            elif response[i] == "}":
                depth -= 1
                if depth == 0:
                    return response[start + len(_BOXED) + 1 : i].strip()
        # Unclosed (e.g. a truncated response): fall back to the previous \boxed.
        start = response.rfind(_BOXED + "{", 0, start)
    return None


def _strip_math_delimiters(answer: str) -> str:
    answer = answer.strip().rstrip(".").strip()
    for left, right in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
        if (
            answer.startswith(left)
            and answer.endswith(right)
            and len(answer) >= len(left) + len(right)
        ):
            return answer[len(left) : len(answer) - len(right)].strip()
    return answer


def extract_answer(response: str) -> str | None:
    """The final answer of a response: last boxed, else last answer tag, else last
    "the answer is ..." phrase; None if there is none."""
    response = _normalize_tags(response)
    boxed = _last_boxed(response)
    if boxed:
        return boxed
    tags = _ANSWER_TAG.findall(response)
    if tags and tags[-1].strip():
        return _strip_math_delimiters(tags[-1])
    phrases = _ANSWER_IS.findall(response)
    if phrases and phrases[-1].strip():
        return _strip_math_delimiters(phrases[-1]) or None
    return None


# --- math-verify -----------------------------------------------------------------------------
def _timeout_s() -> int | None:
    # math-verify times out with SIGALRM, which only the main thread may arm. Reward workers run
    # rewards on their main thread; elsewhere the pool's kill is the only timeout.
    return 5 if threading.current_thread() is threading.main_thread() else None


@lru_cache(maxsize=4096)
def _parse_gold(ground_truth: str) -> Any:
    from math_verify import parse

    text = ground_truth.strip()
    if _BOXED not in text and "$" not in text:
        text = f"\\boxed{{{text}}}"
    return parse(text, parsing_timeout=_timeout_s())


def _split_equals(text: str) -> list[str] | None:
    """`text` cut at each "=" outside brackets and braces ("<=", ">=", "!=", ":=", "==" are
    not cuts); None when it lists several things (a "," or ";" outside brackets: "x = 2, y = 3"
    is one answer, not a chain)."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch in "{([":
            depth += 1
        elif ch in "})]":
            depth -= 1
        elif ch in ",;" and depth == 0:
            return None
        elif ch == "=" and depth == 0:
            before, after = text[i - 1 : i], text[i + 1 : i + 2]
            if before not in ("<", ">", "!", ":", "=") and after != "=":
                parts.append(text[start:i])
                start = i + 1
    return [*parts, text[start:]]


def _value(expr: str) -> Any:
    from math_verify import parse

    return parse(f"\\boxed{{{expr}}}", parsing_timeout=_timeout_s())


def final_expression(answer: str) -> str | None:
    """The one final expression an answer states: the last side of its "=" chain ("x = 5",
    "AB = \\sqrt{9+16} = 5" -> "5"), provided every other side that is a number has that value;
    None for a chain of different values ("1 = 8 = 1", "1 = 8 10 = 1"), which math-verify
    would otherwise read as its last side alone. Sides with unknowns (names, "\\angle ABC") are
    labels and not compared, and so are sides math-verify cannot read."""
    from math_verify import verify

    split = _split_equals(answer)
    if split is None or len(split) == 1:
        return answer
    sides = [p.strip() for p in split]
    last = sides[-1]
    if not last:
        return None
    final = None
    for side in sides[:-1]:
        if not side:
            continue
        parsed = _value(side)
        if not parsed or getattr(parsed[0], "free_symbols", {None}):
            continue  # a name, an expression in unknowns, or nothing math-verify reads
        final = final if final is not None else _value(last)
        if not final or not verify(final, parsed, timeout_seconds=_timeout_s()):
            return None
    return last


def graded_expression(answer: str, ground_truth: str) -> str | None:
    """What of ``answer`` is compared with ``ground_truth``: its `final_expression`, unless the
    ground truth is itself an equation (then the whole answer)."""
    return answer if "=" in ground_truth else final_expression(answer)


def answers_match(answer: str, ground_truth: str) -> bool:
    """Whether ``answer`` equals ``ground_truth`` under math-verify (gold first, as it expects),
    comparing its `graded_expression`: a chain of different values never matches."""
    from math_verify import verify

    answer = graded_expression(answer, ground_truth)
    if answer is None:
        return False
    gold = _parse_gold(ground_truth)
    pred = _value(answer)
    if not gold or not pred:
        return False
    return bool(verify(gold, pred, timeout_seconds=_timeout_s()))


def warmup() -> None:
    """Import math-verify and run one comparison (sympy and the LaTeX grammar load lazily), so
    that a reward worker's first sample is not charged about a second of start-up."""
    answers_match("\\frac{1}{2}", "0.5")


# --- the reward terms ------------------------------------------------------------------------
def accuracy_reward(response: str, ground_truth: str) -> float:
    """1.0 if the extracted final answer matches ``ground_truth`` (module docstring), else 0.0."""
    answer = extract_answer(response)
    if answer is None:
        return 0.0
    return 1.0 if answers_match(answer, ground_truth) else 0.0


_FORMAT = re.compile(r"<think>.*</think>.*\\boxed\{.*\}.*", re.DOTALL)


def format_reward(response: str) -> float:
    """1.0 for ``<think>...</think>`` then ``\\boxed{...}`` (module docstring), else 0.0."""
    return 1.0 if _FORMAT.fullmatch(_normalize_tags(response)) else 0.0


def efficient_length_reward(
    length: int | float, budget: int | float, *, alpha: float = 0.005, delta: float = 0.5
) -> float:
    """``clip(alpha * (budget - length) + delta, 0, 1)`` (paper Sec. 3.3), lengths in tokens."""
    return min(1.0, max(0.0, alpha * (budget - length) + delta))


def efficient_length_reward_sigmoid(
    length: int | float, budget: int | float, *, steepness: float = 10.0
) -> float:
    """``1 / (1 + exp(steepness * (length / budget - 1)))``; 0.5 at the budget (ASSUMPTION, see
    the module docstring)."""
    if budget <= 0:
        raise ValueError(f"budget must be > 0, got {budget}")
    x = steepness * (length / budget - 1.0)
    if x > 700.0:  # exp overflows beyond ~709; the reward is 0 to double precision anyway
        return 0.0
    return 1.0 / (1.0 + math.exp(x))


# --- composition -----------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class RewardSample:
    """One response to score. ``response_length`` (tokens, from the rollout engine) is needed by
    the length terms only."""

    response: str
    ground_truth: str
    response_length: int | None = None


RELEASED_MRL_WEIGHTS: dict[str, float] = {
    "accuracy": 0.85,
    "self_critique": 0.05,
    "image_revisit": 0.05,
    "repetition": 0.05,
}


@dataclass(frozen=True, kw_only=True)
class RewardConfig:
    """Which terms make up the reward and their weights; ``overall = sum_k w_k * term_k``."""

    weights: Mapping[str, float] = field(default_factory=lambda: dict(RELEASED_MRL_WEIGHTS))
    length_budget: int | None = None
    length_alpha: float = 0.005
    length_delta: float = 0.5
    sigmoid_steepness: float = 10.0

    def __post_init__(self) -> None:
        unknown = sorted(set(self.weights) - set(REWARD_TERMS))
        if unknown:
            raise ValueError(f"unknown reward terms {unknown}; known: {sorted(REWARD_TERMS)}")
        uses_length = any(k in _LENGTH_TERMS for k in self.weights)
        if uses_length and (self.length_budget is None or self.length_budget <= 0):
            raise ValueError(
                f"reward terms {sorted(k for k in self.weights if k in _LENGTH_TERMS)} need "
                f"length_budget > 0 (tokens), got {self.length_budget}"
            )
        if not uses_length and self.length_budget is not None:
            raise ValueError(
                f"length_budget={self.length_budget} has no effect without a length term "
                f"({sorted(_LENGTH_TERMS)}) in weights"
            )


def _length(sample: RewardSample) -> int:
    if sample.response_length is None:
        raise ValueError("a length reward needs RewardSample.response_length (tokens)")
    return sample.response_length


REWARD_TERMS: dict[str, Callable[[RewardSample, RewardConfig], float]] = {
    "accuracy": lambda s, c: accuracy_reward(s.response, s.ground_truth),
    "format": lambda s, c: format_reward(s.response),
    "efficient_length": lambda s, c: efficient_length_reward(
        _length(s), c.length_budget or 0, alpha=c.length_alpha, delta=c.length_delta
    ),
    "efficient_length_sigmoid": lambda s, c: efficient_length_reward_sigmoid(
        _length(s), c.length_budget or 0, steepness=c.sigmoid_steepness
    ),
    "self_critique": lambda s, c: self_critique_reward(s.response),
    "image_revisit": lambda s, c: image_revisit_reward(s.response),
    "repetition": lambda s, c: repetition_reward(s.response),
    "repetition_text": lambda s, c: repetition_reward(s.response, wait_maybe_loops=True),
}
_LENGTH_TERMS = frozenset({"efficient_length", "efficient_length_sigmoid"})


def compute_reward(sample: RewardSample, config: RewardConfig) -> dict[str, float]:
    """Every configured term plus ``"overall" = sum_k weight_k * term_k``."""
    scores = {name: REWARD_TERMS[name](sample, config) for name in config.weights}
    scores["overall"] = sum(w * scores[name] for name, w in config.weights.items())
    return scores
