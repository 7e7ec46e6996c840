"""The streaming safetensors reader / writer, staging of outputs, and size parsing."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from megatron_revisual.convert.cli import parse_size
from megatron_revisual.convert.safetensors_io import (
    INDEX_FILE,
    ConvertError,
    HFCheckpoint,
    StreamingSafetensorsWriter,
    TensorSpec,
    plan_shards,
)
from megatron_revisual.staged_dir import staged_output_dir


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(300, 256, generator=g),  # 307200 bytes
        "b.weight": torch.randn(128, 300, generator=g).to(torch.bfloat16),
        "c.bias": torch.randn(7, generator=g).to(torch.float16),
        "d.index": torch.arange(5, dtype=torch.int64),
        "e.scalar": torch.tensor(3.5),
        "f.weight": torch.randn(300, 256, generator=g),
    }


def _specs(tensors: dict[str, torch.Tensor]) -> list[TensorSpec]:
    return [TensorSpec(n, tuple(t.shape), t.dtype) for n, t in tensors.items()]


def test_writer_shards_read_back_bitwise_by_safetensors_and_our_reader(tmp_path):
    tensors = _tensors()
    max_bytes = StreamingSafetensorsWriter.HEADER_RESERVE + 350_000
    writer = StreamingSafetensorsWriter(tmp_path, _specs(tensors), max_shard_bytes=max_bytes)
    for name, t in tensors.items():
        writer.write(name, t)
    writer.close()

    # a (307200 B) alone; b+c+d+e (76800+14+40+4) together; f alone
    assert writer.files == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    assert index["metadata"]["total_size"] == sum(
        t.numel() * t.element_size() for t in tensors.values()
    )
    assert index["weight_map"]["a.weight"] == writer.files[0]
    assert index["weight_map"]["e.scalar"] == writer.files[1]
    assert index["weight_map"]["f.weight"] == writer.files[2]
    loaded = {}
    for f in writer.files:
        assert (tmp_path / f).stat().st_size <= max_bytes
        loaded.update(load_file(tmp_path / f))  # the reference reader accepts our files
    ours = HFCheckpoint(tmp_path)
    assert sorted(ours.names()) == sorted(tensors)
    for name, t in tensors.items():
        assert loaded[name].dtype == t.dtype and torch.equal(loaded[name], t)
        got = ours.get(name)
        assert got.dtype == t.dtype and got.shape == t.shape and torch.equal(got, t)


def test_writer_rejects_out_of_plan_tensors(tmp_path):
    tensors = _tensors()
    writer = StreamingSafetensorsWriter(tmp_path, _specs(tensors))
    with pytest.raises(ValueError, match="'b.weight' arrived where 'a.weight' was planned"):
        writer.write("b.weight", tensors["b.weight"])
    with pytest.raises(ValueError, match=r"torch.float32 \(300, 256\) was planned"):
        writer.write("a.weight", tensors["a.weight"][:10])
    writer.write("a.weight", tensors["a.weight"])
    with pytest.raises(ValueError, match="5 planned tensors were never written, first 'b.weight'"):
        writer.close()


def test_plan_shards_keeps_order_and_isolates_big_tensors():
    specs = [TensorSpec(str(i), (n,), torch.uint8) for i, n in enumerate([3, 3, 10, 2, 2, 2])]
    groups = [[s.name for s in shard] for shard in plan_shards(specs, 6)]
    assert groups == [["0", "1"], ["2"], ["3", "4", "5"]]
    assert plan_shards([], 6) == []


def test_reader_names_missing_tensor_and_truncated_file(tmp_path):
    save_file({"x": torch.ones(1000), "y": torch.zeros(10)}, tmp_path / "model.safetensors")
    ckpt = HFCheckpoint(tmp_path)
    with pytest.raises(ConvertError, match=r"model.safetensors: tensor 'z' is missing"):
        ckpt.get("z")
    size = (tmp_path / "model.safetensors").stat().st_size
    with open(tmp_path / "model.safetensors", "r+b") as f:
        f.truncate(size - 100)
    with pytest.raises(ConvertError) as e:
        HFCheckpoint(tmp_path)
    msg = str(e.value)
    assert "model.safetensors: truncated" in msg and f"{size - 100} bytes on disk" in msg
    assert f"describes {size}" in msg and "tensor 'y'" in msg


def test_reader_rejects_garbage_and_bad_index(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(
        b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!"
    )
    with pytest.raises(ConvertError, match="header is not valid JSON"):
        HFCheckpoint(tmp_path)
    other = tmp_path / "idx"
    other.mkdir()
    save_file({"x": torch.ones(2)}, other / "a.safetensors")
    (other / INDEX_FILE).write_text(
        json.dumps({"weight_map": {"x": "a.safetensors", "w": "a.safetensors"}})
    )
    with pytest.raises(
        ConvertError, match="maps tensor 'w' to a.safetensors, whose header does not hold it"
    ):
        HFCheckpoint(other)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConvertError, match="no model.safetensors or model.safetensors.index.json"):
        HFCheckpoint(empty)


def test_staged_output_dir_is_all_or_nothing(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="boom"), staged_output_dir(out, overwrite=False) as tmp:
        (tmp / "half.txt").write_text("x")
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []  # neither out nor a .partial left behind

    with staged_output_dir(out, overwrite=False) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".out.partial-")
        (tmp / "v1.txt").write_text("1")
    assert [p.name for p in out.iterdir()] == ["v1.txt"]

    with (
        pytest.raises(FileExistsError, match="pass --overwrite"),
        staged_output_dir(out, overwrite=False),
    ):
        pass
    with pytest.raises(RuntimeError), staged_output_dir(out, overwrite=True) as tmp:
        (tmp / "v2.txt").write_text("2")
        raise RuntimeError("fails half way")
    assert [p.name for p in out.iterdir()] == ["v1.txt"]  # the old output survives a failed rewrite
    with staged_output_dir(out, overwrite=True) as tmp:
        (tmp / "v2.txt").write_text("2")
    assert [p.name for p in out.iterdir()] == ["v2.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize(
    ("text", "value"),
    [("5GB", 5 * 10**9), ("500MB", 5 * 10**8), ("2GiB", 2 * 2**30), ("1.5kb", 1500), ("123", 123)],
)
def test_parse_size(text, value):
    assert parse_size(text) == value


def test_parse_size_rejects_nonsense():
    import argparse

    with pytest.raises(argparse.ArgumentTypeError, match="not a size"):
        parse_size("five gigs")
