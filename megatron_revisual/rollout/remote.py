"""A rollout engine in its own process, reachable from any local process over a socket.

    with EngineProcess(VLLMEngineConfig(model_path=..., dtype="float32"),
                       env={"VLLM_CPU_KVCACHE_SPACE": "1"}) as engine:
        batch = engine.generate(requests, SamplingConfig(n=4, seed=0))
        endpoint = engine.endpoint            # picklable: hand it to a training rank, which
        ...                                   # calls endpoint.connect().update_weights(stream)

Used where the engine cannot live inside the training process: on CPU, where a vLLM engine
inside a gloo Megatron rank would collide with its process groups, and in tests, which keep
vLLM's threads and environment out of pytest. Each call is one connection: the parent, a
training rank and a test may all talk to the same engine, one call at a time.

Weights travel a bucket at a time, so the sender never holds more than its current bucket.
Where /dev/shm exists (``weight_transport="auto"``, the default, or ``"shm"``), the sender
copies the bucket into a shared-memory segment (tmpfs: memory, not disk) and sends only its
layout; the engine copies the tensors out and acknowledges, and the sender reuses the segment
for the next bucket: two memory copies instead of pushing every byte through the TCP socket
(about 3x faster for a 2 GB model, benchmarks/bench_rollout.py). ``"socket"`` sends the raw
bytes over the connection, one message per tensor. An engine process
that dies closes its socket: the caller gets ``EngineCrashedError`` at once, not a hang; a
call that outlives ``call_timeout_s`` raises ``EngineTimeoutError``.
"""

from __future__ import annotations

import dataclasses
import math
import multiprocessing as mp
import os
import tempfile
import time
import traceback
from collections.abc import Iterable, Sequence
from multiprocessing.connection import Client, Connection, Listener
from pathlib import Path
from typing import Any

import torch

from megatron_revisual.rollout.engine import (
    EngineConfig,
    RolloutEngine,
    bucketed,
)
from megatron_revisual.rollout.registry import create_engine
from megatron_revisual.rollout.types import (
    DEFAULT_BUCKET_BYTES,
    EngineCapabilities,
    EngineCrashedError,
    EngineTimeoutError,
    RolloutBatch,
    RolloutEngineError,
    RolloutRequest,
    SamplingConfig,
    WeightSyncStats,
)

__all__ = ["EngineClient", "EngineEndpoint", "EngineProcess"]

_DISCONNECTS = (EOFError, ConnectionResetError, BrokenPipeError, ConnectionAbortedError)


@dataclasses.dataclass(frozen=True)
class EngineEndpoint:
    """Where an engine process listens; picklable, so it can be passed to other processes."""

    address: tuple[str, int]
    authkey: bytes
    pid: int

    def connect(
        self, *, call_timeout_s: float = 900.0, weight_transport: str = "auto"
    ) -> EngineClient:
        return EngineClient(self, call_timeout_s=call_timeout_s, weight_transport=weight_transport)


SHM_DIR = "/dev/shm"
_ALIGN = 64  # byte alignment of each tensor inside a shared-memory bucket


def _shm_available() -> bool:
    return os.path.isdir(SHM_DIR) and os.access(SHM_DIR, os.W_OK)


class _ShmSegment:
    """A shared-memory file (tmpfs) mapped as a uint8 tensor. Its name is removed as soon as the
    engine has mapped it (`unlink`), so nothing is left in /dev/shm if either process dies; the
    memory lives as long as one of the two mappings."""

    def __init__(self, nbytes: int) -> None:
        fd, self.path = tempfile.mkstemp(prefix="revisual-weights-", dir=SHM_DIR)
        self.linked = True
        try:
            os.ftruncate(fd, nbytes)
            self.nbytes = nbytes
            self.data = torch.from_file(self.path, shared=True, size=nbytes, dtype=torch.uint8)
        except BaseException:
            self.unlink()
            raise
        finally:
            os.close(fd)

    def unlink(self) -> None:
        if self.linked:
            self.linked = False
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass


def _aligned(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


def _raw_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().cpu().reshape(-1).view(torch.uint8)


def _bucket_layout(bucket: list[tuple[str, torch.Tensor]]) -> tuple[list, int]:
    """Where each tensor of a bucket lies in one flat byte buffer: ([(name, dtype, shape,
    offset)], total bytes); both transports send it, the engine receives into that layout."""
    metas, offset = [], 0
    for name, t in bucket:
        metas.append((name, str(t.dtype).removeprefix("torch."), tuple(t.shape), offset))
        offset += _aligned(t.numel() * t.element_size())
    return metas, offset


class EngineClient(RolloutEngine):
    """The ``RolloutEngine`` interface over an ``EngineEndpoint``."""

    def __init__(
        self,
        endpoint: EngineEndpoint,
        *,
        call_timeout_s: float = 900.0,
        process: Any = None,
        weight_transport: str = "auto",
    ) -> None:
        if weight_transport not in ("auto", "shm", "socket"):
            raise ValueError(
                f"weight_transport={weight_transport!r}; use 'auto', 'shm' or 'socket'"
            )
        if weight_transport == "shm" and not _shm_available():
            raise RolloutEngineError(f"weight_transport='shm' needs a writable {SHM_DIR}")
        self.endpoint = endpoint
        self.call_timeout_s = call_timeout_s
        self._segment: _ShmSegment | None = None  # kept between syncs: its pages stay touched
        self.weight_transport = (
            ("shm" if _shm_available() else "socket")
            if weight_transport == "auto"
            else weight_transport
        )
        self._process = process  # the owner's handle, for the exit code in error messages
        self._name = "rollout"
        self.capabilities: EngineCapabilities = self._call("capabilities", None)
        self._name = self.capabilities.name

    def _where(self) -> str:
        note = f"rollout engine process {self.endpoint.pid} at {self.endpoint.address[0]}:{self.endpoint.address[1]}"
        if self._process is not None and self._process.exitcode is not None:
            note += f" (exited with code {self._process.exitcode})"
        return note

    def _call(self, op: str, payload: Any, send_more: Any = None) -> Any:
        try:
            conn = Client(self.endpoint.address, authkey=self.endpoint.authkey)
        except OSError as e:
            raise EngineCrashedError(f"cannot reach the {self._where()} for {op}: {e}") from None
        with conn:
            try:
                conn.send((op, payload))
                if send_more is not None:
                    send_more(conn)
                deadline = time.monotonic() + self.call_timeout_s
                while not conn.poll(0.5):
                    if self._process is not None and not self._process.is_alive():
                        raise EOFError
                    if time.monotonic() > deadline:
                        raise EngineTimeoutError(
                            f"{self._where()} did not answer {op} within {self.call_timeout_s:.0f} s"
                        )
                status, value = conn.recv()
            except _DISCONNECTS:
                raise EngineCrashedError(
                    f"the {self._where()} closed the connection during {op}: it crashed or was killed"
                ) from None
        if status == "error":
            raise RolloutEngineError(
                f"{self._name} engine in process {self.endpoint.pid} failed during {op}: {value}"
            )
        return value

    def generate(
        self, requests: Sequence[RolloutRequest], sampling: SamplingConfig
    ) -> RolloutBatch:
        return self._call("generate", (list(requests), sampling))

    def update_weights(
        self,
        stream: Iterable[tuple[str, torch.Tensor]],
        *,
        bucket_bytes: int = DEFAULT_BUCKET_BYTES,
    ) -> WeightSyncStats:
        start = time.perf_counter()

        def send_shm_buckets(conn: Connection) -> None:
            for bucket in bucketed(stream, bucket_bytes):
                metas, total = _bucket_layout(bucket)
                for _attempt in range(2):
                    segment = self._segment
                    if segment is None or segment.nbytes < total:
                        segment = self._segment = _ShmSegment(max(total, _aligned(bucket_bytes)))
                    for (_, t), (*_, offset) in zip(bucket, metas, strict=True):
                        raw = _raw_bytes(t)
                        segment.data[offset : offset + raw.numel()].copy_(raw)
                    conn.send(("shm_bucket", (segment.path, segment.nbytes, metas, total)))
                    # the engine has copied the bucket out: the segment may be overwritten
                    reply = conn.recv()
                    if reply == ("copied", None):
                        segment.unlink()  # mapped on both sides now
                        break
                    if reply == ("unmapped", segment.path) and not segment.linked:
                        self._segment = None  # the engine dropped its mapping: a new segment
                        continue
                    raise RolloutEngineError(
                        f"weight sync: expected the engine's 'copied', got {reply!r:.200}"
                    )
                else:
                    raise RolloutEngineError("weight sync: the engine could not map a new segment")
            conn.send(("end", None))

        def send_buckets(conn: Connection) -> None:
            for bucket in bucketed(stream, bucket_bytes):
                conn.send(("bucket", _bucket_layout(bucket)))
                for _, t in bucket:
                    conn.send_bytes(_raw_bytes(t).numpy())
            conn.send(("end", None))

        sender = send_shm_buckets if self.weight_transport == "shm" else send_buckets
        stats: WeightSyncStats = self._call("update_weights", bucket_bytes, sender)
        return dataclasses.replace(stats, seconds=time.perf_counter() - start)

    def free_memory(self) -> bool:
        return self._call("free_memory", None)

    def restore_memory(self, *, kv_cache: bool = True) -> bool:
        return self._call("restore_memory", kv_cache)

    def close(self) -> None:
        """A client owns nothing: the engine keeps serving its other callers."""


class EngineProcess(EngineClient):
    """Starts the engine of ``config`` in a spawned child process and talks to it; ``close``
    (or leaving the ``with`` block) shuts it down. ``env`` is applied in the child before the
    engine is built (e.g. ``VLLM_CPU_KVCACHE_SPACE``). With ``log_path`` the child's stdout and
    stderr (vLLM's logs) go to that file instead of the caller's."""

    def __init__(
        self,
        config: EngineConfig,
        *,
        env: dict[str, str] | None = None,
        start_timeout_s: float = 900.0,
        call_timeout_s: float = 900.0,
        weight_transport: str = "auto",
        log_path: str | Path | None = None,
    ) -> None:
        ctx = mp.get_context("spawn")
        authkey = os.urandom(32)
        ready_recv, ready_send = ctx.Pipe(duplex=False)
        process = ctx.Process(
            target=_serve,
            args=(config, dict(env or {}), authkey, ready_send, None if log_path is None else str(log_path)),
            name="rollout-engine",
        )
        process.start()
        ready_send.close()
        deadline = time.monotonic() + start_timeout_s
        try:
            while not ready_recv.poll(0.5):
                if not process.is_alive():
                    raise EngineCrashedError(
                        f"rollout engine process {process.pid} exited with code {process.exitcode} during start-up"
                    )
                if time.monotonic() > deadline:
                    raise EngineTimeoutError(
                        f"rollout engine did not start within {start_timeout_s:.0f} s"
                    )
            try:
                status, value = ready_recv.recv()
            except _DISCONNECTS:
                process.join(5)
                raise EngineCrashedError(
                    f"rollout engine process {process.pid} died during start-up (exit code {process.exitcode})"
                ) from None
            if status == "error":
                raise RolloutEngineError(
                    f"rollout engine failed to start ({config.model_path}):\n{value}"
                )
        except BaseException:
            _stop(process)
            raise
        finally:
            ready_recv.close()
        self.process = process
        super().__init__(
            EngineEndpoint(value, authkey, process.pid),
            call_timeout_s=call_timeout_s,
            process=process,
            weight_transport=weight_transport,
        )

    def close(self) -> None:
        if self.process.is_alive():
            try:
                self._call("shutdown", None)
            except RolloutEngineError:
                pass
        _stop(self.process)


def _stop(process: Any, grace_s: float = 30.0) -> None:
    process.join(grace_s if process.is_alive() else 0)
    if process.is_alive():
        process.kill()
        process.join()


# ---------------------------------------------------------------------------------------------
# The engine process


class _ReceivePool:
    """Memory the engine process receives weights into, reused from one bucket and one sync to
    the next. On these machines writing into freshly allocated memory costs about 14x a copy
    into memory already touched (page faults), which made fresh receive tensors the largest
    cost of a sync. A block is handed out again only when no tensor uses its storage any more
    (the storage's use count is back to the pool's own references), so a tensor the engine
    still holds (its own buckets, vLLM's layerwise reload) is never overwritten."""

    MAX_BLOCKS = 4

    def __init__(self) -> None:
        self.blocks: list[tuple[torch.Tensor, int]] = []  # (uint8 block, use count when idle)

    # private torch API: without it nothing is reused (every bucket gets fresh memory)
    _use_count = getattr(torch._C, "_storage_Use_Count", None)

    @classmethod
    def _uses(cls, block: torch.Tensor) -> int:
        return cls._use_count(block.untyped_storage()._cdata)

    def take(self, nbytes: int, min_block: int) -> torch.Tensor:
        """A uint8 tensor of ``nbytes`` (views of it carve the bucket's tensors)."""
        for block, idle in self.blocks:
            if block.numel() >= nbytes and self._uses(block) == idle:
                return block[:nbytes]
        block = torch.empty(max(nbytes, min_block), dtype=torch.uint8)
        if self._use_count is not None and len(self.blocks) < self.MAX_BLOCKS:
            self.blocks.append((block, self._uses(block)))
        return block[:nbytes]


_RECEIVE_POOL = _ReceivePool()
_SEGMENTS: dict[str, torch.Tensor] = {}  # engine side: shared-memory segments mapped, by path
_MAX_SEGMENTS = 8


def _carve(region: torch.Tensor, metas: list) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """(name, tensor, its bytes) for each (name, dtype, shape, offset) in ``region``."""
    out = []
    for name, dtype, shape, offset in metas:
        dt = getattr(torch, dtype)
        n = math.prod(shape) * dt.itemsize
        raw = region[offset : offset + n]
        out.append((name, raw.view(dt).reshape(shape), raw))
    return out


class _BucketReader:
    """The weight stream as the engine sees it, read off the connection; ``drain`` consumes
    what the sender still sends after the engine gave up, so the reply can go out.

    Each bucket lands in pooled memory (see `_ReceivePool`) in the sender's layout. A
    shared-memory bucket is copied out in one copy and acknowledged at once (the engine may hold
    tensors for a while, while the sender reuses the segment); a socket bucket's tensors are
    read off the connection one by one as the engine asks for them."""

    def __init__(self, conn: Connection, bucket_bytes: int) -> None:
        self.conn = conn
        self.bucket_bytes = bucket_bytes
        # (name, tensor, its bytes still to read off the socket, or None when filled)
        self.pending: list[tuple[str, torch.Tensor, torch.Tensor | None]] = []
        self.done = False

    def _copy_out(self, path: str, nbytes: int, metas: list, total: int) -> None:
        data = _SEGMENTS.get(path)
        if data is None:
            try:
                data = torch.from_file(path, shared=True, size=nbytes, dtype=torch.uint8)
            except (RuntimeError, OSError):
                self.conn.send(("unmapped", path))  # already unlinked: the sender makes another
                return
            if len(_SEGMENTS) >= _MAX_SEGMENTS:
                _SEGMENTS.pop(next(iter(_SEGMENTS)))
            _SEGMENTS[path] = data
        region = _RECEIVE_POOL.take(total, self.bucket_bytes)
        region.copy_(data[:total])  # same layout on both sides
        self.pending = [(name, tensor, None) for name, tensor, _ in _carve(region, metas)]
        self.conn.send(("copied", None))

    def _next_meta(self) -> bool:
        while not self.pending:
            kind, payload = self.conn.recv()
            if kind == "end":
                self.done = True
                return False
            if kind == "shm_bucket":
                self._copy_out(*payload)
            else:
                metas, total = payload
                self.pending = _carve(_RECEIVE_POOL.take(total, self.bucket_bytes), metas)
        return True

    def __iter__(self):
        while self._next_meta():
            name, tensor, raw = self.pending.pop(0)
            if raw is not None:
                # straight into the tensor's memory: one copy off the socket, none after
                self.conn.recv_bytes_into(raw.numpy())
            yield name, tensor

    def drain(self) -> None:
        while not self.done:
            if self.pending:
                _, _, raw = self.pending.pop(0)
                if raw is not None:
                    self.conn.recv_bytes()
            else:
                self._next_meta()


def _handle(engine: RolloutEngine, conn: Connection, op: str, payload: Any) -> Any:
    if op == "capabilities":
        return engine.capabilities
    if op == "generate":
        requests, sampling = payload
        return engine.generate(requests, sampling)
    if op == "update_weights":
        reader = _BucketReader(conn, payload)
        try:
            return engine.update_weights(iter(reader), bucket_bytes=payload)
        finally:
            reader.drain()
    if op == "free_memory":
        return engine.free_memory()
    if op == "restore_memory":
        return engine.restore_memory(kv_cache=payload)
    raise ValueError(f"unknown engine operation {op!r}")


def _serve(config: EngineConfig, env: dict[str, str], authkey: bytes, ready: Connection,
           log_path: str | None) -> None:
    from megatron_revisual.parallel.harness import die_with_parent

    if log_path is not None:
        from megatron_revisual.logfiles import redirect_stdio

        redirect_stdio(log_path)
    die_with_parent()  # a killed trainer must not leave its engine running
    os.environ.update(env)
    if "OMP_NUM_THREADS" in env:
        torch.set_num_threads(int(env["OMP_NUM_THREADS"]))
    try:
        engine = create_engine(config)
        listener = Listener(("127.0.0.1", 0), authkey=authkey)
    except BaseException:
        ready.send(("error", traceback.format_exc()))
        return
    ready.send(("ok", listener.address))
    ready.close()
    try:
        while True:
            try:
                conn = listener.accept()
            except (OSError, mp.AuthenticationError):
                continue  # a stray or unauthenticated connection
            with conn:
                try:
                    op, payload = conn.recv()
                    if op == "shutdown":
                        conn.send(("ok", None))
                        return
                    try:
                        reply = ("ok", _handle(engine, conn, op, payload))
                    except Exception as e:
                        reply = (
                            "error",
                            f"{type(e).__name__}: {e}\n--- engine traceback ---\n{traceback.format_exc()}",
                        )
                    conn.send(reply)
                except _DISCONNECTS:
                    continue  # the caller went away; keep serving others
    finally:
        listener.close()
        engine.close()
