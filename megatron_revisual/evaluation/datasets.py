"""The benchmarks of `revisual eval`, read from a local directory or the Hub.

Every loader turns a benchmark row into one `Sample`: the user text in that benchmark's prompt
format, the ground truth (an option letter for multiple-choice rows), the image (None for the
text benchmarks), and the fields metrics need. The loaders and their prompt formats live in
`benchmarks_vision` and `benchmarks_text`; this module finds the files and applies them.

Sets (``--datasets``): ``all`` is the released evaluation tool's five (geo3k, wemath, mathvista,
mathverse, mathvision), ``paper`` the ten of the paper's Table 2 in its column order
(`PAPER_BENCHMARKS`), or any comma-separated list of `BENCHMARKS`.

Local layout under ``--dataset-dir`` (the released tool's layout, the benchmarks' own
releases, and the Hub's files as they are downloaded), first match wins:

    geo3k       geometry3k/test/<n>/data.json + img_diagram.png      (InterGPS release)
                geometry3k/**/test*.parquet                            (hiyouga/geometry3k)
    wemath      wemath/testmini.json + images under wemath/ or wemath/images/ (We-Math GitHub data/)
                wemath/**/testmini*.parquet                            (We-Math/We-Math)
    mathvista   mathvista/testmini.json + query.json + images under mathvista/ (MathVista GitHub data/)
                mathvista/**/testmini*.parquet                         (AI4Math/MathVista)
    mathverse   mathverse/testmini.json + images under mathverse/images/ or mathverse/
                mathverse/**/testmini.parquet (not testmini_text_only) (AI4Math/MathVerse)
    mathvision  mathvision/test.jsonl + images under mathvision/       (MATH-V GitHub data/)
                mathvision/**/test-*.parquet (not testmini-*)          (MathLLMs/MathVision)
    dynamath    dynamath/**/sample*.parquet, one file per variant      (DynaMath/DynaMath_Sample)
    logicvista  logicvista/dataset.json + logicvista/images/           (LogicVista GitHub data/)
    aime24      aime24/**/train*.parquet                               (HuggingFaceH4/aime_2024)
    aime25      aime25/aime2025-I.jsonl, aime25/aime2025-II.jsonl      (opencompass/AIME2025)
    gpqa        gpqa/gpqa_diamond.csv                                  (Idavidrein/gpqa, gated)
    math500     math500/test.jsonl                                     (HuggingFaceH4/MATH-500)

and, last, a `datasets` cache folder of the Hub dataset (``AI4Math___math_vista/...``, what
``load_dataset(..., cache_dir=DIR)`` leaves: the released tool passes --dataset-dir as cache_dir).
"""

from __future__ import annotations

import csv
import json
import logging
import os
import re
from dataclasses import replace
from pathlib import Path

from megatron_revisual.evaluation.benchmarks_text import TEXT_SPECS
from megatron_revisual.evaluation.benchmarks_vision import VISION_SPECS, mathvision_prompt
from megatron_revisual.evaluation.samples import (
    BenchmarkSpec,
    DatasetFilesNotFound,
    DatasetFormatError,
    RawRow,
    Sample,
)

__all__ = [
    "BENCHMARKS",
    "PAPER_BENCHMARKS",
    "RELEASED_BENCHMARKS",
    "DatasetFilesNotFound",
    "DatasetFormatError",
    "Sample",
    "benchmark_spec",
    "expected_files",
    "hub_source",
    "load_benchmark",
    "mathvision_prompt",
    "parse_dataset_names",
]

log = logging.getLogger(__name__)

_SPECS: dict[str, BenchmarkSpec] = {s.name: s for s in (*VISION_SPECS, *TEXT_SPECS)}
BENCHMARKS: tuple[str, ...] = tuple(_SPECS)
RELEASED_BENCHMARKS: tuple[str, ...] = ("geo3k", "wemath", "mathvista", "mathverse", "mathvision")
# Table 2 of arXiv 2506.04207, in its column order
PAPER_BENCHMARKS: tuple[str, ...] = (
    "mathverse", "mathvision", "mathvista", "dynamath", "wemath", "logicvista",
    "aime24", "aime25", "gpqa", "math500",
)
_LIMIT_PER_PART = {"dynamath"}  # --max-samples counts seed questions: each keeps its variants


def benchmark_spec(name: str) -> BenchmarkSpec:
    if name not in _SPECS:
        raise ValueError(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)}")
    return _SPECS[name]


def hub_source(name: str) -> tuple[str, str | None, str]:
    """(Hub dataset, config, split) of a benchmark's first part."""
    spec = benchmark_spec(name)
    if spec.hub is None:
        raise ValueError(f"{name} has no Hub copy this loader knows of")
    repo, parts = spec.hub
    return repo, *parts[0]


