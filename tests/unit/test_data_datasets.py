"""Prompt datasets: bad rows skipped with exact per-reason counts, records as the runner needs
them, and a sampler whose saved position resumes the exact batch order."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from megatron_revisual.data.datasets import (
    REVISUAL_FORMAT_PROMPT,
    DatasetSpec,
    PromptLoader,
    chat_prompt,
    load_prompt_dataset,
    rollout_request,
)
from megatron_revisual.data.sampler import ResumableBatchSampler
from megatron_revisual.evaluation.prompts import REVISUAL_SYSTEM_PROMPT
from megatron_revisual.rollout.engine import load_image
from megatron_revisual.testing import tiny_tokenizer


def _png(color: str, size: int = 28) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    tok = tiny_tokenizer.train_tokenizer(700)
    return tiny_tokenizer.save_tokenizer(tok, tmp_path_factory.mktemp("tok"), model_max_length=512)


@pytest.fixture()
def image_dir(tmp_path: Path) -> Path:
    d = tmp_path / "imgs"
    d.mkdir()
    (d / "red.png").write_bytes(_png("red"))
    (d / "broken.png").write_bytes(b"this is not a png")
    buf = io.BytesIO()
    Image.effect_noise((64, 64), 50).convert("RGB").save(buf, format="JPEG")
    (d / "cut.jpg").write_bytes(buf.getvalue()[:1000])  # truncated: its header still verifies
    return d


# The hand-made broken rows; jsonl stores images as paths, parquet also as {"bytes", "path"}.
GOOD_PATH = {"problem": "<image>What color?", "answer": "red", "images": ["imgs/red.png"]}
GOOD_TEXT = {"problem": "What is 2 + 3?", "answer": "5", "images": None}
BROKEN_COMMON = [
    {"problem": "Q", "answer": "1", "images": ["imgs/missing.png"]},  # missing_image
    {"problem": "Q", "answer": "1", "images": ["imgs/broken.png"]},  # unreadable_image
    {"problem": "Q", "answer": "1", "images": ["imgs/cut.jpg"]},  # unreadable_image (truncated)
    {"problem": "Q", "answer": "  ", "images": None},  # empty_answer
    {"problem": "Q", "images": None},  # missing_answer (no key)
    {"answer": "1", "images": None},  # missing_prompt (no key)
    {"problem": "", "answer": "1", "images": None},  # empty_prompt
    {"problem": "<image>Q", "answer": "1", "images": None},  # missing_image (marker, no image)
    {"problem": "<image><image>Q", "answer": "1", "images": ["imgs/red.png"]},  # image_count_mismatch
]
COMMON_COUNTS = {
    "missing_image": 2, "unreadable_image": 2, "empty_answer": 1, "missing_answer": 1,
    "missing_prompt": 1, "empty_prompt": 1, "image_count_mismatch": 1,
}


def _parquet_rows() -> list[dict]:
    def as_struct(row: dict) -> dict:
        row = dict(row)
        if row.get("images") is not None:
            row["images"] = [{"bytes": None, "path": p} for p in row["images"]]
        return row

    rows = [as_struct(r) for r in [GOOD_PATH, GOOD_TEXT, *BROKEN_COMMON]]
    rows.append({"problem": "Bytes?", "answer": "blue",
                 "images": [{"bytes": _png("blue"), "path": None}]})  # good, byte image
    rows.append({"problem": "Q", "answer": "1",
                 "images": [{"bytes": b"garbage bytes", "path": None}]})  # unreadable_image
    rows.append({"problem": "Q", "answer": "1", "images": []})  # good: an empty image list
    return rows


def _write_parquet(path: Path) -> Path:
    # pyarrow, not `datasets`: `datasets` refuses to write paths that do not exist
    pq.write_table(pa.Table.from_pylist(_parquet_rows()), path)
    return path


def _write_jsonl(path: Path, extra_lines: tuple[str, ...] = ()) -> Path:
    rows = [GOOD_PATH, GOOD_TEXT, *BROKEN_COMMON,
            {"problem": "What is 3 + 4?", "answer": 7}]  # good: a numeric answer
    lines = [json.dumps(r) for r in rows] + list(extra_lines)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_parquet_skips_bad_rows_with_exact_counts(tmp_path, image_dir, caplog):
    path = _write_parquet(tmp_path / "train.parquet")
    with caplog.at_level(logging.WARNING):
        data = load_prompt_dataset(DatasetSpec(path=str(path)))
    assert dict(data.skipped) == COMMON_COUNTS | {"unreadable_image": 3}
    assert len(data) == 4
    assert [r.uid for r in data] == ["train.parquet:0", "train.parquet:1", "train.parquet:11",
                                     "train.parquet:13"]
    assert "skipped 10 of 14 rows" in caplog.text
    path_row, text_row, bytes_row, empty_list_row = list(data)
    assert path_row.images == (str(image_dir / "red.png"),)  # relative to the dataset file
    assert bytes_row.images == (_png("blue"),)
    assert text_row.images == () and empty_list_row.images == ()
    assert np.asarray(load_image(bytes_row.images[0])).tolist()[0][0] == [0, 0, 255]
    # images go before the text when the prompt has no <image> marker
    assert bytes_row.messages[-1]["content"] == [
        {"type": "image"},
        {"type": "text", "text": "Bytes? " + REVISUAL_SYSTEM_PROMPT},
    ]
    assert text_row.messages == (
        {"role": "user", "content": "What is 2 + 3? " + REVISUAL_SYSTEM_PROMPT},
    )
    assert path_row.answer == "red"


def test_jsonl_skips_bad_rows_with_exact_counts(tmp_path, image_dir):
    path = _write_jsonl(tmp_path / "train.jsonl")
    data = load_prompt_dataset(DatasetSpec(path=str(path)))
    assert dict(data.skipped) == COMMON_COUNTS
    assert [r.uid for r in data] == ["train.jsonl:0", "train.jsonl:1", "train.jsonl:11"]
    assert data[2].answer == "7"  # mixed str/int answers are read as text
    assert data[0].messages[-1]["content"] == [
        {"type": "image"}, {"type": "text", "text": "What color? " + REVISUAL_SYSTEM_PROMPT},
    ]


def test_malformed_jsonl_lines_are_counted_not_fatal(tmp_path, image_dir):
    path = _write_jsonl(tmp_path / "train.jsonl", extra_lines=("{not json", "[1, 2]"))
    data = load_prompt_dataset(DatasetSpec(path=str(path)))
    assert dict(data.skipped) == COMMON_COUNTS | {"invalid_json": 2}
    assert [r.uid for r in data] == ["train.jsonl:0", "train.jsonl:1", "train.jsonl:11"]
    assert data[2].answer == "7"


def test_directory_of_files_and_header_only_image_check(tmp_path, image_dir):
    _write_parquet(tmp_path / "a.parquet")
    _write_jsonl(tmp_path / "b.jsonl")
    data = load_prompt_dataset(DatasetSpec(path=str(tmp_path)))
    assert dict(data.skipped) == {k: 2 * v for k, v in COMMON_COUNTS.items()} | {"unreadable_image": 5}
    assert len(data) == 4 + 3
    # "open" reads headers only: the truncated file passes it, the non-image files do not
    fast = load_prompt_dataset(DatasetSpec(path=str(tmp_path / "b.jsonl"), image_check="open"))
    assert fast.skipped["unreadable_image"] == 1
    assert len(fast) == 4


def test_config_errors_raise(tmp_path, image_dir):
    path = _write_jsonl(tmp_path / "train.jsonl")
    with pytest.raises(ValueError, match="no column 'question'"):
        load_prompt_dataset(DatasetSpec(path=str(path), prompt_key="question"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_prompt_dataset(DatasetSpec(path=str(tmp_path / "nope.parquet")))
    with pytest.raises(ValueError, match="only use"):
        load_prompt_dataset(DatasetSpec(path=str(path), format_prompt="{{ question }}"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"problem": "Q", "answer": ""}) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"none of its 1 rows is usable; skipped \{'empty_answer': 1\}"):
        load_prompt_dataset(DatasetSpec(path=str(bad)))


def test_chat_prompt_format_and_length_filter(tmp_path, image_dir, tokenizer):
    path = _write_jsonl(tmp_path / "train.jsonl")
    jinja = tmp_path / "fmt.jinja"
    jinja.write_text("Q: {{ content | trim }}\n", encoding="utf-8")
    data = load_prompt_dataset(
        DatasetSpec(path=str(path), format_prompt=str(jinja), system_prompt="Be brief.")
    )
    assert chat_prompt(data[1], tokenizer) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nQ: What is 2 + 3?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    request = rollout_request(data[0], tokenizer)
    assert request.prompt.count("<|vision_start|><|image_pad|><|vision_end|>") == 1
    assert request.images == (str(image_dir / "red.png"),)
    varied = tmp_path / "varied.jsonl"
    questions = ["Hi", "What is 2 + 3?", "What is the sum of all the numbers in this long list?"]
    varied.write_text("".join(json.dumps({"problem": q, "answer": "1"}) + "\n" for q in questions))
    spec = DatasetSpec(path=str(varied), format_prompt=None)
    lengths = [len(tokenizer(chat_prompt(r, tokenizer))["input_ids"]) for r in load_prompt_dataset(spec)]
    assert lengths == sorted(set(lengths))  # three distinct lengths
    short = load_prompt_dataset(spec, tokenizer=tokenizer, max_prompt_length=lengths[1])
    assert [r.prompt for r in short] == questions[:2]
    assert dict(short.skipped) == {"prompt_too_long": 1}
    assert REVISUAL_FORMAT_PROMPT.endswith(REVISUAL_SYSTEM_PROMPT)


def _draw(sampler: ResumableBatchSampler, n: int) -> list[list[int]]:
    return [sampler.next_batch() for _ in range(n)]


def test_sampler_resumes_the_exact_order():
    run = ResumableBatchSampler(10, 3, seed=7)
    first = _draw(run, 4)  # crosses into epoch 1 (3 full batches per epoch, row tail dropped)
    state = json.loads(json.dumps(run.state_dict()))  # a checkpoint stores it as JSON
    rest = _draw(run, 7)
    resumed = ResumableBatchSampler(10, 3, seed=7)
    resumed.load_state_dict(state)
    assert _draw(resumed, 7) == rest
    assert state == {"epoch": 1, "index": 3, "seed": 7, "num_rows": 10, "batch_size": 3,
                     "shuffle": True, "drop_last": True}
    # each epoch is a fresh permutation: 9 distinct rows, the 10th dropped
    epoch0 = sum(first[:3], [])
    assert len(set(epoch0)) == 9 and set(epoch0) <= set(range(10))
    assert sum(first[3:] + rest[:2], []) != epoch0
    assert _draw(ResumableBatchSampler(10, 3, seed=7), 4) == first
    assert _draw(ResumableBatchSampler(10, 3, seed=8), 4) != first


def test_sampler_without_drop_last_and_without_shuffle():
    s = ResumableBatchSampler(5, 2, seed=0, shuffle=False, drop_last=False)
    assert _draw(s, 4) == [[0, 1], [2, 3], [4], [0, 1]]
    assert s.batches_per_epoch == 3 and s.epoch == 1
    with pytest.raises(ValueError, match="num_rows=5 but this sampler 6"):
        ResumableBatchSampler(6, 2, seed=0).load_state_dict(s.state_dict() | {"shuffle": True})
    with pytest.raises(ValueError, match="batch_size <= 5"):
        ResumableBatchSampler(5, 6, seed=0)


def test_loader_state_restores_records_and_checks_data(tmp_path, image_dir):
    path = _write_parquet(tmp_path / "train.parquet")
    data = load_prompt_dataset(DatasetSpec(path=str(path)))
    loader = PromptLoader(data, batch_size=2, seed=3)
    loader.next_batch()
    state = loader.state_dict()
    after = [[r.uid for r in loader.next_batch()] for _ in range(3)]
    again = PromptLoader(load_prompt_dataset(DatasetSpec(path=str(path))), batch_size=2, seed=3)
    again.load_state_dict(state)
    assert [[r.uid for r in again.next_batch()] for _ in range(3)] == after
    assert loader.epoch == 1  # 4 rows, 2 per batch: batches 3 and 4 are epoch 1
    (image_dir / "red.png").unlink()  # a row becomes unusable: the resume must refuse
    changed = PromptLoader(load_prompt_dataset(DatasetSpec(path=str(path))), batch_size=2, seed=3)
    with pytest.raises(ValueError, match="usable rows changed"):
        changed.load_state_dict(state)
