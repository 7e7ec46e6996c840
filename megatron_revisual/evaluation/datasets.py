"""The five benchmarks ReVisual-R1 reports, read from a local directory or the Hub.

Every loader turns a benchmark row into one `Sample`: the user text in that benchmark's prompt
format, the ground truth (an option letter for multiple-choice rows), the image, and the fields
metrics need (breakdown categories, WeMath's problem/step ids, MathVista's precision).

Local layout under ``--dataset-dir`` (the released tool's layout, plus the Hub's parquet files
as they are downloaded), first match wins:

    geo3k       geometry3k/test/<n>/data.json + img_diagram.png      (InterGPS release)
                geometry3k/**/test*.parquet                            (hiyouga/geometry3k)
    wemath      wemath/testmini.json + images under wemath/images/     (We-Math GitHub)
                wemath/**/testmini*.parquet                            (We-Math/We-Math)
    mathvista   mathvista/testmini.json + images under mathvista/      (MathVista GitHub)
                mathvista/**/testmini*.parquet                         (AI4Math/MathVista)
    mathverse   mathverse/testmini.json + images under mathverse/images/
                mathverse/**/testmini*.parquet                         (AI4Math/MathVerse)
    mathvision  mathvision/test.jsonl + images under mathvision/       (MathVision GitHub)
                mathvision/**/test*.parquet                            (MathLLMs/MathVision)

and, last, a `datasets` cache folder of the Hub dataset (``AI4Math___math_vista/...``, what
``load_dataset(..., cache_dir=DIR)`` leaves: the released tool passes --dataset-dir as cache_dir).
MathVerse has no choices field: a multi-choice row's options are read from its "Choices:" lines.

Prompt formats (as in the ReVisual-R1 evaluation tool; the system prompt comes separately):
MathVerse ``query_cot``; MathVista ``query`` (its hint asks for the option letter); WeMath
"{question}\\n\\nOptions: {option}"; MathVision "Please first conduct reasoning, and then answer
the question and provide the correct option letter, e.g., A, B, C, D, at the end." + the
question + lettered choices (free-form MathVision rows, which have no choices, get the question
alone: ASSUMPTION, the released prompt lists choices for every row); Geometry3K the annotated
problem text, graded against the value of the correct choice (the released loader's choice).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megatron_revisual.evaluation.grading import (
    OPTION_LETTERS,
    option_letter,
    parse_choice_lines,
    parse_inline_options,
)

__all__ = [
    "BENCHMARKS",
    "DatasetFilesNotFound",
    "DatasetFormatError",
    "Sample",
    "expected_files",
    "hub_source",
    "load_benchmark",
    "parse_dataset_names",
]

BENCHMARKS: tuple[str, ...] = ("geo3k", "wemath", "mathvista", "mathverse", "mathvision")


@dataclass(frozen=True, kw_only=True)
class Sample:
    """One benchmark question. ``image`` is a file path, encoded image bytes or a PIL image."""

    dataset: str
    id: str
    prompt: str
    answer: str
    multiple_choice: bool
    image: Any
    choices: tuple[str, ...] = ()
    subsets: tuple[str, ...] = ()
    precision: int | None = None
    group: str | None = None  # WeMath: the problem ID shared by its one-step and multi-step rows
    step: str | None = None  # WeMath: the row's key, "2steps_1" ... "3steps_multi"


class DatasetFilesNotFound(FileNotFoundError):
    """A benchmark is in neither the dataset directory nor reachable on the Hub."""


class DatasetFormatError(ValueError):
    """A benchmark row lacks a field or names a missing image."""


@dataclass(frozen=True)
class _Spec:
    subdir: str
    local_json: str  # json/jsonl file under subdir
    image_dirs: tuple[str, ...]  # where relative image paths are looked up, under subdir
    parquet_split: str
    hub: tuple[str, str | None, str]  # (path, config, split)
    to_sample: Callable[[dict, int, list[Path], str], Sample]


# --- row helpers -------------------------------------------------------------------------------
def _field(row: dict, name: str, where: str) -> Any:
    if name not in row or row[name] is None:
        raise DatasetFormatError(f"{where}: missing field {name!r} (fields: {sorted(row)})")
    return row[name]


def _image(value: Any, bases: list[Path], where: str) -> Any:
    """Resolve an image field: HF image dicts, bytes, PIL images, or paths relative to bases."""
    if isinstance(value, list):
        if not value:
            raise DatasetFormatError(f"{where}: empty image list")
        value = value[0]
    if isinstance(value, dict):
        if value.get("bytes"):
            return value["bytes"]
        value = value.get("path")
    if isinstance(value, bytes) or hasattr(value, "convert"):  # bytes or PIL image
        return value
    if not isinstance(value, str) or not value:
        raise DatasetFormatError(f"{where}: no image (got {type(value).__name__})")
    candidates = [base / value for base in bases] or [Path(value)]
    for path in candidates:
        if path.is_file():
            return str(path)
    raise DatasetFormatError(
        f"{where}: image {value!r} not found (looked for {', '.join(map(str, candidates))})"
    )


def _where(source: str, index: int, row_id: Any = None) -> str:
    return f"{source} row {index}" + (f" (id {row_id})" if row_id is not None else "")


# --- one function per benchmark: row -> Sample -------------------------------------------------
def _geo3k_sample(row: dict, index: int, bases: list[Path], source: str) -> Sample:
    if "problem" in row:  # hiyouga/geometry3k: images, problem, answer
        where = _where(source, index)
        return Sample(
            dataset="geo3k",
            id=str(row.get("id", index)),
            prompt=str(_field(row, "problem", where)).replace("<image>", "").strip(),
            answer=str(_field(row, "answer", where)),
            multiple_choice=False,
            image=_image(_field(row, "images", where), bases, where),
        )
    where = _where(source, index, row.get("id"))
    choices = _field(row, "choices", where)
    letter = str(_field(row, "answer", where)).strip()
    if letter not in OPTION_LETTERS[: len(choices)]:
        raise DatasetFormatError(
            f"{where}: answer {letter!r} is not one of the {len(choices)} choices"
        )
    question = row.get("annotat_text") or _field(row, "problem_text", where)
    return Sample(
        dataset="geo3k",
        id=str(_field(row, "id", where)),
        prompt=str(question),
        answer=str(choices[OPTION_LETTERS.index(letter)]),
        multiple_choice=False,
        image=_image(row.get("image", "img_diagram.png"), bases, where),
        subsets=tuple(row.get("problem_type_goal") or ()),
    )


def _wemath_step_kind(key: str) -> str:
    if key.endswith("_multi"):
        return "two-step" if key.startswith("2steps") else "three-step"
    return "one-step"


def _wemath_sample(row: dict, index: int, bases: list[Path], source: str) -> Sample:
    where = _where(source, index, row.get("ID"))
    key = str(_field(row, "key", where))
    option = str(_field(row, "option", where))
    return Sample(
        dataset="wemath",
        id=f"{_field(row, 'ID', where)}@{key}",
        prompt=f"{_field(row, 'question', where)}\n\nOptions: {option}",
        answer=str(_field(row, "answer", where)).strip(),
        multiple_choice=True,
        image=_image(_field(row, "image_path", where), bases, where),
        choices=parse_inline_options(option),
        subsets=(_wemath_step_kind(key),),
        group=str(row["ID"]),
        step=key,
    )


def _mathvista_sample(row: dict, index: int, bases: list[Path], source: str) -> Sample:
    where = _where(source, index, row.get("pid"))
    answer = str(_field(row, "answer", where))
    choices = tuple(str(c) for c in (row.get("choices") or ()))
    multiple_choice = row.get("question_type") == "multi_choice"
    if multiple_choice:
        if answer not in choices:
            raise DatasetFormatError(f"{where}: answer {answer!r} is not among choices {choices}")
        answer = OPTION_LETTERS[choices.index(answer)]
    precision = row.get("precision")
    image = row.get("decoded_image") or _field(row, "image", where)
    task = (row.get("metadata") or {}).get("task")
    return Sample(
        dataset="mathvista",
        id=str(_field(row, "pid", where)),
        prompt=str(row.get("query") or _field(row, "question", where)),
        answer=answer,
        multiple_choice=multiple_choice,
        image=_image(image, bases, where),
        choices=choices,
        subsets=(task,) if task else (),
        precision=int(precision) if row.get("answer_type") == "float" and precision else None,
    )


def _mathverse_sample(row: dict, index: int, bases: list[Path], source: str) -> Sample:
    where = _where(source, index, row.get("sample_index"))
    version = row.get("problem_version")
    prompt = str(_field(row, "query_cot", where))
    multiple_choice = row.get("question_type") == "multi-choice"
    answer = str(_field(row, "answer", where)).strip()
    # No choices field: the options are lines of the question text ("Choices:\nA:40°\n...");
    # Vision-only rows have them in the image, and are graded by the letter alone.
    choices = parse_choice_lines(str(row.get("question") or prompt)) if multiple_choice else ()
    if multiple_choice:  # the gold as a letter ("(B)", or an option's text, would never match)
        answer = option_letter(answer, choices) or answer
    return Sample(
        dataset="mathverse",
        id=str(_field(row, "sample_index", where)),
        prompt=prompt,
        answer=answer,
        multiple_choice=multiple_choice,
        image=_image(_field(row, "image", where), bases, where),
        choices=choices,
        subsets=(version,) if version else (),
    )


def mathvision_prompt(question: str, options: Iterable[str]) -> str:
    """MathVision's prompt: the option-letter instruction and lettered choices if it has any."""
    options = list(options)
    if not options:
        return f"Question: {question}"
    lines = [
        "Please first conduct reasoning, and then answer the question and provide the correct "
        "option letter, e.g., A, B, C, D, at the end.",
        f"Question: {question}",
        "Choices:",
    ]
    lines += [f"{OPTION_LETTERS[i]}: {option}" for i, option in enumerate(options)]
    return "\n".join(lines) + "\n"


