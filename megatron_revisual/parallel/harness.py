"""Process groups for Megatron-Core, and a launcher that runs a function on N local ranks.

Inside a launched process (torchrun, sbatch + srun, or a rank spawned by `run_distributed`):

    layout = initialize_parallel(tp=2, pp=2)   # gloo + CPU redirects without a GPU, nccl with
    ...                                        # megatron.core.parallel_state is ready
    destroy_parallel()

From a test or a script, on CPU (the function must be importable, i.e. defined at module level):

    losses = run_distributed(train_step, world_size=4, tp=2, pp=2, args=(batch,))
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import os
import pickle
import queue
import signal
import socket
import sys
import time
import traceback
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megatron_revisual.parallel.cpu_compat import install_cpu_compat, uninstall_cpu_compat

# Whether initialize_parallel installed the CPU redirects in this process (destroy_parallel
# removes them again).
_compat_installed_here = False


@dataclasses.dataclass(frozen=True, kw_only=True)
class ParallelLayout:
    """How `world_size` ranks split into tensor (tp), pipeline (pp), context (cp) and data (dp)
    parallel groups."""

    tp: int = 1
    pp: int = 1
    cp: int = 1
    dp: int = 1
    world_size: int = 1
    vpp: int | None = None

    def __post_init__(self) -> None:
        for name in ("tp", "pp", "cp", "dp", "world_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive integer")
        if self.tp * self.pp * self.cp * self.dp != self.world_size:
            raise ValueError(
                f"tp*pp*cp*dp = {self.tp}*{self.pp}*{self.cp}*{self.dp} = "
                f"{self.tp * self.pp * self.cp * self.dp} != world_size={self.world_size}"
            )
        if self.vpp is not None:
            if not isinstance(self.vpp, int) or self.vpp < 2:
                raise ValueError(f"vpp={self.vpp!r} must be an integer >= 2, or None")
            if self.pp < 2:
                raise ValueError(f"vpp={self.vpp} needs pipeline parallelism; got pp={self.pp}")

    @classmethod
    def for_world(
        cls, world_size: int, *, tp: int = 1, pp: int = 1, cp: int = 1, vpp: int | None = None
    ) -> ParallelLayout:
        """The layout with data parallelism filling the ranks left over by tp*pp*cp."""
        for name, value in (("world_size", world_size), ("tp", tp), ("pp", pp), ("cp", cp)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive integer")
        model_parallel = tp * pp * cp
        if world_size % model_parallel:
            raise ValueError(
                f"world_size={world_size} is not divisible by tp*pp*cp = {tp}*{pp}*{cp} = "
                f"{model_parallel}; use a multiple of {model_parallel} ranks or change tp/pp/cp"
            )
        return cls(
            tp=tp, pp=pp, cp=cp, dp=world_size // model_parallel, world_size=world_size, vpp=vpp
        )


def initialize_parallel(
    *,
    tp: int = 1,
    pp: int = 1,
    cp: int = 1,
    vpp: int | None = None,
    seed: int = 1234,
    backend: str | None = None,
    timeout_s: float = 600.0,
) -> ParallelLayout:
    """Start torch.distributed from the launcher's environment (RANK, WORLD_SIZE, MASTER_ADDR,
    MASTER_PORT) and Megatron-Core's parallel state on top; seeds Megatron's RNG tracker.
    Without a GPU it installs the CPU redirects (`cpu_compat`), which `destroy_parallel` removes."""
    global _compat_installed_here
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    layout = ParallelLayout.for_world(world_size, tp=tp, pp=pp, cp=cp, vpp=vpp)
    from megatron.core import parallel_state, tensor_parallel

    reap_worker_group_on_exit(os.environ)
    on_gpu = torch.cuda.is_available()
    if on_gpu:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    else:
        _compat_installed_here = install_cpu_compat() or _compat_installed_here
    backend = backend or ("nccl" if on_gpu else "gloo")
    if not dist.is_initialized():
        dist.init_process_group(
            backend=backend,
            rank=int(os.environ.get("RANK", "0")),
            world_size=world_size,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp,
        context_parallel_size=cp,
        distributed_timeout_minutes=max(1, math.ceil(timeout_s / 60)),
    )
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    return layout


def destroy_parallel() -> None:
    """Tear down Megatron's parallel state and the default process group."""
    from megatron.core import parallel_state

    global _compat_installed_here
    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
    if _compat_installed_here:  # the CPU redirects leave with the ranks that needed them
        uninstall_cpu_compat()
        _compat_installed_here = False


