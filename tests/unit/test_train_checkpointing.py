"""Pieces of the runner's checkpointing and logging that need no process group."""

from __future__ import annotations

import json

import torch
from safetensors.torch import save_file

from megatron_revisual.train.checkpointing import (
    find_latest,
    find_stage_end,
    prune_checkpoints,
    remove_stale_writes,
)
from megatron_revisual.train.metrics_log import format_eta, truncate_jsonl
from megatron_revisual.train.schedule import grads_are_finite
from megatron_revisual.train.stage_common import step_seed
from megatron_revisual.train.stages import weights_digest


def _ckpt(root, it: int, **state) -> None:
    d = root / f"iter_{it:07d}"
    d.mkdir(parents=True)
    (d / "trainer_state.json").write_text(json.dumps({"stage_end": None, **state}))


def test_partial_and_unfinished_directories_are_never_latest(tmp_path):
    _ckpt(tmp_path, 4)
    (tmp_path / ".iter_0000006.partial-abc").mkdir()  # a save that crashed before the rename
    (tmp_path / ".iter_0000006.partial-abc" / "trainer_state.json").write_text("{}")
    (tmp_path / "iter_0000008").mkdir()  # no trainer_state.json: not complete
    assert find_latest(tmp_path).name == "iter_0000004"
    assert find_latest(tmp_path / "missing") is None


def test_prune_keeps_the_newest_and_every_stage_end(tmp_path):
    for it in (2, 4, 6, 8, 10):
        _ckpt(tmp_path, it, stage_end="cold_start" if it == 4 else None)
    removed = prune_checkpoints(tmp_path, keep_last=2)
    assert sorted(p.name for p in removed) == ["iter_0000002", "iter_0000006"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iter_0000004", "iter_0000008", "iter_0000010"]
    assert find_stage_end(tmp_path, "cold_start").name == "iter_0000004"
    assert find_stage_end(tmp_path, "mrl") is None


def test_truncate_jsonl_drops_rows_past_the_checkpoint_and_cut_lines(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [{"global_step": s, "loss": s / 10} for s in (1, 2, 3, 4)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"global_step": 5, "lo')
    assert truncate_jsonl(path, 2) == 3
    assert [json.loads(x)["global_step"] for x in path.read_text().splitlines()] == [1, 2]


def test_weights_digest_ignores_the_shard_layout_but_not_a_single_bit(tmp_path):
    a = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(3)}
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    save_file(a, str(tmp_path / "one" / "model.safetensors"))
    save_file({"b": a["b"]}, str(tmp_path / "two" / "model-00001-of-00002.safetensors"))
    save_file({"w": a["w"]}, str(tmp_path / "two" / "model-00002-of-00002.safetensors"))
    assert weights_digest(tmp_path / "one") == weights_digest(tmp_path / "two")
    b = dict(a, w=a["w"].clone())
    b["w"].view(torch.int32)[0, 0] ^= 1  # flip the lowest mantissa bit of one value
    (tmp_path / "three").mkdir()
    save_file(b, str(tmp_path / "three" / "model.safetensors"))
    assert weights_digest(tmp_path / "three") != weights_digest(tmp_path / "one")


def test_grads_are_finite_sees_one_bad_value():
    layer = torch.nn.Linear(3, 2)
    layer(torch.ones(1, 3)).sum().backward()
    assert grads_are_finite(layer)
    layer.bias.grad[1] = float("nan")
    assert not grads_are_finite(layer)
    layer.bias.grad[1] = 0.0
    layer.weight.main_grad = torch.full((2, 3), float("inf"))  # Megatron DDP's buffer wins over .grad
    assert not grads_are_finite(layer)


def test_step_seed_depends_on_run_seed_step_and_salt_only():
    assert step_seed(1, 5) == step_seed(1, 5)
    assert len({step_seed(1, 5), step_seed(2, 5), step_seed(1, 6), step_seed(1, 5, salt=1)}) == 4
    assert 0 <= step_seed(123, 10**9) < 2**31


def test_format_eta():
    assert (format_eta(59.6), format_eta(3725), format_eta(float("nan"))) == ("1m00s", "1h02m05s", "?")


def test_stale_writes_of_a_killed_save_are_removed(tmp_path):
    _ckpt(tmp_path, 2)
    (tmp_path / ".iter_0000004.partial-x1").mkdir()
    (tmp_path / ".iter_0000004.partial-x1" / "common.pt").write_bytes(b"half")
    (tmp_path / ".latest_checkpointed_iteration.txt.0utjyko0").write_text("4")
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("2\n")
    removed = remove_stale_writes(tmp_path)
    assert sorted(p.name for p in removed) == [".iter_0000004.partial-x1",
                                               ".latest_checkpointed_iteration.txt.0utjyko0"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iter_0000002", "latest_checkpointed_iteration.txt"]


def test_a_finished_run_is_not_run_again_unless_resume_none(tmp_path, capsys):
    from megatron_revisual.train.runner import DONE_FILE, _already_done

    assert not _already_done(tmp_path, "auto")
    (tmp_path / DONE_FILE).write_text("{}")
    assert _already_done(tmp_path, "auto")
    assert f"{tmp_path / DONE_FILE} exists; the run is complete" in capsys.readouterr().err
    assert _already_done(tmp_path, str(tmp_path / "iter_0000002"), say=False)
    assert capsys.readouterr().err == ""
    assert not _already_done(tmp_path, "none")  # --resume none: a fresh run over it