def _mathvision_sample(row: dict, index: int, bases: list[Path], source: str) -> Sample:
    where = _where(source, index, row.get("id"))
    options = [str(o) for o in (row.get("options") or ())]
    image = row.get("decoded_image") or _field(row, "image", where)
    subject = row.get("subject")
    return Sample(
        dataset="mathvision",
        id=str(_field(row, "id", where)),
        prompt=mathvision_prompt(str(_field(row, "question", where)), options),
        answer=str(_field(row, "answer", where)).strip(),
        multiple_choice=bool(options),
        image=_image(image, bases, where),
        choices=tuple(options),
        subsets=(subject,) if subject else (),
    )


_SPECS: dict[str, _Spec] = {
    "geo3k": _Spec(
        "geometry3k", "", (), "test", ("hiyouga/geometry3k", None, "test"), _geo3k_sample
    ),
    "wemath": _Spec(
        "wemath",
        "testmini.json",
        ("images", ""),
        "testmini",
        ("We-Math/We-Math", None, "testmini"),
        _wemath_sample,
    ),
    "mathvista": _Spec(
        "mathvista",
        "testmini.json",
        ("",),
        "testmini",
        ("AI4Math/MathVista", None, "testmini"),
        _mathvista_sample,
    ),
    "mathverse": _Spec(
        "mathverse",
        "testmini.json",
        ("images", ""),
        "testmini",
        ("AI4Math/MathVerse", "testmini", "testmini"),
        _mathverse_sample,
    ),
    "mathvision": _Spec(
        "mathvision",
        "test.jsonl",
        ("",),
        "test",
        ("MathLLMs/MathVision", None, "test"),
        _mathvision_sample,
    ),
}