class RankError(RuntimeError):
    """A rank of `run_distributed` raised; carries that rank's traceback."""

    def __init__(self, rank: int, world_size: int, remote_traceback: str) -> None:
        super().__init__(f"rank {rank} of {world_size} failed:\n{remote_traceback}")
        self.rank = rank
        self.remote_traceback = remote_traceback

    def named_error(self, *classes: type[Exception]) -> Exception | None:
        """The rank's error rebuilt as the first of `classes` it raised (an error whose message
        already names the file, tensor or path: shown without the traceback), else None."""
        for cls in classes:
            marker = f"{cls.__name__}: "
            if marker in self.remote_traceback:
                message = self.remote_traceback.rsplit(marker, 1)[1].strip()
                if issubclass(cls, OSError):
                    return cls(None, message)
                return cls(message)
        return None


def _free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when its parent dies (PR_SET_PDEATHSIG), so that a
    killed launcher never leaves ranks or engines running on as orphans. No-op elsewhere."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_pdeathsig = 1
    libc.prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)
    if os.getppid() == 1:  # the parent died before the call: nobody would signal us
        os._exit(1)


# Waits (blocked on a real-time signal, which nothing else sends) for its parent's death, then
# SIGKILLs the parent's process group, itself included.
_GROUP_REAPER = """
import ctypes, os, signal, sys
parent, group, sig = int(sys.argv[1]), int(sys.argv[2]), signal.SIGRTMIN + 3
signal.pthread_sigmask(signal.SIG_BLOCK, {sig, signal.SIGINT})
ctypes.CDLL(None).prctl(1, int(sig), 0, 0, 0)  # PR_SET_PDEATHSIG
while os.getppid() == parent:
    signal.sigtimedwait({sig}, 60)
os.killpg(group, signal.SIGKILL)
"""
_reaper: Any = None


def reap_worker_group_on_exit(environ: Mapping[str, str]) -> None:
    """`reap_process_group_on_exit` for a launcher's worker whose process group is its own.
    torchrun starts each worker in a session of its own, so there the group is the rank and what
    it started. A Slurm step, in contrast, puts all its tasks in one process group, the first
    task's: reaping that group would SIGKILL the other ranks whenever rank 0 exits first. There
    slurmstepd ends the step's leftover processes itself when the step ends."""
    if "TORCHELASTIC_RUN_ID" in environ:
        reap_process_group_on_exit()


def reap_process_group_on_exit() -> None:
    """When this process leads a process group of its own, make sure nothing it started outlives
    it, however it ends (SIGKILL included): a small watcher process SIGKILLs the group once this
    process is gone. Megatron-Core's dist_checkpointing starts a Manager process (its async
    writer's result queue) and forks writers, none of which would otherwise notice the rank's
    death. No-op where this process does not lead its group (its group is not its alone) or
    outside Linux; idempotent."""
    global _reaper
    if _reaper is not None or not sys.platform.startswith("linux"):
        return
    if os.getpgid(0) != os.getpid():
        return
    import subprocess

    _reaper = subprocess.Popen(
        [sys.executable, "-S", "-c", _GROUP_REAPER, str(os.getpid()), str(os.getpgid(0))],
        stdin=subprocess.DEVNULL, close_fds=True,
    )


