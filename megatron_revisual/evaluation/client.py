"""Talking to an OpenAI-compatible chat endpoint: messages, retries, and the prediction cache.

Retries: connection failures, timeouts, HTTP 429 and 5xx are retried up to ``max_retries``
times with exponential backoff (``base_delay * 2**attempt``, capped, with jitter); after that
`ServerUnavailable` ends the run. Any other HTTP error concerns one request (e.g. a prompt too
long for the server's context) and is raised as `RequestRejected` for that sample alone.

Cache: one append-only jsonl per (model, dataset) under the cache directory, one line per
finished request, keyed by a hash of (model, dataset, sample id, prompt text, sampling
settings). A line is flushed and fsynced before the sample counts as done, and a torn last
line from an interrupted run is cut off when the file is opened, so a rerun resumes exactly
where the last one stopped.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import math
import os
import random
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megatron_revisual.evaluation.samples import Sample

__all__ = [
    "ChatClient",
    "Completion",
    "EndpointMismatch",
    "PredictionCache",
    "RequestRejected",
    "RunAborted",
    "ServerUnavailable",
    "build_messages",
    "cache_key",
    "encode_image",
    "resize_to_pixel_range",
    "safe_name",
]


class ServerUnavailable(RuntimeError):
    """The endpoint kept failing (connection errors, timeouts, 429/5xx) after all retries."""


class RequestRejected(RuntimeError):
    """The endpoint answered one request with a non-retryable HTTP error (4xx other than 429)."""


class RunAborted(RuntimeError):
    """The run is being stopped (another request exhausted its retries, or an interrupt)."""


class EndpointMismatch(ValueError):
    """The endpoint does not serve --model-name, or its context cannot hold --max-tokens."""


# --- messages ----------------------------------------------------------------------------------
def resize_to_pixel_range(image: Any, min_pixels: int, max_pixels: int) -> Any:
    """Scale a PIL image, keeping its aspect ratio, so that width*height lies in
    [min_pixels, max_pixels] (as the released tool does before upload; the server's processor
    then snaps it to its patch grid)."""
    if min_pixels > max_pixels:
        raise ValueError(f"min_pixels={min_pixels} exceeds max_pixels={max_pixels}")
    area = image.width * image.height
    factor = 1.0
    if area > max_pixels:
        factor = math.sqrt(max_pixels / area)
    elif area < min_pixels:
        factor = math.sqrt(min_pixels / area)
    if factor == 1.0:
        return image
    size = (max(1, int(image.width * factor)), max(1, int(image.height * factor)))
    return image.resize(size)


def encode_image(image: Any, min_pixels: int, max_pixels: int) -> str:
    """A ``data:image/png;base64,...`` URL for a path, encoded bytes or a PIL image."""
    from PIL import Image

    if isinstance(image, bytes):
        image = Image.open(io.BytesIO(image))
    elif isinstance(image, str | Path):
        image = Image.open(image)
    image = resize_to_pixel_range(image.convert("RGB"), min_pixels, max_pixels)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def build_messages(
    sample: Sample, *, system_prompt: str, min_pixels: int, max_pixels: int
) -> list[dict]:
    """System prompt (left out if empty), then the user turn: the image first, then the text,
    the order Qwen2.5-VL was trained with; a text benchmark's sample (image None) is text only."""
    messages: list[dict] = []
    if system_prompt:
        messages.append({"role": "system", "content": system_prompt})
    if sample.image is None:
        messages.append({"role": "user", "content": sample.prompt})
        return messages
    url = encode_image(sample.image, min_pixels, max_pixels)
    messages.append(
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": url}},
                {"type": "text", "text": sample.prompt},
            ],
        }
    )
    return messages


# --- the endpoint ------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class Completion:
    text: str
    finish_reason: str | None
    completion_tokens: int | None
    attempts: int


