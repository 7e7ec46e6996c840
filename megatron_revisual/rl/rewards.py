"""Rule-based rewards of the ReVisual-R1 recipe, each a plain function, composed by a named preset.

Terms (all in [0, 1]):

accuracy_reward(response, ground_truth, grader)
    1 if the final answer equals the ground truth under the grader, else 0. The answer is, in
    order of preference: the last ``\\boxed{...}`` (balanced braces; an unclosed last one falls
    back to the one before), the last ``<answer>...</answer>``, the last "the answer is X" /
    "final answer: X". Graders: ``math_verify`` (the default; both sides parsed as
    ``\\boxed{...}`` LaTeX, so "\\frac{1}{2}", "1/2" and "0.5" agree and "3\\pi" is not read
    as 3; an "=" chain counts as its last side only when its other numeric sides agree: "x = 5"
    is 5, "1 = 8 = 1" is nothing, where math-verify alone would read 1) or ``mathruler``
    (``grade_answer``, what the released code grades with, unchanged; it is stricter: "0.5" is
    not "50\\%" and "{1,2}" is not "{2,1}"). The paper names no grader.
released_accuracy_reward(response, ground_truth, grader)
    The released extraction: the content of the last ``\\boxed{`` only, none when that one is
    unclosed (mathruler's ``extract_boxed_content``, which returns the string "None" there, so
    the released ``<answer>`` and "answer is" fallbacks never run).
format_reward(response)
    1 if the response is ``<think>...</think>`` followed somewhere by ``\\boxed{...}`` (released
    ``math.py``: fullmatch of ``<think>.*</think>.*\\\\boxed\\{.*\\}.*``, DOTALL). Surrounding
    whitespace and whitespace inside the tags (``< /think >``, which Qwen2.5-VL-32B emits) are
    ignored, as the released ``compute_score`` does with its tag clean-up.
efficient_length_reward(length, budget)
    R = clip(alpha * (L_budget - L) + delta, 0, 1), alpha 0.005, delta 0.5 (paper, Sec. 3.3, and
    the current ``math.py``). The released ``text.py`` ships the same formula with alpha 0.001,
    delta 0.95 (and never calls it).
efficient_length_reward_sigmoid(length, budget)
    R = 1 / (1 + exp(k * (L / L_budget - 1))), k = 10. ASSUMPTION: the issue names a
    "length-normalised sigmoid variant" without a formula; this one is 0.5 at the budget, as the
    linear form is with delta 0.5, and depends on L only through L / L_budget.
self_critique, weighted self-critique, image_revisit, repetition
    The released heuristics, see ``reward_terms``.

Presets (``RewardConfig.preset``; ``compute_reward`` returns every term, ``format`` and
``"overall" = sum_k w_k * term_k``):

ours              the terms and weights of ``RewardConfig.weights`` (default accuracy 1.0), this
                  project's extraction; e.g. the paper's text RL: accuracy, format, efficient length.
revisual_math_v1  the older released ``math.py``: 0.85 accuracy + 0.05 each of self-critique
                  (keywords), image revisit and repetition (five circular patterns).
revisual_math     the current released ``math.py``: 0.80 accuracy + 0.05 each of self-critique
                  (weighted), image revisit and repetition (six circular patterns); with
                  ``length_budget`` (the released ``use_efficient_reward``) also 0.05 efficient
                  length (alpha 0.005, delta 0.5). The weights sum to 0.95 (0.95 + 0.05), as released.
revisual_text     the released ``text.py``: 0.85 accuracy + 0.10 repetition (six patterns) +
                  0.05 self-critique (weighted).
The released presets use the released extraction, and both ``math.py`` versions first remove
whitespace around every ``<``, ``>`` and ``/`` of the response (``\\s*(<|>|/)\\s*`` -> the
character), so every term sees "a/b" for "a / b"; ``text.py`` does not.
"""

from __future__ import annotations

