"""Training checkpoints of `revisual train`: written atomically, found again by `--resume auto`.

    <dir>/iter_0000012/                      a Megatron distributed checkpoint (torch_dist) of the
        metadata.json, *.distcp              policy, readable by `revisual convert mcore-to-hf`
        revisual_model.json, hf_files/       its ModelConfig and tokenizer / processor files
        train_state/rank_00000.pt ...        per rank: optimizer shard, LR schedule, RNG states
        trainer_state.json                   stage, step, data position, PAD tau, ... (last file)
    <dir>/latest_checkpointed_iteration.txt  Megatron-LM's tracker (updated after the rename)

Every rank writes into a hidden `.iter_0000012.partial-<pid>@<host>-*` directory; rank 0
renames it to `iter_0000012` only after all ranks finished, so a crash mid-save leaves no
directory that looks complete (`find_latest` also requires trainer_state.json inside). A save
that fails on any rank (a full disk: `OutputWriteError` "no space left on device while writing
.../iter_0000012") fails on every rank, and its staging directory is deleted at once. The
optimizer state is saved per rank and needs the same parallel layout on resume (that is what an
exact resume means); the model weights are a dist checkpoint and load into any layout.
"""

from __future__ import annotations

import errno
import json
import os
import random
import re
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

__all__ = [
    "TRAINER_STATE_FILE",
    "find_latest",
    "find_stage_end",
    "iteration_dir",
    "load_rank_state",
    "optimizer_state",
    "prune_checkpoints",
    "read_trainer_state",
    "remove_stale_writes",
    "restore_optimizer_state",
    "rng_state",
    "save_checkpoint",
    "set_rng_state",
]

TRAINER_STATE_FILE = "trainer_state.json"
TRACKER_FILE = "latest_checkpointed_iteration.txt"
_ITER = re.compile(r"^iter_(\d{7})$")


def iteration_dir(root: str | Path, iteration: int) -> Path:
    return Path(root) / f"iter_{iteration:07d}"


def _complete(path: Path) -> bool:
    return _ITER.match(path.name) is not None and (path / TRAINER_STATE_FILE).is_file()


def _complete_dirs(root: str | Path) -> list[Path]:
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if _complete(p)), key=lambda p: p.name)


def find_latest(root: str | Path) -> Path | None:
    """The newest complete checkpoint under `root`, or None."""
    done = _complete_dirs(root)
    return done[-1] if done else None


def read_trainer_state(ckpt: Path) -> dict[str, Any]:
    return json.loads((ckpt / TRAINER_STATE_FILE).read_text())


def find_stage_end(root: str | Path, stage: str) -> Path | None:
    """The checkpoint written at the end of `stage`, or None."""
    for ckpt in reversed(_complete_dirs(root)):
        if read_trainer_state(ckpt).get("stage_end") == stage:
            return ckpt
    return None


_STAGING_OWNER = re.compile(r"\.partial-(\d+)@(.+)-[^-]+$")


def _staging_prefix(final: Path) -> str:
    return f".{final.name}.partial-{os.getpid()}@{socket.gethostname()}-"


def _written_by_live_process(path: Path) -> bool:
    """A staging directory whose writer (pid@host in its name) still runs on this host."""
    from megatron_revisual.train.run_lock import process_alive

    match = _STAGING_OWNER.search(path.name)
    if match is None or match.group(2) != socket.gethostname():
        return False
    pid = int(match.group(1))
    return pid != os.getpid() and process_alive(pid)


def remove_stale_writes(root: str | Path) -> list[Path]:
    """Delete what a killed save left behind: hidden `.iter_*` staging / deleting directories and
    temporary tracker files, except a staging directory whose writer still runs on this host.
    Only the run's rank 0 calls this, before it writes anything."""
    removed = []
    for path in Path(root).iterdir():
        stale = path.name.startswith((".iter_", f".{TRACKER_FILE}."))
        if stale and not _written_by_live_process(path):
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def prune_checkpoints(root: str | Path, keep_last: int) -> list[Path]:
    """Delete all but the `keep_last` newest complete checkpoints; stage-end checkpoints stay
    (the next stage and its reference model start from them). Returns what was deleted."""
    done = _complete_dirs(root)
    removable = [p for p in done[:-keep_last] if not read_trainer_state(p).get("stage_end")]
    for path in removable:
        # rename first: a crash mid-delete must not leave a half-deleted "complete" checkpoint
        doomed = path.with_name(f".{path.name}.deleting")
        path.rename(doomed)
        shutil.rmtree(doomed, ignore_errors=True)
    return removable


# --- what each rank saves ----------------------------------------------------------------------
def _inner_optimizers(optimizer: Any) -> list[Any]:
    """Megatron's optimizer(s) down to the torch optimizers holding the state."""
    chained = getattr(optimizer, "chained_optimizers", None)
    return list(chained) if chained is not None else [optimizer]


def optimizer_state(optimizer: Any) -> list[dict[str, Any]]:
    """This rank's optimizer state: for each (chained) Megatron optimizer the torch optimizer's
    state dict (Adam moments of this rank's shard) and the values of the parameters it steps
    (fp32 main copies under mixed precision, views of the model's parameters otherwise)."""
    out = []
    for opt in _inner_optimizers(optimizer):
        inner = opt.optimizer
        out.append({
            "torch_optimizer": inner.state_dict(),
            "main_params": [p.detach().clone() for g in inner.param_groups for p in g["params"]],
        })
    return out


