"""What the released training sets need from the loader: conversation columns, images in every
form those sets use, the first rows only, Hub names (streamed), and a missing column named with
the option to set."""

from __future__ import annotations

import io
import json

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from megatron_revisual.data.datasets import DatasetSpec, load_prompt_dataset
from megatron_revisual.rollout.engine import load_image
from megatron_revisual.testing.released_sets import write_released_fixtures


def _png(color: str, size: int = 28) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    return write_released_fixtures(tmp_path_factory.mktemp("released"))


def _colour(image) -> tuple[int, int, int]:
    return load_image(image).getpixel((0, 0))


def test_mmrl_copy_datasets_image_column(released):
    data = load_prompt_dataset(DatasetSpec(path=str(released["mmrl"]), format_prompt=None))
    assert len(data) == 4 and not data.skipped
    first = data[0]
    # a `datasets` Image column (a list of one): bytes as stored, decoded only by the engine
    assert isinstance(first.images[0], bytes) and load_image(first.images[0]).size == (56, 56)
    assert [m["role"] for m in first.messages] == ["user"]
    assert first.messages[0]["content"][0] == {"type": "image"}
    assert [data[i].answer for i in range(4)] == ["1", "8", "yes", "3"]


def test_a_list_of_images_in_a_datasets_image_column(tmp_path):
    features = datasets.Features({"images": datasets.List(datasets.Image()), "problem": datasets.Value("string"),
                                  "answer": datasets.Value("string")})
    rows = [{"images": [Image.new("RGB", (28, 28), "red"), Image.new("RGB", (28, 28), "blue")],
             "problem": "<image> or <image>: which is red?", "answer": "first"}]
    datasets.Dataset.from_list(rows, features=features).to_parquet(str(tmp_path / "pair.parquet"))
    (pair,) = load_prompt_dataset(DatasetSpec(path=str(tmp_path / "pair.parquet"), format_prompt=None))
    assert [_colour(im) for im in pair.images] == [(255, 0, 0), (0, 0, 255)]  # in order
    assert [p["type"] for p in pair.messages[0]["content"]] == ["image", "text", "image", "text"]


def test_grammer_copy_sharegpt_conversations(released):
    spec = DatasetSpec(path=str(released["grammer"]), conversation_key="conversations", answer_key=None,
                       image_key=None, format_prompt=None)
    data = load_prompt_dataset(spec)
    record = data[1]
    assert record.prompt == "What is 4 + 4?"
    assert record.response == "<think>\n4 + 4 = 8\n</think>\nThe answer is \\boxed{8}."
    assert record.messages == ({"role": "user", "content": "What is 4 + 4?"},)


def test_conversation_shapes_and_skips(tmp_path):
    rows = [
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"},
                      {"role": "assistant", "content": "Hello."}]},  # good, with a system turn
        {"messages": [{"from": "human", "value": "A?"}, {"from": "gpt", "value": "B."}]},  # good
        {"messages": [{"role": "user", "content": "A?"}]},  # bad_conversation: no answer turn
        {"messages": [{"role": "user", "content": "A?"}, {"role": "assistant", "content": "B"},
                      {"role": "user", "content": "C?"}, {"role": "assistant", "content": "D"}]},  # bad (2 exchanges)
        {"messages": [{"speaker": "x", "text": "A?"}]},  # bad_conversation: unknown turn keys
        {"messages": "A?"},  # bad_conversation: not a list
        {"messages": [{"role": "user", "content": " "}, {"role": "assistant", "content": "B"}]},  # empty_prompt
        {"messages": [{"role": "user", "content": "A"}, {"role": "assistant", "content": ""}]},  # empty_response
    ]
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = load_prompt_dataset(DatasetSpec(path=str(path), conversation_key="messages", answer_key=None,
                                           image_key=None, format_prompt=None))
    assert len(data) == 2
    assert dict(data.skipped) == {"bad_conversation": 4, "empty_prompt": 1, "empty_response": 1}
    assert data[0].messages == ({"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"})
    assert (data[1].prompt, data[1].response) == ("A?", "B.")
    # the recipe's system prompt wins over the row's
    again = load_prompt_dataset(DatasetSpec(path=str(path), conversation_key="messages", answer_key=None,
                                            image_key=None, format_prompt=None, system_prompt="S"))
    assert again[0].messages[0] == {"role": "system", "content": "S"}


