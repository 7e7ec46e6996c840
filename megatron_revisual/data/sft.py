"""Cold-start SFT samples: chat-templated conversations, loss on the assistant's tokens only.

    data = load_prompt_dataset(DatasetSpec(path="sft.jsonl", answer_key=None, response_key="response"))
    fmt = SFTFormatter(tokenizer, max_length=32768)          # processor=... for image rows
    examples = [e for r in data if (e := fmt(r)) is not None]  # fmt.counts: truncated, skips
    for group in pack_groups([e.num_tokens for e in examples], max_tokens=32768):
        batch = pack_sequences([examples[i].to_sample() for i in group], config=mrope_config)

Targets are each assistant message's text as the chat template renders it, up to and including
its end-of-turn token (`<|im_end|>`); the template's "<|im_start|>assistant\\n" header, the
newline after `<|im_end|>`, and every system/user token are context only. The segments around
those targets are tokenized separately and concatenated: a prompt is tokenized alone at
inference too (the engine then generates the response's tokens), so no BPE merge may straddle
the prompt/response boundary here either.

The conversation is split by rendering its prefixes (messages[:j] with the generation prompt,
and messages[:j + 1]); the template must render a conversation's prefixes as prefixes of its
text, which the Qwen2.5-VL format does (a template that rewrites history raises).
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from megatron_revisual.data.datasets import (
    PromptDataset,
    PromptRecord,
    dataset_spec,
    load_prompt_dataset,
)
from megatron_revisual.rollout.engine import load_image

if TYPE_CHECKING:  # packing imports megatron.core (seconds); only to_sample needs it
    from megatron_revisual.data.packing import Sample

__all__ = [
    "SFTExample",
    "SFTFormatter",
    "assistant_spans",
    "load_sft_set",
    "load_tokenizer_and_processor",
    "pack_groups",
    "sft_conversation",
]

IMAGE_TOKEN = "<|image_pad|>"


@dataclasses.dataclass(frozen=True, kw_only=True)
class SFTExample:
    """One tokenized conversation. target_mask is True on assistant tokens (packing turns it into
    next-token labels and a loss mask)."""

    uid: str
    input_ids: torch.Tensor  # [L] int64
    target_mask: torch.Tensor  # [L] bool
    pixel_values: torch.Tensor | None = None
    image_grid_thw: torch.Tensor | None = None
    truncated: bool = False

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.numel())

    @property
    def num_target_tokens(self) -> int:
        return int(self.target_mask.sum())

    def to_sample(self) -> Sample:
        from megatron_revisual.data.packing import Sample

        return Sample(
            input_ids=self.input_ids,
            target_mask=self.target_mask,
            pixel_values=self.pixel_values,
            image_grid_thw=self.image_grid_thw,
        )


def load_tokenizer_and_processor(hf_dir: Any, with_vision: bool) -> tuple[Any, Any]:
    """The tokenizer (and for a vision model the processor) of an HF model directory."""
    from transformers import AutoProcessor, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    processor = AutoProcessor.from_pretrained(hf_dir) if with_vision else None
    return tokenizer, processor


def load_sft_set(stage_cfg: Any, tokenizer: Any) -> PromptDataset:
    """A cold-start stage's conversations (`stage_cfg`: its data and max_length). A prompt of
    max_length tokens or more leaves no response token to train on: such rows are skipped here
    and counted (data/skipped/no_room_for_response), instead of coming back empty at every step."""
    return load_prompt_dataset(
        dataset_spec(stage_cfg.data, "cold_start.data"), tokenizer=tokenizer,
        max_prompt_length=stage_cfg.max_length - 1, too_long="no_room_for_response",
    )


def sft_conversation(record: PromptRecord) -> list[dict[str, Any]]:
    """The record's prompt messages followed by its response as the assistant turn."""
    if record.response is None:
        raise ValueError(f"{record.uid}: no response (load the dataset with response_key set)")
    return [*record.messages, {"role": "assistant", "content": record.response}]


def assistant_spans(
    messages: Sequence[dict[str, Any]], tokenizer: Any, *, end_of_turn: str = "<|im_end|>",
    chat_template: str | None = None,
) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the [start, end) character spans of its targets: each
    assistant turn's rendered content through its `end_of_turn`."""

    def render(msgs: Sequence[dict[str, Any]], generation_prompt: bool) -> str:
        return tokenizer.apply_chat_template(
            list(msgs), tokenize=False, add_generation_prompt=generation_prompt,
            chat_template=chat_template,
        )

    full = render(messages, False)
    spans: list[tuple[int, int]] = []
    for j, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        if j == 0:
            raise ValueError("a conversation cannot open with an assistant turn")
        head = render(messages[:j], True)
        upto = render(messages[: j + 1], False)
        if not (upto.startswith(head) and full.startswith(upto)):
            raise ValueError(
                f"the chat template does not render message {j}'s prefix as a prefix of the "
                "conversation; its assistant tokens cannot be located"
            )
        end = upto.rfind(end_of_turn, len(head))
        if end < 0:
            raise ValueError(f"assistant turn {j} does not end with {end_of_turn!r} when rendered")
        spans.append((len(head), end + len(end_of_turn)))
    if not spans:
        raise ValueError("the conversation has no assistant turn to train on")
    return full, spans


