"""The data a rollout engine takes and returns, shared by every engine (vLLM, transformers,
an engine in another process).

Log-probabilities are *raw*: ``log_softmax`` of the model's logits at temperature 1, before
temperature, top-k or top-p (vLLM's default ``logprobs_mode="raw_logprobs"``; transformers'
``output_logits``). That is what Megatron recomputes from the same weights, so the two can be
compared token for token; the sampling itself does use the temperature and filters.
"""

from __future__ import annotations

import dataclasses
import enum
from collections import Counter
from pathlib import Path
from typing import Any

__all__ = [
    "DEFAULT_BUCKET_BYTES",
    "EngineCapabilities",
    "EngineCrashedError",
    "EngineState",
    "EngineTimeoutError",
    "RolloutBatch",
    "RolloutEngineError",
    "RolloutRequest",
    "RolloutSample",
    "SamplingConfig",
    "SkippedRequest",
    "WeightSyncStats",
]

# The weight stream's bucket: what the trainer gathers (`convert.export.stream_hf_tensors`) and an
# engine loads (`RolloutEngine.update_weights`) at a time, unless the caller says otherwise (the
# trainer passes `rollout.weight_bucket_mb`, whose default is this).
DEFAULT_BUCKET_BYTES = 512 << 20


class EngineState(enum.Enum):
    """An engine's memory state around training (the one state machine: `colocated.SleepCycle`
    drives it, `vllm_engine.VLLMEngine` keeps its own copy of where vLLM is)."""

    AWAKE = "awake"  # weights and KV cache: generate and sync allowed
    ASLEEP = "asleep"  # level 1: weights offloaded, KV cache dropped
    WEIGHTS = "weights"  # weights back, KV cache not yet: sync allowed, generate not


# What an image may be given as: a PIL image, a file path, or the encoded file's bytes.
ImageLike = Any


class RolloutEngineError(RuntimeError):
    """The engine failed on a call; the message names the engine and the operation."""


class EngineCrashedError(RolloutEngineError):
    """The engine (or the process serving it) died; it cannot take further calls."""


class EngineTimeoutError(RolloutEngineError):
    """The engine did not answer within the configured time."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class SamplingConfig:
    """How to sample. ``temperature=0`` is greedy; ``top_k=0`` and ``top_p=1`` turn those
    filters off. With a ``seed``, sample j of request i uses seed ``seed + i * n + j`` in vLLM
    (the whole request's n samples one stream seeded ``seed + i * n`` in transformers), so a
    rerun with the same seed gives the same tokens on the same engine and weights."""

    n: int = 1
    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    # Never sampled. Engines of vision-language models always add the image / video
    # placeholder ids: a completion holding one could not be fed back to the trainer.
    suppress_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError(f"n={self.n} must be >= 1")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens={self.max_tokens} must be >= 1")
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature} must be >= 0 (0 is greedy)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k} must be >= 0 (0 disables top-k)")
        if isinstance(self.stop, str):
            raise ValueError(f"stop={self.stop!r} must be a tuple of strings, not one string")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop={self.stop!r}: every stop string must be a non-empty str")
        if any(not isinstance(t, int) or t < 0 for t in self.suppress_token_ids):
            raise ValueError(
                f"suppress_token_ids={self.suppress_token_ids!r} must be token ids >= 0"
            )


@dataclasses.dataclass(frozen=True, kw_only=True)
class RolloutRequest:
    """One prompt: chat-templated text with one ``<|vision_start|><|image_pad|><|vision_end|>``
    placeholder per image, in the order of ``images``. ``seed_index`` is the index a seeded
    request's sampling seed is derived from (``SamplingConfig.seed + seed_index * n + j``);
    None: its position in the list. A batch split over several engines keeps each request's
    index in the whole batch here, so its samples do not depend on which engine serves it."""

    prompt: str
    images: tuple[ImageLike, ...] = ()
    seed_index: int | None = None

    @classmethod
    def with_image(cls, prompt: str, image: ImageLike | None) -> RolloutRequest:
        return cls(prompt=prompt, images=() if image is None else (image,))

    def describe_image(self, k: int) -> str:
        image = self.images[k]
        if isinstance(image, str | Path):
            return str(image)
        if isinstance(image, bytes | bytearray):
            return f"<{len(image)} bytes>"
        return type(image).__name__


@dataclasses.dataclass(frozen=True, kw_only=True)
class RolloutSample:
    """One sampled completion. ``logprobs[k]`` is the raw log-probability of ``token_ids[k]``
    given the prompt and ``token_ids[:k]``. ``finish_reason`` is ``"stop"`` (EOS or a stop
    string, named in ``stop_reason``) or ``"length"``; ``text`` excludes a matched stop string
    while ``token_ids`` keep the token that completed it."""

    request_index: int
    sample_index: int
    prompt_token_ids: list[int]
    token_ids: list[int]
    logprobs: list[float]
    text: str
    finish_reason: str
    stop_reason: int | str | None = None


@dataclasses.dataclass(frozen=True, kw_only=True)
class SkippedRequest:
    """A request that produced no samples, and why (``reason`` is a short key to count by)."""

    request_index: int
    reason: str  # "prompt_too_long" | "unreadable_image"
    detail: str


@dataclasses.dataclass(frozen=True, kw_only=True)
class RolloutBatch:
    samples: list[RolloutSample]
    skipped: list[SkippedRequest]
    seconds: float

    @property
    def num_generated_tokens(self) -> int:
        return sum(len(s.token_ids) for s in self.samples)

    @property
    def tokens_per_second(self) -> float:
        return self.num_generated_tokens / self.seconds if self.seconds > 0 else float("nan")

    def skipped_counts(self) -> dict[str, int]:
        return dict(Counter(s.reason for s in self.skipped))

    def samples_of(self, request_index: int) -> list[RolloutSample]:
        return [s for s in self.samples if s.request_index == request_index]


@dataclasses.dataclass(frozen=True, kw_only=True)
class WeightSyncStats:
    """One weight update: wall seconds from the first tensor pulled to the engine ready again."""

    seconds: float
    bytes: int
    tensors: int
    buckets: int
    max_bucket_bytes: int

    @property
    def gb_per_second(self) -> float:
        return self.bytes / self.seconds / 1e9 if self.seconds > 0 else float("nan")


@dataclasses.dataclass(frozen=True, kw_only=True)
class EngineCapabilities:
    """What an engine can do here. ``sleep`` False means ``free_memory`` / ``restore_memory``
    do nothing on this engine; ``sleep_note`` says why."""

    name: str
    sleep: bool
    sleep_note: str
    weight_sync: bool
    weight_sync_note: str
    tensor_parallel_size: int
    logprobs: str = "raw"