def _cache_folder_name(spec: BenchmarkSpec) -> str:
    """How `datasets` names a Hub dataset's folder in a cache_dir: "AI4Math___math_vista"."""
    org, _, hub_name = spec.hub[0].partition("/")
    return f"{org}___{re.sub(r'(?<=[a-z0-9])(?=[A-Z])', '_', hub_name).lower()}"


def _hub_cache_folder(spec: BenchmarkSpec, dataset_dir: Path) -> Path | None:
    """`dataset_dir`'s folder of the benchmark's Hub dataset, if `load_dataset(...,
    cache_dir=dataset_dir)` (the released tool's --dataset-dir) has put one there."""
    if spec.hub is None or not dataset_dir.is_dir():
        return None
    wanted = _cache_folder_name(spec).casefold()
    found = [p for p in dataset_dir.iterdir() if p.is_dir() and p.name.casefold() == wanted]
    return found[0] if found else None


def expected_files(name: str, dataset_dir: str | Path) -> list[str]:
    """The local files a benchmark is read from (alternatives), for error messages."""
    spec = benchmark_spec(name)
    root = Path(dataset_dir) / spec.subdir
    out = []
    if name == "geo3k":
        out.append(f"{root}/test/<n>/data.json (+ img_diagram.png)")
    elif spec.local_files:
        images = "" if spec.text_only else " (+ images)"
        out.append(" + ".join(str(root / f) for f in spec.local_files) + images)
    if spec.parquet_glob:
        out.append(f"{root}/{spec.parquet_glob}")
    if spec.hub is not None:
        out.append(f"{Path(dataset_dir) / _cache_folder_name(spec)} (a datasets cache_dir)")
    return out


# --- readers -----------------------------------------------------------------------------------
def _read_rows(path: Path, key_field: str | None) -> list[dict]:
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".csv":
        return list(csv.DictReader(text.splitlines()))
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    data = json.loads(text)
    if isinstance(data, dict):  # keyed by id: MathVista's pid, LogicVista's "v1_0"
        return [{key_field or "id": key, **value} for key, value in data.items()]
    return list(data)


def _fill_from_side_file(rows: list[RawRow], path: Path, field: str, key_field: str) -> None:
    """Set `field` of each row that lacks it from `path`, a JSON object keyed by the rows'
    `key_field` (MathVista's query.json: {pid: query})."""
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise DatasetFormatError(f"{path}: expected a JSON object keyed by {key_field}, got {type(data).__name__}")
    for raw in rows:
        key = str(raw.data.get(key_field))
        if raw.data.get(field) is None and key in data:
            raw.data[field] = data[key]


def _read_local(spec: BenchmarkSpec, root: Path) -> tuple[list[RawRow], bool]:
    """The rows found under root/<subdir>, and whether any file was found."""
    base = root / spec.subdir
    if spec.name == "geo3k":
        folders = sorted(
            (p for p in (base / "test").glob("*") if (p / "data.json").is_file()),
            key=lambda p: (not p.name.isdigit(), int(p.name) if p.name.isdigit() else 0, p.name),
        )
        if folders:
            return [
                RawRow(json.loads((f / "data.json").read_text(encoding="utf-8")), [f], str(f / "data.json"), 0)
                for f in folders
            ], True
    files = [base / f for f in spec.local_files if (base / f).is_file()]
    if files:
        bases = [base / d if d else base for d in spec.image_dirs]
        rows = [
            RawRow(row, bases, str(path), i, path.stem)
            for path in files for i, row in enumerate(_read_rows(path, spec.key_field))
        ]
        for name, field in spec.side_files:
            if (base / name).is_file():
                _fill_from_side_file(rows, base / name, field, spec.key_field or "id")
        return rows, True
    parquet = sorted(base.glob(spec.parquet_glob)) if spec.parquet_glob else []
    if parquet:
        import pyarrow.parquet as pq

        return [
            RawRow(row, [path.parent], str(path), i, path.stem)
            for path in parquet for i, row in enumerate(pq.read_table(path).to_pylist())
        ], True
    return [], False


def _hub_offline() -> str | None:
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in {"1", "true", "yes", "on"}:
            return var
    return None


def _read_hub(spec: BenchmarkSpec, cache_dir: Path | None) -> list[RawRow]:
    from datasets import load_dataset

    repo, parts = spec.hub
    where = f" in {cache_dir}" if cache_dir else ""
    rows = []
    for config, split in parts:
        ds = load_dataset(repo, config, split=split, cache_dir=str(cache_dir) if cache_dir else None)
        part = config if len(parts) > 1 and config else split
        label = f"{repo}[{config + '/' if config else ''}{split}]{where}"
        rows += [RawRow(row, [], label, i, part) for i, row in enumerate(ds)]
    return rows


