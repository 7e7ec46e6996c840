"""The rollout engine interface, its configs, and what every engine shares: prompt-length
filtering, image loading and size-bounded weight buckets.

    from megatron_revisual.rollout.engine import VLLMEngineConfig
    from megatron_revisual.rollout.registry import create_engine
    engine = create_engine(VLLMEngineConfig(model_path="runs/tiny", dtype="float32",
                                            max_model_len=1024, enforce_eager=True))
    batch = engine.generate([RolloutRequest.with_image(prompt, "fig.png")],
                            SamplingConfig(n=8, max_tokens=512, temperature=1.0, seed=0))
    stats = engine.update_weights(stream_hf_tensors(model, cfg.model), bucket_bytes=1 << 28)

A weight stream is any iterator of ``(hf_name, tensor)`` in Hugging Face checkpoint names
(``model.layers.0.self_attn.q_proj.weight``, ``visual.blocks.0.attn.qkv.weight``, ...), each
tensor complete (gathered over TP). The engine pulls it one bucket at a time, so the producer
never has more than ``bucket_bytes`` (plus one tensor larger than that) in flight.
"""

from __future__ import annotations

import abc
import dataclasses
import io
import json
import logging
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from megatron_revisual.rollout.types import (
    DEFAULT_BUCKET_BYTES,
    EngineCapabilities,
    RolloutBatch,
    RolloutRequest,
    SamplingConfig,
    SkippedRequest,
    WeightSyncStats,
)

__all__ = [
    "EngineConfig",
    "HFEngineConfig",
    "PreparedRequest",
    "PromptPreparer",
    "RolloutEngine",
    "SyncMeter",
    "VLLMEngineConfig",
    "bucketed",
    "load_image",
]

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclasses.dataclass(frozen=True, kw_only=True)
class EngineConfig:
    """Settings every engine honours. Prompts longer than ``max_prompt_tokens`` (counted after
    image placeholders are expanded; default ``max_model_len - 1``) are skipped and counted."""

    model_path: str
    dtype: str = "bfloat16"
    max_model_len: int = 8192
    max_prompt_tokens: int | None = None
    seed: int = 0
    max_images_per_prompt: int = 1

    def __post_init__(self) -> None:
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype={self.dtype!r}; use one of {sorted(_DTYPES)}")
        if self.max_model_len < 2:
            raise ValueError(f"max_model_len={self.max_model_len} must be >= 2")
        limit = self.max_prompt_tokens
        if limit is not None and not 1 <= limit < self.max_model_len:
            raise ValueError(
                f"max_prompt_tokens={limit} must be in [1, max_model_len={self.max_model_len})"
            )
        if self.max_images_per_prompt < 0:
            raise ValueError(f"max_images_per_prompt={self.max_images_per_prompt} must be >= 0")

    @property
    def prompt_limit(self) -> int:
        return (
            self.max_prompt_tokens if self.max_prompt_tokens is not None else self.max_model_len - 1
        )

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]


@dataclasses.dataclass(frozen=True, kw_only=True)
class VLLMEngineConfig(EngineConfig):
    """vLLM in this process. ``distributed_executor_backend="external_launcher"`` runs one
    engine per rank of an existing torchrun world (the colocated GPU setup); otherwise
    ``tensor_parallel_size`` > 1 starts vLLM's own worker processes, which generate but cannot
    take an in-process weight stream. ``gpu_memory_utilization`` and ``enable_sleep_mode``
    apply on GPUs; ``cpu_kv_cache_gib`` on CPU (vLLM's ``kv_cache_memory_bytes``, fractions of a GiB too).

    ``cpu_prepack_weights`` (CPU only): False keeps every linear layer's weight as a plain
    tensor used through ``torch.nn.functional.linear``, so a weight sync is one copy per tensor
    into the live parameters; True lets vLLM repack the weights for oneDNN, which makes every
    sync rebuild each layer and repack it (about half the sync time, benchmarks/bench_rollout.py).
    """

    tensor_parallel_size: int = 1
    enforce_eager: bool = False
    max_num_seqs: int = 256
    gpu_memory_utilization: float = 0.5
    enable_sleep_mode: bool = True
    distributed_executor_backend: str | None = None
    cpu_kv_cache_gib: float | None = None
    cpu_prepack_weights: bool = False
    instance_id: str | None = None  # external_launcher on CPU: names the engine's shared memory

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size={self.tensor_parallel_size} must be >= 1")
        if self.distributed_executor_backend not in (None, "external_launcher", "mp", "uni"):
            raise ValueError(
                f"distributed_executor_backend={self.distributed_executor_backend!r}; use None, "
                "'external_launcher', 'mp' or 'uni'"
            )


