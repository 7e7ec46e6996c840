"""A training checkpoint on a full disk: a named error with the path, the staging directory
removed at once, the previous checkpoint untouched.

The disk is a 1 MiB tmpfs where this process may mount one (root). Elsewhere the test
simulates the full disk at the lowest write we own: the per-rank state file
(`checkpointing.write_file_atomic` raises OSError(ENOSPC)), after Megatron's own files were
written.
"""

from __future__ import annotations

import errno
import json

import pytest
import torch

from megatron_revisual.config.schema import ModelConfig
from megatron_revisual.convert.dist_io import launch
from megatron_revisual.staged_dir import OutputWriteError
from megatron_revisual.testing.disk import small_tmpfs
from megatron_revisual.train import checkpointing
from megatron_revisual.train.checkpointing import find_latest, save_checkpoint

MODEL_CFG = ModelConfig(num_layers=1, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                        ffn_hidden_size=96, vocab_size=100, params_dtype="fp32")


class _Weights(torch.nn.Module):
    def __init__(self, numel: int) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.arange(numel, dtype=torch.float32))

    def sharded_state_dict(self) -> dict:
        from megatron.core.dist_checkpointing.mapping import ShardedTensor

        return {"w": ShardedTensor.from_rank_offsets("w", self.w.data)}


def _save(root, iteration: int, numel: int) -> None:
    save_checkpoint(root, iteration, state=_Weights(numel).sharded_state_dict(), model_cfg=MODEL_CFG, hf_side_dir=None,
                    rank_state={"rng": iteration}, trainer_state={"global_step": iteration})


def _save_then_fill_disk(root) -> str:
    _save(root, 1, 16)
    with pytest.raises(OutputWriteError) as e:
        _save(root, 2, 2**20)  # 4 MiB: more than the disk holds
    return str(e.value)


def test_a_checkpoint_on_a_full_disk_fails_named_and_leaves_nothing_half_written(tmp_path, monkeypatch):
    with small_tmpfs(tmp_path / "disk", size_bytes=2**20) as mounted:
        root = tmp_path / "disk" / "checkpoints"
        if not mounted:
            real = checkpointing.write_file_atomic

            def no_space(path, data):
                if ".iter_0000002.partial-" in str(path):
                    raise OSError(errno.ENOSPC, "No space left on device", str(path))
                real(path, data)

            monkeypatch.setattr(checkpointing, "write_file_atomic", no_space)
        (message,) = launch(_save_then_fill_disk, tp=1, pp=1, args=(root,))
        assert message == f"no space left on device while writing {root / 'iter_0000002'}"
        assert sorted(p.name for p in root.iterdir()) == ["iter_0000001", "latest_checkpointed_iteration.txt"]
        assert find_latest(root).name == "iter_0000001"
        assert json.loads((root / "iter_0000001" / "trainer_state.json").read_text()) == {"global_step": 1}
        assert (root / "latest_checkpointed_iteration.txt").read_text() == "1\n"


def test_the_cli_shows_a_rank_s_full_disk_as_the_named_error():
    from megatron_revisual.cli import _named_error
    from megatron_revisual.parallel.harness import RankError

    message = "no space left on device while writing /runs/x/checkpoints/iter_0000002"
    remote = ("Traceback (most recent call last):\n  ...\n"
              f"megatron_revisual.staged_dir.OutputWriteError: {message}\n")
    assert str(_named_error(RankError(1, 2, remote))) == message
    assert _named_error(RankError(1, 2, "Traceback ...\nZeroDivisionError: division by zero\n")) is None
    assert str(_named_error(OutputWriteError(errno.ENOSPC, message))) == message
