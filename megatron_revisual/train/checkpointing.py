"""Training checkpoints of `revisual train`: written atomically, found again by `--resume auto`.

    <dir>/iter_0000012/                      a Megatron distributed checkpoint (torch_dist):
        metadata.json, *.distcp, common.pt       the policy (readable by `revisual convert
                                                 mcore-to-hf`), the optimizer state
                                                 (`optimizer.*`, Megatron's reshardable format)
                                                 and the LR schedule (common)
        revisual_model.json, hf_files/       its ModelConfig and tokenizer / processor files
        train_state/rank_00000.pt ...        per rank: RNG states
        trainer_state.json                   stage, step, data position, PAD tau, layout, ... (last)
    <dir>/latest_checkpointed_iteration.txt  Megatron-LM's tracker (updated after the rename)

The optimizer state goes through Megatron-Core's `optimizer.sharded_state_dict` in the
`fully_reshardable` format: every parameter's Adam moments and fp32 main copy are stored in the
parameter's own shape and sharding, so a run resumes its optimizer at another TP / PP / DP
layout (the RNG states are restored only at the saved layout: a different layout draws
differently anyway). Checkpoints written before (format 1: the optimizer shard inside each
rank's train_state file) still resume, at their own layout only.

Every rank writes into a hidden `.iter_0000012.partial-<pid>@<host>-*` directory; rank 0
renames it to `iter_0000012` only after all ranks finished, so a crash mid-save leaves no
directory that looks complete (`find_latest` also requires trainer_state.json inside). A save
that fails on any rank (a full disk: `OutputWriteError` "no space left on device while writing
.../iter_0000012") fails on every rank, and its staging directory is deleted at once.

With `checkpoint.async_save` the tensors are copied to host memory at the save and written by a
background thread while training goes on (`AsyncSaves`); the rename that makes the checkpoint
complete happens at the first step boundary after every rank's writes finished, and at the
latest before the next save, the stage's end or the run's exit.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from megatron_revisual.parallel.device import broadcast_object
from megatron_revisual.parallel.rng import set_rng_state
from megatron_revisual.staged_dir import write_file_atomic

__all__ = [
    "CHECKPOINT_FORMAT",
    "OPTIMIZER_METADATA",
    "TRAINER_STATE_FILE",
    "AsyncSaves",
    "checkpoint_root",
    "current_layout",
    "find_latest",
    "find_stage_end",
    "iteration_dir",
    "load_rank_state",
    "prune_checkpoints",
    "read_trainer_state",
    "remove_stale_writes",
    "restore_optimizer_state",
    "restore_training_state",
    "save_checkpoint",
    "stop_file_path",
    "training_state_dict",
]

TRAINER_STATE_FILE = "trainer_state.json"
TRACKER_FILE = "latest_checkpointed_iteration.txt"
# 1: optimizer shards in the per-rank train_state files (same layout only); 2: optimizer state and
# LR schedule in the dist checkpoint (reshardable)
CHECKPOINT_FORMAT = 2
# Megatron-Core's reshardable optimizer format: each parameter's state in the parameter's shape
# and sharding (gathered over DP at the save), no prefix per chained optimizer
OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "fully_reshardable", "chained_optim_avoid_prefix": True}
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


def restore_optimizer_state(optimizer: Any, state: list[dict[str, Any]], where: str) -> None:
    """Format 1 (the per-rank train_state file): for each (chained) Megatron optimizer the torch
    optimizer's state dict and the values of the parameters it steps, at the saved layout."""
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
                f"{where}: the saved optimizer shard does not match this rank's parameters. This "
                "checkpoint has the old per-rank optimizer format (written before checkpoint "
                "format 2), which resumes only at the parallel layout and model it was saved "
                "with: resume it at that layout, let it save once (every new checkpoint is "
                "reshardable), then change the layout"
            )
        inner.load_state_dict(saved["torch_optimizer"])
        with torch.no_grad():
            for p, v in zip(params, saved["main_params"], strict=True):
                p.copy_(v)


