"""Tiny copies of the released ReVisual-R1 training sets, in the layout and columns of the Hub
repositories as far as they are known, for tests and `revisual data` dry runs (nothing is
downloaded). What each copy rests on:

    csfufu/mmrl             mmrl/data/train-00000-of-00001.parquet: problem (with "<image>"
                            markers), answer, images (a list of `datasets` Image: {"bytes",
                            "path"} structs), dataset (the source set: iconqa, geometry3k, ...).
                            CONFIRMED in part: a public build script reading the Hub copy
                            (30,937 rows) selects exactly these columns and calls `images` HF's
                            {bytes, path} struct list; another reads img["bytes"]. Further columns,
                            if any, are unknown.
    csfufu/textrl           textrl/text_concat.parquet (the Hub repository's one file, 5.19 MB):
                            problem, answer. NOT CONFIRMED: the columns are the released trainer's
                            defaults (examples/config.yaml prompt_key problem, answer_key answer).
    csfufu/Grammer_dataset  Grammer_dataset/text_v01_47382.json (the Hub repository's one file,
                            2.19 GB, a JSON array): conversations, ShareGPT turns {"from": "human"
                            | "gpt", "value"}. NOT CONFIRMED: the cold start went through
                            LLaMA-Factory (cold_start/examples/train_full/revisual_cold_start.yaml),
                            whose default ShareGPT columns these are.

    paths = write_released_fixtures("runs/released")   # {"mmrl": ..., "textrl": ..., "grammer": ...}
"""

from __future__ import annotations

import io
import json
from pathlib import Path

__all__ = ["write_released_fixtures"]


def _digit_png(digit: int, size: int = 56) -> bytes:
    import random

    from megatron_revisual.data.synthetic import render_digit

    buf = io.BytesIO()
    render_digit(digit, random.Random(digit), size=size).save(buf, format="PNG")
    return buf.getvalue()


def _mmrl(root: Path) -> Path:
    import datasets

    features = datasets.Features({
        "images": datasets.List(datasets.Image()),
        "problem": datasets.Value("string"),
        "answer": datasets.Value("string"),
        "dataset": datasets.Value("string"),
    })
    rows = [
        {"images": [_digit_png(1)], "problem": "<image>Which digit is shown in the image: 1 or 8?",
         "answer": "1", "dataset": "iconqa"},
        {"images": [_digit_png(8)], "problem": "<image>Which digit is shown in the image: 1 or 8?",
         "answer": "8", "dataset": "geometry3k"},
        {"images": [_digit_png(8)], "problem": "<image>Is the digit in the image an 8? Answer yes or no.",
         "answer": "yes", "dataset": "geoqa"},
        {"images": [_digit_png(3)], "problem": "<image>Which digit is shown?", "answer": "3",
         "dataset": ""},
    ]
    out = root / "mmrl" / "data" / "train-00000-of-00001.parquet"
    out.parent.mkdir(parents=True, exist_ok=True)
    # written by `datasets`, so the file carries its Image feature metadata as the Hub's does
    datasets.Dataset.from_list(rows, features=features).to_parquet(str(out))
    return out


def _textrl(root: Path) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"problem": f"What is {a} + {b}?", "answer": str(a + b)} for a, b in ((2, 3), (7, 5), (9, 9))]
    out = root / "textrl" / "text_concat.parquet"
    out.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), out)
    return out


def _grammer(root: Path) -> Path:
    def trace(a: int, b: int) -> str:
        return f"<think>\n{a} + {b} = {a + b}\n</think>\nThe answer is \\boxed{{{a + b}}}."

    rows = [
        {"conversations": [{"from": "human", "value": f"What is {a} + {b}?"},
                           {"from": "gpt", "value": trace(a, b)}]}
        for a, b in ((1, 2), (4, 4), (6, 3))
    ]
    out = root / "Grammer_dataset" / "text_v01_47382.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=1), encoding="utf-8")
    return out


def write_released_fixtures(root: str | Path) -> dict[str, Path]:
    """The three tiny copies under `root`; returns each stage's file."""
    root = Path(root)
    return {"mmrl": _mmrl(root), "textrl": _textrl(root), "grammer": _grammer(root)}
