"""The benchmarks added for the paper's Table 2 (DynaMath, LogicVista, AIME 2024/2025, GPQA,
MATH-500): loaders on fixtures in each release's schema, their grading rules, repeated runs and
worst-case metrics, and the table layout with the paper's own numbers."""

from __future__ import annotations

import argparse
import json
import logging

import pytest

from megatron_revisual.evaluation.benchmarks_text import gpqa_choices
from megatron_revisual.evaluation.datasets import PAPER_BENCHMARKS, load_benchmark
from megatron_revisual.evaluation.grading import grade_response
from megatron_revisual.evaluation.metrics import (
    dynamath_metrics,
    pass_at_k,
    repeated_metrics,
    summarize,
)
from megatron_revisual.evaluation.runner import add_eval_arguments, run_eval
from megatron_revisual.evaluation.tables import compare_table, load_paper_rows
from megatron_revisual.testing.eval_fixtures import write_fixture_datasets
from megatron_revisual.testing.eval_fixtures_paper import PAPER_FIXTURE_COUNTS


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("paper_benchmarks")
    counts = write_fixture_datasets(root, names=PAPER_FIXTURE_COUNTS)
    assert counts == PAPER_FIXTURE_COUNTS
    return root


def _rows(samples):
    return [(s.id, s.answer, s.multiple_choice, s.grading, s.group, s.run) for s in samples]


def test_the_paper_benchmarks_load_from_their_release_layouts(root, caplog):
    dyna = load_benchmark("dynamath", root, source="local")
    assert [s.id for s in dyna] == [f"{q}@variant{v}" for v in (1, 2, 3) for q in (1, 2, 3)]
    assert _rows(dyna[:3]) == [
        ("1@variant1", "2.0944", False, "dynamath_float", "1", None),
        ("2@variant1", "B", True, "default", "2", None),
        ("3@variant1", "May", False, "dynamath_text", "3", None),
    ]
    assert dyna[3].answer == "3.0944" and isinstance(dyna[0].image, bytes)
    assert dyna[0].prompt.startswith("## Question\nWhat is the period")
    assert dyna[0].prompt.endswith("number.Please answer in a floating-point number.")
    assert dyna[1].subsets == ("plane geometry",)
    # --max-samples counts seed questions: each keeps all its variants
    assert [s.id for s in load_benchmark("dynamath", root, source="local", limit=1)] == [
        "1@variant1", "1@variant2", "1@variant3"]

    with caplog.at_level(logging.WARNING):
        logic = load_benchmark("logicvista", root, source="local")
    assert _rows(logic) == [
        ("v1_0", "C", False, "letter_set", None, None),
        ("v1_1", "B, D", False, "letter_set", None, None),
        ("v1_2", "3", False, "letter_set", None, None),
    ]
    assert logic[1].subsets == ("spatial",) and logic[0].image.endswith("logicvista/images/v1_0.png")
    assert "logicvista: left out 1 row(s) without a question or answer" in caplog.text

    aime24 = load_benchmark("aime24", root, source="local", runs=2)
    assert _rows(aime24[:3]) == [("60#0", "49", False, "default", "60", 0), ("60#1", "49", False, "default", "60", 1),
                                 ("61#0", "512", False, "default", "61", 0)]
    assert len(aime24) == 6 and aime24[0].image is None
    aime25 = load_benchmark("aime25", root, source="local")
    assert [(s.id, s.answer) for s in aime25] == [("I-1#0", "45"), ("I-2#0", "55"), ("II-1#0", "105"),
                                                  ("II-2#0", "120")]

    gpqa = load_benchmark("gpqa", root, source="local")
    assert [(s.id, s.answer, s.choices) for s in gpqa] == [
        ("recA1b2C3d4E5f6G7h", "B", ("graviton", "photon", "gluon", "W boson")),
        ("recZ9y8X7w6V5u4T3s", "C", ("sp", "sp2", "sp3", "dsp2")),
    ]
    assert gpqa[0].prompt == (
        "What is the correct answer to this question: Which particle mediates the electromagnetic "
        "force?\n\nChoices:\n(A) graviton\n(B) photon\n(C) gluon\n(D) W boson"
    )
    # the shuffle is the question's own (seeded by its Record ID), whatever else is loaded
    row = {"Question": "q", "Correct Answer": "sp3", "Incorrect Answer 1": "sp2", "Incorrect Answer 2": "sp",
           "Incorrect Answer 3": "dsp2", "Record ID": "recZ9y8X7w6V5u4T3s"}
    assert gpqa_choices(row, "row") == (("sp", "sp2", "sp3", "dsp2"), "C")

    math = load_benchmark("math500", root, source="local")
    assert [(s.id, s.answer, s.subsets) for s in math] == [
        ("test/counting_and_probability/1.json", "28", ("Counting & Probability",)),
        ("test/algebra/2.json", "5\\sqrt{2}", ("Algebra",)),
        ("test/prealgebra/3.json", "\\frac{5}{6}", ("Prealgebra",)),
    ]


def test_logicvista_has_no_hub_copy_and_says_what_to_download(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"logicvista/dataset.json \(\+ images\).*it has no Hub copy"):
        load_benchmark("logicvista", tmp_path)


