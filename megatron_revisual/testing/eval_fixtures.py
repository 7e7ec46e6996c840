"""Tiny datasets in each benchmark's published schema, with generated PIL images.

For tests and the benchmark script: nothing is downloaded. ``layout="files"`` writes the
JSON/JSONL + image-file layout of the benchmarks' GitHub releases, ``layout="parquet"`` the
Hub's parquet files (images as ``{"bytes", "path"}`` structs); `datasets.load_benchmark` reads
both. Rows keep each benchmark's field names, types and kinds of answers (option letters,
integers, floats with a precision, text), as read in the real files (each `BenchmarkSpec.schema`
names them): InterGPS data.json; hiyouga/geometry3k's six columns; We-Math's testmini.json;
MathVista's testmini.json without prompts + query.json (GitHub), with a query column (Hub);
MathVerse's query_cot wordings, "Choices:"/"Choice:" option lines and letter, "(C)", text and
"C\nD" answers, and its text-only parquet beside testmini.parquet; MATH-V's test.jsonl and the
Hub's testmini parquet beside test's. The question texts are made up.

    from megatron_revisual.testing.eval_fixtures import write_fixture_datasets
    counts = write_fixture_datasets("runs/eval_fixtures")   # {"geo3k": 3, "wemath": 7, ...}
"""

from __future__ import annotations

import io
import json
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from megatron_revisual.testing.images import fixture_image

__all__ = ["fixture_image", "fixture_rows", "write_fixture_datasets"]  # fixture_image: from .images


def _png(image: Any) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _float_or_none(value: Any) -> float | None:
    return None if value is None else float(value)