def _rank_file(ckpt: Path, rank: int) -> Path:
    return ckpt / "train_state" / f"rank_{rank:05d}.pt"


def load_rank_state(ckpt: Path) -> dict[str, Any]:
    path = _rank_file(ckpt, dist.get_rank())
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: the checkpoint was written by a run with fewer ranks; its old "
            "per-rank optimizer format (before checkpoint format 2) resumes only with the world "
            "size and parallel layout it was saved with"
        )
    return torch.load(path, map_location="cpu", weights_only=False)


def current_layout() -> dict[str, int]:
    """The parallel layout a checkpoint records (trainer_state.json "layout")."""
    from megatron.core import parallel_state as ps

    return {
        "world": dist.get_world_size(),
        "tp": ps.get_tensor_model_parallel_world_size(),
        "pp": ps.get_pipeline_model_parallel_world_size(),
        "cp": ps.get_context_parallel_world_size(),
        "dp": ps.get_data_parallel_world_size(),
    }


def training_state_dict(model: torch.nn.Module, optimizer: Any, scheduler: Any, *,
                        is_loading: bool = False) -> dict[str, Any]:
    """What the dist checkpoint holds: the model's sharded tensors under their own keys (what
    `revisual convert` and `load_model_checkpoint` read), the optimizer's under `optimizer.`
    (Megatron's reshardable format, mapped onto the model's sharding) and the LR schedule."""
    _prime_optimizer_state(optimizer)  # a stage saved before its first update has no state yet
    model_sd = model.sharded_state_dict()
    optim_sd = optimizer.sharded_state_dict(model_sd, is_loading=is_loading, metadata=dict(OPTIMIZER_METADATA))
    return {**model_sd, "optimizer": optim_sd, "scheduler": scheduler.state_dict()}


def restore_training_state(ckpt: Path, *, model: torch.nn.Module, optimizer: Any, scheduler: Any) -> str | None:
    """Collective: the optimizer, LR schedule and (at the saved layout) RNG states of `ckpt`
    into this run, whose model already holds the checkpoint's weights. Returns a line for the log
    when the layout changed (the optimizer was resharded, the RNG states were not restored)."""
    state = read_trainer_state(ckpt)
    if int(state.get("checkpoint_format", 1)) < 2:
        saved = load_rank_state(ckpt)
        restore_optimizer_state(optimizer, saved["optimizer"], str(ckpt))
        scheduler.load_state_dict(saved["scheduler"])
        set_rng_state(saved["rng"])
        return None
    from megatron.core import dist_checkpointing

    request = training_state_dict(model, optimizer, scheduler, is_loading=True)
    wanted = {"optimizer": request["optimizer"]}
    loaded = dist_checkpointing.load(wanted, str(ckpt))
    with _torch_adam_step_kept(optimizer):
        optimizer.load_state_dict(loaded["optimizer"])
    scheduler.load_state_dict(loaded["scheduler"])
    saved_layout, layout = state.get("layout"), current_layout()
    if saved_layout == layout:
        set_rng_state(load_rank_state(ckpt)["rng"])
        return None
    return (f"{ckpt.name} was saved at layout {saved_layout}, this run is {layout}: optimizer state "
            "resharded; RNG states start from this run's seed")


def _prime_optimizer_state(optimizer: Any) -> None:
    """Give an optimizer that has not stepped yet the state a fresh Adam would create at its first
    step: Megatron's `init_state_fn` (zero moments) and, for torch's own Adam (no Transformer
    Engine / Apex fused Adam), the per-parameter `step` 0 that the distributed optimizer's
    `state_dict` reads (it asserts one common step). Needed to save before the first update (a
    GRPO stage whose every step PAD skipped) and to load (which then overwrites all of it).
    Entries that exist are left as they are; the next step's arithmetic is unchanged."""
    for opt in _inner_optimizers(optimizer):
        init = getattr(opt, "init_state_fn", None)
        if init is not None:
            init(opt.optimizer, getattr(opt, "config", None))
        if isinstance(opt.optimizer, torch.optim.Adam | torch.optim.AdamW):
            for state in opt.optimizer.state.values():
                state.setdefault("step", torch.zeros((), dtype=torch.float32))