def hub_source(name: str) -> tuple[str, str | None, str]:
    """(Hub dataset, config, split) of a benchmark."""
    return _SPECS[name].hub


def _cache_folder_name(name: str) -> str:
    """How `datasets` names a Hub dataset's folder in a cache_dir: "AI4Math___math_vista"."""
    org, _, hub_name = _SPECS[name].hub[0].partition("/")
    return f"{org}___{re.sub(r'(?<=[a-z0-9])(?=[A-Z])', '_', hub_name).lower()}"


def _hub_cache_folder(name: str, dataset_dir: Path) -> Path | None:
    """`dataset_dir`'s folder of the benchmark's Hub dataset, if `load_dataset(...,
    cache_dir=dataset_dir)` (the released tool's --dataset-dir) has put one there."""
    wanted = _cache_folder_name(name).casefold()
    if not dataset_dir.is_dir():
        return None
    found = [p for p in dataset_dir.iterdir() if p.is_dir() and p.name.casefold() == wanted]
    return found[0] if found else None


def expected_files(name: str, dataset_dir: str | Path) -> list[str]:
    """The local files a benchmark is read from (alternatives), for error messages."""
    spec = _SPECS[name]
    root = Path(dataset_dir) / spec.subdir
    if name == "geo3k":
        first = f"{root}/test/<n>/data.json (+ img_diagram.png)"
    else:
        first = f"{root / spec.local_json} (+ images)"
    cache = f"{Path(dataset_dir) / _cache_folder_name(name)} (a datasets cache_dir)"
    return [first, f"{root}/**/{spec.parquet_split}*.parquet", cache]


# --- readers -----------------------------------------------------------------------------------
def _read_json_rows(path: Path) -> list[dict]:
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    data = json.loads(text)
    if isinstance(data, dict):  # MathVista's testmini.json is keyed by pid
        return [{"pid": key, **value} for key, value in data.items()]
    return list(data)