def fixture_rows() -> dict[str, list[tuple[dict, str, Any]]]:
    """Per benchmark: (row without its image, relative image path, PIL image)."""
    rows: dict[str, list[tuple[dict, str, Any]]] = {}
    rows["geo3k"] = [
        (
            {  # InterGPS test/<n>/data.json (fields the hiyouga/geometry3k script reads, and a few more)
                "id": i,
                "problem_text": f"Find x. Side {i + 2}.",
                "annotat_text": f"Find x in the triangle with side {i + 2}.",
                "choices": [str(i + 1), str(i + 2), str(2 * i + 5), str(3 * i + 7)],
                "answer": "ABCD"[i % 4],
                "problem_type_goal": [["Length"], ["Angle"], ["Length", "Area"]][i % 3],
                "problem_type_graph": ["Triangle"],
            },
            "img_diagram.png",
            fixture_image(100 + i),
        )
        for i in range(3)
    ]
    wemath = []  # testmini.json: ID is the problem, key its step; images beside the file (data/)
    for steps, group in ((2, "2steps_1"), (3, "3steps_1")):
        for part in [*map(str, range(1, steps + 1)), "multi"]:
            key = f"{steps}steps_{part}"
            image = f"{steps}steps/image/1-{part}.png"
            wemath.append(
                (
                    {
                        "ID": group,
                        "split": "testmini",
                        "knowledge concept": "Circumference of Circles",
                        "question": f"As shown in the diagram, step {part}: the radius is ( ) cm.",
                        "option": "A. 1 cm;B. 1.5 cm;C. 3.14 cm;D. 6.28 cm; E. No correct answer",
                        "answer": "ABCD"[len(wemath) % 4],
                        "image_path": image,
                        "key": key,
                        "question number": len(wemath) + 1,
                        "knowledge concept description": "C = 2 pi r",
                    },
                    image,
                    fixture_image(200 + len(wemath)),
                )
            )
    rows["wemath"] = wemath
    vista = [
        ("multi_choice", "text", ["12", "15", "18", "20"], "15", None, "geometry problem solving"),
        ("multi_choice", "text", ["yes", "no"], "no", None, "figure question answering"),
        ("free_form", "integer", None, "7", None, "math word problem"),
        ("free_form", "float", None, "2.35", 2, "geometry problem solving"),
    ]
    rows["mathvista"] = []
    for i, (qtype, atype, choices, answer, precision, task) in enumerate(vista, start=1):
        question = f"What is the value in question {i}?"
        if choices:
            lettered = "\n".join(f"({'ABCD'[j]}) {c}" for j, c in enumerate(choices))
            query = (
                "Hint: Please answer the question and provide the correct option letter, e.g., "
                f"A, B, C, D, at the end.\nQuestion: {question}\nChoices:\n{lettered}"
            )
        else:  # the hints of MathVista's README table, by answer type
            asks = {
                "integer": "an integer answer and provide the final value, e.g., 1, 2, 3",
                "float": "a floating-point number with two decimal places and provide the final value, "
                "e.g., 1.23, 1.34, 1.45",
            }[atype]
            query = f"Hint: Please answer the question requiring {asks}, at the end.\nQuestion: {question}"
        row = {  # GitHub data/testmini.json: precision an int, no query (that is in query.json)
            "question": question,
            "image": f"images/{i}.jpg",
            "choices": choices,
            "unit": None,
            "precision": precision,
            "answer": answer,
            "question_type": qtype,
            "answer_type": atype,
            "pid": str(i),
            "metadata": {"split": "testmini", "task": task, "category": "math-targeted-vqa"},
            "query": query,  # moved to query.json by the "files" writer
        }
        rows["mathvista"].append((row, f"images/{i}.jpg", fixture_image(300 + i)))
    # MathVerse: (version, type, question, answer); the options are lines of the question
    verse = [
        ("Text Dominant", "multi-choice", "Find the length of AB in figure 1.\nChoices:\nA:6\nB:8\nC:10\nD:12", "B"),
        ("Vision Only", "multi-choice", "", "A"),  # question and options are in the image
        ("Text Lite", "free-form", "Find the length of AB in figure 3.", "12"),
        ("Vision Intensive", "free-form", "Find the ratio in figure 4.", "\\frac{1}{2}"),
        ("Text Dominant", "multi-choice", "Is AB the longest side?\nChoice:\nA. True\nB. False", "False"),
        ("Text Lite", "multi-choice", "Find angle C.\nChoices:\nA:30°\nB:45°\nC:60°\nD:90°", "(C)"),
        ("Text Dominant", "multi-choice", "Which are equal to AB? Choose 2 answers:\nChoices:\nA:BC\nB:CD\nC:DE\nD:EF",
         "C\nD"),
    ]
    rows["mathverse"] = []
    for i, (version, qtype, question, answer) in enumerate(verse, start=1):
        asks = (
            "provide the correct option letter, e.g., A, B, C, D" if qtype == "multi-choice"
            else "provide the final value, e.g., 1, 2.5, 300"
        )
        cot = f"please first conduct reasoning, and then answer the question and {asks}, at the end."
        wo = f"please directly answer the question and {asks}."
        if version == "Vision Only":  # the question is in the image, the field empty
            query_cot = f"According to the question shown in the image, {cot}"
            query_wo = f"According to the question shown in the image, {wo}"
        else:
            query_cot = f"{cot[0].upper()}{cot[1:]}\nQuestion: {question}"
            query_wo = f"{wo[0].upper()}{wo[1:]}\nQuestion: {question}"
        image = f"images_version_{'6' if version == 'Vision Only' else '1-4'}/image_{i}.png"
        row = {
            "sample_index": str(i),
            "problem_index": str(i),
            "problem_version": version,
            "question": question,
            "image": image,
            "answer": answer,
            "question_type": qtype,
            "metadata": {"split": "testmini", "source": "GeoQA", "subject": "Plane Geometry", "subfield": "Length"},
            "query_wo": query_wo,
            "query_cot": query_cot,
            "question_for_eval": question,
        }
        rows["mathverse"].append((row, image, fixture_image(400 + i)))
    vision = [
        (["1", "2", "3", "4", "5"], "C", "metric geometry - length", 2),
        (["A", "B", "C", "D", "E"], "E", "combinatorics", 3),
        (["$\\frac{1}{2}$", "$1$", "$2$", "$3$", "$4$"], "A", "algebra", 1),
        ([], "14", "counting", 2),
    ]
    rows["mathvision"] = []
    for i, (options, answer, subject, level) in enumerate(vision, start=1):
        row = {
            "id": str(i),
            "question": f"<image1>\nHow many squares are shaded in picture {i}?",
            "options": options,
            "image": f"images/{i}.jpg",
            "answer": answer,
            "solution": None,
            "level": level,
            "subject": subject,
        }
        rows["mathvision"].append((row, f"images/{i}.jpg", fixture_image(500 + i)))
    return rows