@contextlib.contextmanager
def _torch_adam_step_kept(optimizer: Any) -> Iterator[None]:
    """Two mends for Megatron-Core 0.19's distributed optimizer loading a reshardable state into
    torch's own Adam (no Transformer Engine / Apex fused Adam), where torch Adam keeps a `step`
    tensor per parameter and the checkpoint keeps one step in the param groups:
    - it copies every tensor of a parameter's state from the checkpoint, `step` included, which
      the checkpoint does not have per parameter (KeyError: 'step'): during the load a missing
      `step` is the state's own, already restored from the groups;
    - it gives every parameter the same `step` tensor object, which torch Adam then increments
      once per parameter at each step (the bias correction runs ahead: a resumed run drifts from
      its second step on): afterwards each parameter gets its own copy."""
    patched = []
    for opt in _inner_optimizers(optimizer):
        original = getattr(opt, "_set_main_param_and_optimizer_states", None)
        if original is None:
            continue

        def set_states(model_param: torch.Tensor, tensors: dict[str, Any], *, _opt=opt, _original=original) -> None:
            group, order = _opt.model_param_group_index_map[model_param]
            main = _opt.optimizer.param_groups[group]["params"][order]
            step = _opt.optimizer.state[main].get("step")
            if isinstance(step, torch.Tensor) and "step" not in tensors:
                tensors = {**tensors, "step": step}
            _original(model_param, tensors)

        opt._set_main_param_and_optimizer_states = set_states
        patched.append(opt)
    try:
        yield
    finally:
        for opt in patched:
            del opt._set_main_param_and_optimizer_states  # the class's method again
    for opt in _inner_optimizers(optimizer):
        for state in opt.optimizer.state.values():
            if isinstance(state.get("step"), torch.Tensor):
                state["step"] = state["step"].clone()


class AsyncSaves:
    """Checkpoint writes in flight (`checkpoint.async_save`), on Megatron-Core's async queue:
    each save's tensors are staged to host memory (a device-to-host copy on GPU; on the host, the
    forked writer's copy-on-write snapshot) and written by a forked process while training goes
    on. `poll` (collective) completes a save whose writes finished on every rank: Megatron's
    finalization (the checkpoint index), then ours (metadata, trainer_state.json, the rename, the
    tracker, pruning). A failed write fails on every rank at the poll and leaves no directory
    that looks complete."""

    def __init__(self) -> None:
        from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

        self._queue = AsyncCallsQueue(persistent=False)
        self._pending: list[tuple[Path, Path]] = []  # (staging, final) of saves in flight
        self.completed: list[Path] = []

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    def start(self, request: Any, staging: Path, final: Path) -> None:
        self._queue.schedule_async_request(request)
        self._pending.append((staging, final))

    def poll(self, *, blocking: bool = False) -> list[Path]:
        """Collective. Completes every save whose writes are done on all ranks (all of them when
        `blocking`); returns the checkpoints that became complete."""
        if not self._pending:
            return []
        try:
            done = self._queue.maybe_finalize_async_calls(blocking=blocking)
        except _save_failures() as e:
            staging, final = self._pending.pop(0)
            _raise_if_any_failed(e, staging, final)
            raise
        finished = [self._pending.pop(0)[1] for _ in done]
        self.completed += finished
        return finished

    def close(self) -> None:
        self.poll(blocking=True)


def checkpoint_root(cfg: Any) -> Path:
    """Where a run's checkpoints go: `checkpoint.dir`, else <output_dir>/checkpoints."""
    return Path(cfg.checkpoint.dir or Path(cfg.output_dir) / "checkpoints")


