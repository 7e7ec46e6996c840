"""The released tool's five benchmarks read in the layouts their real files ship in, end to end through
`load_benchmark`: exact prompts, ground truths and grades. Each layout is the one named in the
benchmark's `BenchmarkSpec.schema` (GitHub data files and Hub parquet columns as read there); the
question texts are made up."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from megatron_revisual.evaluation.datasets import DatasetFormatError, benchmark_spec, load_benchmark
from megatron_revisual.evaluation.grading import grade_response, parse_choice_lines, parse_inline_options
from megatron_revisual.testing.eval_fixtures import write_fixture_datasets
from megatron_revisual.testing.images import fixture_image


def _png(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fixture_image(7).save(path, format="PNG")


def _grade(sample, response: str):
    return grade_response(
        response, sample.answer, multiple_choice=sample.multiple_choice, choices=sample.choices,
        precision=sample.precision, rule=sample.grading,
    )


def test_geo3k_hub_parquet_with_its_six_columns(tmp_path):
    # hiyouga/geometry3k README: images, problem, answer, id, choices, ground_truth
    image = {"bytes": b"\x89PNG fake", "path": None}
    rows = [{
        "images": [image], "problem": "<image>Find x. Assume that segments that appear tangent are tangent.",
        "answer": "7.5", "id": 2401, "choices": ["5", "7.5", "10", "12.5"], "ground_truth": "B",
    }]
    path = tmp_path / "geometry3k" / "data" / "test-00000-of-00001.parquet"
    path.parent.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    (sample,) = load_benchmark("geo3k", tmp_path, source="local")
    assert (sample.id, sample.prompt, sample.answer) == (
        "2401", "Find x. Assume that segments that appear tangent are tangent.", "7.5"
    )
    assert sample.image == b"\x89PNG fake" and sample.multiple_choice is False
    assert _grade(sample, "\\boxed{\\frac{15}{2}}").correct
    assert not _grade(sample, "\\boxed{B}").correct  # graded by value, as the released-format loader does


def test_wemath_github_layout_images_beside_the_json_and_full_width_option_dots(tmp_path):
    # github.com/We-Math/We-Math data/: testmini.json + 2steps/image/59-1.png beside it
    row = {
        "ID": "2steps_59", "split": "testmini", "knowledge concept": "Rotation",
        "question": "Which figure is obtained by rotating figure A?",
        "option": "A. ①;B．②;C. ③; D. Cannot be determined; E. No correct answer", "answer": "A",
        "image_path": "2steps/image/59-1.png", "key": "2steps_1", "question number": 59,
        "knowledge concept description": "Rotation: ...",
    }
    (tmp_path / "wemath").mkdir()
    (tmp_path / "wemath" / "testmini.json").write_text(json.dumps([row], ensure_ascii=False), encoding="utf-8")
    _png(tmp_path / "wemath" / "2steps" / "image" / "59-1.png")
    (sample,) = load_benchmark("wemath", tmp_path, source="local")
    assert sample.id == "2steps_59@2steps_1"
    assert sample.prompt == (
        "Which figure is obtained by rotating figure A?\n\n"
        "Options: A. ①;B．②;C. ③; D. Cannot be determined; E. No correct answer"
    )
    assert sample.answer == "A" and sample.image == str(tmp_path / "wemath" / "2steps" / "image" / "59-1.png")
    assert sample.choices == ("①", "②", "③", "Cannot be determined", "No correct answer")
    assert (_grade(sample, "\\boxed{①}").correct, _grade(sample, "\\boxed{B}").correct) == (True, False)


def test_mathvista_github_layout_reads_its_prompts_from_query_json(tmp_path):
    # github.com/lupantech/MathVista data/testmini.json has no query; data/query.json has {pid: query}
    base = tmp_path / "mathvista"
    row = {
        "question": "Find $m\\angle H$", "image": "images/5.jpg", "choices": ["97", "102", "107", "122"],
        "unit": None, "precision": None, "answer": "97", "question_type": "multi_choice",
        "answer_type": "text", "pid": "5", "metadata": {"split": "testmini", "task": "geometry problem solving"},
    }
    query = (
        "Hint: Please answer the question and provide the correct option letter, e.g., A, B, C, D, at the end.\n"
        "Question: Find $m\\angle H$\nChoices:\n(A) 97\n(B) 102\n(C) 107\n(D) 122"
    )
    floaty = {**row, "pid": "108", "image": "images/108.jpg", "choices": None, "precision": 2, "answer": "51.04",
              "question_type": "free_form", "answer_type": "float", "question": "Find the average."}
    base.mkdir()
    (base / "testmini.json").write_text(json.dumps({"5": row, "108": floaty}), encoding="utf-8")
    queries = {"5": query, "108": "Hint: two decimals.\nQuestion: Find the average."}
    (base / "query.json").write_text(json.dumps(queries), encoding="utf-8")
    _png(base / "images" / "5.jpg")
    _png(base / "images" / "108.jpg")
    vista, avg = load_benchmark("mathvista", tmp_path, source="local")
    assert vista.prompt == query  # the hint and the lettered choices, not the bare question
    assert (vista.id, vista.answer, vista.multiple_choice) == ("5", "A", True)
    assert vista.choices == ("97", "102", "107", "122")
    assert (avg.prompt, avg.answer, avg.precision) == ("Hint: two decimals.\nQuestion: Find the average.", "51.04", 2)
    assert _grade(avg, "\\boxed{51.043}").correct and not _grade(avg, "\\boxed{51.1}").correct
    assert _grade(vista, "\\boxed{A}").correct and not _grade(vista, "\\boxed{B}").correct

    (base / "query.json").unlink()  # the prompts missing: an error that says where they are kept
    with pytest.raises(DatasetFormatError, match=r"testmini.json row 0 \(id 5\): no 'query'.*data/query.json"):
        load_benchmark("mathvista", tmp_path, source="local")


def test_mathverse_choice_headers_gold_forms_and_choose_two(tmp_path):
    write_fixture_datasets(tmp_path, names=["mathverse"])
    verse = load_benchmark("mathverse", tmp_path, source="local")
    assert [(s.id, s.answer, s.multiple_choice, s.grading) for s in verse] == [
        ("1", "B", True, "default"),
        ("2", "A", True, "default"),  # Vision Only: question "", options in the image
        ("3", "12", False, "default"),
        ("4", "\\frac{1}{2}", False, "default"),
        ("5", "B", True, "default"),  # "Choice:\nA. True\nB. False", gold "False"
        ("6", "C", True, "default"),  # gold "(C)"
        ("7", "C, D", False, "letter_set"),  # "Choose 2 answers", gold "C\nD"
    ]
    assert verse[1].prompt == (
        "According to the question shown in the image, please first conduct reasoning, and then answer the "
        "question and provide the correct option letter, e.g., A, B, C, D, at the end."
    )
    assert verse[4].prompt == (
        "Please first conduct reasoning, and then answer the question and provide the correct option letter, "
        "e.g., A, B, C, D, at the end.\nQuestion: Is AB the longest side?\nChoice:\nA. True\nB. False"
    )
    assert verse[4].choices == ("True", "False")
    assert [_grade(verse[4], r).correct for r in ("\\boxed{B}", "\\boxed{False}", "\\boxed{A}")] == [True, True, False]
    assert [_grade(verse[5], r).correct for r in ("\\boxed{C}", "\\boxed{60^\\circ}", "\\boxed{(B)}")] == [
        True, True, False
    ]
    assert [_grade(verse[6], r).correct for r in ("\\boxed{C, D}", "\\boxed{D, C}", "\\boxed{C}")] == [
        True, True, False
    ]


def test_parse_choice_lines_reads_both_mathverse_headers():
    assert parse_choice_lines("Find the bearing.\nChoice:\nA. 090^\\circ T\nB. 180^\\circ T") == (
        "090^\\circ T", "180^\\circ T"
    )
    assert parse_choice_lines("x?\nChoices:\nA:40°\nB:60°") == ("40°", "60°")
    assert parse_inline_options("A. ①;B．②;C. ③") == ("①", "②", "③")


def test_hub_parquet_neighbours_are_not_read(tmp_path):
    # AI4Math/MathVerse keeps testmini_text_only.parquet beside testmini.parquet, MathLLMs/MathVision
    # data/testmini-* beside data/test-*: the text-only rows (ids 1..788 again) and the testmini split
    # (ids of test rows) would be read twice
    write_fixture_datasets(tmp_path, layout="parquet", names=["mathverse", "mathvision"])
    assert (tmp_path / "mathverse" / "testmini_text_only.parquet").is_file()
    assert (tmp_path / "mathvision" / "data" / "testmini-00000-of-00001.parquet").is_file()
    assert [s.id for s in load_benchmark("mathverse", tmp_path, source="local")] == list("1234567")
    assert [s.id for s in load_benchmark("mathvision", tmp_path, source="local")] == ["1", "2", "3", "4"]
    assert benchmark_spec("mathverse").parquet_glob == "**/testmini.parquet"


def test_mathvision_free_form_prompt_is_the_released_tools(tmp_path):
    # github.com/mathllm/MATH-V data/test.jsonl; the released tool's build_mathvision_prompt for every row
    row = {"id": "1", "question": "Which number should be written in place of the question mark?\n<image1>",
           "options": [], "answer": "60", "solution": None, "level": 2, "subject": "arithmetic",
           "image": "images/1.jpg"}
    (tmp_path / "mathvision").mkdir()
    (tmp_path / "mathvision" / "test.jsonl").write_text(json.dumps(row) + "\n", encoding="utf-8")
    _png(tmp_path / "mathvision" / "images" / "1.jpg")
    (sample,) = load_benchmark("mathvision", tmp_path, source="local")
    assert sample.prompt == (
        "Please first conduct reasoning, and then answer the question and provide the correct option letter, "
        "e.g., A, B, C, D, at the end.\nQuestion: Which number should be written in place of the question mark?"
        "\n<image1>\nChoices:\n"
    )
    assert (sample.answer, sample.multiple_choice, sample.subsets) == ("60", False, ("arithmetic",))
    assert _grade(sample, "\\boxed{60}").correct and not _grade(sample, "\\boxed{61}").correct