def _write_files(root: Path, rows: dict[str, list[tuple[dict, str, Any]]]) -> None:
    for i, (row, rel, image) in enumerate(rows.get("geo3k", [])):
        folder = root / "geometry3k" / "test" / str(i)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "data.json").write_text(json.dumps(row, indent=1), encoding="utf-8")
        image.save(folder / rel)
    places = {
        "wemath": ("wemath", "testmini.json", "images", "list"),
        "mathvista": ("mathvista", "testmini.json", "", "dict"),
        "mathverse": ("mathverse", "testmini.json", "images", "list"),
        "mathvision": ("mathvision", "test.jsonl", "", "jsonl"),
    }
    for name, (subdir, filename, image_dir, kind) in places.items():
        if name not in rows:
            continue
        base = root / subdir
        for _row, rel, image in rows[name]:
            path = base / image_dir / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            image.convert("RGB").save(path, format="JPEG" if rel.endswith(".jpg") else "PNG")
        data = [row for row, _, _ in rows[name]]
        if kind == "dict":  # MathVista's data/testmini.json: {pid: row}, and data/query.json: {pid: query}
            queries = {r["pid"]: r["query"] for r in data}
            (base / "query.json").write_text(json.dumps(queries, indent=1), encoding="utf-8")
            text = json.dumps({r["pid"]: {k: v for k, v in r.items() if k != "query"} for r in data}, indent=1)
        elif kind == "jsonl":
            text = "".join(json.dumps(r) + "\n" for r in data)
        else:
            text = json.dumps(data, indent=1)
        (base / filename).write_text(text, encoding="utf-8")


def _write_parquet(root: Path, rows: dict[str, list[tuple[dict, str, Any]]]) -> dict[str, Path]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    def struct(rel: str, image: Any) -> dict:
        return {"bytes": _png(image), "path": rel}

    tables: dict[str, tuple[str, list[dict]]] = {
        "geo3k": (
            "geometry3k/data/test-00000-of-00001.parquet",
            [
                {  # hiyouga/geometry3k README's features; what ground_truth holds is not confirmed
                    "images": [struct(rel, image)],
                    "problem": "<image>" + row["annotat_text"],
                    "answer": row["choices"]["ABCD".index(row["answer"])],
                    "id": row["id"],
                    "choices": row["choices"],
                    "ground_truth": row["answer"],
                }
                for row, rel, image in rows.get("geo3k", [])
            ],
        ),
        "wemath": (
            "wemath/testmini-00000-of-00001.parquet",
            [{**row, "image_path": struct(rel, image)} for row, rel, image in rows.get("wemath", [])],
        ),
        "mathvista": (
            "mathvista/data/testmini-00000-of-00001.parquet",
            [  # the Hub's precision is a float64
                {**row, "decoded_image": struct(rel, image), "precision": _float_or_none(row["precision"])}
                for row, rel, image in rows.get("mathvista", [])
            ],
        ),
        "mathverse": (
            "mathverse/testmini.parquet",
            [{**row, "image": struct(rel, image)} for row, rel, image in rows.get("mathverse", [])],
        ),
        "mathvision": (
            "mathvision/data/test-00000-of-00001.parquet",
            [
                {**row, "decoded_image": struct(rel, image)}
                for row, rel, image in rows.get("mathvision", [])
            ],
        ),
    }
    written = {}
    for name, (rel_path, data) in tables.items():
        if name not in rows:
            continue
        path = root / rel_path
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(data), path)
        written[name] = path
    # The Hub repositories' other files beside them, which the loaders must not read: MathVerse's
    # text-only config (testmini_text_only.parquet), MathVision's testmini split (data/testmini-*)
    if "mathverse" in rows:
        row, _, _ = rows["mathverse"][0]
        text_only = {**row, "problem_version": "Text Only", "image": None}
        pq.write_table(pa.Table.from_pylist([text_only]), root / "mathverse/testmini_text_only.parquet")
    if "mathvision" in rows:
        pq.write_table(
            pa.Table.from_pylist(tables["mathvision"][1][:2]), root / "mathvision/data/testmini-00000-of-00001.parquet"
        )
    return written