def _find_rows(spec: BenchmarkSpec, dataset_dir: str | Path | None, source: str) -> list[RawRow]:
    cache_dir = Path(dataset_dir) if dataset_dir is not None else None
    if source in ("auto", "local") and cache_dir is not None:
        rows, found = _read_local(spec, cache_dir)
        if found:
            return rows
    expected = "; ".join(expected_files(spec.name, dataset_dir or "<--dataset-dir>"))
    cached = cache_dir is not None and _hub_cache_folder(spec, cache_dir) is not None
    if spec.hub is None:
        raise DatasetFilesNotFound(f"{spec.name}: no dataset files found; expected {expected} (it has no Hub copy)")
    if source == "local" and not cached:
        raise DatasetFilesNotFound(f"{spec.name}: no dataset files found; expected {expected}")
    offline = _hub_offline()
    if offline and not cached:
        raise DatasetFilesNotFound(
            f"{spec.name}: no dataset files found; expected {expected} (Hub not tried: {offline} is set)"
        )
    try:
        return _read_hub(spec, cache_dir)
    except Exception as e:  # any hub/network failure: report it with the local layout
        raise DatasetFilesNotFound(
            f"{spec.name}: no dataset files found (expected {expected}) and the Hub dataset "
            f"{spec.hub[0]} could not be loaded: {type(e).__name__}: {e}"
        ) from e


def _first(rows: list[RawRow], limit: int, per_part: bool) -> list[RawRow]:
    if not per_part:
        return rows[:limit]
    taken: dict[str, int] = {}
    out = []
    for row in rows:
        if taken.get(row.part, 0) < limit:
            taken[row.part] = taken.get(row.part, 0) + 1
            out.append(row)
    return out


def load_benchmark(
    name: str,
    dataset_dir: str | Path | None,
    *,
    source: str = "auto",
    limit: int | None = None,
    runs: int = 1,
) -> list[Sample]:
    """All samples of benchmark ``name`` (the first ``limit`` if given; DynaMath: the first
    ``limit`` seed questions of each variant).

    source: "local" (``dataset_dir`` only), "hub" (``datasets.load_dataset`` only), or "auto"
    (local if the files are there, else the Hub unless HF_HUB_OFFLINE / HF_DATASETS_OFFLINE).
    As in the released tool, ``dataset_dir`` is also the Hub datasets' cache_dir: a cache
    folder there (``AI4Math___math_vista``, ...) counts as local, and a download goes there.
    ``runs``: a repeated benchmark (AIME) asks each problem that many times (ids "<id>#<r>").
    """
    spec = benchmark_spec(name)
    if source not in ("auto", "local", "hub"):
        raise ValueError(f"source must be auto, local or hub, got {source!r}")
    if runs < 1:
        raise ValueError(f"runs={runs} must be >= 1")
    rows = _find_rows(spec, dataset_dir, source)
    if limit is not None:
        rows = _first(rows, limit, name in _LIMIT_PER_PART)
    samples, left_out = [], []
    for raw in rows:
        sample = spec.to_sample(raw)
        if sample is None:
            left_out.append(f"{raw.source} row {raw.index}")
        else:
            samples.append(sample)
    if left_out:
        log.warning("%s: left out %d row(s) without a question or answer: %s", name, len(left_out),
                    ", ".join(left_out[:3]))
    seen: dict[str, int] = {}
    for i, sample in enumerate(samples):
        if sample.id in seen:
            raise DatasetFormatError(
                f"{name}: sample id {sample.id!r} appears twice (rows {seen[sample.id]} and {i}); "
                "ids key the prediction cache and must be unique"
            )
        seen[sample.id] = i
    if spec.repeated:
        samples = [replace(s, id=f"{s.id}#{r}", group=s.id, run=r) for s in samples for r in range(runs)]
    return samples


def parse_dataset_names(spec: str) -> tuple[str, ...]:
    """``"all"`` (the released tool's five), ``"paper"`` (Table 2's ten) or a comma-separated
    list, validated, in the given order, without repeats."""
    sets = {"all": RELEASED_BENCHMARKS, "paper": PAPER_BENCHMARKS}
    if spec.strip() in sets:
        return sets[spec.strip()]
    names = [n.strip() for n in spec.split(",") if n.strip()]
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown or not names:
        raise ValueError(
            f"--datasets {spec!r}: unknown {unknown or 'empty list'}; use 'all' (the released "
            f"tool's five), 'paper' (Table 2's ten) or a comma-separated subset of {','.join(BENCHMARKS)}"
        )
    return tuple(dict.fromkeys(names))