class SFTFormatter:
    """Tokenizes conversations into `SFTExample`s. `counts` holds "truncated" (kept, cut to
    max_length) and the skips: "no_target_tokens" (truncation left no assistant token),
    "image_truncated" (truncation cut into image placeholders), "unreadable_image",
    "image_count_mismatch" (image placeholders in the text that are not the row's images)."""

    def __init__(self, tokenizer: Any, *, max_length: int, processor: Any = None,
                 end_of_turn: str = "<|im_end|>", chat_template: str | None = None) -> None:
        if max_length < 2:
            raise ValueError(f"max_length={max_length} must be >= 2")
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.processor = processor
        self.end_of_turn = end_of_turn
        self.chat_template = chat_template
        self.image_token = getattr(processor, "image_token", None) or IMAGE_TOKEN
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.counts: Counter = Counter()

    def __call__(self, record: PromptRecord) -> SFTExample | None:
        return self.tokenize(sft_conversation(record), images=record.images, uid=record.uid)

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _images(self, images: Sequence[Any]) -> tuple[dict[str, torch.Tensor], list[int]]:
        pils = [load_image(im) for im in images]
        out = self.processor.image_processor(images=pils, return_tensors="pt")
        merge = int(self.processor.image_processor.merge_size)
        grid = out["image_grid_thw"]
        return dict(out), (grid.prod(-1) // (merge * merge)).tolist()

    def tokenize(self, messages: Sequence[dict[str, Any]], *, images: Sequence[Any] = (),
                 uid: str = "") -> SFTExample | None:
        """One conversation; None (and a count) when it has to be skipped."""
        full, spans = assistant_spans(
            messages, self.tokenizer, end_of_turn=self.end_of_turn, chat_template=self.chat_template
        )
        vision: dict[str, torch.Tensor] = {}
        per_image: list[int] = []
        if images:
            if self.processor is None:
                raise ValueError(f"{uid}: the conversation has images; give SFTFormatter a processor")
            try:
                vision, per_image = self._images(images)
            except (OSError, ValueError):  # UnreadableImageError, or the processor refusing it
                self.counts["unreadable_image"] += 1
                return None
        # a placeholder the images do not account for (the text holds the token's literal
        # string, or an assistant turn does) is bad data, not a reason to stop the run
        in_targets = sum(full.count(self.image_token, a, b) for a, b in spans)
        if full.count(self.image_token) != len(per_image) or in_targets:
            self.counts["image_count_mismatch"] += 1
            return None
        ids: list[int] = []
        mask: list[bool] = []
        pending = iter(per_image)
        cuts = [0] + [c for span in spans for c in span] + [len(full)]
        for k in range(len(cuts) - 1):
            text = full[cuts[k] : cuts[k + 1]]
            is_target = k % 2 == 1
            if not is_target and self.image_token in text:
                # the processor's expansion: one placeholder per merged patch of that image
                pieces = text.split(self.image_token)
                text = pieces[0] + "".join(self.image_token * next(pending) + p for p in pieces[1:])
            piece = self._ids(text) if text else []
            ids += piece
            mask += [is_target] * len(piece)
        input_ids = torch.tensor(ids, dtype=torch.long)
        target_mask = torch.tensor(mask, dtype=torch.bool)
        truncated = input_ids.numel() > self.max_length
        if truncated:
            image_tokens = int((input_ids == self.image_token_id).sum())
            input_ids, target_mask = input_ids[: self.max_length], target_mask[: self.max_length]
            if int((input_ids == self.image_token_id).sum()) != image_tokens:
                self.counts["image_truncated"] += 1
                return None
            if not bool(target_mask.any()):
                self.counts["no_target_tokens"] += 1
                return None
            self.counts["truncated"] += 1
        return SFTExample(
            uid=uid, input_ids=input_ids, target_mask=target_mask,
            pixel_values=vision.get("pixel_values"), image_grid_thw=vision.get("image_grid_thw"),
            truncated=truncated,
        )


def pack_groups(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Indices grouped in order into packs of at most max_tokens tokens (greedy: a sample that
    does not fit starts the next pack), so the data order is kept and the grouping is
    deterministic. Every length must be <= max_tokens (truncate first)."""
    groups: list[list[int]] = []
    used = max_tokens + 1
    for i, n in enumerate(lengths):
        if n > max_tokens:
            raise ValueError(f"sample {i} has {n} tokens > max_tokens={max_tokens}; truncate it first")
        if used + n > max_tokens:
            groups.append([])
            used = 0
        groups[-1].append(i)
        used += n
    return groups
