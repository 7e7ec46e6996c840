"""The demo's synthetic data: deterministic for a seed, answers readable back from the pixels,
responses that earn full rewards, and lengths a tiny model on CPU can afford."""

from __future__ import annotations

import random
import re
from collections import Counter
from pathlib import Path

import pytest

from megatron_revisual.data.datasets import (
    DatasetSpec,
    chat_prompt,
    load_prompt_dataset,
)
from megatron_revisual.data.synthetic import (
    COLOURS,
    arithmetic_rows,
    count_dots,
    image_rows,
    read_colour,
    read_digit,
    read_side,
    render_digit,
    render_dots,
    write_demo_datasets,
    write_rows,
)
from megatron_revisual.rl.rewards import accuracy_reward, format_reward
from megatron_revisual.rollout.engine import load_image
from megatron_revisual.testing import tiny_tokenizer

SIZES = {"n_sft": 24, "n_sft_images": 8, "n_mrl": 40, "n_trl": 24, "n_val": 8}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    tok = tiny_tokenizer.train_tokenizer(700)
    return tiny_tokenizer.save_tokenizer(tok, tmp_path_factory.mktemp("tok"), model_max_length=4096)


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes(tmp_path):
    a = write_demo_datasets(tmp_path / "a", seed=3, **SIZES)
    write_demo_datasets(tmp_path / "b", seed=3, **SIZES)
    write_demo_datasets(tmp_path / "c", seed=4, **SIZES)
    assert sorted(a) == ["mrl", "mrl_val", "sft", "trl", "trl_val"]
    tree_a, tree_b, tree_c = _tree(tmp_path / "a"), _tree(tmp_path / "b"), _tree(tmp_path / "c")
    assert tree_a == tree_b
    assert len([n for n in tree_a if n.startswith("sft_images/")]) == SIZES["n_sft_images"]
    assert all(tree_a[n] != tree_c[n] for n in ("mrl.parquet", "sft.jsonl", "trl.jsonl"))
    assert a["mrl"].read_bytes() == tree_b["mrl.parquet"]


def test_dot_images_are_counted_back_to_their_answers(tmp_path):
    paths = write_demo_datasets(tmp_path, seed=0, **SIZES)
    data = load_prompt_dataset(DatasetSpec(path=str(paths["mrl"])))
    assert len(data) == SIZES["n_mrl"] and not data.skipped
    counts = Counter()
    for record in data:
        (image,) = record.images
        assert isinstance(image, bytes)  # parquet keeps the PNG bytes
        pil = load_image(image)
        assert pil.size == (56, 56)
        assert count_dots(pil) == int(record.answer)
        counts[record.answer] += 1
    assert sorted(counts) == ["1", "2", "3", "4"]
    # the SFT file's image rows are jsonl rows naming PNG files beside it
    sft = load_prompt_dataset(DatasetSpec(path=str(paths["sft"]), answer_key="answer",
                                          response_key="response"))
    with_images = [r for r in sft if r.images]
    assert len(with_images) == SIZES["n_sft_images"] and len(sft) == 24 + 8
    assert all(count_dots(load_image(r.images[0])) == int(r.answer) for r in with_images)


def test_digits_read_back_and_renderers_check_inputs(tmp_path):
    path = write_rows(image_rows(60, seed=5, task="digit"), tmp_path / "digits.jsonl")
    data = load_prompt_dataset(DatasetSpec(path=str(path)))
    assert [read_digit(load_image(r.images[0])) for r in data] == [int(r.answer) for r in data]
    assert {r.answer for r in data} == {str(d) for d in range(10)}
    rng = random.Random(0)
    for size in (56, 84, 112):  # the geometry scales with the image
        assert [read_digit(render_digit(d, rng, size=size)) for d in range(10)] == list(range(10))
        assert [count_dots(render_dots(k, rng, size=size)) for k in range(1, 10)] == list(range(1, 10))
    with pytest.raises(ValueError, match="count=0"):
        render_dots(0, rng)
    with pytest.raises(ValueError, match="task='color'"):
        image_rows(1, seed=0, task="color")


