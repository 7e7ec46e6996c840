"""The text benchmarks of the paper's Table 2: AIME 2024, AIME 2025, GPQA (diamond), MATH-500.

The paper states only the metric (pass@1; AIME: "pass@32" in the text, "averaged over eight
independent inference runs" in Table 2's caption) and its prompt template (Figure 5, the
system prompt). The user turn is therefore the problem as the dataset gives it, and grading the
released tool's (math-verify on the final \\boxed{} answer), except GPQA:

    gpqa  "What is the correct answer to this question: {Question}\\n\\nChoices:\\n(A) ...\\n(D) ..."
          (the zero-shot prompt of the GPQA repository's baselines, as OpenCompass words it too,
          without its "Format your response as follows" line: the template asks for \\boxed{});
          the four answers are shuffled per question with a seed from its "Record ID", so the
          order does not depend on which rows are loaded; graded by letter.

AIME problems are asked --aime-runs times (default 8, the caption's count); the table's number
is the mean accuracy over all runs (avg@n, which is the unbiased pass@1) and pass@k is reported
beside it (`metrics.repeated_metrics`). Why avg@n: several of Table 2's AIME entries are
multiples of 1/240 (8 runs x 30 problems), e.g. MMR1-Math-v0's AIME25 0.8 = 2/240, which a
pass@32 over 30 problems (multiples of 1/30) cannot give.
"""

from __future__ import annotations

import hashlib
import random

from megatron_revisual.evaluation.grading import OPTION_LETTERS
from megatron_revisual.evaluation.samples import (
    BenchmarkSpec,
    RawRow,
    Sample,
    required_field,
    row_location,
)

__all__ = ["TEXT_SPECS", "gpqa_choices", "gpqa_prompt"]


def _aime24_sample(raw: RawRow) -> Sample:
    row = raw.data
    where = row_location(raw, row.get("id"))
    return Sample(
        dataset="aime24",
        id=str(required_field(row, "id", where)),
        prompt=str(required_field(row, "problem", where)).strip(),
        answer=str(required_field(row, "answer", where)).strip(),
        multiple_choice=False,
    )


def _aime25_sample(raw: RawRow) -> Sample:
    row = raw.data
    where = row_location(raw)
    exam = (raw.part or "I").rsplit("-", 1)[-1].upper()  # "AIME2025-II" / "aime2025-II" -> "II"
    return Sample(
        dataset="aime25",
        id=f"{exam}-{raw.index + 1}",  # the file has no id: its row is the problem number
        prompt=str(required_field(row, "question", where)).strip(),
        answer=str(required_field(row, "answer", where)).strip(),
        multiple_choice=False,
    )


def gpqa_choices(row: dict, where: str) -> tuple[tuple[str, ...], str]:
    """The four answers in this question's shuffled order, and the correct one's letter."""
    correct = str(required_field(row, "Correct Answer", where)).strip()
    wrong = [str(required_field(row, f"Incorrect Answer {i}", where)).strip() for i in (1, 2, 3)]
    key = str(row.get("Record ID") or row["Question"])
    seed = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little")
    order = [correct, *wrong]
    random.Random(seed).shuffle(order)
    return tuple(order), OPTION_LETTERS[order.index(correct)]


def gpqa_prompt(question: str, choices: tuple[str, ...]) -> str:
    lines = [f"({OPTION_LETTERS[i]}) {c}" for i, c in enumerate(choices)]
    return f"What is the correct answer to this question: {question.strip()}\n\nChoices:\n" + "\n".join(lines)


def _gpqa_sample(raw: RawRow) -> Sample:
    row = raw.data
    where = row_location(raw, row.get("Record ID"))
    question = str(required_field(row, "Question", where))
    choices, letter = gpqa_choices(row, where)
    domain = row.get("High-level domain")
    return Sample(
        dataset="gpqa",
        id=str(row.get("Record ID") or raw.index),
        prompt=gpqa_prompt(question, choices),
        answer=letter,
        multiple_choice=True,
        choices=choices,
        subsets=(str(domain),) if domain else (),
    )


def _math500_sample(raw: RawRow) -> Sample:
    row = raw.data
    where = row_location(raw, row.get("unique_id"))
    subject = row.get("subject")
    return Sample(
        dataset="math500",
        id=str(required_field(row, "unique_id", where)),
        prompt=str(required_field(row, "problem", where)).strip(),
        answer=str(required_field(row, "answer", where)).strip(),
        multiple_choice=False,
        subsets=(str(subject),) if subject else (),
    )


TEXT_SPECS: tuple[BenchmarkSpec, ...] = (
    BenchmarkSpec(
        name="aime24", title="AIME24", subdir="aime24", local_files=(),
        image_dirs=(), parquet_glob="**/train*.parquet",
        hub=("HuggingFaceH4/aime_2024", ((None, "train"),)), to_sample=_aime24_sample,
        text_only=True, repeated=True,
        schema="https://huggingface.co/datasets/HuggingFaceH4/aime_2024 (README features: id "
        "int64, problem, solution, answer, url, year; split train, data/train-*.parquet, 30 rows)",
    ),
    BenchmarkSpec(
        name="aime25", title="AIME25", subdir="aime25",
        local_files=("aime2025-I.jsonl", "aime2025-II.jsonl"), image_dirs=(), parquet_glob=None,
        hub=("opencompass/AIME2025", (("AIME2025-I", "test"), ("AIME2025-II", "test"))),
        to_sample=_aime25_sample, text_only=True, repeated=True,
        schema="https://huggingface.co/datasets/opencompass/AIME2025 (configs AIME2025-I / "
        "AIME2025-II, split test, files aime2025-I.jsonl / aime2025-II.jsonl; fields question, "
        "answer as read by users of the set, e.g. its loaders in evaluation harnesses)",
    ),
    BenchmarkSpec(
        name="gpqa", title="GPQA", subdir="gpqa", local_files=("gpqa_diamond.csv",), image_dirs=(),
        parquet_glob=None, hub=("Idavidrein/gpqa", (("gpqa_diamond", "train"),)),
        to_sample=_gpqa_sample, text_only=True,
        schema="https://huggingface.co/datasets/Idavidrein/gpqa (gated; config gpqa_diamond, "
        "split train, gpqa_diamond.csv, 198 rows; columns Question, Correct Answer, Incorrect "
        "Answer 1-3, Record ID, High-level domain, Subdomain, ...)",
    ),
    BenchmarkSpec(
        name="math500", title="MATH500", subdir="math500", local_files=("test.jsonl",),
        image_dirs=(), parquet_glob="**/test*.parquet",
        hub=("HuggingFaceH4/MATH-500", ((None, "test"),)), to_sample=_math500_sample,
        text_only=True,
        schema="https://huggingface.co/datasets/HuggingFaceH4/MATH-500 (test.jsonl; problem, "
        "solution, answer, subject, level int64, unique_id; split test, 500 rows)",
    ),
)
