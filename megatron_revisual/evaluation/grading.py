"""Grading one model response against a benchmark sample.

The final answer is found by ``rl.rewards.extract_answer`` (last ``\\boxed{}``, else last
``<answer>`` tag, else the last "the answer is ..." phrase) and compared with math-verify by
``rl.rewards.answers_match``: the same code the training rewards use. What is added here is
only what evaluation needs on top:

* option letters for multiple-choice samples: "B", "(B)", "B.", "B: 3 cm", "\\text{B}" all read
  as B; an answer that is an option's *content* instead of its letter is mapped to the letter;
  a response with no boxed answer whose last line is a lone letter (the MathVista / MathVerse
  prompts ask for "the correct option letter ... at the end") is read too;
* unicode math in gold answers ("2√{3}", "3π", "60°", as MathVerse writes them) turned into
  LaTeX before math-verify, and a plain-text fallback for answers it does not parse ("Yes");
* MathVista's ``precision`` for float answers (its answers are rounded to that many decimals);
* the rules of benchmarks whose official scripts grade otherwise (``rule``): ``dynamath_float``
  (within 0.001 of the truth, "2π" read as 2 x pi) and ``dynamath_text`` (the truth contained
  in the answer), DynaMath's evaluation/opensource_json_eval.py; ``letter_set`` (the chosen
  letters, or numbers, as a set equal to the truth's "B, D"), LogicVista's
  eval/extract_accuracy.py with a rule-based extraction instead of its GPT-4 extractor.

A response without a readable answer scores 0 and is marked ``parsed=False``: it is counted,
never an error.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from megatron_revisual.rl.rewards import answers_match, extract_answer, graded_expression

__all__ = [
    "GRADING_RULES",
    "OPTION_LETTERS",
    "Grade",
    "grade_response",
    "option_letter",
    "parse_choice_lines",
    "parse_inline_options",
]

OPTION_LETTERS = "ABCDEFGH"
GRADING_RULES = ("default", "dynamath_float", "dynamath_text", "letter_set")

# "\text{B}", "\mathrm{B}", "\textbf{(B)}": unwrap before reading the letter.
_LATEX_WRAPPER = re.compile(r"\\(?:text|textbf|mathrm|mathbf|operatorname)\s*\{([^{}]*)\}")
# A letter alone, or with a separator and the option text: "B", "(B)", "B.", "B)", "B: 3 cm",
# "(B) 3 cm". Upper case only ("a = 3" is an expression), and "A triangle" is not option A.
_LETTER = re.compile(r"\(?([A-H])\)?|\(([A-H])\)\s*\S.*|([A-H])\s*[.:)]\s*.*", re.DOTALL)
_LONE_LETTER_LINE = re.compile(r"\**\(?([A-H])\)?[.)]?\**")
# WeMath's options come in one string: "A. 300, 400;B. 400, 300; E. No correct answer"; a few
# rows of its testmini.json write the full-width "．" ("A. ①;B．②;C. ③").
_INLINE_OPTION = re.compile(
    r"(?:^|;)\s*([A-H])\s*[.．:：]\s*(.*?)\s*(?=;\s*[A-H]\s*[.．:：]|$)", re.DOTALL
)
# MathVerse lists its options in the question text, after a "Choices:" line ("A:40°"), or in a
# few rows a "Choice:" line ("A. 090^\circ T"), as data/testmini_text_only.json of
# github.com/ZrrSkywalker/MathVerse has them
_CHOICE_HEADERS = ("choices", "choice")
_CHOICE_LINE = re.compile(r"^\s*\(?([A-H])\)?\s*[.:：)]\s*(.*?)\s*$")
# "Option B", "choice (C)": the letter named outright
_NAMED_LETTER = re.compile(r"(?:option|choice)\s*:?\s*\(?([A-H])\)?\.?", re.IGNORECASE)
# A letter, LaTeX or plain spacing, then text: "B \text{ } 4", "B\ 60^\circ", "B 60°"; a letter
# only when the text is that option's (else "A triangle" would be option A)
_LETTER_THEN_TEXT = re.compile(r"\(?([A-H])\)?(?:\s|\\[ ,;:!]|\\quad|~)+(\S.*)", re.DOTALL)


@dataclass(frozen=True, kw_only=True)
class Grade:
    """The outcome for one response.

    ``extracted`` is the final answer as written by the model (None if there is none),
    ``prediction`` what was compared (the option letter for choice questions), ``parsed``
    whether a comparable prediction was found at all.
    """

    extracted: str | None
    prediction: str | None
    parsed: bool
    correct: bool


def parse_inline_options(options: str) -> tuple[str, ...]:
    """Option texts in letter order from "A. x;B. y; C. z" (WeMath's format); () if none."""
    found = _INLINE_OPTION.findall(options.strip())
    letters = [letter for letter, _ in found]
    if letters != list(OPTION_LETTERS[: len(letters)]):
        return ()
    return tuple(text.strip().rstrip(";").strip() for _, text in found)


def parse_choice_lines(question: str) -> tuple[str, ...]:
    """Option texts in letter order from the lines after a "Choices:" (or "Choice:") line of a
    question (MathVerse's format); () if there is no such list."""
    lines = question.splitlines()
    starts = [i for i, line in enumerate(lines) if line.strip().rstrip(":：").casefold() in _CHOICE_HEADERS]
    if not starts:
        return ()
    found = []
    for line in lines[starts[-1] + 1 :]:
        match = _CHOICE_LINE.match(line)
        if not match:
            break
        found.append(match.groups())
    letters = [letter for letter, _ in found]
    if not letters or letters != list(OPTION_LETTERS[: len(letters)]):
        return ()
    return tuple(text for _, text in found)


def _latexify(text: str) -> str:
    """Unicode math as LaTeX, so that math-verify reads gold answers like MathVerse's "2√{3}",
    "3π" or "60°"."""
    text = text.replace("√{", "\\sqrt{")
    text = re.sub(r"√\s*(\d+(?:\.\d+)?|[A-Za-z])", r"\\sqrt{\1}", text)
    return text.replace("π", "\\pi ").replace("°", "^{\\circ}").strip()


def _unwrap_latex(text: str) -> str:
    previous = None
    while previous != text:
        previous, text = text, _LATEX_WRAPPER.sub(r"\1", text)
    return text.replace("$", "").strip()


def _normalize_text(text: str) -> str:
    text = _unwrap_latex(text).casefold()
    return re.sub(r"[\s.,;:!?'\"`]+", "", text)


def _option_by_text(text: str, choices: tuple[str, ...]) -> str | None:
    """The letter of the option whose text `text` is (as text first, then under math-verify)."""
    wanted = _normalize_text(text)
    for i, choice in enumerate(choices):
        if wanted and wanted == _normalize_text(choice):
            return OPTION_LETTERS[i]
    for i, choice in enumerate(choices):
        if answers_match(_latexify(text), _latexify(choice)):
            return OPTION_LETTERS[i]
    return None


def option_letter(answer: str, choices: tuple[str, ...] = ()) -> str | None:
    """The option letter an extracted answer names, or None.

    A letter beyond ``len(choices)`` (when choices are known) is rejected; an answer that is not
    a letter is matched against the option texts (text first, then math-verify); a letter
    followed by text without a separator ("B 60°") counts when the text is that option's.
    """
    text = _unwrap_latex(answer)
    match = _LETTER.fullmatch(text) or _NAMED_LETTER.fullmatch(text)
    if match:
        letter = next(g for g in match.groups() if g)
        if not choices or OPTION_LETTERS.index(letter) < len(choices):
            return letter
        # Out of range, so not a letter: an option's text may still be "F" (WeMath has such).
    if not choices:
        return None
    match = _LETTER_THEN_TEXT.fullmatch(text)
    if match and OPTION_LETTERS.index(match.group(1)) < len(choices):
        letter, rest = match.groups()
        if _option_by_text(rest, (choices[OPTION_LETTERS.index(letter)],)) is not None:
            return letter
    return _option_by_text(text, choices)


def _trailing_letter(response: str) -> str | None:
    lines = [line.strip() for line in response.strip().splitlines() if line.strip()]
    if not lines:
        return None
    match = _LONE_LETTER_LINE.fullmatch(lines[-1])
    return match.group(1) if match else None


def _round_to(value: str, precision: int) -> float | None:
    try:
        return round(float(value.replace(",", "")), precision)
    except ValueError:
        return None


def _free_form_correct(extracted: str, ground_truth: str, *, precision: int | None = None) -> bool:
    if precision is not None:
        pred, gold = _round_to(extracted, precision), _round_to(ground_truth, precision)
        if pred is not None and gold is not None:
            return pred == gold
    if answers_match(_latexify(extracted), _latexify(ground_truth)):
        return True
    # math-verify reads words as products of symbols; plain-text answers are compared as text.
    wanted = _normalize_text(ground_truth)
    return bool(wanted) and wanted == _normalize_text(extracted)


def _final_text(response: str) -> str | None:
    extracted = extract_answer(response)
    return _trailing_letter(response) if extracted is None else extracted


def _number(text: str) -> float | None:
    """A number as DynaMath's answers are written: "3.5", "-2", "2π" / "2\\pi" (x pi)."""
    text = _unwrap_latex(text).replace(",", "").replace(" ", "")
    pi = re.fullmatch(r"([-+]?\d*\.?\d*)(?:π|\\pi)", text)
    try:
        if pi:
            coefficient = pi.group(1)
            return math.pi * (float(coefficient) if coefficient not in ("", "+", "-") else float(coefficient + "1"))
        return float(text)
    except ValueError:
        return None


def _grade_by_rule(response: str, ground_truth: str, rule: str) -> Grade:
    extracted = _final_text(response)
    if extracted is None:
        return Grade(extracted=None, prediction=None, parsed=False, correct=False)
    if rule == "dynamath_text":
        return Grade(extracted=extracted, prediction=extracted, parsed=True, correct=ground_truth in extracted)
    if rule == "dynamath_float":
        value, truth = _number(extracted), _number(ground_truth)
        if value is None or truth is None:
            return Grade(extracted=extracted, prediction=None, parsed=False, correct=False)
        return Grade(extracted=extracted, prediction=repr(value), parsed=True, correct=abs(value - truth) <= 1e-3)
    # letter_set: the truth's kind of token (letters, else numbers), chosen ones as a set
    wanted = sorted(t.strip().upper() for t in ground_truth.split(",") if t.strip())
    token = r"(?<![A-Za-z])[A-H](?![A-Za-z])" if all(t.isalpha() for t in wanted) else r"\d+"
    chosen = sorted(set(re.findall(token, _unwrap_latex(extracted))))
    if not chosen:
        return Grade(extracted=extracted, prediction=None, parsed=False, correct=False)
    return Grade(extracted=extracted, prediction=", ".join(chosen), parsed=True, correct=chosen == wanted)


def grade_response(
    response: str,
    ground_truth: str,
    *,
    multiple_choice: bool,
    choices: tuple[str, ...] = (),
    precision: int | None = None,
    rule: str = "default",
) -> Grade:
    """Grade one response; ``ground_truth`` is the option letter when ``multiple_choice``.
    ``rule`` other than "default" grades by that benchmark's own rule (module docstring)."""
    if rule not in GRADING_RULES:
        raise ValueError(f"rule={rule!r}; use one of {GRADING_RULES}")
    if rule != "default":
        return _grade_by_rule(response, ground_truth, rule)
    extracted = extract_answer(response)
    if multiple_choice:
        letter = option_letter(extracted, choices) if extracted is not None else None
        if letter is None and extracted is None:
            letter = _trailing_letter(response)
        if letter is None:
            return Grade(extracted=extracted, prediction=None, parsed=False, correct=False)
        return Grade(
            extracted=extracted,
            prediction=letter,
            parsed=True,
            correct=letter == ground_truth.strip().upper(),
        )
    final = graded_expression(extracted, ground_truth) if extracted is not None else None
    if final is None:  # no answer, or a chain of different values ("1 = 8 = 1")
        return Grade(extracted=extracted, prediction=None, parsed=False, correct=False)
    correct = _free_form_correct(final, ground_truth, precision=precision)
    return Grade(extracted=extracted, prediction=final, parsed=True, correct=correct)
