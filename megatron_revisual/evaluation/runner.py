"""`revisual eval`: the ReVisual-R1 paper's benchmarks through an OpenAI-compatible endpoint.

    revisual eval ... --datasets paper --aime-runs 8           # Table 2's ten, in its layout
    revisual eval --compare runs/eval/m_summary.json paper     # a run beside the paper's rows

The flags are those of the released evaluation tool (``eval/src/main.py``), with its defaults,
so its users can switch; the extra ones (--dataset-source, --max-samples, --retry-base-delay,
--request-timeout) only add control. On CPU, against `revisual serve` of a tiny model:

    revisual serve runs/tiny --port 8000 --served-model-name tiny --dtype float32 \
        --max-model-len 1024 --vllm-args="--enforce-eager" &
    revisual eval --model-name tiny --openai-base-url http://127.0.0.1:8000/v1 \\
        --dataset-dir data/eval --datasets mathvista,wemath --max-tokens 64 --output-dir runs/eval

On GPUs: the same against `revisual serve /path/to/Revisual-R1-final --tensor-parallel-size 8`.
Also runnable as ``python -m megatron_revisual.evaluation ...``.

Outputs in --output-dir, named after the model: ``<model>_samples.jsonl`` (one line per sample:
response, extracted answer, correctness, categories), ``<model>_summary.json`` and
``<model>_summary.md``; and, as the released tool writes them, one ``<model>___<dataset>.json``
per benchmark ({"results": [...], "metrics": {...}, "config": {...}}; a result's "prediction" is
the response text, as there). Finished requests are cached (see `client.PredictionCache`) in
--cache-dir, by default ``<output-dir>/cache``: a rerun, or a run resumed after an interruption,
asks only for what is missing.

Before the first request the endpoint is asked once for its models: --model-name must be among
them, and --max-tokens below the context vLLM reports (max_model_len). Exit status: 0; 1 when
more samples errored than --allow-errors (default 0; the outputs are still written) or the
endpoint kept failing; 2 for bad input (dataset files, flags, a model the endpoint does not serve).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from megatron_revisual.evaluation.client import (
    ChatClient,
    Completion,
    EndpointMismatch,
    PredictionCache,
    RequestRejected,
    RunAborted,
    ServerUnavailable,
    build_messages,
    cache_key,
    safe_name,
)
from megatron_revisual.evaluation.datasets import (
    BENCHMARKS,
    RELEASED_BENCHMARKS,
    DatasetFilesNotFound,
    DatasetFormatError,
    Sample,
    load_benchmark,
    parse_dataset_names,
)
from megatron_revisual.evaluation.grading import grade_response
from megatron_revisual.evaluation.metrics import markdown_report, summarize
from megatron_revisual.evaluation.prompts import REVISUAL_SYSTEM_PROMPT
from megatron_revisual.evaluation.tables import compare_table, paper_layout, run_row

__all__ = ["EvalConfig", "EvalResult", "add_eval_arguments", "evaluate", "run_eval"]


@dataclass(frozen=True, kw_only=True)
class EvalConfig:
    """One evaluation run; the defaults are the released tool's."""

    model_name: str
    output_dir: Path
    base_url: str = "https://api.openai.com/v1"
    api_key: str = "EMPTY"
    cache_dir: Path | None = None  # None: <output_dir>/cache
    max_tokens: int = 8192
    min_pixels: int = 262144
    max_pixels: int = 1048576
    temperature: float = 0.3
    top_p: float = 0.95
    system_prompt: str = REVISUAL_SYSTEM_PROMPT
    datasets: tuple[str, ...] = RELEASED_BENCHMARKS
    dataset_dir: Path | None = None
    aime_runs: int = 8  # samples per AIME problem (the paper's caption: eight runs)
    dataset_source: str = "auto"
    eval_threads: int = 8
    max_retries: int = 3
    retry_base_delay: float = 1.0
    request_timeout: float = 3600.0
    max_samples: int | None = None
    allow_errors: int = 0

    def __post_init__(self) -> None:
        problems = []
        if self.allow_errors < 0:
            problems.append(f"--allow-errors {self.allow_errors} must be >= 0")
        if self.eval_threads < 1:
            problems.append(f"--eval-threads {self.eval_threads} must be >= 1")
        if self.max_retries < 0:
            problems.append(f"--max-retries {self.max_retries} must be >= 0")
        if self.max_tokens < 1:
            problems.append(f"--max-tokens {self.max_tokens} must be >= 1")
        if not 0 < self.min_pixels <= self.max_pixels:
            problems.append(
                f"--min-pixels {self.min_pixels} / --max-pixels {self.max_pixels}: need "
                "0 < min <= max"
            )
        if self.max_samples is not None and self.max_samples < 1:
            problems.append(f"--max-samples {self.max_samples} must be >= 1")
        if self.aime_runs < 1:
            problems.append(f"--aime-runs {self.aime_runs} must be >= 1")
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def sampling_settings(self) -> dict[str, Any]:
        """What, besides model, dataset and prompt, decides a response: the cache key part."""
        return {
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "min_pixels": self.min_pixels,
            "max_pixels": self.max_pixels,
            "system_prompt": self.system_prompt,
        }


