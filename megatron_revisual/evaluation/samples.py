"""What every benchmark loader shares: the `Sample` it produces, the `BenchmarkSpec` that says
where a benchmark's files are, and the row helpers that name file, row and field on bad input.

    spec = BenchmarkSpec(name="math500", title="MATH500", subdir="math500", ...)
    sample = spec.to_sample(RawRow(data=row, bases=[folder], source="test.jsonl", index=3))
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "BenchmarkSpec",
    "DatasetFilesNotFound",
    "DatasetFormatError",
    "RawRow",
    "Sample",
    "required_field",
    "resolve_image",
    "row_location",
]


@dataclass(frozen=True, kw_only=True)
class Sample:
    """One benchmark question. ``image`` is a file path, encoded image bytes, a PIL image, or
    None for the text benchmarks (AIME, GPQA, MATH-500).

    ``group`` ties rows that are scored together: WeMath's problem ID (with ``step`` its key,
    "2steps_1" ... "3steps_multi"), DynaMath's seed question (its 10 variants), the AIME problem
    of a repeated run. ``run`` numbers the repeated samples of one problem (AIME), else None.
    ``grading`` picks the benchmark's rule in `grading.grade_response` ("default": the released
    tool's math-verify grading)."""

    dataset: str
    id: str
    prompt: str
    answer: str
    multiple_choice: bool
    image: Any = None
    choices: tuple[str, ...] = ()
    subsets: tuple[str, ...] = ()
    precision: int | None = None
    group: str | None = None
    step: str | None = None
    run: int | None = None
    grading: str = "default"


class DatasetFilesNotFound(FileNotFoundError):
    """A benchmark is in neither the dataset directory nor reachable on the Hub."""


class DatasetFormatError(ValueError):
    """A benchmark row lacks a field or names a missing image."""


@dataclass(frozen=True)
class RawRow:
    """A row as read from a file or the Hub: where it came from, for error messages, and the
    folders its relative image paths are looked up in."""

    data: dict
    bases: list[Path]
    source: str  # file path, or "<repo>[<config>/<split>]"
    index: int  # row number within `source`
    part: str = ""  # the Hub config/split or file it came from, when a benchmark has several


@dataclass(frozen=True, kw_only=True)
class BenchmarkSpec:
    """Where one benchmark's rows are and how a row becomes a `Sample`.

    Local layout under ``--dataset-dir/<subdir>``: each of ``local_files`` that exists (json,
    jsonl or csv; images looked up under ``image_dirs``), else the parquet files matching
    ``parquet_glob``. ``hub`` is (repository, ((config, split), ...)): several parts are read
    in order (AIME 2025 I and II, DynaMath's ten variants); None when the benchmark has no
    confirmed Hub copy. ``title`` is its column in the paper's Table 2. ``schema`` says where
    the field names come from."""

    name: str
    title: str
    subdir: str
    local_files: tuple[str, ...]
    image_dirs: tuple[str, ...]
    parquet_glob: str | None
    hub: tuple[str, tuple[tuple[str | None, str], ...]] | None
    to_sample: Callable[[RawRow], Sample | None]  # None: not a question (left out, logged)
    key_field: str | None = None  # a JSON file keyed by id ({"1": {...}}): the key's field
    # (file, field): a JSON object beside the local files, keyed like them ({pid: value}), that fills
    # a field the rows lack (MathVista's GitHub data/query.json: the prompts)
    side_files: tuple[tuple[str, str], ...] = ()
    text_only: bool = False
    repeated: bool = False  # scored over several runs per problem (AIME): --aime-runs
    schema: str = ""


def row_location(raw: RawRow, row_id: Any = None) -> str:
    return f"{raw.source} row {raw.index}" + (f" (id {row_id})" if row_id is not None else "")


def required_field(row: dict, name: str, where: str) -> Any:
    if name not in row or row[name] is None:
        raise DatasetFormatError(f"{where}: missing field {name!r} (fields: {sorted(row)})")
    return row[name]


def resolve_image(value: Any, bases: list[Path], where: str) -> Any:
    """An image field as the client takes it: HF image dicts ({"bytes", "path"}: bytes win),
    bytes, PIL images, or a path looked up under ``bases``; a list gives its first image."""
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
