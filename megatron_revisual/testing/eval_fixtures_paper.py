"""Tiny copies of the benchmarks `revisual eval` gained for the paper's Table 2, each in the one
layout its release has, with the field names and kinds of values of the real files (the schema
sources are in `benchmarks_vision` / `benchmarks_text`). Nothing is downloaded.

    dynamath    dynamath/data/sample<k>-00000-of-00001.parquet, k = 1..3 (the Hub has 10)
    logicvista  logicvista/dataset.json + logicvista/images/v1_<n>.png
    aime24      aime24/data/train-00000-of-00001.parquet
    aime25      aime25/aime2025-I.jsonl, aime25/aime2025-II.jsonl
    gpqa        gpqa/gpqa_diamond.csv
    math500     math500/test.jsonl

Used by `eval_fixtures.write_fixture_datasets`; `PAPER_FIXTURE_COUNTS` is the number of samples each
gives (AIME: problems, before --aime-runs repeats them).
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from megatron_revisual.testing.images import fixture_image

__all__ = ["PAPER_FIXTURE_COUNTS", "PAPER_FIXTURE_WRITERS"]


def _png(seed: int) -> bytes:
    buf = io.BytesIO()
    fixture_image(seed).save(buf, format="PNG")
    return buf.getvalue()


def _write_parquet(path: Path, rows: list[dict]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)


# (question, ground_truth, answer_type, subject) of three seed questions, one per answer kind
_DYNAMATH_SEEDS = [
    ("What is the period of this function? Answer the question with a floating-point number.",
     "2.0944", "float", "analytic geometry"),
    ("Which line is the steepest? Choices: (A) red (B) blue (C) green (D) black", "B",
     "multiple choice", "plane geometry"),
    ("Which month has the highest value in the chart?", "May", "text", "statistics"),
]
DYNAMATH_VARIANTS = 3


def _dynamath(root: Path) -> None:
    for k in range(1, DYNAMATH_VARIANTS + 1):
        rows = [
            {
                "id": str(i), "question": q, "image": f"image/image{i}.png",
                "decoded_image": {"bytes": _png(600 + 10 * i + k), "path": f"image{i}.png"},
                "ground_truth": truth if kind != "float" else f"{float(truth) + k - 1:.4f}",
                "answer_type": kind, "subject": subject, "knowledge_level": "high school",
            }
            for i, (q, truth, kind, subject) in enumerate(_DYNAMATH_SEEDS, start=1)
        ]
        _write_parquet(root / "dynamath" / "data" / f"sample{k}-00000-of-00001.parquet", rows)


def _logicvista(root: Path) -> None:
    base = root / "logicvista"
    (base / "images").mkdir(parents=True, exist_ok=True)
    items = [
        ("What choice (A, B, C, or D) should be in place of the question mark?", "C", ["inductive"]),
        ("Which two of the proposals A, B, C or D complete the diagrams?", "B, D", ["spatial"]),
        ("Which is the correct answer according to the image? Select from 1-5", "3", ["numerical"]),
        ("", "", []),  # as dataset.json's v1_382: no question, no answer
    ]
    data = {}
    for i, (question, answer, skill) in enumerate(items):
        key = f"v1_{i}"
        (base / "images" / f"{key}.png").write_bytes(_png(700 + i))
        data[key] = {
            "imagename": f"{key}.png", "question": question, "answer": answer,
            "reasoning": "Because of the pattern.", "skill": skill, "broad_capability": ["diagram"],
            "specific_capability": ["sequence pattern"], "imagesource": "aptitudetests",
            "sourcelink": "https://www.aptitudetests.org/", "liscenced": "false",
        }
    (base / "dataset.json").write_text(json.dumps(data, indent=1), encoding="utf-8")


def _aime24(root: Path) -> None:
    rows = [
        {"id": 60 + i, "problem": f"Find the remainder when {7 + i}^{i + 2} is divided by 1000.",
         "solution": "Compute it.", "answer": str(pow(7 + i, i + 2, 1000)),
         "url": f"https://artofproblemsolving.com/wiki/index.php/2024_AIME_I_Problems/Problem_{i + 1}",
         "year": "2024"}
        for i in range(3)
    ]
    _write_parquet(root / "aime24" / "data" / "train-00000-of-00001.parquet", rows)


def _aime25(root: Path) -> None:
    base = root / "aime25"
    base.mkdir(parents=True, exist_ok=True)
    for exam, offset in (("I", 0), ("II", 5)):
        lines = [json.dumps({"question": f"Find the sum of all integers n with 0 < n < {10 + offset + i}.",
                             "answer": str((9 + offset + i) * (10 + offset + i) // 2)}) for i in range(2)]
        (base / f"aime2025-{exam}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")


_GPQA_COLUMNS = [
    "Pre-Revision Question", "Pre-Revision Correct Answer", "Question", "Correct Answer",
    "Incorrect Answer 1", "Incorrect Answer 2", "Incorrect Answer 3", "Explanation", "Subdomain",
    "Record ID", "High-level domain",
]


def _gpqa(root: Path) -> None:
    rows = [
        ("Which particle mediates the electromagnetic force?", "photon", "gluon", "W boson", "graviton",
         "Quantum physics", "recA1b2C3d4E5f6G7h", "Physics"),
        ("What is the hybridization of carbon in methane?", "sp3", "sp2", "sp", "dsp2",
         "Organic Chemistry", "recZ9y8X7w6V5u4T3s", "Chemistry"),
    ]
    base = root / "gpqa"
    base.mkdir(parents=True, exist_ok=True)
    with open(base / "gpqa_diamond.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=_GPQA_COLUMNS)
        writer.writeheader()
        for q, right, w1, w2, w3, sub, rid, domain in rows:
            writer.writerow({
                "Pre-Revision Question": q, "Pre-Revision Correct Answer": right, "Question": q,
                "Correct Answer": right, "Incorrect Answer 1": w1, "Incorrect Answer 2": w2,
                "Incorrect Answer 3": w3, "Explanation": "By definition.", "Subdomain": sub,
                "Record ID": rid, "High-level domain": domain,
            })


def _math500(root: Path) -> None:
    rows = [
        {"problem": "Compute $\\dbinom{8}{2}$.", "solution": "It is $\\boxed{28}$.", "answer": "28",
         "subject": "Counting & Probability", "level": 1, "unique_id": "test/counting_and_probability/1.json"},
        {"problem": "Simplify $\\sqrt{50}$.", "solution": "It is $\\boxed{5\\sqrt{2}}$.", "answer": "5\\sqrt{2}",
         "subject": "Algebra", "level": 2, "unique_id": "test/algebra/2.json"},
        {"problem": "What is $\\frac{1}{2}+\\frac{1}{3}$?", "solution": "$\\boxed{\\frac{5}{6}}$",
         "answer": "\\frac{5}{6}", "subject": "Prealgebra", "level": 1, "unique_id": "test/prealgebra/3.json"},
    ]
    base = root / "math500"
    base.mkdir(parents=True, exist_ok=True)
    (base / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


PAPER_FIXTURE_WRITERS: dict[str, Callable[[Path], Any]] = {
    "dynamath": _dynamath, "logicvista": _logicvista, "aime24": _aime24, "aime25": _aime25,
    "gpqa": _gpqa, "math500": _math500,
}
PAPER_FIXTURE_COUNTS = {
    "dynamath": len(_DYNAMATH_SEEDS) * DYNAMATH_VARIANTS, "logicvista": 3, "aime24": 3, "aime25": 4,
    "gpqa": 2, "math500": 3,
}