@dataclass(kw_only=True)
class EvalResult:
    summary: dict[str, Any]
    samples_path: Path
    summary_path: Path
    markdown_path: Path
    dataset_paths: list[Path]  # the released tool's <model>___<dataset>.json files
    records: list[dict[str, Any]] = field(repr=False)

    @property
    def errors(self) -> int:
        return sum(1 for r in self.records if r["error"])


def _record(sample: Sample, completion: dict[str, Any], *, cached: bool) -> dict[str, Any]:
    error = completion.get("error")
    response = completion.get("response") or ""
    grade = grade_response(
        response,
        sample.answer,
        multiple_choice=sample.multiple_choice,
        choices=sample.choices,
        precision=sample.precision,
        rule=sample.grading,
    )
    return {
        "dataset": sample.dataset,
        "id": sample.id,
        "question": sample.prompt,
        "answer": sample.answer,
        "multiple_choice": sample.multiple_choice,
        "subsets": list(sample.subsets),
        "group": sample.group,
        "step": sample.step,
        "run": sample.run,
        "grading": sample.grading,
        "response": response,
        "extracted": grade.extracted,
        "prediction": grade.prediction,
        "parsed": grade.parsed and not error,
        "correct": grade.correct and not error,
        "error": error,
        "finish_reason": completion.get("finish_reason"),
        "completion_tokens": completion.get("completion_tokens"),
        "cached": cached,
    }


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _log(message: str) -> None:
    print(f"[eval] {message}", file=sys.stderr, flush=True)


