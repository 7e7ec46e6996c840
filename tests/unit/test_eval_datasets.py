"""Benchmark loaders: both local layouts, prompt formats, and errors that name what is missing."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from megatron_revisual.evaluation.datasets import (
    PAPER_BENCHMARKS,
    RELEASED_BENCHMARKS,
    DatasetFilesNotFound,
    DatasetFormatError,
    load_benchmark,
    parse_dataset_names,
)
from megatron_revisual.evaluation.runner import add_eval_arguments, run_eval
from megatron_revisual.testing.eval_fixtures import write_fixture_datasets


@pytest.fixture(scope="module")
def roots(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("eval_datasets")
    for layout in ("files", "parquet", "hub-cache"):
        write_fixture_datasets(root / layout, layout=layout)
    return {layout: root / layout for layout in ("files", "parquet", "hub-cache")}


def _key(s):
    return (s.id, s.prompt, s.answer, s.multiple_choice, s.choices, s.precision, s.group, s.step)


@pytest.mark.parametrize("name", RELEASED_BENCHMARKS)
def test_every_layout_gives_the_same_samples(roots, name):
    files = load_benchmark(name, roots["files"], source="local")
    parquet = load_benchmark(name, roots["parquet"], source="local")
    assert [_key(s) for s in files] == [_key(s) for s in parquet]
    # --dataset-dir as the released tool means it: a datasets cache_dir (read offline here)
    cached = load_benchmark(name, roots["hub-cache"])
    assert [_key(s) for s in cached] == [_key(s) for s in parquet]
    assert all(isinstance(s.image, bytes) for s in cached)
    assert all(isinstance(s.image, str) and Path(s.image).is_file() for s in files)
    assert all(isinstance(s.image, bytes) for s in parquet)
    if name != "geo3k":  # hiyouga/geometry3k has no problem types
        assert [s.subsets for s in files] == [s.subsets for s in parquet]


def test_fields_per_benchmark(roots):
    root = roots["files"]
    geo = load_benchmark("geo3k", root, source="local")
    # the value of the correct choice, graded as free-form math (the released loader's choice)
    assert [(s.id, s.answer, s.multiple_choice) for s in geo] == [
        ("0", "1", False),
        ("1", "3", False),
        ("2", "9", False),
    ]
    assert geo[2].subsets == ("Length", "Area")

    wemath = load_benchmark("wemath", root, source="local")
    assert [s.id for s in wemath][:3] == [
        "2steps_1@2steps_1",
        "2steps_1@2steps_2",
        "2steps_1@2steps_multi",
    ]
    assert [s.subsets[0] for s in wemath] == ["one-step"] * 2 + ["two-step"] + ["one-step"] * 3 + [
        "three-step"
    ]
    assert wemath[0].prompt.endswith(
        "\n\nOptions: A. 1 cm;B. 1.5 cm;C. 3.14 cm;D. 6.28 cm; E. No correct answer"
    )
    assert wemath[0].choices == ("1 cm", "1.5 cm", "3.14 cm", "6.28 cm", "No correct answer")
    assert (wemath[-1].group, wemath[-1].step, wemath[-1].multiple_choice) == (
        "3steps_1",
        "3steps_multi",
        True,
    )

    vista = load_benchmark("mathvista", root, source="local")  # prompts from query.json
    assert [(s.answer, s.multiple_choice, s.precision) for s in vista] == [
        ("B", True, None),  # "15" is choice B
        ("B", True, None),
        ("7", False, None),
        ("2.35", False, 2),
    ]
    assert vista[0].prompt.startswith(
        "Hint: Please answer the question and provide the correct option letter"
    )
    assert vista[0].subsets == ("geometry problem solving",)

    verse = load_benchmark("mathverse", root, source="local")
    assert [(s.answer, s.multiple_choice, s.subsets) for s in verse] == [
        ("B", True, ("Text Dominant",)),
        ("A", True, ("Vision Only",)),
        ("12", False, ("Text Lite",)),
        ("\\frac{1}{2}", False, ("Vision Intensive",)),
        ("B", True, ("Text Dominant",)),  # "False", option B's text
        ("C", True, ("Text Lite",)),  # "(C)"
        ("C, D", False, ("Text Dominant",)),  # "C\nD", graded as a set
    ]
    assert verse[0].prompt == (  # query_cot as MathVerse words it
        "Please first conduct reasoning, and then answer the question and provide the correct option "
        "letter, e.g., A, B, C, D, at the end.\nQuestion: Find the length of AB in figure 1.\nChoices:\n"
        "A:6\nB:8\nC:10\nD:12"
    )
    assert verse[1].prompt.startswith("According to the question shown in the image, please first")

    vision = load_benchmark("mathvision", root, source="local")
    assert vision[0].prompt == (
        "Please first conduct reasoning, and then answer the question and provide the correct "
        "option letter, e.g., A, B, C, D, at the end.\nQuestion: <image1>\nHow many squares are "
        "shaded in picture 1?\nChoices:\nA: 1\nB: 2\nC: 3\nD: 4\nE: 5\n"
    )
    assert [(s.answer, s.multiple_choice) for s in vision] == [
        ("C", True),
        ("E", True),
        ("A", True),
        ("14", False),
    ]
    # a free-form row: the released tool's prompt, with an empty "Choices:" list
    assert vision[3].prompt == vision[0].prompt.split("Question: ")[0] + (
        "Question: <image1>\nHow many squares are shaded in picture 4?\nChoices:\n"
    )
    assert vision[3].subsets == ("counting",)


def test_limit(roots):
    assert [s.id for s in load_benchmark("mathvista", roots["files"], source="local", limit=2)] == [
        "1",
        "2",
    ]


def test_missing_files_name_the_expected_files(tmp_path, monkeypatch):
    with pytest.raises(DatasetFilesNotFound) as e:
        load_benchmark("mathverse", tmp_path, source="local")
    assert f"{tmp_path}/mathverse/testmini.json" in str(e.value)
    assert f"{tmp_path}/mathverse/**/testmini.parquet" in str(e.value)
    assert f"{tmp_path}/AI4Math___math_verse (a datasets cache_dir)" in str(e.value)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DatasetFilesNotFound, match=r"Hub not tried: HF_HUB_OFFLINE"):
        load_benchmark("geo3k", tmp_path, source="auto")


def test_eval_stops_before_any_request_when_a_benchmark_is_missing(roots, tmp_path, capsys):
    data = tmp_path / "data"
    write_fixture_datasets(data)
    (data / "mathvision" / "test.jsonl").unlink()
    parser = argparse.ArgumentParser()
    add_eval_arguments(parser)
    args = parser.parse_args(
        [
            "--model-name", "m",
            "--openai-base-url", "http://127.0.0.1:9/v1",  # nothing is asked
            "--dataset-dir", str(data),
            "--dataset-source", "local",
            "--output-dir", str(tmp_path / "out"),
        ]
    )  # fmt: skip
    assert run_eval(args) == 2
    err = capsys.readouterr().err
    assert "mathvision: no dataset files found" in err
    assert f"{data}/mathvision/test.jsonl" in err
    assert not (tmp_path / "out").exists()


def test_bad_rows_name_file_row_and_field(tmp_path):
    write_fixture_datasets(tmp_path)
    path = tmp_path / "wemath" / "testmini.json"
    rows = json.loads(path.read_text())
    del rows[2]["answer"]
    path.write_text(json.dumps(rows))
    with pytest.raises(
        DatasetFormatError, match=r"testmini.json row 2 \(id 2steps_1\): missing field 'answer'"
    ):
        load_benchmark("wemath", tmp_path, source="local")

    (tmp_path / "mathvision" / "images" / "3.jpg").unlink()
    with pytest.raises(
        DatasetFormatError, match=r"test.jsonl row 2 \(id 3\): image 'images/3.jpg' not found"
    ):
        load_benchmark("mathvision", tmp_path, source="local")

    path = tmp_path / "mathverse" / "testmini.json"
    rows = json.loads(path.read_text())
    rows[1]["sample_index"] = rows[0]["sample_index"]
    path.write_text(json.dumps(rows))
    with pytest.raises(DatasetFormatError, match="sample id '1' appears twice"):
        load_benchmark("mathverse", tmp_path, source="local")


def test_parse_dataset_names():
    assert parse_dataset_names("all") == RELEASED_BENCHMARKS  # the released tool's 'all'
    assert parse_dataset_names("paper") == PAPER_BENCHMARKS
    assert len(PAPER_BENCHMARKS) == 10
    assert parse_dataset_names("wemath, geo3k,wemath") == ("wemath", "geo3k")
    with pytest.raises(ValueError, match=r"unknown \['mmmu'\]"):
        parse_dataset_names("geo3k,mmmu")