def test_arithmetic_answers_and_responses_earn_full_reward():
    rows = arithmetic_rows(200, seed=1, ops=("+", "-", "*"))
    for row in rows:
        a, op, b = re.fullmatch(r"What is (\d+) ([-+*]) (\d+)\?", row["problem"]).groups()
        assert int(row["answer"]) == {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]
        assert int(row["answer"]) >= 0
        assert accuracy_reward(row["response"], row["answer"]) == 1.0
        assert format_reward(row["response"]) == 1.0
    assert arithmetic_rows(20, seed=1) == arithmetic_rows(20, seed=1)
    assert arithmetic_rows(20, seed=1) != arithmetic_rows(20, seed=2)
    for row in image_rows(20, seed=0) + image_rows(20, seed=0, task="digit"):
        assert accuracy_reward(row["response"], row["answer"]) == 1.0
        assert format_reward(row["response"]) == 1.0
        assert accuracy_reward(row["response"], str(int(row["answer"]) + 1)) == 0.0


def test_texts_are_short_with_the_tiny_tokenizer(tmp_path, tokenizer):
    paths = write_demo_datasets(tmp_path, seed=0, **SIZES)

    def n_tokens(text: str) -> int:
        return len(tokenizer(text)["input_ids"])

    rows = arithmetic_rows(100, seed=0) + image_rows(50, seed=0) + image_rows(50, seed=0, task="digit")
    # the "<image>" marker is replaced by the vision placeholders, so it is not counted
    assert max(n_tokens(r["problem"].removeprefix("<image>")) for r in rows) <= 15
    assert max(n_tokens(r["response"]) for r in rows) <= 25
    # the chat prompt a rollout engine gets, with and without the ReVisual instruction
    raw = load_prompt_dataset(DatasetSpec(path=str(paths["mrl"]), format_prompt=None))
    formatted = load_prompt_dataset(DatasetSpec(path=str(paths["mrl"])))
    assert max(n_tokens(chat_prompt(r, tokenizer)) for r in raw) <= 50
    assert max(n_tokens(chat_prompt(r, tokenizer)) for r in formatted) <= 150


def test_demo_cold_start_rows_never_show_a_digit_image(tmp_path):
    """The demo's cold start: text choice questions and two-candidate questions about the colour
    of a shape or the half it lies in; no SFT image shows a digit, and the MRL stage reads 1, 8."""
    paths = write_demo_datasets(tmp_path, seed=0, task="digit", digits=(1, 8), n_sft=20,
                                n_sft_text_choice=30, n_sft_colours=40, n_sft_sides=24, n_mrl=16,
                                n_trl=4, n_val=4)
    sft = load_prompt_dataset(DatasetSpec(path=str(paths["sft"]), response_key="response", format_prompt=None))
    assert len(sft) == 114 and not sft.skipped
    texts = [r for r in sft if "shown in the text" in r.prompt]
    sides = [r for r in sft if "Which side" in r.prompt]
    images = [r for r in sft if r.images and r not in sides]
    assert len(texts) == 30 and len(images) == 40 and len(sides) == 24
    for r in sides:
        named = re.fullmatch(r"<image>Which side of the image is the shape on: (\w+) or (\w+)\?", r.prompt).groups()
        assert read_side(load_image(r.images[0])) == r.answer and sorted(named) == ["left", "right"]
        assert r.response == f"<think>\nThe image shows {r.answer}.\n</think>\nThe answer is \\boxed{{{r.answer}}}."
    assert {r.answer for r in sides} == {"left", "right"}
    for r in texts:
        evidence, question = r.prompt.split("\n")
        named = re.fullmatch(r"Which digit is shown in the text: (\d) or (\d)\?", question).groups()
        assert r.answer == evidence and evidence in named and named[0] != named[1]
        assert accuracy_reward(r.response, r.answer) == format_reward(r.response) == 1.0
    for r in images:
        named = re.fullmatch(r"<image>Which colour is the shape in the image: (\w+) or (\w+)\?", r.prompt).groups()
        assert read_colour(load_image(r.images[0])) == r.answer and r.answer in named
        assert set(named) <= set(COLOURS) and named[0] != named[1]
    mrl = load_prompt_dataset(DatasetSpec(path=str(paths["mrl"]), format_prompt=None))
    assert {r.answer for r in mrl} == {"1", "8"}
    assert all(r.prompt.endswith(("1 or 8?", "8 or 1?")) for r in mrl)
    assert all(read_digit(load_image(r.images[0])) == int(r.answer) for r in mrl)
    with pytest.raises(ValueError, match=r"options=3 must be in 2\.\.2 \(the digit task's answers\)"):
        image_rows(1, seed=0, task="digit", digits=(1, 8), options=3)