import dataclasses
import math
import re
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Literal

from megatron_revisual.rl.reward_terms import (
    image_revisit_reward,
    repetition_reward,
    self_critique_reward,
    weighted_self_critique_reward,
)

__all__ = [
    "GRADERS",
    "REWARD_PRESETS",
    "REWARD_TERMS",
    "RewardConfig",
    "RewardPreset",
    "RewardSample",
    "accuracy_reward",
    "answers_match",
    "compute_reward",
    "efficient_length_reward",
    "efficient_length_reward_sigmoid",
    "extract_answer",
    "extract_last_boxed",
    "final_expression",
    "format_reward",
    "graded_expression",
    "image_revisit_reward",
    "released_accuracy_reward",
    "repetition_reward",
    "reward_config_problems",
    "self_critique_reward",
    "warmup",
    "weighted_self_critique_reward",
]

Grader = Literal["math_verify", "mathruler"]
GRADERS: tuple[str, ...] = ("math_verify", "mathruler")

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


def _boxed_content(response: str, start: int) -> str | None:
    """Content of the ``\\boxed{`` at ``start`` up to its balanced ``}``, or None if unclosed."""
    depth = 0
    for i in range(start + len(_BOXED), len(response)):
        if response[i] == "{":
            depth += 1
        elif response[i] == "}":
            depth -= 1
            if depth == 0:
                return response[start + len(_BOXED) + 1 : i].strip()
    return None


def _last_boxed(response: str) -> str | None:
    """Content of the last closed ``\\boxed{...}``, or None."""
    start = response.rfind(_BOXED + "{")
    while start >= 0:
        content = _boxed_content(response, start)
        if content is not None:
            return content
        # Unclosed (e.g. a truncated response): fall back to the previous \boxed.
        start = response.rfind(_BOXED + "{", 0, start)
    return None


def extract_last_boxed(response: str) -> str | None:
    """The released extraction: the content of the last ``\\boxed{``, None if it is unclosed."""
    start = response.rfind(_BOXED + "{")
    return None if start < 0 else _boxed_content(response, start)


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


def _math_verify_match(answer: str, ground_truth: str) -> bool:
    from math_verify import verify

    answer = graded_expression(answer, ground_truth)
    if answer is None:
        return False
    gold = _parse_gold(ground_truth)
    pred = _value(answer)
    if not gold or not pred:
        return False
    return bool(verify(gold, pred, timeout_seconds=_timeout_s()))


def answers_match(answer: str, ground_truth: str, grader: Grader = "math_verify") -> bool:
    """Whether ``answer`` equals ``ground_truth``: math-verify (gold first, as it expects) on its
    `graded_expression`, so a chain of different values never matches, or mathruler's
    ``grade_answer`` (given answer first, as it expects; the released grading, unchanged)."""
    if grader == "math_verify":
        return _math_verify_match(answer, ground_truth)
    if grader == "mathruler":
        from mathruler.grader import grade_answer

        return bool(grade_answer(answer, ground_truth))
    raise ValueError(f"unknown grader {grader!r}; use one of {GRADERS}")


def warmup(grader: Grader = "math_verify") -> None:
    """Import the grader and run one comparison (sympy and the LaTeX grammar load lazily), so
    that a reward worker's first sample is not charged about a second of start-up."""
    answers_match("\\frac{1}{2}", "0.5", grader)


# --- the reward terms ------------------------------------------------------------------------
def accuracy_reward(response: str, ground_truth: str, grader: Grader = "math_verify") -> float:
    """1.0 if the extracted final answer matches ``ground_truth`` (module docstring), else 0.0."""
    answer = extract_answer(response)
    if answer is None:
        return 0.0
    return 1.0 if answers_match(answer, ground_truth, grader) else 0.0