def _rank_main(
    rank: int,
    port: int,
    layout: ParallelLayout,
    seed: int,
    threads: int,
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    results: Any,
    stdio_path: str | None,
) -> None:
    from megatron_revisual.logfiles import ignore_known_warnings, redirect_stdio

    # before initialize_parallel: Megatron-Core warns and logs as it is imported
    if stdio_path is not None:
        redirect_stdio(stdio_path.format(rank=rank))
    ignore_known_warnings(on_gpu=torch.cuda.is_available())
    # Own process group, so that killing this rank also kills what it started (e.g. the Manager
    # process of dist_checkpointing) instead of orphaning it.
    os.setpgid(0, 0)
    die_with_parent()
    reap_process_group_on_exit()
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(layout.world_size),
    )
    # torch is already imported when this runs, so OMP_NUM_THREADS would come too late.
    torch.set_num_threads(threads)
    try:
        initialize_parallel(tp=layout.tp, pp=layout.pp, cp=layout.cp, vpp=layout.vpp, seed=seed)
        # Pickled here so that an unpicklable result fails in the rank, with its traceback.
        results.put((rank, True, pickle.dumps(fn(*args, **kwargs))))
    except BaseException:
        results.put((rank, False, traceback.format_exc()))
        return
    destroy_parallel()


def run_distributed(
    fn: Callable[..., Any],
    *,
    world_size: int,
    tp: int = 1,
    pp: int = 1,
    cp: int = 1,
    vpp: int | None = None,
    seed: int = 1234,
    args: tuple[Any, ...] = (),
    kwargs: dict[str, Any] | None = None,
    timeout_s: float = 300.0,
    threads_per_rank: int = 1,
    stdio_path: str | None = None,
) -> list[Any]:
    """Run `fn(*args, **kwargs)` on `world_size` freshly spawned local ranks, each initialized
    with `initialize_parallel`, and return the per-rank results in rank order.

    With `stdio_path` (a format string with `{rank}`) each rank's stdout and stderr go to its
    own file (`logfiles.redirect_stdio`); `logfiles.console()` is still the terminal.

    The first rank to raise aborts the run with a `RankError` holding its traceback; a rank that
    dies silently or a run longer than `timeout_s` raises too, and every rank is killed.
    """
    layout = ParallelLayout.for_world(world_size, tp=tp, pp=pp, cp=cp, vpp=vpp)
    context = mp.get_context("spawn")
    results = context.Queue()
    port = _free_loopback_port()
    processes = [
        context.Process(
            target=_rank_main,
            args=(rank, port, layout, seed, threads_per_rank, fn, args, kwargs or {}, results,
                  stdio_path),
            name=f"rank{rank}",
            # Not daemonic: ranks start children (dist_checkpointing's Manager, data workers).
            daemon=False,
        )
        for rank in range(world_size)
    ]
    for process in processes:
        process.start()
    outputs: dict[int, Any] = {}
    deadline = time.monotonic() + timeout_s
    try:
        while len(outputs) < world_size:
            try:
                rank, ok, payload = results.get(timeout=0.2)
            except queue.Empty:
                _check_alive(processes, outputs, results, world_size)
                if time.monotonic() > deadline:
                    missing = sorted(set(range(world_size)) - set(outputs))
                    raise TimeoutError(
                        f"run_distributed({getattr(fn, '__name__', fn)}): ranks {missing} of "
                        f"{world_size} did not finish within timeout_s={timeout_s}"
                    ) from None
                continue
            if not ok:
                raise RankError(rank, world_size, payload)
            outputs[rank] = pickle.loads(payload)
        for process in processes:
            # Results are in; a rank stuck in teardown is killed below rather than waited for.
            process.join(timeout=min(30.0, max(1.0, deadline - time.monotonic())))
    finally:
        for process in processes:
            if process.is_alive():
                _kill_rank(process)
        results.close()
    return [outputs[rank] for rank in range(world_size)]


def _kill_rank(process: Any) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        # Killed before it made its own process group.
        process.kill()
    process.join()


def _check_alive(
    processes: list[Any], outputs: dict[int, Any], results: Any, world_size: int
) -> None:
    for rank, process in enumerate(processes):
        if rank in outputs or process.exitcode is None:
            continue
        # The rank may have reported just before exiting: give its message a moment to arrive.
        try:
            late_rank, ok, payload = results.get(timeout=1.0)
        except queue.Empty:
            raise RankError(
                rank, world_size, f"process exited with code {process.exitcode} without a result"
            ) from None
        if not ok:
            raise RankError(late_rank, world_size, payload)
        outputs[late_rank] = pickle.loads(payload)
        return
