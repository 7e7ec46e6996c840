"""`revisual data`: a recipe's data read through the training code, before a job is queued; and
the check `revisual train` and the launchers make that every data source exists.

    revisual data configs/tiny_cpu_demo.yaml                      # every stage, every row
    revisual data configs/qwen25_vl_7b_8xh100.yaml --rows 64      # the first 64 rows per source
    revisual data CONFIG mrl.data.path=/data/mmrl --stages mrl

Per data section (a stage's data and, when it validates, its validation data) it loads the rows
as the stage does: the same spec (`data.datasets.dataset_spec`), the cold start's `data.sft.load_sft_set` and
`SFTFormatter` (chat template, loss mask, images through the processor, `max_length`), the GRPO
stages' load with `rollout.max_prompt_length`, the tokenizer and processor of `model.hf_path`
(their min / max pixels decide the visual tokens). It prints rows read / kept / skipped by
reason, prompt and response token-length percentiles, images per row, visual tokens per image,
and the share the recipe's max lengths truncate (cold start) or that the rollout engine would
skip once images are expanded (GRPO). `--rows N` sets each section's `max_rows` (a Hub dataset
is then streamed). Exit 1 when a section would train on nothing or cannot be read (a missing
column names the option to set), 2 for a bad config. A recipe with a `prepare:` section is
prepared first (the tiny model, the synthetic data), as `revisual train` would.

`check_data_sources(cfg)` is the cheap part, run by `revisual train` before any rank starts and
by the launchers: each source exists and is readable, and its first row has the columns the
section names; a problem is one line naming the option and the path (`DataSourceError`, exit 2).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from megatron_revisual.config import ConfigError
from megatron_revisual.config.schema import DataConfig, RunConfig

__all__ = ["DataSourceError", "SectionReport", "add_data_arguments", "check_data_sources", "data_sections",
           "dry_run", "format_report", "run_data"]


class DataSourceError(ConfigError):
    """A stage's data source that is missing, unreadable, or lacks a column the recipe names."""


def data_sections(cfg: RunConfig, stages: list[str] | None = None) -> list[tuple[str, str, DataConfig]]:
    """(stage, option, data) of every data section the listed stages read, in stage order."""
    out = []
    for name in stages or cfg.stages:
        stage = getattr(cfg, name)
        if stage is None:
            continue
        out.append((name, f"{name}.data", stage.data))
        v = getattr(stage, "validation", None)
        if v is not None and v.data is not None and v.every:
            out.append((name, f"{name}.validation.data", v.data))
    return out


# --- the cheap check ---------------------------------------------------------------------------
def _first_columns(path: Path) -> list[str] | None:
    """The columns of a local source's first row (None when that needs reading it all: .json)."""
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in (".parquet", ".jsonl") and p.is_file()
                       and not any(part.startswith(".") for part in p.relative_to(path).parts))
        if not files:
            raise OSError("holds no .parquet or .jsonl files")
        path = files[0]
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return list(pq.read_schema(path).names)
    if path.suffix == ".jsonl":
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    row = json.loads(line)
                    return sorted(row) if isinstance(row, dict) else []
        return []
    with open(path, "rb") as f:  # readable at all
        f.read(1)
    return None


def _hub_columns(name: str, split: str) -> list[str] | None:
    import datasets

    builder = datasets.load_dataset_builder(name)
    splits = builder.info.splits
    if splits and split not in splits:
        raise ValueError(f"has no split {split!r}; its splits: {sorted(splits)}")
    return sorted(builder.info.features) if builder.info.features else None


def check_data_sources(cfg: RunConfig, *, skip_under: Path | None = None) -> list[str]:
    """Raise `DataSourceError` (one line) for the first source that does not exist, cannot be
    read or lacks a named column; returns notes on what was not checked. Sources under
    `skip_under` (the directory `prepare` writes when the run starts) are left out."""
    from megatron_revisual.data.datasets import dataset_spec, missing_columns_error

    notes = []
    for _stage, option, data in data_sections(cfg):
        spec = dataset_spec(data, option)
        shown = f"{option}.path={data.path}"
        path = Path(data.path).expanduser()
        if skip_under is not None and path.resolve().is_relative_to(skip_under.resolve()):
            notes.append(f"{shown}: written by prepare when the run starts; not checked")
            continue
        try:
            if path.exists():
                columns = _first_columns(path)
            elif path.suffix in (".parquet", ".jsonl", ".json") or data.path.startswith((".", "/", "~")):
                raise DataSourceError(f"{shown}: no such file or directory")
            else:
                name, _, split = data.path.partition("@")
                columns = _hub_columns(name, split or spec.split)
        except DataSourceError:
            raise
        except Exception as e:  # unreadable file, unreachable Hub, bad JSON: one line, named
            what = "the Hub dataset cannot be opened" if not path.exists() else "cannot be read"
            raise DataSourceError(f"{shown}: {what} ({type(e).__name__}: {e})") from None
        if columns is None:
            notes.append(f"{shown}: columns not checked (read when the stage loads it)")
            continue
        problem = missing_columns_error(spec, shown, columns)
        if problem:
            raise DataSourceError(problem)
    return notes