class ChatClient:
    """Chat completions against one model at one OpenAI-compatible base URL; thread-safe."""

    def __init__(
        self,
        *,
        model: str,
        api_key: str,
        base_url: str,
        max_tokens: int,
        temperature: float,
        top_p: float,
        max_retries: int,
        retry_base_delay: float = 1.0,
        retry_max_delay: float = 60.0,
        request_timeout: float = 3600.0,
    ) -> None:
        import openai

        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries}")
        self.model = model
        self.base_url = base_url
        self.max_tokens = max_tokens
        self.temperature = temperature
        self.top_p = top_p
        self.max_retries = max_retries
        self.retry_base_delay = retry_base_delay
        self.retry_max_delay = retry_max_delay
        # The client's own retries are off: ours count toward --max-retries and are logged.
        self._client = openai.OpenAI(
            api_key=api_key, base_url=base_url, max_retries=0, timeout=request_timeout
        )
        self._retryable = (
            openai.APIConnectionError,
            openai.RateLimitError,
            openai.InternalServerError,
        )
        self._status_error = openai.APIStatusError

    def _with_retries(
        self, call: Any, what: str, stop: threading.Event | None = None
    ) -> tuple[Any, int]:
        """`call()` retried per the module docstring; (its result, attempts)."""
        last: Exception | None = None
        for attempt in range(self.max_retries + 1):
            if attempt and stop is not None:
                stop.wait(self._delay(attempt - 1))
            elif attempt:
                time.sleep(self._delay(attempt - 1))
            if stop is not None and stop.is_set():
                raise RunAborted(f"{what}: not asked, the run is stopping")
            try:
                return call(), attempt + 1
            except self._retryable as e:
                last = e
                continue
            except self._status_error as e:
                if e.status_code >= 500:  # 5xx without a dedicated exception class
                    last = e
                    continue
                raise RequestRejected(f"{what}: HTTP {e.status_code}: {e}") from e
        raise ServerUnavailable(
            f"{what}: {self.base_url} failed {self.max_retries + 1} times "
            f"(--max-retries {self.max_retries}); last error: {type(last).__name__}: {last}"
        ) from last

    def check_endpoint(self) -> str:
        """Once, before the first sample: the endpoint lists --model-name, and (where it says,
        as vLLM does with ``max_model_len``) its context is longer than --max-tokens; raises
        `EndpointMismatch` naming what it serves. Returns a line for the log. An endpoint
        that does not list its models (HTTP 4xx, or 501 on /models) is not checked."""

        def listing() -> Any:
            try:
                return self._client.models.list()
            except self._status_error as e:
                if e.status_code == 501:  # not implemented there: no answer to retry for
                    raise RequestRejected(f"HTTP 501: {e}") from e
                raise

        try:
            page, _ = self._with_retries(listing, f"{self.base_url}/models")
        except RequestRejected as e:
            return f"not checked ({e})"
        served = {m.id: getattr(m, "max_model_len", None) for m in page.data}
        if self.model not in served:
            raise EndpointMismatch(
                f"--model-name {self.model!r} is not served by {self.base_url}; it serves "
                f"{sorted(served)}"
            )
        context = served[self.model]
        if context is not None and self.max_tokens >= int(context):
            raise EndpointMismatch(
                f"--max-tokens {self.max_tokens} does not fit the context of {self.model!r} at "
                f"{self.base_url} (max_model_len {context}, prompt included); use --max-tokens "
                f"well below {context}, or serve with a larger --max-model-len"
            )
        return f"{self.model!r} served with max_model_len {context}"

    def _delay(self, attempt: int) -> float:
        delay = min(self.retry_max_delay, self.retry_base_delay * 2**attempt)
        return delay * random.uniform(0.5, 1.0)

    def complete(
        self,
        messages: list[dict],
        *,
        what: str = "request",
        stop: threading.Event | None = None,
    ) -> Completion:
        """One chat completion, retried per the module docstring. Once ``stop`` is set, no
        further attempt starts (`RunAborted`)."""

        def create() -> Any:
            return self._client.chat.completions.create(
                model=self.model,
                messages=messages,
                max_tokens=self.max_tokens,
                temperature=self.temperature,
                top_p=self.top_p,
            )

        response, attempts = self._with_retries(create, what, stop)
        choice = response.choices[0]
        usage = response.usage
        return Completion(
            text=choice.message.content or "",
            finish_reason=choice.finish_reason,
            completion_tokens=usage.completion_tokens if usage else None,
            attempts=attempts,
        )


# --- the cache ---------------------------------------------------------------------------------
def cache_key(
    *, model: str, dataset: str, sample_id: str, prompt: str, settings: dict[str, Any]
) -> str:
    """Hash of everything that determines a response (the prompt text covers format changes)."""
    blob = json.dumps(
        {"model": model, "dataset": dataset, "id": sample_id, "prompt": prompt, **settings},
        sort_keys=True,
        ensure_ascii=True,
    )
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def safe_name(name: str) -> str:
    """A model name as a file name: "org/model:v1" -> "org_model_v1"."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "model"


class PredictionCache:
    """``<root>/<model>/<dataset>.jsonl``: finished requests by cache key (module docstring)."""

    def __init__(self, root: str | Path, model: str) -> None:
        self.dir = Path(root) / safe_name(model)
        self._lock = threading.Lock()

    def path(self, dataset: str) -> Path:
        return self.dir / f"{dataset}.jsonl"

    def load(self, dataset: str) -> dict[str, dict]:
        """Entries of one dataset; cuts off a torn last line so that appends stay parseable."""
        path = self.path(dataset)
        if not path.is_file():
            return {}
        data = path.read_bytes()
        entries: dict[str, dict] = {}
        # Everything after the last newline is an interrupted write; a complete line that does
        # not parse (two processes sharing a cache) is skipped, not fatal.
        good_end = data.rfind(b"\n") + 1
        for line in data[:good_end].splitlines():
            try:
                entry = json.loads(line)
                entries[entry["key"]] = entry
            except (json.JSONDecodeError, KeyError, TypeError):
                continue
        if good_end < len(data):
            with self._lock, open(path, "r+b") as f:
                f.truncate(good_end)
        return entries

    def put(self, dataset: str, entry: dict) -> None:
        line = json.dumps(entry, ensure_ascii=False) + "\n"
        with self._lock:
            self.dir.mkdir(parents=True, exist_ok=True)
            with open(self.path(dataset), "a", encoding="utf-8") as f:
                f.write(line)
                f.flush()
                os.fsync(f.fileno())