def restore_optimizer_state(optimizer: Any, state: list[dict[str, Any]], where: str) -> None:
    opts = _inner_optimizers(optimizer)
    if len(opts) != len(state):
        raise ValueError(f"{where}: {len(state)} optimizer states saved, this run has {len(opts)}")
    for opt, saved in zip(opts, state, strict=True):
        inner = opt.optimizer
        params = [p for g in inner.param_groups for p in g["params"]]
        if len(params) != len(saved["main_params"]) or any(
            p.shape != v.shape for p, v in zip(params, saved["main_params"], strict=True)
        ):
            raise ValueError(
                f"{where}: the saved optimizer shard does not match this rank's parameters; an "
                "exact resume needs the same parallel layout and model as the saved run"
            )
        inner.load_state_dict(saved["torch_optimizer"])
        with torch.no_grad():
            for p, v in zip(params, saved["main_params"], strict=True):
                p.copy_(v)


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        from megatron.core import tensor_parallel

        state["cuda"] = torch.cuda.get_rng_state()
        state["cuda_tracker"] = tensor_parallel.get_cuda_rng_tracker().get_states()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        from megatron.core import tensor_parallel

        torch.cuda.set_rng_state(state["cuda"])
        tensor_parallel.get_cuda_rng_tracker().set_states(state["cuda_tracker"])


def _rank_file(ckpt: Path, rank: int) -> Path:
    return ckpt / "train_state" / f"rank_{rank:05d}.pt"


def load_rank_state(ckpt: Path) -> dict[str, Any]:
    path = _rank_file(ckpt, dist.get_rank())
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: the checkpoint was written by a run with fewer ranks; an exact "
            "resume needs the same world size and parallel layout"
        )
    return torch.load(path, map_location="cpu", weights_only=False)


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _broadcast_object(obj: Any) -> Any:
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def save_checkpoint(
    root: str | Path,
    iteration: int,
    *,
    model: torch.nn.Module,
    model_cfg: Any,
    hf_side_dir: str | Path | None,
    rank_state: dict[str, Any],
    trainer_state: dict[str, Any],
    keep_last: int | None = None,
) -> Path:
    """Collective over the world: write checkpoint `iteration` and return its directory.

    `model`: this rank's unwrapped model (its `sharded_state_dict` is saved); `rank_state`:
    what this rank alone needs back (optimizer shard, scheduler, RNG); `trainer_state`:
    JSON-able, the same on every rank (rank 0 writes it)."""
    from megatron.core import dist_checkpointing

    from megatron_revisual.convert.dist_ckpt import write_checkpoint_metadata

    root = Path(root)
    final = iteration_dir(root, iteration)
    staging = None
    if dist.get_rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        remove_stale_writes(root)
        if final.exists():  # an earlier attempt at this iteration, now superseded
            old = final.with_name(f".{final.name}.replaced")
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
            shutil.rmtree(old, ignore_errors=True)
        staging = str(tempfile.mkdtemp(prefix=_staging_prefix(final), dir=root))
    staging = Path(_broadcast_object(staging))
    error: BaseException | None = None
    try:
        dist_checkpointing.save(model.sharded_state_dict(), str(staging))
        _atomic_write_bytes(_rank_file(staging, dist.get_rank()), _bytes_of(rank_state))
    except _save_failures() as e:
        error = e
    _raise_if_any_failed(error, staging, final)
    if dist.get_rank() == 0:
        try:
            write_checkpoint_metadata(staging, model_cfg, hf_dir=hf_side_dir)
            _atomic_write_bytes(
                staging / TRAINER_STATE_FILE,
                (json.dumps(trainer_state, indent=2, sort_keys=True) + "\n").encode(),
            )
            staging.chmod(0o755)
            staging.rename(final)
        except _save_failures() as e:
            error = e
    _raise_if_any_failed(error, staging, final)
    if dist.get_rank() == 0:
        _atomic_write_bytes(root / TRACKER_FILE, f"{iteration}\n".encode())
        if keep_last is not None:
            prune_checkpoints(root, keep_last)
    dist.barrier()
    return final


def _save_failures() -> tuple[type[BaseException], ...]:
    # CheckpointException (a rank's write failed inside dist_checkpointing) is a BaseException
    from torch.distributed.checkpoint import CheckpointException

    return (Exception, CheckpointException)


def _raise_if_any_failed(error: BaseException | None, staging: Path, final: Path) -> None:
    """Collective: if any rank's part of the save failed, the staging directory is deleted and
    every rank raises: `OutputWriteError` for a failed write ("no space left on device while
    writing <final>"), this rank's own exception otherwise, or a RuntimeError naming the rank
    that failed."""
    from megatron_revisual.staged_dir import OutputWriteError, output_write_error

    named = output_write_error(error, final) if error is not None else None
    summary = None if error is None else str(named) if named else f"{type(error).__name__}: {error}"
    summaries = [None] * dist.get_world_size()
    dist.all_gather_object(summaries, summary)
    failed = [(rank, text) for rank, text in enumerate(summaries) if text is not None]
    if not failed:
        return
    if dist.get_rank() == 0:
        shutil.rmtree(staging, ignore_errors=True)
    dist.barrier()
    if named is not None:
        raise named from error
    if error is not None:
        raise error
    rank, text = failed[0]
    if text.startswith("no space left on device"):
        raise OutputWriteError(errno.ENOSPC, text)
    raise RuntimeError(f"checkpoint {final.name}: rank {rank} failed to write its part: {text}")


def _bytes_of(obj: Any) -> bytes:
    import io

    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()
