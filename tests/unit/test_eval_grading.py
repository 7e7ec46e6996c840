"""Answer extraction and grading for evaluation: option letters, math-verify, fallbacks."""

from __future__ import annotations

import pytest

from megatron_revisual.evaluation.grading import (
    Grade,
    grade_response,
    option_letter,
    parse_inline_options,
)

FOUR = ("12", "15", "18", "20")


@pytest.mark.parametrize(
    ("response", "truth", "choices", "prediction"),
    [
        ("<think>compare</think> so \\boxed{B}", "B", (), "B"),
        ("\\boxed{(C)}", "C", (), "C"),
        ("\\boxed{\\text{D}}", "D", (), "D"),
        ("\\boxed{B: 3 cm}", "B", (), "B"),
        ("The answer is (A).", "A", (), "A"),
        ("<answer>E</answer>", "E", (), "E"),
        ("\\boxed{15}", "B", FOUR, "B"),  # the option's text, not its letter
        ("\\boxed{no}", "B", ("yes", "no"), "B"),
        ("we compare both.\nB", "B", (), "B"),  # no box: the last line is the letter
        ("we compare both.\n**(B)**", "B", (), "B"),
        ("\\boxed{C}", "A", FOUR, "C"),  # read, wrong
    ],
)
def test_multiple_choice_letters(response, truth, choices, prediction):
    grade = grade_response(response, truth, multiple_choice=True, choices=choices)
    assert grade.parsed and grade.prediction == prediction
    assert grade.correct == (prediction == truth)


def test_option_text_that_is_a_letter_beyond_the_options():
    # WeMath: "A. F; B. D; ..." - a boxed "F" is option A's text, there is no option F.
    choices = parse_inline_options("A. F;    B. D;    C. B;    D. I; E. No correct answer")
    assert choices == ("F", "D", "B", "I", "No correct answer")
    assert grade_response("\\boxed{F}", "A", multiple_choice=True, choices=choices).correct


@pytest.mark.parametrize(
    ("response", "choices"),
    [
        ("\\boxed{A triangle}", ()),  # a word starting with A is not option A
        ("\\boxed{C}", ("yes", "no")),  # beyond the options
        ("I cannot tell.", FOUR),
        ("", ()),
    ],
)
def test_unreadable_choice_scores_zero_and_is_marked(response, choices):
    grade = grade_response(response, "A", multiple_choice=True, choices=choices)
    assert grade == Grade(extracted=grade.extracted, prediction=None, parsed=False, correct=False)


@pytest.mark.parametrize(
    ("response", "truth", "correct"),
    [
        ("\\boxed{\\frac{1}{2}}", "0.5", True),
        ("\\boxed{3\\pi}", "3", False),
        ("\\boxed{2\\sqrt{3}}", "2√{3}", True),  # MathVerse's unicode gold answers
        ("\\boxed{2\\sqrt{3}}", "2√3", True),
        ("\\boxed{60}", "60°", True),
        ("\\boxed{3\\pi}", "3π", True),
        ("\\boxed{Yes}", "yes", True),  # text, which math-verify does not read
        ("\\boxed{1,000}", "1000", True),
        ("<answer> 7 </answer>", "7", True),
        ("\\boxed{4}", "2√{3}", False),
    ],
)
def test_free_form(response, truth, correct):
    grade = grade_response(response, truth, multiple_choice=False)
    assert grade.parsed and grade.correct is correct


def test_mathvista_precision_rounds_both_sides():
    assert grade_response("\\boxed{2.349}", "2.35", multiple_choice=False, precision=2).correct
    assert not grade_response("\\boxed{2.3}", "2.35", multiple_choice=False, precision=2).correct
    # without a precision, math-verify's own comparison decides
    assert not grade_response("\\boxed{2.349}", "2.35", multiple_choice=False).correct


def test_free_form_without_answer_is_unparsed():
    grade = grade_response("the figure shows a triangle", "7", multiple_choice=False)
    assert grade == Grade(extracted=None, prediction=None, parsed=False, correct=False)


def test_parse_inline_options():
    assert parse_inline_options(
        "A. 3, 5, 4; B. 3, 50, 40; C. 300, 50, 40; D. 30, 50, 40.; E. No correct answer"
    ) == ("3, 5, 4", "3, 50, 40", "300, 50, 40", "30, 50, 40.", "No correct answer")
    assert parse_inline_options("A. 1 cm;B. 1.5 cm") == ("1 cm", "1.5 cm")
    assert parse_inline_options("no options here") == ()
    assert parse_inline_options("B. skipped A") == ()


def test_option_letter_direct():
    assert option_letter("(B) 15", FOUR) == "B"
    assert option_letter("b", FOUR) is None  # lower case is a variable, not a letter
    assert option_letter("18", FOUR) == "C"
    assert option_letter("19", FOUR) is None


@pytest.mark.parametrize(
    ("boxed", "truth", "prediction", "correct"),
    [
        ("1 = 8 10 = 1 = 1 = 1", "1", None, False),  # math-verify alone: its last side, 1
        ("1 = 8 = 1", "1", None, False),
        ("AB = \\sqrt{9+16} = 5", "5", "5", True),  # a label, then agreeing values
        ("x = 1", "1", "1", True),
        ("\\angle ABC = 30^\\circ", "30°", "30^\\circ", True),
        ("2 + 3 = 5", "5", "5", True),
        ("y = 2x + 1", "y = 2x + 1", "y = 2x + 1", True),  # the gold is an equation itself
    ],
)
def test_one_final_expression_is_graded(boxed, truth, prediction, correct):
    grade = grade_response(f"so \\boxed{{{boxed}}}", truth, multiple_choice=False)
    assert (grade.prediction, grade.parsed, grade.correct) == (prediction, prediction is not None, correct)


def test_the_training_reward_refuses_chains_too():
    from megatron_revisual.rl.rewards import accuracy_reward

    assert accuracy_reward("\\boxed{1 = 8 = 1}", "1") == 0.0
    assert accuracy_reward("\\boxed{x = 1}", "1") == 1.0


def test_mathverse_multiple_choice_is_graded_by_letter(tmp_path):
    from megatron_revisual.evaluation.datasets import load_benchmark
    from megatron_revisual.testing.eval_fixtures import write_fixture_datasets

    write_fixture_datasets(tmp_path)
    text_dominant, vision_only = load_benchmark("mathverse", tmp_path, source="local")[:2]
    assert text_dominant.choices == ("6", "8", "10", "12")  # from the question's "Choices:" lines
    assert vision_only.choices == ()  # the options are in the image

    def grade(response, sample):
        return grade_response(response, sample.answer, multiple_choice=True, choices=sample.choices)

    for response in ("\\boxed{B}", "\\boxed{B \\text{ } 8}", "\\boxed{B\\ 8}", "\\boxed{8}",
                     "\\boxed{\\text{Option B}}"):
        g = grade(response, text_dominant)
        assert (g.prediction, g.correct) == ("B", True), response
    assert grade("\\boxed{E}", text_dominant).parsed is False  # there is no option E
    assert grade("\\boxed{C 8}", text_dominant).parsed is False  # C's text is 10
    assert grade("\\boxed{A}", vision_only).correct
    assert grade("\\boxed{\\text{Choice (A)}}", vision_only).correct
