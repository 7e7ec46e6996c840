"""`revisual eval` end to end against vLLM's real OpenAI-compatible server on CPU.

The server (started once for the module by `serving.VLLMServer`, serving a tiny random
Qwen2.5-VL) sits behind a small proxy on loopback that counts the chat requests reaching the
server and can fail requests on demand (HTTP 503), so request counts, retries and resumption
are observed from the server's side, not from the client's own bookkeeping. The random model's
answers are garbage: the tests check the bookkeeping (summary = recount of the jsonl, requests
sent, cache hits), not accuracy.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from megatron_revisual.evaluation.datasets import PAPER_BENCHMARKS, RELEASED_BENCHMARKS
from megatron_revisual.evaluation.metrics import wemath_metrics
from megatron_revisual.evaluation.runner import add_eval_arguments, run_eval
from megatron_revisual.testing.eval_fixtures import write_fixture_datasets

pytestmark = [pytest.mark.integration, pytest.mark.vllm]

CHAT_PATH = "/v1/chat/completions"


class FaultProxy:
    """HTTP proxy on 127.0.0.1 in front of the server: counts chat requests forwarded, and
    answers 503 instead of forwarding for the next ``fail_next`` requests, or for every request
    after ``fail_after`` forwarded ones."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.lock = threading.Lock()
        self.forwarded = 0
        self.failed = 0
        self.fail_next = 0
        self.fail_after: int | None = None
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def _relay(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if self.path.endswith(CHAT_PATH) and proxy._should_fail():
                    payload = b'{"error": {"message": "injected fault", "code": 503}}'
                    self.send_response(503)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                conn = http.client.HTTPConnection("127.0.0.1", proxy.upstream_port, timeout=600)
                headers = {
                    k: v
                    for k, v in self.headers.items()
                    if k.lower() not in ("host", "connection", "content-length")
                }
                conn.request(self.command, self.path, body=body, headers=headers)
                upstream = conn.getresponse()
                data = upstream.read()
                conn.close()
                self.send_response(upstream.status)
                self.send_header(
                    "Content-Type", upstream.getheader("Content-Type", "application/json")
                )
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = _relay

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def _should_fail(self) -> bool:
        with self.lock:
            if self.fail_next > 0:
                self.fail_next -= 1
                self.failed += 1
                return True
            if self.fail_after is not None and self.forwarded >= self.fail_after:
                self.failed += 1
                return True
            self.forwarded += 1
            return False

    def reset(self) -> None:
        with self.lock:
            self.forwarded = self.failed = self.fail_next = 0
            self.fail_after = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def proxy(tmp_path_factory):
    from megatron_revisual.serving import VLLMServer, build_server_command
    from megatron_revisual.testing.tiny_checkpoint import make_tiny_checkpoint

    root = tmp_path_factory.mktemp("eval_server")
    model = make_tiny_checkpoint(root / "tiny-vl", seed=0)
    cmd = build_server_command(
        model,
        host="127.0.0.1",
        port=_free_port(),
        served_model_name="tiny",
        dtype="float32",
        max_model_len=1024,
        extra_args=["--enforce-eager", "--max-num-seqs", "8"],
    )
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    log_path = root / "server.log"
    with open(log_path, "w") as log:
        server = VLLMServer(cmd, log=log, env=env, ready_timeout=300)
        server.start()
        try:
            server.wait_ready()
        except BaseException:
            server.stop()
            log.flush()
            pytest.fail(f"vLLM server did not start:\n{log_path.read_text()[-6000:]}")
        front = FaultProxy(server.port)
        try:
            yield front
        finally:
            front.close()
            server.stop()


@pytest.fixture(scope="module")
def dataset_dirs(tmp_path_factory) -> dict[str, tuple[Path, dict[str, int]]]:
    root = tmp_path_factory.mktemp("eval_data")
    return {
        layout: (root / layout, write_fixture_datasets(root / layout, layout=layout))
        for layout in ("files", "parquet")
    }


def _eval(base_url: str, data: Path, out: Path, *extra: str) -> int:
    parser = argparse.ArgumentParser()
    add_eval_arguments(parser)
    args = parser.parse_args(
        [
            "--model-name", "tiny",
            "--openai-base-url", base_url,
            "--openai-api-key", "local",
            "--dataset-dir", str(data),
            "--dataset-source", "local",
            "--output-dir", str(out),
            "--max-tokens", "24",
            "--temperature", "0",
            "--min-pixels", str(56 * 56),
            "--max-pixels", str(112 * 112 * 4),
            *extra,
        ]
    )  # fmt: skip
    return run_eval(args)


def _recount(records: list[dict], name: str) -> dict:
    rows = [r for r in records if r["dataset"] == name]
    correct = sum(r["correct"] for r in rows)
    subsets: dict[str, Counter] = {}
    for r in rows:
        for s in r["subsets"]:
            subsets.setdefault(s, Counter())["total"] += 1
            subsets[s]["correct"] += r["correct"]
    return {
        "total": len(rows),
        "correct": correct,
        "accuracy": correct / len(rows),
        "unparsed": sum(not r["parsed"] and not r["error"] for r in rows),
        "errors": sum(bool(r["error"]) for r in rows),
        "sub_metrics": {
            s: {"correct": c["correct"], "total": c["total"], "accuracy": c["correct"] / c["total"]}
            for s, c in sorted(subsets.items())
        },
    }


def test_eval_all_benchmarks_then_all_from_cache(proxy, dataset_dirs, tmp_path):
    data, counts = dataset_dirs["files"]
    counts = {name: counts[name] for name in RELEASED_BENCHMARKS}  # --datasets all: the released tool's five
    total = sum(counts.values())
    out = tmp_path / "out"
    proxy.reset()
    assert _eval(proxy.base_url, data, out, "--datasets", "all", "--eval-threads", "4") == 0
    assert proxy.forwarded == total and proxy.failed == 0

    records = [json.loads(line) for line in (out / "tiny_samples.jsonl").read_text().splitlines()]
    summary = json.loads((out / "tiny_summary.json").read_text())
    assert len(records) == total
    assert Counter(r["dataset"] for r in records) == counts
    assert summary["requests"] == {"sent": total, "from_cache": 0}
    assert all(r["response"] and not r["cached"] for r in records)
    for name in counts:
        got = summary["datasets"][name]
        recount = _recount(records, name)
        assert {k: got[k] for k in recount} == recount, name
    assert summary["datasets"]["wemath"]["wemath"] == wemath_metrics(
        [r for r in records if r["dataset"] == "wemath"]
    )
    assert summary["datasets"]["wemath"]["wemath"]["problems"] == 2
    pooled = sum(r["correct"] for r in records)
    assert summary["overall"]["correct"] == pooled and summary["overall"]["total"] == total
    per_dataset = [summary["datasets"][n]["accuracy"] for n in counts]
    assert summary["overall"]["average"] == pytest.approx(sum(per_dataset) / len(per_dataset))
    table = (out / "tiny_summary.md").read_text()
    for name in counts:
        assert f"| {name} |" in table

    # Same settings, same cache: not a single request reaches the server.
    proxy.reset()
    assert _eval(proxy.base_url, data, out, "--datasets", "all", "--eval-threads", "4") == 0
    assert proxy.forwarded == 0 and proxy.failed == 0
    again = [json.loads(line) for line in (out / "tiny_samples.jsonl").read_text().splitlines()]
    assert [r["response"] for r in again] == [r["response"] for r in records]
    assert all(r["cached"] for r in again)
    assert json.loads((out / "tiny_summary.json").read_text())["requests"] == {
        "sent": 0,
        "from_cache": total,
    }

    # Other sampling settings are other cache entries: one request per sample again.
    proxy.reset()
    assert _eval(proxy.base_url, data, out, "--datasets", "geo3k", "--max-tokens", "8") == 0
    assert proxy.forwarded == counts["geo3k"]


def test_eval_paper_set_in_the_paper_layout_beside_the_paper(proxy, dataset_dirs, tmp_path, capsys):
    """The ten benchmarks of Table 2 (the six added ones from their release layouts, text-only
    requests for AIME / GPQA / MATH-500), AIME asked twice per problem, the table in the paper's
    layout with the paper's rows and this run's gaps to ReVisual-R1."""
    data, counts = dataset_dirs["files"]
    out = tmp_path / "out"
    proxy.reset()
    rc = _eval(proxy.base_url, data, out, "--datasets", "paper", "--aime-runs", "2", "--eval-threads", "4",
               "--compare", "paper")
    assert rc == 0
    asked = sum(counts[n] * (2 if n.startswith("aime") else 1) for n in PAPER_BENCHMARKS)
    assert asked == 53 and proxy.forwarded == asked and proxy.failed == 0
    summary = json.loads((out / "tiny_summary.json").read_text())
    assert list(summary["datasets"]) == list(PAPER_BENCHMARKS)
    assert summary["datasets"]["dynamath"]["dynamath"]["seed_questions"] == 3
    assert summary["datasets"]["dynamath"]["dynamath"]["variants"] == 9
    aime = summary["datasets"]["aime25"]["repeated"]
    assert (aime["problems"], aime["runs"], sorted(aime["pass@k"])) == (4, 2, ["1", "2"])
    assert summary["datasets"]["logicvista"]["total"] == 3 and summary["datasets"]["gpqa"]["total"] == 2
    printed = capsys.readouterr().out
    header = ("| Model | MathVerse | MathVision | MathVista | DynaMath | WeMath | LogicVista | AIME24 | AIME25 "
              "| GPQA | MATH500 | Avg. |")
    assert printed.count(header) == 2  # the run's own table, then beside the paper's rows
    assert "| ReVisual-R1 | 53.6 | 48.8 | 73.1 | 27.5 | 42.0 | 52.3 | 53.3 | 43.3 | 47.5 | 89.2 | 53.1 |" in printed
    assert "| tiny | " in printed and "| Δ tiny − ReVisual-R1 (paper) | " in printed


def test_eval_retries_server_faults_and_completes(proxy, dataset_dirs, tmp_path):
    data, counts = dataset_dirs["parquet"]  # the Hub's parquet layout, through a real server
    proxy.reset()
    proxy.fail_next = 3
    rc = _eval(
        proxy.base_url, data, tmp_path / "out",
        "--datasets", "mathvista,mathvision",
        "--eval-threads", "1", "--max-retries", "3", "--retry-base-delay", "0.01",
    )  # fmt: skip
    assert rc == 0
    n = counts["mathvista"] + counts["mathvision"]
    assert proxy.failed == 3 and proxy.forwarded == n
    summary = json.loads((tmp_path / "out" / "tiny_summary.json").read_text())
    assert summary["requests"] == {"sent": n + 3, "from_cache": 0}
    assert summary["datasets"]["mathvista"]["total"] == counts["mathvista"]


def test_interrupted_run_resumes_without_asking_again(proxy, dataset_dirs, tmp_path, capsys):
    data, counts = dataset_dirs["files"]
    n = counts["wemath"]
    out = tmp_path / "out"
    proxy.reset()
    proxy.fail_after = 3  # the server "goes away" after three answers
    rc = _eval(
        proxy.base_url, data, out,
        "--datasets", "wemath", "--eval-threads", "1",
        "--max-retries", "2", "--retry-base-delay", "0.01",
    )  # fmt: skip
    assert rc == 1
    err = capsys.readouterr().err
    assert "failed 3 times (--max-retries 2)" in err and "rerun to resume" in err
    assert proxy.forwarded == 3
    cache_lines = (out / "cache" / "tiny" / "wemath.jsonl").read_text().splitlines()
    assert len(cache_lines) == 3

    proxy.reset()
    assert _eval(proxy.base_url, data, out, "--datasets", "wemath", "--eval-threads", "1") == 0
    assert proxy.forwarded == n - 3
    summary = json.loads((out / "tiny_summary.json").read_text())
    assert summary["requests"] == {"sent": n - 3, "from_cache": 3}
    assert summary["datasets"]["wemath"]["total"] == n


def test_the_released_default_max_tokens_fails_once_before_any_sample(proxy, dataset_dirs, tmp_path, capsys):
    """The released tool's --max-tokens 8192 against a server with a 1024-token context: one
    clear error at the start, not one rejected request (and retry loop) per sample."""
    data, _ = dataset_dirs["files"]
    proxy.reset()
    rc = _eval(proxy.base_url, data, tmp_path / "out", "--datasets", "geo3k", "--max-tokens", "8192")
    assert rc == 2
    err = capsys.readouterr().err
    assert f"--max-tokens 8192 does not fit the context of 'tiny' at {proxy.base_url} (max_model_len 1024" in err
    assert proxy.forwarded == 0 and proxy.failed == 0
    assert not (tmp_path / "out" / "tiny_summary.json").exists()