@dataclasses.dataclass(frozen=True, kw_only=True)
class HFEngineConfig(EngineConfig):
    """transformers ``generate``, one request at a time (n samples batched). ``device``:
    ``"auto"`` is ``cuda`` when a GPU is present, else ``cpu``."""

    device: str = "auto"


class RolloutEngine(abc.ABC):
    """Generates n samples per prompt with raw per-token log-probs, takes weight updates from
    a stream of (hf_name, tensor), and frees / restores its memory around training where the
    engine supports it (``capabilities.sleep``)."""

    capabilities: EngineCapabilities

    @abc.abstractmethod
    def generate(
        self, requests: Sequence[RolloutRequest], sampling: SamplingConfig
    ) -> RolloutBatch:
        """Samples for every request that is not skipped (see ``RolloutBatch.skipped``)."""

    @abc.abstractmethod
    def update_weights(
        self,
        stream: Iterable[tuple[str, torch.Tensor]],
        *,
        bucket_bytes: int = DEFAULT_BUCKET_BYTES,
    ) -> WeightSyncStats:
        """Load every tensor of ``stream`` (HF checkpoint names) into the engine's weights."""

    def free_memory(self) -> bool:
        """Release weights and KV cache memory for training; False when the engine cannot
        (then nothing was released, see ``capabilities.sleep_note``)."""
        if not self.capabilities.sleep:
            log.info(
                "%s: free_memory does nothing: %s",
                self.capabilities.name,
                self.capabilities.sleep_note,
            )
        return False

    def restore_memory(self, *, kv_cache: bool = True) -> bool:
        """Undo ``free_memory``; False when there was nothing to restore. ``kv_cache=False``
        brings back the weights only (for a weight update), a later call the rest."""
        return False

    @abc.abstractmethod
    def close(self) -> None:
        """Release the engine (a client: just stop using it); further calls are errors."""

    def __enter__(self) -> RolloutEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------
# Prompts and images


class UnreadableImageError(ValueError):
    pass


def load_image(image: Any) -> Any:
    """A decoded RGB PIL image from a PIL image, a path or encoded bytes; raises
    ``UnreadableImageError`` saying why when it cannot be decoded."""
    from PIL import Image

    try:
        if isinstance(image, Image.Image):
            img = image
        elif isinstance(image, str | Path):
            img = Image.open(image)
        elif isinstance(image, bytes | bytearray):
            img = Image.open(io.BytesIO(image))
        else:
            raise UnreadableImageError(f"unsupported image type {type(image).__name__}")
        img.load()  # decode now: a truncated file fails here, not inside the engine
        return img.convert("RGB")
    except UnreadableImageError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise UnreadableImageError(f"{type(e).__name__}: {e}") from None


@dataclasses.dataclass(frozen=True, kw_only=True)
class PreparedRequest:
    index: int
    prompt: str
    images: list[Any]  # decoded PIL images
    prompt_tokens: int
    seed_index: int  # see RolloutRequest.seed_index


def _is_vision_checkpoint(model_path: str | Path) -> bool:
    cfg = json.loads((Path(model_path) / "config.json").read_text())
    return "vision_config" in cfg