def released_accuracy_reward(
    response: str, ground_truth: str, grader: Grader = "math_verify"
) -> float:
    """``accuracy_reward`` with the released extraction (last ``\\boxed`` only)."""
    answer = extract_last_boxed(response)
    if answer is None:
        return 0.0
    return 1.0 if answers_match(answer, ground_truth, grader) else 0.0


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


def _length(sample: RewardSample) -> int:
    if sample.response_length is None:
        raise ValueError("a length reward needs RewardSample.response_length (tokens)")
    return sample.response_length


# Term functions of a sample (its response already normalised by the preset) and the config.
TermFn = Callable[[RewardSample, "RewardConfig"], float]


def _efficient_length(s: RewardSample, c: RewardConfig) -> float:
    return efficient_length_reward(
        _length(s), c.length_budget or 0, alpha=c.length_alpha, delta=c.length_delta
    )


REWARD_TERMS: dict[str, TermFn] = {
    "accuracy": lambda s, c: accuracy_reward(s.response, s.ground_truth, c.grader),
    "format": lambda s, c: format_reward(s.response),
    "efficient_length": _efficient_length,
    "efficient_length_sigmoid": lambda s, c: efficient_length_reward_sigmoid(
        _length(s), c.length_budget or 0, steepness=c.sigmoid_steepness
    ),
    "self_critique": lambda s, c: self_critique_reward(s.response),
    "image_revisit": lambda s, c: image_revisit_reward(s.response),
    "repetition": lambda s, c: repetition_reward(s.response),
    "repetition_text": lambda s, c: repetition_reward(s.response, wait_maybe_loops=True),
}
_LENGTH_TERMS = frozenset({"efficient_length", "efficient_length_sigmoid"})


@dataclass(frozen=True, kw_only=True)
class RewardPreset:
    """A reward as one released file computes it (module docstring). ``weights`` None: the
    config's (``ours``); ``length_weight``: the efficient-length weight a ``length_budget`` adds;
    ``released_spacing``: strip whitespace around ``<``, ``>``, ``/`` before every term."""

    source: str
    weights: Mapping[str, float] | None
    terms: Mapping[str, TermFn]
    released_spacing: bool = False
    length_weight: float | None = None


def _released_accuracy(s: RewardSample, c: RewardConfig) -> float:
    return released_accuracy_reward(s.response, s.ground_truth, c.grader)


_CURRENT_RELEASE_TERMS: dict[str, TermFn] = {
    "accuracy": _released_accuracy,
    "self_critique": lambda s, c: weighted_self_critique_reward(s.response),
    "image_revisit": REWARD_TERMS["image_revisit"],
    "repetition": REWARD_TERMS["repetition_text"],
    "efficient_length": _efficient_length,
    "format": REWARD_TERMS["format"],
}
REWARD_PRESETS: dict[str, RewardPreset] = {
    "ours": RewardPreset(source="RewardConfig.weights", weights=None, terms=REWARD_TERMS),
    "revisual_math_v1": RewardPreset(
        source="older examples/reward_function/math.py",
        weights={"accuracy": 0.85, "self_critique": 0.05, "image_revisit": 0.05, "repetition": 0.05},
        terms={**REWARD_TERMS, "accuracy": _released_accuracy},
        released_spacing=True,
    ),
    "revisual_math": RewardPreset(
        source="examples/reward_function/math.py",
        weights={"accuracy": 0.80, "self_critique": 0.05, "image_revisit": 0.05, "repetition": 0.05},
        terms=_CURRENT_RELEASE_TERMS,
        released_spacing=True,
        length_weight=0.05,
    ),
    "revisual_text": RewardPreset(
        source="examples/reward_function/text.py",
        weights={"accuracy": 0.85, "repetition": 0.10, "self_critique": 0.05},
        terms=_CURRENT_RELEASE_TERMS,
    ),
}
_RELEASED_SPACING = re.compile(r"\s*(<|>|/)\s*")