# --- the dry run -------------------------------------------------------------------------------
@dataclasses.dataclass
class SectionReport:
    stage: str
    option: str
    path: str
    error: str | None = None
    rows_read: int = 0
    kept: int = 0
    skipped: Counter = dataclasses.field(default_factory=Counter)
    prompt_tokens: list[int] = dataclasses.field(default_factory=list)
    response_tokens: list[int] = dataclasses.field(default_factory=list)
    images_per_row: Counter = dataclasses.field(default_factory=Counter)
    visual_tokens: list[int] = dataclasses.field(default_factory=list)
    over_limit: int = 0  # truncated (cold start) / too long after image expansion (GRPO)
    limit: str = ""
    notes: list[str] = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.error is None and self.kept > 0


def _sft_section(report: SectionReport, stage_cfg: Any, option: str, tokenizer: Any, processor: Any) -> None:
    from megatron_revisual.data.sft import SFTFormatter, load_sft_set

    dataset = load_sft_set(stage_cfg, tokenizer)
    report.kept, report.skipped = len(dataset), Counter(dataset.skipped)
    report.rows_read = report.kept + sum(report.skipped.values())
    formatter = SFTFormatter(tokenizer, max_length=stage_cfg.max_length, processor=processor)
    examples = 0
    for i in range(len(dataset)):
        record = dataset[i]
        example = formatter(record)
        if example is None:
            continue
        examples += 1
        report.prompt_tokens.append(example.num_tokens - example.num_target_tokens)
        report.response_tokens.append(example.num_target_tokens)
        report.images_per_row[len(record.images)] += 1
        if example.image_grid_thw is not None:
            merge = int(processor.image_processor.merge_size)
            report.visual_tokens += (example.image_grid_thw.prod(-1) // (merge * merge)).tolist()
    dropped = {k: v for k, v in formatter.counts.items() if k != "truncated"}
    report.skipped.update(dropped)
    report.kept = examples
    report.over_limit = formatter.counts.get("truncated", 0)
    report.limit = f"cold_start.max_length={stage_cfg.max_length} truncates"


def _read_rows(report: SectionReport, data: DataConfig, option: str, **filters: Any) -> Any:
    from megatron_revisual.data.datasets import dataset_spec, load_prompt_dataset

    dataset = load_prompt_dataset(dataset_spec(data, option), **filters)  # as GRPOLoop / load_validation_set
    report.kept, report.skipped = len(dataset), Counter(dataset.skipped)
    report.rows_read = report.kept + sum(report.skipped.values())
    for i in range(len(dataset)):
        report.images_per_row[len(dataset[i].images)] += 1
    return dataset


def _grpo_section(report: SectionReport, cfg: RunConfig, stage_cfg: Any, data: DataConfig, option: str,
                  tokenizer: Any) -> None:
    from megatron_revisual.data.datasets import rollout_request
    from megatron_revisual.rollout.engine import PromptPreparer, UnreadableImageError, load_image

    limit = stage_cfg.rollout.max_prompt_length
    dataset = _read_rows(report, data, option, tokenizer=tokenizer, max_prompt_length=limit)
    stage = option.split(".")[0]
    report.limit = f"{stage}.rollout.max_prompt_length={limit} (after image expansion; the engine skips these)"
    # the engine's own count (rollout.engine.PromptPreparer), with the image limit GRPOLoop gives it
    max_images = 1 if cfg.model.vision is not None else 0
    preparer = PromptPreparer(cfg.model.hf_path, prompt_limit=limit, max_images=max_images)
    too_many = 0
    for i in range(len(dataset)):
        record = dataset[i]
        if len(record.images) > max_images:
            too_many += 1
            continue
        prepared, skipped = preparer.prepare([rollout_request(record, tokenizer)])
        for image in record.images:
            try:
                report.visual_tokens.append(preparer.image_tokens(load_image(image)))
            except UnreadableImageError:
                pass
        if prepared:
            report.prompt_tokens.append(prepared[0].prompt_tokens)
        elif skipped[0].reason == "prompt_too_long":
            report.over_limit += 1
    if too_many:
        report.error = (f"{too_many} of {report.kept} rows have more than {max_images} image(s), the most the "
                        "rollout engine takes per prompt (train.grpo_loop: max_images_per_prompt): the "
                        "stage would stop at the first")


def dry_run(cfg: RunConfig, *, rows: int | None = None, stages: list[str] | None = None,
            skip_under: Path | None = None) -> list[SectionReport]:
    """Read every data section of `stages` (default: the config's) as training would; sections
    under `skip_under` (what `prepare` writes when the run starts) are left out. Without a
    tokenizer at model.hf_path the rows are still parsed (columns, images), not tokenized."""
    hf = Path(cfg.model.hf_path) if cfg.model.hf_path else None
    tokenizer = processor = None
    note = None
    if hf is not None and (hf / "tokenizer_config.json").is_file():
        from megatron_revisual.data.sft import load_tokenizer_and_processor

        tokenizer, processor = load_tokenizer_and_processor(hf, cfg.model.vision is not None)
        if processor is not None:
            ip = processor.image_processor
            size = getattr(ip, "size", None) or {}
            low = getattr(ip, "min_pixels", None) or size.get("shortest_edge")
            high = getattr(ip, "max_pixels", None) or size.get("longest_edge")
            print(f"images: resized by the image processor of {hf} (min_pixels {low}, max_pixels {high}), "
                  f"{ip.patch_size}-pixel patches merged {ip.merge_size} x {ip.merge_size} into one token")
    else:
        note = f"model.hf_path={cfg.model.hf_path}: no tokenizer there; token statistics skipped"
    reports = []
    for stage, option, data in data_sections(cfg, stages):
        if skip_under is not None and Path(data.path).resolve().is_relative_to(skip_under.resolve()):
            continue
        if rows is not None:
            data = dataclasses.replace(data, max_rows=rows)
        report = SectionReport(stage, option, data.path, notes=[note] if note else [])
        stage_cfg = getattr(cfg, stage)
        try:
            if tokenizer is None:  # rows, columns, images: what can be checked without it
                _read_rows(report, data, option)
            elif stage == "cold_start":
                _sft_section(report, dataclasses.replace(stage_cfg, data=data), option, tokenizer, processor)
            else:
                _grpo_section(report, cfg, stage_cfg, data, option, tokenizer)
        except (OSError, ValueError) as e:  # missing file / column, nothing usable, unreadable
            report.error = str(e)
        reports.append(report)
    return reports


def _percentiles(values: list[int]) -> str:
    if not values:
        return "-"
    ordered = sorted(values)

    def at(q: float) -> int:
        return ordered[min(len(ordered) - 1, int(q * (len(ordered) - 1) + 0.5))]

    return f"p50 {at(0.5)}, p90 {at(0.9)}, p99 {at(0.99)}, max {ordered[-1]}"


def format_report(reports: list[SectionReport]) -> str:
    lines = []
    for r in reports:
        lines.append(f"== {r.option}.path={r.path}")
        lines += [f"   note: {n}" for n in r.notes]
        if r.error is not None:
            lines.append(f"   FAILED: {r.error}")
            continue
        skipped = ", ".join(f"{k} {v}" for k, v in sorted(r.skipped.items())) or "none"
        lines.append(f"   rows read {r.rows_read}, kept {r.kept}, skipped {sum(r.skipped.values())} ({skipped})")
        if r.prompt_tokens:
            lines.append(f"   prompt tokens: {_percentiles(r.prompt_tokens)}")
        if r.response_tokens:
            lines.append(f"   response tokens: {_percentiles(r.response_tokens)}")
        if r.limit and r.kept:
            lines.append(f"   {r.limit}: {r.over_limit} of {r.kept} ({100 * r.over_limit / r.kept:.1f}%)")
        per_row = ", ".join(f"{k}: {v}" for k, v in sorted(r.images_per_row.items()))
        lines.append(f"   images per row: {per_row or '-'}")
        if r.visual_tokens:
            lines.append(f"   visual tokens per image: {_percentiles(r.visual_tokens)}")
        lines.append("   ok" if r.ok else "   FAILED: no usable row: the stage would train on nothing")
    return "\n".join(lines) + "\n"


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML recipe, e.g. configs/qwen25_vl_7b_8xh100.yaml")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. mrl.data.path=/data/mmrl")
    parser.add_argument("--rows", type=int, default=None, help="read only the first N rows of each source")
    parser.add_argument("--stages", default=None, help="comma-separated stages (default: the recipe's)")


