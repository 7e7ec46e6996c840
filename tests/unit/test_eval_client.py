"""Request building, retries with backoff, and the resumable prediction cache.

The retry tests use a stub HTTP endpoint on 127.0.0.1 that only answers with status codes and
counts requests: they check the transport logic (what is retried, how often), nothing else.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image

from megatron_revisual.evaluation.client import (
    ChatClient,
    PredictionCache,
    RequestRejected,
    ServerUnavailable,
    build_messages,
    cache_key,
    resize_to_pixel_range,
)
from megatron_revisual.evaluation.datasets import Sample
from megatron_revisual.evaluation.runner import add_eval_arguments, run_eval
from megatron_revisual.testing.eval_fixtures import write_fixture_datasets

SETTINGS = {"max_tokens": 16, "temperature": 0.3, "top_p": 0.95, "min_pixels": 1, "max_pixels": 9}


def _key(**change):
    kw = {"model": "m", "dataset": "geo3k", "sample_id": "1", "prompt": "p", "settings": SETTINGS}
    kw.update(change)
    return cache_key(**kw)


def test_cache_key_covers_model_dataset_sample_prompt_and_settings():
    base = _key()
    assert _key() == base
    changed = [
        _key(model="n"),
        _key(dataset="wemath"),
        _key(sample_id="2"),
        _key(prompt="q"),
        *[_key(settings={**SETTINGS, k: v}) for k, v in
          [("max_tokens", 17), ("temperature", 0.0), ("top_p", 1.0), ("min_pixels", 2), ("max_pixels", 8)]],
        _key(settings={**SETTINGS, "system_prompt": "x"}),
    ]  # fmt: skip
    assert len({base, *changed}) == len(changed) + 1


def test_cache_roundtrip_and_torn_last_line(tmp_path):
    cache = PredictionCache(tmp_path, "org/model:v1")
    assert cache.path("geo3k") == tmp_path / "org_model_v1" / "geo3k.jsonl"
    assert cache.load("geo3k") == {}
    cache.put("geo3k", {"key": "a", "response": "x"})
    cache.put("geo3k", {"key": "b", "response": "ü"})
    path = cache.path("geo3k")
    good = path.read_bytes()
    with open(path, "ab") as f:  # an interrupted write: half a line, no newline
        f.write(b'{"key": "c", "respo')
    entries = cache.load("geo3k")
    assert set(entries) == {"a", "b"} and entries["b"]["response"] == "ü"
    assert path.read_bytes() == good  # the torn tail is cut off before anything is appended
    cache.put("geo3k", {"key": "c", "response": "z"})
    assert set(cache.load("geo3k")) == {"a", "b", "c"}


def test_resize_to_pixel_range():
    big = resize_to_pixel_range(Image.new("RGB", (1000, 500)), 100, 125_000)
    assert big.size == (500, 250)
    small = resize_to_pixel_range(Image.new("RGB", (20, 10)), 800, 10_000)
    assert small.size == (40, 20)
    same = Image.new("RGB", (30, 30))
    assert resize_to_pixel_range(same, 100, 10_000) is same
    with pytest.raises(ValueError, match="exceeds"):
        resize_to_pixel_range(same, 10, 5)


def test_build_messages_image_first_then_text():
    buf = io.BytesIO()
    Image.new("RGB", (200, 100), "red").save(buf, format="JPEG")
    sample = Sample(
        dataset="d",
        id="1",
        prompt="Find x.",
        answer="1",
        multiple_choice=False,
        image=buf.getvalue(),
    )
    messages = build_messages(sample, system_prompt="SYS", min_pixels=100, max_pixels=5000)
    assert messages[0] == {"role": "system", "content": "SYS"}
    image_part, text_part = messages[1]["content"]
    assert text_part == {"type": "text", "text": "Find x."}
    prefix = "data:image/png;base64,"
    assert image_part["image_url"]["url"].startswith(prefix)
    png = Image.open(io.BytesIO(base64.b64decode(image_part["image_url"]["url"][len(prefix) :])))
    assert png.size == (100, 50)  # 20000 px scaled by sqrt(5000 / 20000)
    assert (
        build_messages(sample, system_prompt="", min_pixels=1, max_pixels=10**6)[0]["role"]
        == "user"
    )


class _Stub:
    """Answers chat requests with the given statuses in turn (then 200 with a completion);
    with `models` ({name: max_model_len}) it lists them on GET /v1/models as vLLM does (else
    GET is HTTP 501)."""

    def __init__(self, statuses: list[int], models: dict[str, int] | None = None) -> None:
        self.statuses = list(statuses)
        self.requests = 0
        self.model_requests = 0
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            if models is not None:

                def do_GET(self):
                    stub.model_requests += 1
                    listed = [{"id": k, "object": "model", "created": 0, "owned_by": "vllm",
                               "max_model_len": v} for k, v in models.items()]
                    data = json.dumps({"object": "list", "data": listed}).encode()
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)

            def do_POST(self):
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                stub.requests += 1
                status = stub.statuses.pop(0) if stub.statuses else 200
                body = {"error": {"message": f"status {status}"}}
                if status == 200:
                    body = {
                        "id": "x", "object": "chat.completion", "created": 0, "model": "m",
                        "choices": [{"index": 0, "finish_reason": "stop",
                                     "message": {"role": "assistant", "content": "\\boxed{7}"}}],
                        "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
                    }  # fmt: skip
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def _client(url: str, retries: int) -> ChatClient:
    return ChatClient(
        model="m", api_key="k", base_url=url, max_tokens=4, temperature=0.0, top_p=1.0,
        max_retries=retries, retry_base_delay=0.001,
    )  # fmt: skip


@pytest.mark.parametrize("statuses", [[503, 500, 429], [502]])
def test_retryable_errors_are_retried(statuses):
    stub = _Stub(statuses)
    try:
        out = _client(stub.url, retries=3).complete([{"role": "user", "content": "hi"}])
    finally:
        stub.close()
    assert out.text == "\\boxed{7}" and out.completion_tokens == 2
    assert out.attempts == stub.requests == len(statuses) + 1


def test_retries_exhausted_and_client_errors():
    stub = _Stub([503] * 10)
    try:
        with pytest.raises(ServerUnavailable, match=r"failed 3 times \(--max-retries 2\)"):
            _client(stub.url, retries=2).complete([{"role": "user", "content": "hi"}])
        assert stub.requests == 3
        stub.statuses, stub.requests = [400], 0
        with pytest.raises(RequestRejected, match="HTTP 400"):
            _client(stub.url, retries=5).complete([{"role": "user", "content": "hi"}])
        assert stub.requests == 1  # a bad request is not retried
    finally:
        stub.close()


def test_unreachable_server_ends_eval_with_a_clear_error(tmp_path, capsys):
    with socket.socket() as s:  # a loopback port with nothing listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    write_fixture_datasets(tmp_path / "data")
    parser = argparse.ArgumentParser()
    add_eval_arguments(parser)
    args = parser.parse_args(
        [
            "--model-name", "m", "--openai-base-url", f"http://127.0.0.1:{port}/v1",
            "--dataset-dir", str(tmp_path / "data"), "--datasets", "geo3k",
            "--output-dir", str(tmp_path / "out"), "--max-retries", "2",
            "--retry-base-delay", "0.001",
        ]
    )  # fmt: skip
    assert run_eval(args) == 1
    err = capsys.readouterr().err
    assert f"http://127.0.0.1:{port}/v1 failed 3 times (--max-retries 2)" in err
    assert "APIConnectionError" in err and "rerun to resume" in err


def _eval_args(url: str, data, out, *extra: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_eval_arguments(parser)
    return parser.parse_args([
        "--model-name", "m", "--openai-base-url", url, "--dataset-dir", str(data),
        "--datasets", "mathvista", "--output-dir", str(out), "--eval-threads", "1", *extra,
    ])  # fmt: skip


def test_rejected_request_is_counted_as_error_and_asked_again_next_run(tmp_path, capsys):
    write_fixture_datasets(tmp_path / "data")
    stub = _Stub([400])  # the first request is refused, the others answered "\boxed{7}"
    args = _eval_args(stub.url, tmp_path / "data", tmp_path / "out")
    try:
        assert run_eval(args) == 1  # one sample errored, --allow-errors 0
        assert "1 of 4 samples failed (--allow-errors 0); first: mathvista/" in capsys.readouterr().err
        first = json.loads((tmp_path / "out" / "m_summary.json").read_text())
        assert stub.requests == 4
        stub.requests = 0
        assert run_eval(args) == 0
        second = json.loads((tmp_path / "out" / "m_summary.json").read_text())
        assert stub.requests == 1  # only the refused sample; three come from the cache
    finally:
        stub.close()
    d1, d2 = first["datasets"]["mathvista"], second["datasets"]["mathvista"]
    assert (d1["total"], d1["errors"], d1["correct"]) == (4, 1, 1)  # sample 3's answer is 7
    assert (d2["total"], d2["errors"], d2["correct"]) == (4, 0, 1)
    assert first["requests"] == {"sent": 4, "from_cache": 0}
    assert second["requests"] == {"sent": 1, "from_cache": 3}
    records = [
        json.loads(x) for x in (tmp_path / "out" / "m_samples.jsonl").read_text().splitlines()
    ]
    assert [r["prediction"] for r in records] == [None, None, "7", "7"]  # "7" is no option letter
    assert [r["correct"] for r in records] == [False, False, True, False]
    # the released tool's per-dataset file: its "prediction" is the response text
    released = json.loads((tmp_path / "out" / "m___mathvista.json").read_text())
    assert [r["prediction"] for r in released["results"]] == ["\\boxed{7}"] * 4
    assert [r["accuracy"] for r in released["results"]] == [0.0, 0.0, 1.0, 0.0]
    assert [r["id"] for r in released["results"]] == [r["id"] for r in records]
    assert released["metrics"] == second["datasets"]["mathvista"]
    assert released["config"]["model_name"] == "m" and "api_key" not in released["config"]


@pytest.mark.parametrize(("allowed", "rc"), [(3, 1), (4, 0)])
def test_every_sample_failing_is_a_failed_run_unless_allowed(tmp_path, capsys, allowed, rc):
    write_fixture_datasets(tmp_path / "data")
    stub = _Stub([400] * 4)
    try:
        args = _eval_args(stub.url, tmp_path / "data", tmp_path / "out", "--allow-errors", str(allowed))
        assert run_eval(args) == rc
    finally:
        stub.close()
    assert stub.requests == 4
    err = capsys.readouterr().err
    assert (f"4 of 4 samples failed (--allow-errors {allowed})" in err) == (rc == 1)
    assert json.loads((tmp_path / "out" / "m_summary.json").read_text())["overall"]["total"] == 4


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--max-tokens", "8192"], "--max-tokens 8192 does not fit the context of 'm' at {url} (max_model_len 64"),
        (["--max-tokens", "16", "--model-name", "other"],
         "--model-name 'other' is not served by {url}; it serves ['m']"),
    ],
)
def test_the_endpoint_is_checked_once_before_the_first_sample(tmp_path, capsys, flags, message):
    write_fixture_datasets(tmp_path / "data")
    stub = _Stub([], models={"m": 64})
    try:
        assert run_eval(_eval_args(stub.url, tmp_path / "data", tmp_path / "out", *flags)) == 2
        assert f"revisual eval: error: {message.format(url=stub.url)}" in capsys.readouterr().err
        assert (stub.model_requests, stub.requests) == (1, 0)  # no sample was asked
        args = _eval_args(stub.url, tmp_path / "data", tmp_path / "ok", "--max-tokens", "16")
        assert run_eval(args) == 0
        assert (stub.model_requests, stub.requests) == (2, 4)  # once per run, not per sample
    finally:
        stub.close()