class PromptPreparer:
    """Decodes images and counts prompt tokens as the engine will see them (each image
    placeholder expanded to its ``(h/14/2) * (w/14/2)`` tokens, from the image processor's own
    resize rule), so overlong prompts are skipped before they reach the engine."""

    def __init__(self, model_path: str | Path, *, prompt_limit: int, max_images: int) -> None:
        from transformers import AutoProcessor, AutoTokenizer

        self.vision = _is_vision_checkpoint(model_path)
        self.prompt_limit = prompt_limit
        self.max_images = max_images if self.vision else 0
        if self.vision:
            self.processor = AutoProcessor.from_pretrained(model_path)
            self.tokenizer = self.processor.tokenizer
            self.image_token_id = self.tokenizer.convert_tokens_to_ids("<|image_pad|>")
            video_token_id = self.tokenizer.convert_tokens_to_ids("<|video_pad|>")
            self.placeholder_token_ids: tuple[int, ...] = (self.image_token_id, video_token_id)
        else:
            self.processor = None
            self.tokenizer = AutoTokenizer.from_pretrained(model_path)
            self.image_token_id = None
            self.placeholder_token_ids = ()

    def suppressed(self, sampling: SamplingConfig) -> list[int]:
        """Token ids the engine must never sample for this request."""
        return sorted(set(sampling.suppress_token_ids) | set(self.placeholder_token_ids))

    def image_tokens(self, image: Any) -> int:
        ip = self.processor.image_processor
        patches = ip.get_number_of_image_patches(image.height, image.width, {})
        return patches // (ip.merge_size**2)

    def prepare(
        self, requests: Sequence[RolloutRequest]
    ) -> tuple[list[PreparedRequest], list[SkippedRequest]]:
        prepared, skipped = [], []
        for i, request in enumerate(requests):
            if len(request.images) > self.max_images:
                raise ValueError(
                    f"request {i}: {len(request.images)} images, but this engine takes at most "
                    f"{self.max_images} per prompt (max_images_per_prompt; 0 for text-only models)"
                )
            ids = self.tokenizer(request.prompt, add_special_tokens=False)["input_ids"]
            placeholders = ids.count(self.image_token_id) if self.image_token_id is not None else 0
            if placeholders != len(request.images):
                raise ValueError(
                    f"request {i}: the prompt has {placeholders} <|image_pad|> placeholders but "
                    f"{len(request.images)} images were given"
                )
            images, unreadable = [], None
            for k, image in enumerate(request.images):
                try:
                    images.append(load_image(image))
                except UnreadableImageError as e:
                    unreadable = f"image {k} ({request.describe_image(k)}): {e}"
                    break
            if unreadable is not None:
                log.warning("rollout: skipping request %d: unreadable %s", i, unreadable)
                skipped.append(
                    SkippedRequest(request_index=i, reason="unreadable_image", detail=unreadable)
                )
                continue
            n_tokens = len(ids) + sum(self.image_tokens(img) - 1 for img in images)
            if n_tokens > self.prompt_limit:
                detail = f"{n_tokens} prompt tokens > max_prompt_tokens={self.prompt_limit}"
                log.warning("rollout: skipping request %d: %s", i, detail)
                skipped.append(
                    SkippedRequest(request_index=i, reason="prompt_too_long", detail=detail)
                )
                continue
            prepared.append(
                PreparedRequest(
                    index=i, prompt=request.prompt, images=images, prompt_tokens=n_tokens,
                    seed_index=i if request.seed_index is None else request.seed_index,
                )
            )
        return prepared, skipped


# ---------------------------------------------------------------------------------------------
# Weight streams


class SyncMeter:
    """Counts what passes through ``bucketed``."""

    def __init__(self) -> None:
        self.bytes = 0
        self.tensors = 0
        self.buckets = 0
        self.max_bucket_bytes = 0

    def stats(self, seconds: float) -> WeightSyncStats:
        return WeightSyncStats(
            seconds=seconds,
            bytes=self.bytes,
            tensors=self.tensors,
            buckets=self.buckets,
            max_bucket_bytes=self.max_bucket_bytes,
        )


def bucketed(
    stream: Iterable[tuple[str, torch.Tensor]],
    bucket_bytes: int,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    meter: SyncMeter | None = None,
) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Group ``stream`` into lists of at most ``bucket_bytes`` (a larger tensor travels alone),
    each tensor cast to ``dtype`` and moved to ``device`` as it joins its bucket. A repeated
    name is an error: two producers (or two PP stages) would be writing the same weight."""
    if bucket_bytes < 1:
        raise ValueError(f"bucket_bytes={bucket_bytes} must be >= 1")
    meter = meter if meter is not None else SyncMeter()
    seen: set[str] = set()
    bucket: list[tuple[str, torch.Tensor]] = []
    size = 0

    def flush() -> list[tuple[str, torch.Tensor]]:
        meter.buckets += 1
        meter.max_bucket_bytes = max(meter.max_bucket_bytes, size)
        return bucket

    for item in stream:
        try:
            name, tensor = item
        except (TypeError, ValueError):
            raise TypeError(
                f"weight stream items must be (name, tensor) pairs, got {item!r:.80}"
            ) from None
        if not isinstance(name, str) or not isinstance(tensor, torch.Tensor):
            raise TypeError(
                f"weight stream item ({type(name).__name__}, {type(tensor).__name__}): expected (str, Tensor)"
            )
        if name in seen:
            raise ValueError(f"weight stream: {name} appears twice in one update")
        seen.add(name)
        tensor = tensor.detach().to(device=device, dtype=dtype)
        nbytes = tensor.numel() * tensor.element_size()
        if bucket and size + nbytes > bucket_bytes:
            yield flush()
            bucket, size = [], 0
        bucket.append((name, tensor))
        size += nbytes
        meter.bytes += nbytes
        meter.tensors += 1
    if bucket:
        yield flush()