def run_data(args: argparse.Namespace) -> int:
    from megatron_revisual.config import config_from_dict, read_raw_config, validate_config
    from megatron_revisual.config.validate import validate_for_training
    from megatron_revisual.logfiles import ignore_known_warnings
    from megatron_revisual.prepare import write_prepared_inputs

    if args.rows is not None and args.rows < 1:
        print(f"revisual data: error: --rows {args.rows} must be >= 1", file=sys.stderr)
        return 2
    raw = read_raw_config(args.config, args.overrides)
    write_prepared_inputs(raw, lambda m: print(f"revisual data: {m}", file=sys.stderr))
    cfg = config_from_dict(raw, source=str(args.config) + (" + overrides" if args.overrides else ""))
    validate_config(cfg)
    validate_for_training(cfg)
    stages = [s.strip() for s in args.stages.split(",")] if args.stages else None
    unknown = [s for s in stages or [] if s not in cfg.stages]
    if unknown:
        print(f"revisual data: error: --stages {args.stages}: {unknown} not in stages={cfg.stages}", file=sys.stderr)
        return 2
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import datasets

    datasets.disable_progress_bars()
    ignore_known_warnings(on_gpu=False)  # Megatron's TE/apex notice, from the training modules' imports
    reports = dry_run(cfg, rows=args.rows, stages=stages)
    print(format_report(reports), end="")
    failed = [r.option for r in reports if not r.ok]
    if failed:
        print(f"revisual data: {len(failed)} of {len(reports)} data sections would not train: "
              f"{', '.join(failed)}", file=sys.stderr)
        return 1
    return 0
