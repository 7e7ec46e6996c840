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

Weights cross the socket as raw bytes, one bucket of metadata then one message per tensor, so
the sender never holds more than its current bucket and no file is written. An engine process
that dies closes its socket: the caller gets ``EngineCrashedError`` at once, not a hang; a
call that outlives ``call_timeout_s`` raises ``EngineTimeoutError``.
"""

from __future__ import annotations

import dataclasses
import multiprocessing as mp
import os
import time
import traceback
from collections.abc import Iterable, Sequence
from multiprocessing.connection import Client, Connection, Listener
from typing import Any

import torch

from megatron_revisual.rollout.engine import (
    DEFAULT_BUCKET_BYTES,
    EngineConfig,
    RolloutEngine,
    bucketed,
    create_engine,
)
from megatron_revisual.rollout.types import (
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

    def connect(self, *, call_timeout_s: float = 900.0) -> EngineClient:
        return EngineClient(self, call_timeout_s=call_timeout_s)


class EngineClient(RolloutEngine):
    """The ``RolloutEngine`` interface over an ``EngineEndpoint``."""

    def __init__(
        self, endpoint: EngineEndpoint, *, call_timeout_s: float = 900.0, process: Any = None
    ) -> None:
        self.endpoint = endpoint
        self.call_timeout_s = call_timeout_s
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

        def send_buckets(conn: Connection) -> None:
            for bucket in bucketed(stream, bucket_bytes):
                conn.send(
                    (
                        "bucket",
                        [
                            (n, str(t.dtype).removeprefix("torch."), tuple(t.shape))
                            for n, t in bucket
                        ],
                    )
                )
                for _, t in bucket:
                    conn.send_bytes(t.contiguous().cpu().reshape(-1).view(torch.uint8).numpy())
            conn.send(("end", None))

        stats: WeightSyncStats = self._call("update_weights", bucket_bytes, send_buckets)
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
    engine is built (e.g. ``VLLM_CPU_KVCACHE_SPACE``)."""

    def __init__(
        self,
        config: EngineConfig,
        *,
        env: dict[str, str] | None = None,
        start_timeout_s: float = 900.0,
        call_timeout_s: float = 900.0,
    ) -> None:
        ctx = mp.get_context("spawn")
        authkey = os.urandom(32)
        ready_recv, ready_send = ctx.Pipe(duplex=False)
        process = ctx.Process(
            target=_serve,
            args=(config, dict(env or {}), authkey, ready_send),
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


class _BucketReader:
    """The weight stream as the engine sees it, read off the connection; ``drain`` consumes
    what the sender still sends after the engine gave up, so the reply can go out."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.pending: list[tuple[str, str, tuple[int, ...]]] = []
        self.done = False

    def _next_meta(self) -> bool:
        while not self.pending:
            kind, metas = self.conn.recv()
            if kind == "end":
                self.done = True
                return False
            self.pending = list(metas)
        return True

    def __iter__(self):
        while self._next_meta():
            name, dtype, shape = self.pending.pop(0)
            tensor = torch.empty(shape, dtype=getattr(torch, dtype))
            # straight into the tensor's memory: one copy off the socket, none after
            self.conn.recv_bytes_into(tensor.reshape(-1).view(torch.uint8).numpy())
            yield name, tensor

    def drain(self) -> None:
        while not self.done:
            if self.pending:
                self.pending.pop(0)
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
        reader = _BucketReader(conn)
        try:
            return engine.update_weights(iter(reader), bucket_bytes=payload)
        finally:
            reader.drain()
    if op == "free_memory":
        return engine.free_memory()
    if op == "restore_memory":
        return engine.restore_memory(kv_cache=payload)
    raise ValueError(f"unknown engine operation {op!r}")


def _serve(config: EngineConfig, env: dict[str, str], authkey: bytes, ready: Connection) -> None:
    from megatron_revisual.parallel.harness import die_with_parent

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
