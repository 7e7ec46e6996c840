"""`revisual eval` throughput: samples/s with --eval-threads 8 against 1 on the same server.

Starts vLLM's OpenAI-compatible server on a tiny random Qwen2.5-VL (or uses --base-url), writes
the five tiny fixture benchmarks, warms the server up, then evaluates every sample with 1
thread and with 8 (a fresh cache each time, so every sample is a request) and prints samples/s
of both and their ratio. The ratio measures how well concurrent requests batch in the server.

CPU (what this was written for):  python benchmarks/bench_eval.py      # ~2 minutes on 2 cores
Existing server:                  python benchmarks/bench_eval.py --base-url http://127.0.0.1:8000/v1 --model-name NAME
"""

from __future__ import annotations

import argparse
import os
import socket
import tempfile
import time
from pathlib import Path

from megatron_revisual.evaluation.datasets import RELEASED_BENCHMARKS
from megatron_revisual.evaluation.runner import EvalConfig, evaluate
from megatron_revisual.testing.eval_fixtures import write_fixture_datasets


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(base_url: str, model: str, data: Path, out: Path, threads: int, max_tokens: int) -> float:
    config = EvalConfig(
        model_name=model,
        base_url=base_url,
        output_dir=out,
        dataset_dir=data,
        dataset_source="local",
        eval_threads=threads,
        max_tokens=max_tokens,
        temperature=0.0,
        min_pixels=56 * 56,
        max_pixels=112 * 112 * 4,
    )
    start = time.perf_counter()
    result = evaluate(config)
    elapsed = time.perf_counter() - start
    assert result.summary["requests"]["from_cache"] == 0
    return result.summary["overall"]["total"] / elapsed


def bench(base_url: str, model: str, work: Path, max_tokens: int) -> None:
    data = work / "data"
    counts = write_fixture_datasets(data, names=RELEASED_BENCHMARKS)  # what EvalConfig's default asks
    _run(base_url, model, data, work / "warmup", 4, max_tokens)  # first requests are slower
    rates = {t: _run(base_url, model, data, work / f"threads{t}", t, max_tokens) for t in (1, 8)}
    n = sum(counts.values())
    print(f"{n} samples (5 benchmarks), max_tokens={max_tokens}, server at {base_url}")
    print(f"--eval-threads 1: {rates[1]:.2f} samples/s")
    print(f"--eval-threads 8: {rates[8]:.2f} samples/s")
    print(f"ratio 8 vs 1:     {rates[8] / rates[1]:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base-url", default=None, help="use this server instead of starting one")
    parser.add_argument("--model-name", default="tiny")
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench_eval-") as tmp:
        work = Path(tmp)
        if args.base_url:
            bench(args.base_url, args.model_name, work, args.max_tokens)
            return
        from megatron_revisual.serving import VLLMServer, build_server_command
        from megatron_revisual.testing.tiny_checkpoint import make_tiny_checkpoint

        model = make_tiny_checkpoint(work / "tiny-vl", seed=0)
        cmd = build_server_command(
            model,
            port=_free_port(),
            served_model_name=args.model_name,
            dtype="float32",
            max_model_len=1024,
            extra_args=["--enforce-eager", "--max-num-seqs", "8"],
        )
        env = {
            **os.environ,
            "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
        }
        with open(work / "server.log", "w") as log, VLLMServer(cmd, log=log, env=env) as server:
            bench(server.base_url, args.model_name, work, args.max_tokens)


if __name__ == "__main__":
    main()