def stop_file_path(output_dir: str | Path) -> Path:
    """The file whose existence asks a run to checkpoint and stop (`REVISUAL_STOP_FILE` or
    <output_dir>/STOP); the stop signals' handlers write it."""
    return Path(os.environ.get("REVISUAL_STOP_FILE") or Path(output_dir) / "STOP")


def save_checkpoint(
    root: str | Path,
    iteration: int,
    *,
    state: dict[str, Any],
    model_cfg: Any,
    hf_side_dir: str | Path | None,
    rank_state: dict[str, Any],
    trainer_state: dict[str, Any],
    keep_last: int | None = None,
    async_saves: AsyncSaves | None = None,
) -> Path:
    """Collective over the world: write checkpoint `iteration` and return its directory.

    `state`: the sharded state dict to save (`training_state_dict`: model, optimizer, LR
    schedule); `rank_state`: what this rank alone needs back (RNG states); `trainer_state`:
    JSON-able, the same on every rank (rank 0 writes it). With `async_saves` the tensors are
    written in the background and the directory becomes complete at a later `async_saves.poll`."""
    from megatron.core import dist_checkpointing

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
    staging = Path(broadcast_object(staging))
    error: BaseException | None = None
    request = None
    try:
        request = dist_checkpointing.save(
            state, str(staging), sharded_strategy=_save_strategy(), async_sharded_save=async_saves is not None,
            async_strategy="mcore", content_metadata={"revisual_checkpoint_format": CHECKPOINT_FORMAT},
        )
        write_file_atomic(_rank_file(staging, dist.get_rank()), _bytes_of(rank_state))
    except _save_failures() as e:
        error = e
    _raise_if_any_failed(error, staging, final)

    def complete() -> None:
        _complete_save(root, iteration, staging, final, model_cfg=model_cfg, hf_side_dir=hf_side_dir,
                       trainer_state=trainer_state, keep_last=keep_last)

    if request is None:
        complete()
    else:
        request.add_finalize_fn(complete)
        async_saves.start(request, staging, final)
    return final


def _save_strategy() -> Any:
    """torch_dist, with the writes of DP-replicated tensors spread over the DP ranks (fully
    parallel save) when there is more than one."""
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy
    from megatron.core.dist_checkpointing.strategies.fully_parallel import (
        FullyParallelSaveStrategyWrapper,
    )

    strategy = get_default_save_sharded_strategy()
    if ps.model_parallel_is_initialized() and ps.get_data_parallel_world_size(with_context_parallel=True) > 1:
        strategy = FullyParallelSaveStrategyWrapper(strategy, ps.get_data_parallel_group(with_context_parallel=True))
    return strategy


def _complete_save(root: Path, iteration: int, staging: Path, final: Path, *, model_cfg: Any,
                   hf_side_dir: str | Path | None, trainer_state: dict[str, Any], keep_last: int | None) -> None:
    """Collective, after every rank's tensors are written: rank 0 adds the model metadata and
    trainer_state.json (last), renames the staging directory and updates the tracker."""
    from megatron_revisual.convert.dist_ckpt import write_checkpoint_metadata

    error: BaseException | None = None
    if dist.get_rank() == 0:
        try:
            write_checkpoint_metadata(staging, model_cfg, hf_dir=hf_side_dir)
            write_file_atomic(
                staging / TRAINER_STATE_FILE,
                (json.dumps(trainer_state, indent=2, sort_keys=True) + "\n").encode(),
            )
            staging.chmod(0o755)
            staging.rename(final)
        except _save_failures() as e:
            error = e
    _raise_if_any_failed(error, staging, final)
    if dist.get_rank() == 0:
        write_file_atomic(root / TRACKER_FILE, f"{iteration}\n".encode())
        if keep_last is not None:
            prune_checkpoints(root, keep_last)
    dist.barrier()


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