def _read_local(name: str, root: Path) -> tuple[list[tuple[dict, list[Path], str]], bool]:
    """(row, image bases, source) triples and whether any file was found."""
    spec = _SPECS[name]
    base = root / spec.subdir
    if name == "geo3k":
        folders = sorted(
            (p for p in (base / "test").glob("*") if (p / "data.json").is_file()),
            key=lambda p: (not p.name.isdigit(), int(p.name) if p.name.isdigit() else 0, p.name),
        )
        if folders:
            rows = []
            for folder in folders:
                row = json.loads((folder / "data.json").read_text(encoding="utf-8"))
                rows.append((row, [folder], str(folder / "data.json")))
            return rows, True
    elif (base / spec.local_json).is_file():
        path = base / spec.local_json
        bases = [base / d if d else base for d in spec.image_dirs]
        return [(row, bases, str(path)) for row in _read_json_rows(path)], True
    parquet = sorted(base.glob(f"**/{spec.parquet_split}*.parquet"))
    if parquet:
        import pyarrow.parquet as pq

        rows = []
        for path in parquet:
            rows += [(row, [path.parent], str(path)) for row in pq.read_table(path).to_pylist()]
        return rows, True
    return [], False


def _hub_offline() -> str | None:
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in {"1", "true", "yes", "on"}:
            return var
    return None


def _read_hub(name: str, cache_dir: Path | None) -> list[tuple[dict, list[Path], str]]:
    from datasets import load_dataset

    path, config, split = _SPECS[name].hub
    ds = load_dataset(path, config, split=split, cache_dir=str(cache_dir) if cache_dir else None)
    where = f" in {cache_dir}" if cache_dir else ""
    return [(row, [], f"{path}[{split}]{where}") for row in ds]


def load_benchmark(
    name: str,
    dataset_dir: str | Path | None,
    *,
    source: str = "auto",
    limit: int | None = None,
) -> list[Sample]:
    """All samples of benchmark ``name`` (the first ``limit`` if given).

    source: "local" (``dataset_dir`` only), "hub" (``datasets.load_dataset`` only), or "auto"
    (local if the files are there, else the Hub unless HF_HUB_OFFLINE / HF_DATASETS_OFFLINE).
    As in the released tool, ``dataset_dir`` is also the Hub datasets' cache_dir: a cache
    folder there (``AI4Math___math_vista``, ...) counts as local, and a download goes there.
    """
    if name not in _SPECS:
        raise ValueError(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)}")
    if source not in ("auto", "local", "hub"):
        raise ValueError(f"source must be auto, local or hub, got {source!r}")
    rows: list[tuple[dict, list[Path], str]] = []
    found = False
    cache_dir = Path(dataset_dir) if dataset_dir is not None else None
    if source in ("auto", "local") and cache_dir is not None:
        rows, found = _read_local(name, cache_dir)
    if not found:
        expected = "; ".join(expected_files(name, dataset_dir or "<--dataset-dir>"))
        cached = cache_dir is not None and _hub_cache_folder(name, cache_dir) is not None
        if source == "local" and not cached:
            raise DatasetFilesNotFound(f"{name}: no dataset files found; expected {expected}")
        offline = _hub_offline()
        if offline and not cached:
            raise DatasetFilesNotFound(
                f"{name}: no dataset files found; expected {expected} "
                f"(Hub not tried: {offline} is set)"
            )
        try:
            rows = _read_hub(name, cache_dir)
        except Exception as e:  # any hub/network failure: report it with the local layout
            raise DatasetFilesNotFound(
                f"{name}: no dataset files found (expected {expected}) and the Hub dataset "
                f"{_SPECS[name].hub[0]} could not be loaded: {type(e).__name__}: {e}"
            ) from e
    if limit is not None:
        rows = rows[:limit]
    to_sample = _SPECS[name].to_sample
    samples = [to_sample(row, i, bases, src) for i, (row, bases, src) in enumerate(rows)]
    seen: dict[str, int] = {}
    for i, sample in enumerate(samples):
        if sample.id in seen:
            raise DatasetFormatError(
                f"{name}: sample id {sample.id!r} appears twice (rows {seen[sample.id]} and {i}); "
                "ids key the prediction cache and must be unique"
            )
        seen[sample.id] = i
    return samples


def parse_dataset_names(spec: str) -> tuple[str, ...]:
    """``"all"`` or a comma-separated list, validated, in the given order, without repeats."""
    if spec.strip() == "all":
        return BENCHMARKS
    names = [n.strip() for n in spec.split(",") if n.strip()]
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown or not names:
        raise ValueError(
            f"--datasets {spec!r}: unknown {unknown or 'empty list'}; "
            f"use 'all' or a comma-separated subset of {','.join(BENCHMARKS)}"
        )
    return tuple(dict.fromkeys(names))
