"""Prompt datasets for the GRPO stages and (prompt, response) datasets for cold-start SFT, read
with Hugging Face `datasets`; bad rows are skipped and counted, and `PromptLoader` walks them in
the order of a resumable sampler (`data.sampler.ResumableBatchSampler`).

    spec = DatasetSpec(path="data/mrl.parquet")       # keys problem / answer / images (ReVisual)
    data = load_prompt_dataset(spec)                  # PromptDataset; data.skipped: per-reason counts
    loader = PromptLoader(data, batch_size=8, seed=1)
    prompts = loader.next_batch()                     # list[PromptRecord]
    requests = [rollout_request(p, tokenizer) for p in prompts]
    checkpoint["data"] = loader.state_dict()          # ... later: loader.load_state_dict(...)

Sources: a .parquet / .jsonl / .json file, a directory (its .parquet and .jsonl files, sorted,
recursively; row ids name the file relative to the directory), or a Hub dataset name ("name" or
"name@split", the released config's convention) when no such local path exists. Each file is
loaded on its own so that relative image paths resolve against that file's directory (then the
directory given as the source: the dataset root). `max_rows` reads only the first rows (of the
files in order; a Hub dataset is then streamed, not downloaded whole).

Images, in `image_key` (one image or a list): a file path (relative to the dataset file or the
dataset root, or absolute), `{"bytes": ..., "path": ...}` (how a `datasets` Image column is
stored in parquet; bytes win), raw bytes, or a PIL image. Image columns are never decoded by
`datasets`: records carry the path or the bytes and the rollout engine / processor decodes them.

Conversations (`conversation_key`, the cold-start data as LLaMA-Factory takes it): a column
holding the turns, ShareGPT's {"from": "human" | "gpt" | "system", "value": ...} or
{"role": "user" | "assistant" | "system", "content": ...}; a row is [system,] user, assistant:
the user turn is the prompt, the assistant turn the response, a system turn the row's system
prompt (unless `system_prompt` is set). Other shapes are skipped as bad_conversation.

Prompts: the user text goes through the jinja `format_prompt` (variable `content`), then is split
at "<image>" markers into chat content parts; a row with images but no markers gets its images
before the text (Qwen's convention). The default format is the ReVisual-R1 instruction appended
to the question (`REVISUAL_FORMAT_PROMPT`). The released `math_format.jinja` words it slightly
differently ("... the reasoning process step by step as an internal monologue ..."); pass that
text as `format_prompt` to train with it instead.

Bad rows never stop a run: each is skipped with one reason (the first that applies, in this
order): invalid_json (jsonl lines that do not parse), missing_prompt, empty_prompt,
missing_answer, empty_answer, missing_response, empty_response, bad_conversation, missing_image
(no file, no bytes, or <image> markers without images), unreadable_image (PIL cannot decode it),
image_count_mismatch (<image> markers != images), prompt_too_long (only with a tokenizer and
`max_prompt_length`; SFT data counts it as no_room_for_response: a prompt that fills the
sequence leaves no token to train on). A file without the prompt / answer / response /
conversation column is a config error and raises, naming the columns it has and the option to
set (`<option>.prompt_key=...`; the image column may be absent: text-only data).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import itertools
import json
import logging
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import jinja2
import numpy as np

from megatron_revisual.data.sampler import ResumableBatchSampler
from megatron_revisual.evaluation.prompts import REVISUAL_SYSTEM_PROMPT
from megatron_revisual.rollout.engine import load_image
from megatron_revisual.rollout.types import ImageLike, RolloutRequest

__all__ = [
    "DatasetSpec",
    "PromptDataset",
    "PromptLoader",
    "PromptRecord",
    "REVISUAL_FORMAT_PROMPT",
    "SKIP_REASONS",
    "chat_prompt",
    "dataset_spec",
    "load_prompt_dataset",
    "missing_columns_error",
    "rollout_request",
]

log = logging.getLogger(__name__)

# The question, then the ReVisual-R1 instruction (one source of its text: evaluation.prompts).
REVISUAL_FORMAT_PROMPT = "{{ content | trim }} " + REVISUAL_SYSTEM_PROMPT

SKIP_REASONS: tuple[str, ...] = (
    "invalid_json",
    "missing_prompt",
    "empty_prompt",
    "missing_answer",
    "empty_answer",
    "missing_response",
    "empty_response",
    "bad_conversation",
    "missing_image",
    "unreadable_image",
    "image_count_mismatch",
    "prompt_too_long",
    "no_room_for_response",
)
IMAGE_MARKER = "<image>"
_SUFFIXES = {".parquet": "parquet", ".jsonl": "json", ".json": "json"}


@dataclasses.dataclass(frozen=True, kw_only=True)
class DatasetSpec:
    """Where a dataset is and how to read its rows.

    answer_key None: rows need no answer (SFT data); response_key set: rows need a response.
    image_key None or absent from the files: text-only rows.
    format_prompt: jinja text with `{{ content }}`, a path to a .jinja file, or None (raw text).
    system_prompt: None keeps the chat template's default system message.
    image_check: "decode" fully decodes every image once at load (catches truncated files),
    "open" reads headers only (PIL verify; faster on large sets), "none" trusts the files.
    conversation_key: a column of chat turns (module docstring) instead of prompt / response.
    max_rows: read only the first rows. option: how errors name these fields ("mrl.data").
    """

    path: str
    prompt_key: str = "problem"
    answer_key: str | None = "answer"
    image_key: str | None = "images"
    response_key: str | None = None
    format_prompt: str | None = REVISUAL_FORMAT_PROMPT
    system_prompt: str | None = None
    split: str = "train"
    image_check: Literal["decode", "open", "none"] = "decode"
    conversation_key: str | None = None
    max_rows: int | None = None
    option: str = "data"

    def __post_init__(self) -> None:
        if self.image_check not in ("decode", "open", "none"):
            raise ValueError(f"image_check={self.image_check!r}; use 'decode', 'open' or 'none'")
        if not self.prompt_key:
            raise ValueError("prompt_key must name a column")
        if self.max_rows is not None and self.max_rows < 1:
            raise ValueError(f"{self.option}.max_rows={self.max_rows} must be >= 1")

    def required_columns(self) -> dict[str, str]:
        """{option field: column} of the columns every file must have."""
        if self.conversation_key:
            keys = {"conversation_key": self.conversation_key, "answer_key": self.answer_key}
        else:
            keys = {"prompt_key": self.prompt_key, "answer_key": self.answer_key,
                    "response_key": self.response_key}
        return {k: v for k, v in keys.items() if v}


@dataclasses.dataclass(frozen=True, kw_only=True)
class PromptRecord:
    """One usable row. `messages` is the chat (system?, user) ready for a chat template; its
    image parts are {"type": "image"} in the order of `images`."""

    uid: str  # "<file name>:<row>", stable across runs
    prompt: str  # the user text after the format template ("<image>" markers kept)
    answer: str  # "" when the spec has no answer_key
    response: str | None  # the SFT target, when the spec has a response_key
    images: tuple[ImageLike, ...]  # absolute path str, encoded bytes or PIL image
    messages: tuple[dict[str, Any], ...]


class _BadRow(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


# --- images ------------------------------------------------------------------------------------
def _resolve_image(value: Any, base_dir: Path, root_dir: Path) -> ImageLike:
    if isinstance(value, dict):
        if value.get("bytes"):
            return bytes(value["bytes"])
        value = value.get("path")
    if isinstance(value, bytes | bytearray):
        if not value:
            raise _BadRow("missing_image", "empty image bytes")
        return bytes(value)
    if hasattr(value, "convert"):  # a PIL image
        return value
    if not isinstance(value, str) or not value:
        raise _BadRow("missing_image", f"no image (got {type(value).__name__})")
    if Path(value).is_absolute():
        path = Path(value)
    else:  # beside the file, then under the dataset root (a Hub snapshot: data/ + images/)
        path = next((d / value for d in (base_dir, root_dir) if (d / value).is_file()), base_dir / value)
    if not path.is_file():
        where = base_dir if root_dir == base_dir else f"{base_dir} or {root_dir}"
        raise _BadRow("missing_image", f"image file {value} does not exist (looked in {where})")
    return str(path)


def _check_image(image: ImageLike, how: str) -> None:
    from PIL import Image

    try:
        if how == "decode" or hasattr(image, "convert"):
            load_image(image)  # what the rollout engine does with it
        else:
            with Image.open(io.BytesIO(image) if isinstance(image, bytes) else image) as im:
                im.verify()
    except Exception as e:  # UnreadableImageError, or whatever PIL's verify raises
        what = f"<{len(image)} bytes>" if isinstance(image, bytes) else str(image)
        raise _BadRow("unreadable_image", f"cannot read image {what}: {e}") from None


# --- rows --------------------------------------------------------------------------------------
def _text_field(row: dict, key: str, name: str) -> str:
    value = row.get(key)
    if value is None:
        raise _BadRow(f"missing_{name}", f"no {key!r}")
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise _BadRow(f"missing_{name}", f"{key!r} is a {type(value).__name__}, not text")
    text = value if isinstance(value, str) else str(value)
    if not text.strip():
        raise _BadRow(f"empty_{name}", f"{key!r} is empty")
    return text


def _user_content(text: str, n_images: int) -> str | list[dict[str, Any]]:
    pieces = text.split(IMAGE_MARKER)
    markers = len(pieces) - 1
    if n_images == 0:
        if markers:
            raise _BadRow("missing_image", f"prompt has {markers} {IMAGE_MARKER} marker(s), row no image")
        return text
    if markers == 0:
        return [{"type": "image"}] * n_images + [{"type": "text", "text": text}]
    if markers != n_images:
        raise _BadRow(
            "image_count_mismatch", f"prompt has {markers} {IMAGE_MARKER} markers for {n_images} images"
        )
    parts: list[dict[str, Any]] = []
    for i, piece in enumerate(pieces):
        if i:
            parts.append({"type": "image"})
        if piece:
            parts.append({"type": "text", "text": piece})
    return parts


class _RowParser:
    def __init__(self, spec: DatasetSpec) -> None:
        self.spec = spec
        self.template = None
        if spec.format_prompt is not None:
            text = spec.format_prompt
            if text.endswith(".jinja") and Path(text).is_file():
                text = Path(text).read_text(encoding="utf-8")
            env = jinja2.Environment(undefined=jinja2.StrictUndefined)
            self.template = env.from_string(text.strip())
            try:  # a template naming other variables is a config error, found before any row
                self.template.render(content="")
            except jinja2.UndefinedError as e:
                raise ValueError(f"format_prompt may only use {{{{ content }}}}: {e}") from None

    def __call__(self, row: dict, base_dir: Path, uid: str, check_images: bool,
                 root_dir: Path | None = None) -> PromptRecord:
        s = self.spec
        system = s.system_prompt
        if s.conversation_key:
            row_system, prompt, response = _conversation(row, s.conversation_key)
            system = system if system is not None else row_system
        else:
            prompt = _text_field(row, s.prompt_key, "prompt")
            response = _text_field(row, s.response_key, "response") if s.response_key else None
        answer = _text_field(row, s.answer_key, "answer") if s.answer_key else ""
        value = row.get(s.image_key) if s.image_key else None
        values = [] if value is None else value if isinstance(value, list | tuple) else [value]
        images = tuple(_resolve_image(v, base_dir, root_dir or base_dir) for v in values)
        if check_images and s.image_check != "none":
            for image in images:
                _check_image(image, s.image_check)
        text = self.template.render(content=prompt) if self.template is not None else prompt
        messages: list[dict[str, Any]] = []
        if system is not None:
            messages.append({"role": "system", "content": system})
        messages.append({"role": "user", "content": _user_content(text, len(images))})
        return PromptRecord(
            uid=uid, prompt=text, answer=answer, response=response, images=images,
            messages=tuple(messages),
        )


_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def _conversation(row: dict, key: str) -> tuple[str | None, str, str]:
    """(system or None, user text, assistant text) of a one-exchange conversation column."""
    turns = row.get(key)
    if not isinstance(turns, list | tuple):
        raise _BadRow("bad_conversation", f"{key!r} is {type(turns).__name__}, not a list of turns")
    parsed = []
    for turn in turns:
        role = _ROLES.get(str(turn.get("from", turn.get("role"))).lower()) if isinstance(turn, dict) else None
        text = turn.get("value", turn.get("content")) if isinstance(turn, dict) else None
        if role is None or not isinstance(text, str):
            raise _BadRow("bad_conversation", f"{key!r} has a turn {str(turn)[:80]!r}: expected "
                          "{'from': human|gpt|system, 'value': ...} or {'role': ..., 'content': ...}")
        parsed.append((role, text))
    system = parsed.pop(0)[1] if parsed and parsed[0][0] == "system" else None
    if [r for r, _ in parsed] != ["user", "assistant"]:
        raise _BadRow("bad_conversation", f"{key!r} has turns {[r for r, _ in parsed]}; expected "
                      "[system,] user, assistant")
    (_, user), (_, assistant) = parsed
    if not user.strip():
        raise _BadRow("empty_prompt", f"{key!r}: the user turn is empty")
    if not assistant.strip():
        raise _BadRow("empty_response", f"{key!r}: the assistant turn is empty")
    return system, user, assistant


# --- sources -----------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Source:
    name: str
    base_dir: Path
    num_rows: int
    columns: frozenset[str]
    read: Callable[[int], dict]
    rows: Callable[[], Iterator[dict | None]]  # None: a line that did not parse
    root_dir: Path | None = None  # the directory given as the source, for relative image paths


def _raw_image_features(features: Any) -> Any:
    """`features` with every Image left undecoded ({"bytes", "path"})."""
    import datasets

    def raw(feature: Any) -> Any:
        if isinstance(feature, datasets.Image):
            return datasets.Image(decode=False)
        if isinstance(feature, datasets.List | datasets.LargeList):
            return dataclasses.replace(feature, feature=raw(feature.feature))
        if isinstance(feature, dict):
            return {k: raw(v) for k, v in feature.items()}
        if isinstance(feature, list):
            return [raw(feature[0])]
        return feature

    return datasets.Features({k: raw(v) for k, v in features.items()})


def _arrow_source(ds: Any, name: str, base_dir: Path, limit: int | None = None) -> _Source:
    """Rows decoded by `datasets` (Json columns etc.), image columns left as stored."""
    features = _raw_image_features(ds.features)
    table = ds.data.table if limit is None else ds.data.table.slice(0, limit)

    def rows() -> Iterator[dict]:
        for batch in table.to_batches(max_chunksize=256):
            for raw in batch.to_pylist():
                yield features.decode_example(raw)

    return _Source(
        name, base_dir, table.num_rows, frozenset(table.column_names),
        lambda i: features.decode_example(table.slice(i, 1).to_pylist()[0]), rows,
    )


def _rows_source(rows: list[dict | None], name: str, base_dir: Path) -> _Source:
    columns = frozenset(k for row in rows if row for k in row)
    return _Source(name, base_dir, len(rows), columns, rows.__getitem__, lambda: iter(rows))


def _jsonl_source(path: Path, name: str, limit: int | None = None) -> _Source:
    """Line by line, for jsonl files `datasets` refuses (a malformed line; since such a file
    has no schema, a line's fields may have any type)."""
    parsed: list[dict | None] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        parsed.append(row if isinstance(row, dict) else None)
    return _rows_source(parsed[:limit], name, path.parent)


def _file_source(path: Path, name: str, limit: int | None = None) -> _Source:
    import datasets

    builder = _SUFFIXES[path.suffix]
    try:
        ds = datasets.load_dataset(builder, data_files=str(path), split="train")
    except (datasets.exceptions.DatasetsError, ValueError) as e:  # ArrowInvalid is a ValueError
        if path.suffix != ".jsonl":
            raise
        log.warning("%s: `datasets` cannot read it (%s); reading it line by line", path, e)
        return _jsonl_source(path, name, limit)
    return _arrow_source(ds, name, path.parent, limit)


def _hub_source(spec: DatasetSpec) -> _Source:
    """A Hub dataset ("name" or "name@split"); with max_rows only its first rows, streamed."""
    import datasets

    name, _, split = spec.path.partition("@")
    if spec.max_rows is None:
        return _arrow_source(datasets.load_dataset(name, split=split or spec.split), spec.path, Path.cwd())
    stream = datasets.load_dataset(name, split=split or spec.split, streaming=True)
    if stream.features is not None:
        stream = stream.cast(_raw_image_features(stream.features))
    return _rows_source(list(itertools.islice(stream, spec.max_rows)), spec.path, Path.cwd())


def _sources(spec: DatasetSpec) -> list[_Source]:
    path = Path(spec.path).expanduser()
    if path.is_file():
        if path.suffix not in _SUFFIXES:
            raise ValueError(f"{path}: expected a {', '.join(_SUFFIXES)} file")
        return [_file_source(path.resolve(), path.name, spec.max_rows)]
    if path.is_dir():
        # .json is left out here: directories often hold metadata .json files beside the data
        names = sorted(
            str(p.relative_to(path)) for p in path.rglob("*")
            if p.suffix in (".parquet", ".jsonl") and p.is_file()
            and not any(part.startswith(".") for part in p.relative_to(path).parts)
        )
        if not names:
            raise FileNotFoundError(f"{path} holds no .parquet or .jsonl files")
        sources, left = [], spec.max_rows
        for n in names:
            if left is not None and left <= 0:
                break
            src = _file_source((path / n).resolve(), n, left)
            sources.append(dataclasses.replace(src, root_dir=path.resolve()))
            left = None if left is None else left - src.num_rows
        return sources
    if path.suffix in _SUFFIXES or spec.path.startswith((".", "/", "~")):
        raise FileNotFoundError(f"dataset file {path} does not exist")
    return [_hub_source(spec)]


def missing_columns_error(spec: DatasetSpec, where: str, columns: Iterable[str]) -> str | None:
    """The message naming the first column `spec` needs that is not in `columns` (and the
    option to set), or None when all are there."""
    columns = sorted(columns)
    for field, key in spec.required_columns().items():
        if key not in columns:
            return (f"{where}: no column {key!r} ({spec.option}.{field}); its columns: {columns}; "
                    f"set {spec.option}.{field}=<one of them>")
    return None


# --- the dataset -------------------------------------------------------------------------------
class PromptDataset(Sequence[PromptRecord]):
    """The usable rows of a dataset; records are built on access (images stay as stored)."""

    def __init__(self, spec: DatasetSpec, sources: list[_Source], index: np.ndarray,
                 skipped: Counter, skipped_examples: dict[str, list[str]]) -> None:
        self.spec = spec
        self._sources = sources
        self._index = index  # [n, 2]: source number, row number
        self._parse = _RowParser(spec)
        self.skipped: Counter = skipped
        self.skipped_examples = skipped_examples  # first few "<uid>: <detail>" per reason

    def __len__(self) -> int:
        return len(self._index)

    def __getitem__(self, i: int) -> PromptRecord:  # type: ignore[override]
        s, r = (int(x) for x in self._index[i])
        src = self._sources[s]
        return self._parse(src.read(r), src.base_dir, f"{src.name}:{r}", check_images=False,
                           root_dir=src.root_dir)

    @property
    def fingerprint(self) -> str:
        """Changes when the usable rows change; a resumed run checks it."""
        h = hashlib.sha256()
        for src in self._sources:
            h.update(f"{src.name}:{src.num_rows};".encode())
        h.update(self._index.tobytes())
        return h.hexdigest()[:16]


def load_prompt_dataset(
    spec: DatasetSpec, *, tokenizer: Any = None, max_prompt_length: int | None = None,
    too_long: str = "prompt_too_long",
) -> PromptDataset:
    """Read and check every row of `spec`; skipped rows are counted (`.skipped`) and logged.

    With a tokenizer and max_prompt_length, rows whose chat-templated prompt has more text
    tokens are skipped, counted under `too_long` (each image counts as its one placeholder token
    here; the processor's expansion is added by the rollout engine, which skips what is still
    too long).
    """
    if (tokenizer is None) != (max_prompt_length is None):
        raise ValueError("give tokenizer and max_prompt_length together (or neither)")
    if too_long not in SKIP_REASONS:
        raise ValueError(f"too_long={too_long!r} is not one of {SKIP_REASONS}")
    sources = _sources(spec)
    for src in sources:
        problem = missing_columns_error(spec, f"{spec.path} ({src.name})", src.columns)
        if problem:
            raise ValueError(problem)
    parse = _RowParser(spec)
    keep: list[tuple[int, int]] = []
    skipped: Counter = Counter()
    examples: dict[str, list[str]] = {}
    for s, src in enumerate(sources):
        for r, row in enumerate(src.rows()):
            uid = f"{src.name}:{r}"
            try:
                if row is None:
                    raise _BadRow("invalid_json", "not a JSON object")
                record = parse(row, src.base_dir, uid, check_images=True, root_dir=src.root_dir)
                if tokenizer is not None:
                    n = len(tokenizer(chat_prompt(record, tokenizer), add_special_tokens=False)["input_ids"])
                    if n > max_prompt_length:
                        raise _BadRow(too_long, f"{n} prompt tokens > {max_prompt_length}")
            except _BadRow as bad:
                skipped[bad.reason] += 1
                found = examples.setdefault(bad.reason, [])
                if len(found) < 3:
                    found.append(f"{uid}: {bad}")
                continue
            keep.append((s, r))
    total = sum(src.num_rows for src in sources)
    if skipped:
        log.warning(
            "%s: skipped %d of %d rows: %s (e.g. %s)", spec.path, sum(skipped.values()), total,
            dict(skipped), "; ".join(e[0] for e in examples.values()),
        )
    if not keep:
        raise ValueError(f"{spec.path}: none of its {total} rows is usable; skipped {dict(skipped)}")
    log.info("%s: %d usable rows", spec.path, len(keep))
    index = np.asarray(keep, dtype=np.int64).reshape(-1, 2)
    return PromptDataset(spec, sources, index, skipped, examples)


def dataset_spec(data: Any, option: str = "data") -> DatasetSpec:
    """The spec of a recipe's data section (`config.schema.DataConfig`); `option` ("mrl.data")
    names it in errors. format_prompt "revisual" is `REVISUAL_FORMAT_PROMPT`, "none" raw text."""
    fmt = {"revisual": REVISUAL_FORMAT_PROMPT, "none": None}.get(data.format_prompt, data.format_prompt)
    return DatasetSpec(
        path=data.path, prompt_key=data.prompt_key, answer_key=data.answer_key,
        image_key=data.image_key, response_key=data.response_key, format_prompt=fmt,
        system_prompt=data.system_prompt, image_check=data.image_check,
        conversation_key=data.conversation_key, max_rows=data.max_rows, option=option,
    )


def chat_prompt(record: PromptRecord, tokenizer: Any) -> str:
    """The prompt text a rollout engine takes: the chat template with the assistant header."""
    return tokenizer.apply_chat_template(
        list(record.messages), tokenize=False, add_generation_prompt=True
    )


def rollout_request(record: PromptRecord, tokenizer: Any) -> RolloutRequest:
    return RolloutRequest(prompt=chat_prompt(record, tokenizer), images=record.images)


# --- loading in batches -----------------------------------------------------------------------
class PromptLoader:
    """A dataset with its resumable sampler: `next_batch()` gives records; the state includes
    the dataset fingerprint so a resume on changed data fails instead of silently diverging."""

    def __init__(self, dataset: PromptDataset, batch_size: int, *, seed: int,
                 shuffle: bool = True, drop_last: bool = True) -> None:
        self.dataset = dataset
        self.sampler = ResumableBatchSampler(
            len(dataset), batch_size, seed=seed, shuffle=shuffle, drop_last=drop_last
        )

    def next_batch(self) -> list[PromptRecord]:
        return [self.dataset[i] for i in self.sampler.next_batch()]

    @property
    def epoch(self) -> int:
        return self.sampler.epoch

    def state_dict(self) -> dict[str, Any]:
        return {"sampler": self.sampler.state_dict(), "fingerprint": self.dataset.fingerprint}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["fingerprint"] != self.dataset.fingerprint:
            raise ValueError(
                f"{self.dataset.spec.path}: the usable rows changed since the checkpoint "
                f"(fingerprint {state['fingerprint']} -> {self.dataset.fingerprint})"
            )
        self.sampler.load_state_dict(state["sampler"])