def test_raw_bytes_and_paths_relative_to_the_dataset_root(tmp_path):
    root = tmp_path / "snapshot"  # a Hub snapshot: data/*.parquet, images/ beside data/
    (root / "images").mkdir(parents=True)
    (root / "images" / "red.png").write_bytes(_png("red"))
    (root / "data").mkdir()
    (root / "data" / "blue.png").write_bytes(_png("blue"))
    pq.write_table(pa.Table.from_pylist([
        {"problem": "Q1", "answer": "red", "images": ["images/red.png"]},  # relative to the root
        {"problem": "Q2", "answer": "blue", "images": ["blue.png"]},  # relative to the file
        {"problem": "Q3", "answer": "green", "images": [_png("green").hex()]},  # neither: missing
    ]), root / "data" / "train-0.parquet")
    pq.write_table(pa.Table.from_pylist([  # raw bytes, one image (not a list)
        {"problem": "Q4", "answer": "white", "images": _png("white")},
    ]), root / "data" / "train-1.parquet")
    data = load_prompt_dataset(DatasetSpec(path=str(root), format_prompt=None))
    assert [data[i].answer for i in range(len(data))] == ["red", "blue", "white"]
    assert _colour(data[0].images[0]) == (255, 0, 0) and data[0].images[0] == str(root / "images" / "red.png")
    assert _colour(data[1].images[0]) == (0, 0, 255)
    assert _colour(data[2].images[0]) == (255, 255, 255) and isinstance(data[2].images[0], bytes)
    assert dict(data.skipped) == {"missing_image": 1}
    assert f"(looked in {root / 'data'} or {root})" in data.skipped_examples["missing_image"][0]


def test_max_rows_reads_the_first_rows_across_files(tmp_path):
    for k in range(2):
        pq.write_table(pa.Table.from_pylist([{"problem": f"Q{k}{i}", "answer": "1"} for i in range(3)]),
                       tmp_path / f"part-{k}.parquet")
    data = load_prompt_dataset(DatasetSpec(path=str(tmp_path), image_key=None, format_prompt=None, max_rows=4))
    assert [data[i].prompt for i in range(len(data))] == ["Q00", "Q01", "Q02", "Q10"]
    one = load_prompt_dataset(DatasetSpec(path=str(tmp_path / "part-1.parquet"), image_key=None,
                                          format_prompt=None, max_rows=2))
    assert [one[i].prompt for i in range(len(one))] == ["Q10", "Q11"]
    with pytest.raises(ValueError, match=r"mrl.data.max_rows=0 must be >= 1"):
        DatasetSpec(path="x", max_rows=0, option="mrl.data")


def test_a_hub_name_with_max_rows_is_streamed_with_images_left_encoded(monkeypatch):
    features = datasets.Features({"images": datasets.List(datasets.Image()), "problem": datasets.Value("string"),
                                  "answer": datasets.Value("string")})
    hub = datasets.Dataset.from_list(
        [{"images": [Image.new("RGB", (28, 28), "red")], "problem": f"<image>Q{i}", "answer": "r"} for i in range(5)],
        features=features,
    )
    asked = []

    def fake_load_dataset(name, split=None, streaming=False, **kw):
        asked.append((name, split, streaming))
        return hub.to_iterable_dataset() if streaming else hub

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    data = load_prompt_dataset(DatasetSpec(path="csfufu/mmrl@train", format_prompt=None, max_rows=2))
    assert asked == [("csfufu/mmrl", "train", True)]
    assert len(data) == 2 and isinstance(data[0].images[0], bytes) and _colour(data[0].images[0]) == (255, 0, 0)
    whole = load_prompt_dataset(DatasetSpec(path="csfufu/mmrl", format_prompt=None))
    assert asked[-1] == ("csfufu/mmrl", "train", False) and len(whole) == 5


def test_pil_images_as_a_stream_without_features_gives_them(monkeypatch):
    """A stream whose features are unknown yields the Image column decoded: PIL images."""
    class Stream:
        features = None

        def __iter__(self):
            yield {"images": [Image.new("RGB", (28, 28), "green")], "problem": "<image>Q", "answer": "g"}
            yield {"images": Image.new("RGB", (28, 28), "blue"), "problem": "<image>R", "answer": "b"}

    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: Stream())
    data = load_prompt_dataset(DatasetSpec(path="csfufu/mmrl@train", format_prompt=None, max_rows=2))
    assert len(data) == 2 and not data.skipped
    assert all(isinstance(data[i].images[0], Image.Image) for i in range(2))
    assert [_colour(data[i].images[0]) for i in range(2)] == [(0, 128, 0), (0, 0, 255)]


def test_a_renamed_column_is_named_with_the_option_to_set(tmp_path, released):
    table = pq.read_table(released["mmrl"]).rename_columns(["images", "question", "answer", "dataset"])
    pq.write_table(table, tmp_path / "renamed.parquet")
    with pytest.raises(ValueError) as e:
        load_prompt_dataset(DatasetSpec(path=str(tmp_path / "renamed.parquet"), option="mrl.data"))
    assert str(e.value) == (
        f"{tmp_path / 'renamed.parquet'} (renamed.parquet): no column 'problem' (mrl.data.prompt_key); its "
        "columns: ['answer', 'dataset', 'images', 'question']; set mrl.data.prompt_key=<one of them>"
    )
    with pytest.raises(ValueError, match=r"no column 'conversations' \(cold_start.data.conversation_key\)"):
        load_prompt_dataset(DatasetSpec(path=str(released["textrl"]), conversation_key="conversations",
                                        answer_key=None, option="cold_start.data"))