@dataclass(frozen=True, kw_only=True)
class RewardConfig:
    """Which reward: a preset (module docstring), the grader, and for ``ours`` the terms and
    weights (``overall = sum_k w_k * term_k``; default accuracy 1.0)."""

    preset: str = "ours"
    grader: Grader = "math_verify"
    weights: Mapping[str, float] | None = None
    length_budget: int | None = None
    length_alpha: float = 0.005
    length_delta: float = 0.5
    sigmoid_steepness: float = 10.0

    def __post_init__(self) -> None:
        problems = reward_config_problems(
            preset=self.preset, grader=self.grader, weights=self.weights, length_budget=self.length_budget
        )
        if problems:
            raise ValueError("; ".join(problems))

    def resolved_weights(self) -> dict[str, float]:
        """The weight of every term in ``overall``."""
        preset = REWARD_PRESETS[self.preset]
        if preset.weights is None:
            return dict(self.weights) if self.weights is not None else {"accuracy": 1.0}
        weights = dict(preset.weights)
        if self.length_budget is not None and preset.length_weight is not None:
            weights["efficient_length"] = preset.length_weight
        return weights


def reward_config_problems(
    *,
    preset: str,
    grader: str,
    weights: Mapping[str, float] | None,
    length_budget: int | None,
    names: Mapping[str, str] | None = None,
) -> list[str]:
    """What is wrong with these ``RewardConfig`` fields; ``names`` renames the fields in the
    messages (the run config calls them ``mrl.rl.reward_preset`` and so on)."""
    n = {"preset": "preset", "grader": "grader", "weights": "weights",
         "length_budget": "length_budget", **(names or {})}  # fmt: skip
    if preset not in REWARD_PRESETS:
        return [f"{n['preset']}={preset!r} is unknown; use one of {sorted(REWARD_PRESETS)}"]
    problems = []
    if grader not in GRADERS:
        problems.append(f"{n['grader']}={grader!r} is unknown; use one of {list(GRADERS)}")
    fixed = REWARD_PRESETS[preset]
    if length_budget is not None and length_budget <= 0:
        problems.append(f"{n['length_budget']}={length_budget} must be > 0 (tokens)")
    if fixed.weights is not None:
        if weights is not None:
            problems.append(
                f"{n['weights']} has no effect with {n['preset']}={preset!r}, which fixes "
                f"{dict(fixed.weights)}; use {n['preset']}='ours' to choose terms and weights"
            )
        if length_budget is not None and fixed.length_weight is None:
            problems.append(
                f"{n['length_budget']}={length_budget} has no effect with {n['preset']}={preset!r} "
                "(its source has no length term); leave it null"
            )
        return problems
    weights = {"accuracy": 1.0} if weights is None else weights
    unknown = sorted(set(weights) - set(REWARD_TERMS))
    if unknown:
        problems.append(f"{n['weights']}: unknown terms {unknown}; use {sorted(REWARD_TERMS)}")
    length_terms = sorted(k for k in weights if k in _LENGTH_TERMS)
    if length_terms and length_budget is None:
        problems.append(f"reward terms {length_terms} need {n['length_budget']} > 0 (tokens)")
    if not length_terms and length_budget is not None:
        problems.append(
            f"{n['length_budget']}={length_budget} has no effect without a length term "
            f"({sorted(_LENGTH_TERMS)}) in {n['weights']}"
        )
    return problems


def compute_reward(sample: RewardSample, config: RewardConfig) -> dict[str, float]:
    """Every weighted term, ``format`` (logged, weight 0 unless weighted) and ``"overall"``."""
    preset = REWARD_PRESETS[config.preset]
    if preset.released_spacing:
        sample = dataclasses.replace(sample, response=_RELEASED_SPACING.sub(r"\1", sample.response))
    weights = config.resolved_weights()
    scores = {name: preset.terms[name](sample, config) for name in weights}
    if "format" not in scores:
        scores["format"] = format_reward(sample.response)
    scores["overall"] = sum(w * scores[name] for name, w in weights.items())
    return scores