def evaluate(config: EvalConfig) -> EvalResult:
    """Load, ask (thread pool, retries, cache), grade, summarize and write; see module doc."""
    # Every dataset is loaded before the first request, so a missing file fails fast.
    samples = {
        name: load_benchmark(
            name, config.dataset_dir, source=config.dataset_source, limit=config.max_samples,
            runs=config.aime_runs,
        )
        for name in config.datasets
    }
    cache = PredictionCache(config.cache_dir or config.output_dir / "cache", config.model_name)
    settings = config.sampling_settings
    records: dict[tuple[str, str], dict[str, Any]] = {}
    todo: list[tuple[Sample, str]] = []
    for name, rows in samples.items():
        entries = cache.load(name)
        for sample in rows:
            key = cache_key(
                model=config.model_name,
                dataset=name,
                sample_id=sample.id,
                prompt=sample.prompt,
                settings=settings,
            )
            if key in entries:
                records[(name, sample.id)] = _record(sample, entries[key], cached=True)
            else:
                todo.append((sample, key))
    total = sum(len(rows) for rows in samples.values())
    _log(f"{total} samples, {total - len(todo)} from cache, {len(todo)} to ask {config.base_url}")

    client = ChatClient(
        model=config.model_name,
        api_key=config.api_key,
        base_url=config.base_url,
        max_tokens=config.max_tokens,
        temperature=config.temperature,
        top_p=config.top_p,
        max_retries=config.max_retries,
        retry_base_delay=config.retry_base_delay,
        request_timeout=config.request_timeout,
    )

    # Set by the first fatal failure, before its future completes, so that no queued or
    # retrying request starts after it: an aborted run leaves nothing talking to the server.
    stop = threading.Event()

    def ask(sample: Sample) -> Completion:
        what = f"{sample.dataset}/{sample.id}"
        if stop.is_set():
            raise RunAborted(f"{what}: not asked, the run is stopping")
        try:
            messages = build_messages(
                sample,
                system_prompt=config.system_prompt,
                min_pixels=config.min_pixels,
                max_pixels=config.max_pixels,
            )
        except (OSError, ValueError) as e:  # unreadable or corrupt image file
            stop.set()
            raise DatasetFormatError(f"{what}: image: {e}") from e
        try:
            return client.complete(messages, what=what, stop=stop)
        except ServerUnavailable:
            stop.set()
            raise

    if todo:
        _log(f"endpoint: {client.check_endpoint()}")
    requests = 0
    start = time.monotonic()
    next_report = 0.1
    pool = ThreadPoolExecutor(max_workers=config.eval_threads, thread_name_prefix="eval")
    pending: dict[Future, tuple[Sample, str]] = {pool.submit(ask, s): (s, k) for s, k in todo}
    try:
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            # Grading and cache writes stay on this thread: math-verify's timeout needs the
            # main thread, and one writer keeps the cache file simple.
            for future in done:
                sample, key = pending.pop(future)
                try:
                    completion = future.result()
                except RunAborted:
                    continue  # the future that stopped the run raises the real error
                except RequestRejected as e:
                    requests += 1
                    _log(f"warning: {e}")
                    entry = {"error": str(e)}  # not cached: a rerun asks again
                else:
                    requests += completion.attempts
                    entry = {
                        "key": key,
                        "dataset": sample.dataset,
                        "id": sample.id,
                        "response": completion.text,
                        "finish_reason": completion.finish_reason,
                        "completion_tokens": completion.completion_tokens,
                    }
                    cache.put(sample.dataset, entry)
                records[(sample.dataset, sample.id)] = _record(sample, entry, cached=False)
            finished = len(todo) - len(pending)
            if todo and (finished / len(todo) >= next_report or not pending):
                rate = finished / max(time.monotonic() - start, 1e-9)
                _log(f"{finished}/{len(todo)} requests done ({rate:.2f} samples/s)")
                next_report = finished / len(todo) + 0.1
    except BaseException:
        # Finished samples are in the cache already; stop asking for the rest (a request in
        # flight ends on its own: waiting for a long generation would delay the error).
        stop.set()
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown(wait=True)

    ordered = [records[(name, s.id)] for name, rows in samples.items() for s in rows]
    summary = {"model": config.model_name, **summarize(ordered, config.datasets)}
    summary["requests"] = {"sent": requests, "from_cache": total - len(todo)}
    summary["config"] = {
        k: (str(v) if isinstance(v, Path) else v)
        for k, v in asdict(config).items()
        if k != "api_key"
    }

    config.output_dir.mkdir(parents=True, exist_ok=True)
    stem = safe_name(config.model_name)
    samples_path = config.output_dir / f"{stem}_samples.jsonl"
    summary_path = config.output_dir / f"{stem}_summary.json"
    markdown_path = config.output_dir / f"{stem}_summary.md"
    _write_atomic(samples_path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in ordered))
    _write_atomic(summary_path, json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    table = "\n## In the layout of the paper's Table 2 (percent)\n\n" + paper_layout([run_row(summary)])
    _write_atomic(markdown_path, markdown_report(config.model_name, summary) + table)
    dataset_paths = []
    for name in config.datasets:
        path = config.output_dir / f"{stem}___{name}.json"
        seed_style = {
            "results": [_released_result(r) for r in ordered if r["dataset"] == name],
            "metrics": summary["datasets"][name],
            "config": summary["config"],
        }
        _write_atomic(path, json.dumps(seed_style, indent=2, ensure_ascii=False) + "\n")
        dataset_paths.append(path)
    return EvalResult(
        summary=summary,
        samples_path=samples_path,
        summary_path=summary_path,
        markdown_path=markdown_path,
        dataset_paths=dataset_paths,
        records=ordered,
    )


def _released_result(record: dict[str, Any]) -> dict[str, Any]:
    """A sample as the released tool's per-dataset file lists it (its "prediction" is the
    response text, "accuracy" 1.0 or 0.0, "source" the sub-benchmark), plus what we extracted."""
    return {
        "id": record["id"],
        "question": record["question"],
        "answer": record["answer"],
        "dataset": record["dataset"],
        "source": record["subsets"][0] if record["subsets"] else record["dataset"],
        "prediction": record["response"],
        "accuracy": 1.0 if record["correct"] else 0.0,
        "correct": record["correct"],
        "extracted": record["prediction"],
        "error": record["error"],
    }


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `revisual eval` (the released tool's names and defaults, plus a few)."""
    p = parser
    p.add_argument("--model-name", help="model name as the endpoint serves it (required unless only comparing)")
    p.add_argument(
        "--openai-api-key",
        default=os.environ.get("OPENAI_API_KEY", "EMPTY"),
        help="API key (default: $OPENAI_API_KEY, else 'EMPTY', which a local vLLM accepts)",
    )
    p.add_argument(
        "--openai-base-url", default="https://api.openai.com/v1", help="endpoint base URL"
    )
    p.add_argument(
        "--cache-dir", type=Path, default=None, help="prediction cache (default: OUTPUT_DIR/cache)"
    )
    p.add_argument("--output-dir", type=Path, default=Path("eval_results"), help="where results go")
    p.add_argument("--max-tokens", type=int, default=8192, help="maximum tokens to generate")
    p.add_argument("--min-pixels", type=int, default=262144, help="images smaller are scaled up")
    p.add_argument("--max-pixels", type=int, default=1048576, help="images larger are scaled down")
    p.add_argument("--temperature", type=float, default=0.3, help="sampling temperature")
    p.add_argument("--top-p", type=float, default=0.95, help="top-p sampling")
    p.add_argument(
        "--system-prompt", default=REVISUAL_SYSTEM_PROMPT, help="system prompt ('' for none)"
    )
    p.add_argument(
        "--datasets",
        default="all",
        help=f"comma-separated subset of {','.join(BENCHMARKS)}; 'all': the released tool's "
        f"{','.join(RELEASED_BENCHMARKS)}; 'paper': the ten of the paper's Table 2",
    )
    p.add_argument(
        "--aime-runs", type=int, default=8,
        help="samples per AIME 2024 / 2025 problem; scored as their mean (avg@n) with pass@k "
        "beside it (default 8: the paper's Table 2 caption, 'averaged over eight runs')",
    )
    p.add_argument(
        "--compare", nargs="+", metavar="FILE", default=None,
        help="print runs side by side in the paper's table layout: <model>_summary.json files "
        "(or folders holding one) and/or 'paper' (the paper's Table 2 rows and each run's gap "
        "to its ReVisual-R1); with --model-name, this run comes first",
    )
    p.add_argument(
        "--dataset-dir", type=Path, default=None, help="local benchmark files (see docs)"
    )
    p.add_argument(
        "--dataset-source",
        choices=("auto", "local", "hub"),
        default="auto",
        help="auto: --dataset-dir if it has the files, else the Hub",
    )
    p.add_argument("--eval-threads", type=int, default=8, help="concurrent requests")
    p.add_argument(
        "--max-retries",
        type=int,
        default=3,
        help="retries per request (connection errors, 429, 5xx)",
    )
    p.add_argument(
        "--retry-base-delay",
        type=float,
        default=1.0,
        help="first backoff in seconds, doubled per retry",
    )
    p.add_argument("--request-timeout", type=float, default=3600.0, help="seconds per request")
    p.add_argument("--max-samples", type=int, default=None, help="first N samples per dataset only")
    p.add_argument(
        "--allow-errors",
        type=int,
        default=0,
        help="samples whose request failed that still give exit status 0 (default 0)",
    )


def run_eval(args: argparse.Namespace) -> int:
    """`revisual eval`; 0 on success, 1 if the endpoint failed or more samples errored than
    --allow-errors, 2 for bad input (module docstring)."""
    if args.model_name is None:
        if not args.compare:
            print("revisual eval: error: --model-name is required (or --compare FILE... alone)", file=sys.stderr)
            return 2
        try:
            print(compare_table(args.compare), end="")
        except (OSError, ValueError) as e:
            print(f"revisual eval: error: {e}", file=sys.stderr)
            return 2
        return 0
    try:
        config = EvalConfig(
            model_name=args.model_name,
            api_key=args.openai_api_key,
            base_url=args.openai_base_url,
            cache_dir=args.cache_dir,
            output_dir=args.output_dir,
            max_tokens=args.max_tokens,
            min_pixels=args.min_pixels,
            max_pixels=args.max_pixels,
            temperature=args.temperature,
            top_p=args.top_p,
            system_prompt=args.system_prompt,
            datasets=parse_dataset_names(args.datasets),
            dataset_dir=args.dataset_dir,
            dataset_source=args.dataset_source,
            eval_threads=args.eval_threads,
            max_retries=args.max_retries,
            retry_base_delay=args.retry_base_delay,
            request_timeout=args.request_timeout,
            max_samples=args.max_samples,
            allow_errors=args.allow_errors,
            aime_runs=args.aime_runs,
        )
        if args.compare:  # a bad --compare file fails before any request
            compare_table(args.compare)
        result = evaluate(config)
    except (DatasetFilesNotFound, DatasetFormatError, EndpointMismatch, ValueError, FileNotFoundError) as e:
        print(f"revisual eval: error: {e}", file=sys.stderr)
        return 2
    except ServerUnavailable as e:
        print(
            f"revisual eval: error: {e}\nFinished samples are cached; rerun to resume.",
            file=sys.stderr,
        )
        return 1
    print(result.markdown_path.read_text(encoding="utf-8"), end="")
    if args.compare:
        print("\n" + compare_table(args.compare, current=run_row(result.summary)), end="")
    print(f"results: {result.samples_path}, {result.summary_path}, {result.markdown_path}")
    if result.errors > config.allow_errors:
        first = next(r for r in result.records if r["error"])
        print(
            f"revisual eval: error: {result.errors} of {len(result.records)} samples failed "
            f"(--allow-errors {config.allow_errors}); first: {first['error']}",
            file=sys.stderr,
        )
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="revisual eval", description=__doc__.split("\n\n")[0])
    add_eval_arguments(parser)
    return run_eval(parser.parse_args(argv))