@pytest.mark.parametrize(
    ("response", "truth", "rule", "correct", "parsed"),
    [
        ("\\boxed{2.094}", "2.0944", "dynamath_float", True, True),  # within 0.001
        ("\\boxed{2.1}", "2.0944", "dynamath_float", False, True),
        ("\\boxed{2\\pi}", "6.2832", "dynamath_float", True, True),
        ("\\boxed{2π}", "6.2832", "dynamath_float", True, True),
        ("\\boxed{two}", "2", "dynamath_float", False, False),
        ("The answer is \\boxed{May}.", "May", "dynamath_text", True, True),
        ("\\boxed{June}", "May", "dynamath_text", False, True),
        ("\\boxed{B, D}", "B, D", "letter_set", True, True),
        ("\\boxed{D and B}", "B, D", "letter_set", True, True),
        ("\\boxed{B}", "B, D", "letter_set", False, True),
        ("\\boxed{3}", "3", "letter_set", True, True),
        ("so it is\nC", "C", "letter_set", True, True),
        ("no idea", "C", "letter_set", False, False),
    ],
)
def test_benchmark_grading_rules(response, truth, rule, correct, parsed):
    grade = grade_response(response, truth, multiple_choice=False, rule=rule)
    assert (grade.correct, grade.parsed) == (correct, parsed)


def test_pass_at_k_and_repeated_runs():
    assert pass_at_k(4, 2, 2) == pytest.approx(5 / 6)
    assert pass_at_k(4, 0, 4) == 0.0 and pass_at_k(4, 4, 1) == 1.0
    hits = {"a": [1, 0, 1, 0], "b": [0, 0, 0, 0], "c": [1, 1, 1, 1]}
    records = [{"group": g, "run": i, "correct": bool(v)} for g, vs in hits.items() for i, v in enumerate(vs)]
    m = repeated_metrics(records)
    assert (m["problems"], m["runs"], m["avg"]) == (3, 4, 0.5)
    assert m["pass@k"] == pytest.approx({"1": 0.5, "2": 11 / 18, "4": 2 / 3})


def test_dynamath_worst_case_is_the_table_number():
    hits = {"1": [1, 1, 1], "2": [1, 0, 1], "3": [0, 0, 0]}
    records = [
        {"dataset": "dynamath", "group": g, "correct": bool(v), "parsed": True, "subsets": []}
        for g, vs in hits.items() for v in vs
    ]
    assert dynamath_metrics(records) == {"seed_questions": 3, "variants": 9, "worst_case": 1 / 3,
                                         "average_case": 5 / 9}
    math = [{"dataset": "math500", "group": None, "correct": c, "parsed": True, "subsets": []} for c in (1, 0)]
    summary = summarize(records + math, ["dynamath", "math500"])
    assert summary["datasets"]["dynamath"]["headline"] == pytest.approx(1 / 3)
    assert summary["datasets"]["dynamath"]["accuracy"] == pytest.approx(5 / 9)
    assert summary["overall"]["average"] == pytest.approx((1 / 3 + 1 / 2) / 2)


def test_the_paper_rows_are_table_2():
    rows = {r.model: r for r in load_paper_rows()}
    assert len(rows) == 14
    ours = rows["ReVisual-R1"]
    assert [ours.scores[b] for b in PAPER_BENCHMARKS] == [53.6, 48.8, 73.1, 27.5, 42.0, 52.3, 53.3, 43.3, 47.5, 89.2]
    assert ours.mean == 53.1
    # every printed average is the mean of its row, to the printed digit, but one
    off = [m for m, r in rows.items() if abs(sum(r.scores.values()) / 10 - r.average) > 0.05 + 1e-9]
    assert off == ["MM-Eureka-Qwen-7B"]


def _summary(path, model, correct_by_dataset):
    records = [
        {"dataset": name, "correct": bool(c), "parsed": True, "subsets": [], "group": None}
        for name, hits in correct_by_dataset.items() for c in hits
    ]
    summary = {"model": model, **summarize(records, list(correct_by_dataset))}
    path.write_text(json.dumps(summary))
    return path


def test_compare_puts_runs_beside_the_paper_with_their_gaps(tmp_path, capsys):
    a = _summary(tmp_path / "a_summary.json", "a", {"mathverse": [1, 0], "math500": [1, 1, 1, 0]})
    (tmp_path / "b").mkdir()
    _summary(tmp_path / "b" / "b_summary.json", "b", {"mathverse": [0, 0]})
    table = compare_table([str(a), str(tmp_path / "b"), "paper"])
    lines = table.splitlines()
    assert lines[0].startswith("| Model | MathVerse | MathVision | MathVista | DynaMath | WeMath")
    assert lines[0].endswith("| GPQA | MATH500 | Avg. |")
    assert len(lines) == 2 + 14 + 2 + 2
    assert f"| a ({tmp_path.name}) | 50.0 | - | - | - | - | - | - | - | - | 75.0 | 62.5 |" in lines
    # gaps to the paper's ReVisual-R1 (53.6 and 89.2), and over those columns' mean
    assert (f"| Δ a ({tmp_path.name}) − ReVisual-R1 (paper) | -3.6 | - | - | - | - | - | - | - | - | -14.2 | -8.9 |"
            in lines)
    assert "| Δ b (b) − ReVisual-R1 (paper) | -53.6 |" in table

    parser = argparse.ArgumentParser()
    add_eval_arguments(parser)
    assert run_eval(parser.parse_args(["--compare", "paper"])) == 0
    out = capsys.readouterr().out
    assert "| ReVisual-R1 | 53.6 | 48.8 | 73.1 | 27.5 | 42.0 | 52.3 | 53.3 | 43.3 | 47.5 | 89.2 | 53.1 |" in out
    assert run_eval(parser.parse_args(["--compare", str(tmp_path / "none.json")])) == 2
    assert f"--compare {tmp_path / 'none.json'}: no such file" in capsys.readouterr().err
    assert run_eval(parser.parse_args([])) == 2


def test_a_text_benchmark_sample_is_sent_as_text_only(root):
    from megatron_revisual.evaluation.client import build_messages

    (sample, *_) = load_benchmark("math500", root, source="local")
    assert build_messages(sample, system_prompt="S", min_pixels=1, max_pixels=4) == [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "Compute $\\dbinom{8}{2}$."},
    ]
