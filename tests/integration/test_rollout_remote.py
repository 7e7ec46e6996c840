"""An engine in its own process (`rollout.remote.EngineProcess`), here the transformers engine:
the socket carries requests, samples and weight buckets unchanged, an error inside the engine
comes back with its traceback and leaves the engine serving, a killed engine is reported at
once instead of hanging the caller."""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch

from megatron_revisual.convert.hf_load import SafetensorsReader
from megatron_revisual.rollout.engine import HFEngineConfig
from megatron_revisual.rollout.registry import create_engine
from megatron_revisual.rollout.remote import EngineProcess
from megatron_revisual.rollout.types import (
    EngineCrashedError,
    RolloutEngineError,
    RolloutRequest,
    SamplingConfig,
)

pytestmark = pytest.mark.integration

SETTINGS = {"dtype": "float32", "max_model_len": 512}
SAMPLING = SamplingConfig(n=2, max_tokens=6, seed=3)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from megatron_revisual.testing.tiny_checkpoint import make_tiny_checkpoint

    root = tmp_path_factory.mktemp("remote")
    return {
        "a": make_tiny_checkpoint(root / "a", text_only=True, seed=0),
        "b": make_tiny_checkpoint(root / "b", text_only=True, seed=1),
    }


@pytest.fixture(scope="module")
def remote(tiny):
    config = HFEngineConfig(model_path=str(tiny["a"]), **SETTINGS)
    with EngineProcess(
        config, env={"OMP_NUM_THREADS": "1"}, start_timeout_s=300, call_timeout_s=300
    ) as engine:
        yield engine


def _requests(model_dir) -> list[RolloutRequest]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    return [
        RolloutRequest(
            prompt=tok.apply_chat_template(
                [{"role": "user", "content": f"What is {i} + {i}?"}],
                add_generation_prompt=True,
                tokenize=False,
            )
        )
        for i in range(3)
    ]


def _stream(model_dir, dtype=None):
    reader = SafetensorsReader(model_dir)
    for name in sorted(reader.names()):
        t = reader.get(name)
        yield name, t if dtype is None else t.to(dtype)


def _assert_same_samples(a, b) -> None:
    """Same tokens and text; log-probs equal up to float reduction order (the remote process may
    run matmuls with another thread count, which moves the last bits)."""
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert (x.token_ids, x.text, x.finish_reason) == (y.token_ids, y.text, y.finish_reason)
        assert torch.allclose(torch.tensor(x.logprobs), torch.tensor(y.logprobs), atol=1e-5, rtol=0)


def test_remote_engine_equals_the_in_process_one_before_and_after_a_sync(tiny, remote):
    local = create_engine(HFEngineConfig(model_path=str(tiny["a"]), **SETTINGS))
    requests = _requests(tiny["a"])
    assert remote.capabilities == local.capabilities
    before_remote, before_local = (
        remote.generate(requests, SAMPLING),
        local.generate(requests, SAMPLING),
    )
    _assert_same_samples(before_remote.samples, before_local.samples)
    stats = remote.update_weights(_stream(tiny["b"]), bucket_bytes=1 << 16)
    local.update_weights(_stream(tiny["b"]), bucket_bytes=1 << 16)
    reader = SafetensorsReader(tiny["b"])
    assert stats.tensors == len(reader.names()) == 27
    assert stats.bytes == sum(reader.get(n).numel() * 4 for n in reader.names())
    assert stats.buckets >= 10 and stats.seconds > 0
    after_remote, after_local = (
        remote.generate(requests, SAMPLING),
        local.generate(requests, SAMPLING),
    )
    _assert_same_samples(after_remote.samples, after_local.samples)
    assert [s.logprobs for s in after_remote.samples] != [s.logprobs for s in before_remote.samples]


@pytest.mark.parametrize("transport", ["shm", "socket"])
def test_each_weight_transport_delivers_exact_weights(tiny, remote, transport):
    # the engine goes a -> b -> a through this transport, with buckets smaller than a layer
    # and a tensor larger than a bucket; each time it must sample what a local engine with the
    # same weights samples, and b must differ from a
    client = remote.endpoint.connect(weight_transport=transport)
    assert client.weight_transport == transport
    requests = _requests(tiny["a"])
    results = {}
    for name in ("a", "b", "a"):
        stats = client.update_weights(_stream(tiny[name]), bucket_bytes=1 << 14)
        assert stats.tensors == 27 and stats.buckets >= 20
        local = create_engine(HFEngineConfig(model_path=str(tiny[name]), **SETTINGS))
        got = client.generate(requests, SAMPLING)
        _assert_same_samples(got.samples, local.generate(requests, SAMPLING).samples)
        results.setdefault(name, got)
    assert [s.logprobs for s in results["a"].samples] != [
        s.logprobs for s in results["b"].samples
    ]


def test_bf16_stream_is_cast_to_the_engine_dtype(tiny, remote):
    # bf16 bytes survive the socket; the engine casts them to its fp32 weights
    local = create_engine(HFEngineConfig(model_path=str(tiny["a"]), **SETTINGS))
    remote.update_weights(_stream(tiny["b"], torch.bfloat16))
    local.update_weights(_stream(tiny["b"], torch.bfloat16))
    requests = _requests(tiny["a"])
    _assert_same_samples(remote.generate(requests, SAMPLING).samples, local.generate(requests, SAMPLING).samples)


def test_engine_errors_come_back_and_the_engine_keeps_serving(tiny, remote):
    def bad_stream():
        yield from _stream(tiny["b"])
        yield "model.layers.9.mlp.up_proj.weight", torch.zeros(4, 4)
        yield "sent.after.the.failure", torch.zeros(128)  # drained by the engine, never loaded

    with pytest.raises(
        RolloutEngineError,
        match=(r"(?s)failed during update_weights: RolloutEngineError: "
               r".*'model.layers.9.mlp.up_proj.weight' is not a tensor.*engine traceback"),
    ):
        remote.update_weights(bad_stream(), bucket_bytes=1 << 12)
    assert len(remote.generate(_requests(tiny["a"])[:1], SAMPLING).samples) == 2


def test_other_processes_connect_through_the_endpoint(tiny, remote):
    import pickle

    client = pickle.loads(pickle.dumps(remote.endpoint)).connect()
    assert client.capabilities.name == "transformers"
    assert len(client.generate(_requests(tiny["a"])[:2], SAMPLING).samples) == 4


def test_killed_engine_raises_at_once(tiny):
    config = HFEngineConfig(model_path=str(tiny["a"]), **SETTINGS)
    engine = EngineProcess(config, env={"OMP_NUM_THREADS": "1"}, start_timeout_s=300)
    client = engine.endpoint.connect()
    os.kill(engine.endpoint.pid, signal.SIGKILL)
    engine.process.join(10)
    start = time.monotonic()
    with pytest.raises(EngineCrashedError, match=r"exited with code -9"):
        engine.generate(_requests(tiny["a"]), SAMPLING)
    with pytest.raises(EngineCrashedError, match=r"cannot reach the rollout engine process"):
        client.generate(_requests(tiny["a"]), SAMPLING)
    assert time.monotonic() - start < 5
    engine.close()


def test_start_up_failure_is_reported(tmp_path):
    with pytest.raises(RolloutEngineError, match=r"(?s)failed to start .*config.json"):
        EngineProcess(
            HFEngineConfig(model_path=str(tmp_path / "nowhere"), **SETTINGS), start_timeout_s=120
        )