def _write_hub_cache(root: Path, rows: dict[str, list[tuple[dict, str, Any]]]) -> None:
    """The Hub datasets as `datasets.load_dataset(<hub name>, cache_dir=root)` leaves them
    (``<org>___<name>/<config>/<version>/<hash>/<name>-<split>.arrow`` + dataset_info.json),
    built offline: each parquet file is prepared by the parquet builder in a scratch cache,
    then filed under its Hub name."""
    import tempfile

    import datasets
    from datasets.naming import camelcase_to_snakecase

    from megatron_revisual.evaluation.datasets import hub_source

    with tempfile.TemporaryDirectory() as scratch:
        files = _write_parquet(Path(scratch) / "files", rows)
        for name, parquet in files.items():
            repo, config, split = hub_source(name)
            cache = Path(scratch) / "cache" / name
            datasets.load_dataset("parquet", data_files={split: str(parquet)}, cache_dir=str(cache))
            (built,) = [p for p in cache.glob("parquet/*/*/*") if p.is_dir()]
            org, _, hub_name = repo.partition("/")
            snake = camelcase_to_snakecase(hub_name)
            target = root / f"{org}___{snake}" / (config or "default") / built.parent.name / built.name
            target.mkdir(parents=True)
            for f in built.iterdir():
                dest = f.name.replace("parquet-", f"{snake}-", 1) if f.suffix == ".arrow" else f.name
                shutil.copy2(f, target / dest)
            info = json.loads((target / "dataset_info.json").read_text())
            info.update(dataset_name=snake, config_name=config or "default")
            (target / "dataset_info.json").write_text(json.dumps(info))


def write_fixture_datasets(
    root: str | Path, *, layout: str = "files", names: Iterable[str] | None = None
) -> dict[str, int]:
    """Write tiny benchmarks under ``root`` (a ``--dataset-dir``): the released tool's five as
    the released files ("files"), the Hub's parquet files ("parquet") or a datasets cache folder
    ("hub-cache"), and the paper's others (`eval_fixtures_paper`) in their one layout, except under
    "hub-cache". ``names``: which (default: every benchmark). Returns the samples per benchmark
    written (AIME: problems, before --aime-runs repeats them)."""
    from megatron_revisual.evaluation.datasets import BENCHMARKS, RELEASED_BENCHMARKS
    from megatron_revisual.testing.eval_fixtures_paper import (
        PAPER_FIXTURE_COUNTS,
        PAPER_FIXTURE_WRITERS,
    )

    writers = {"files": _write_files, "parquet": _write_parquet, "hub-cache": _write_hub_cache}
    if layout not in writers:
        raise ValueError(f"layout must be one of {sorted(writers)}, got {layout!r}")
    wanted = list(BENCHMARKS if names is None else names)
    unknown = [n for n in wanted if n not in BENCHMARKS]
    if unknown:
        raise ValueError(f"no fixture for {unknown}; known: {list(BENCHMARKS)}")
    root = Path(root)
    rows = {name: r for name, r in fixture_rows().items() if name in wanted}
    if rows:
        writers[layout](root, rows)
    counts = {name: len(r) for name, r in rows.items()}
    if layout != "hub-cache":
        for name in wanted:
            if name not in RELEASED_BENCHMARKS:
                PAPER_FIXTURE_WRITERS[name](root)
                counts[name] = PAPER_FIXTURE_COUNTS[name]
    return counts
