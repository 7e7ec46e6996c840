"""Rollouts with the real vLLM CPU engine and the transformers engine, and the weight sync from
Megatron into them, checked by Megatron's own log-prob recomputation.

The acceptance check, once per model (Qwen2.5-VL with images, text-only Qwen2 with tied
embeddings): both engines start from checkpoint A; Megatron at TP=2 (gloo) holds checkpoint
B. Each engine samples 64 sequences (16 prompts x 4, half of the VL prompts with an image),
Megatron recomputes their log-probs (far apart: different weights), Megatron streams its
weights into the engine (`convert.export.stream_hf_tensors`, gathered over TP, in buckets),
the engine samples 64 new sequences, and Megatron's recomputation now matches to fp32 noise.

vLLM runs in an `EngineProcess` (one per model, started once for the module) so that its
threads and environment stay out of pytest; Megatron's rank 0 reaches it over the engine's
socket and runs the transformers engine in-process.

    OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/integration/test_rollout_vllm.py -s
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_revisual.config import load_config
from megatron_revisual.parallel import run_distributed
from megatron_revisual.rollout.consistency import logprob_consistency
from megatron_revisual.rollout.engine import HFEngineConfig, VLLMEngineConfig
from megatron_revisual.rollout.registry import create_engine
from megatron_revisual.rollout.remote import EngineProcess
from megatron_revisual.rollout.types import (
    EngineCrashedError,
    RolloutRequest,
    SamplingConfig,
)

pytestmark = [pytest.mark.integration, pytest.mark.vllm]

ROOT = Path(__file__).resolve().parents[2]
NUM_PROMPTS = 16
SAMPLING = SamplingConfig(n=4, max_tokens=12, temperature=1.0, seed=7)
# (width, height): 2x2 up to 7x5 merged tokens; 196x140 spans several 112-pixel windows
IMAGE_SIZES = [(56, 56), (84, 56), (112, 84), (196, 140)]
ENGINE_SETTINGS = {"dtype": "float32", "max_model_len": 1024, "max_prompt_tokens": 256}


def image(k: int):
    from PIL import Image

    w, h = IMAGE_SIZES[k % len(IMAGE_SIZES)]
    rng = np.random.default_rng(k)
    return Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8))


def chat_prompt(model_dir: str | Path, question: str, with_image: bool) -> str:
    from transformers import AutoTokenizer

    content = ([{"type": "image"}] if with_image else []) + [{"type": "text", "text": question}]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
    )


def rollout_requests(model_dir: str | Path, *, images: bool) -> list[RolloutRequest]:
    """16 prompts; with `images`, every other one carries an image."""
    out = []
    for i in range(NUM_PROMPTS):
        with_image = images and i % 2 == 0
        question = f"Problem {i}: what is {i} + {2 * i + 1}? Reason, then answer in \\boxed{{}}."
        prompt = chat_prompt(model_dir, question, with_image)
        out.append(RolloutRequest.with_image(prompt, image(i) if with_image else None))
    return out


# ---------------------------------------------------------------------------------------------
# Megatron side (runs in the gloo ranks)


def megatron_logprobs(model, cfg, hf_dir: str, requests, samples) -> list[list[float]]:
    """Megatron's raw log-probs of each sample's tokens given its prompt (and image)."""
    from megatron.core import parallel_state as ps
    from transformers import AutoConfig, AutoProcessor

    from megatron_revisual.models.qwen25_vl.rope_index import MRopeIndexConfig, rope_index
    from megatron_revisual.rl.logprobs import vocab_parallel_log_probs

    vision = cfg.model.vision is not None
    processor = AutoProcessor.from_pretrained(hf_dir) if vision else None
    rows = [s.prompt_token_ids + s.token_ids for s in samples]
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    attn = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        attn[i, : len(r)] = 1
    extra = {}
    if vision:
        pixels, grids = [], []
        for s in samples:
            request = requests[s.request_index]
            if not request.images:
                continue
            inputs = processor(
                text=[request.prompt], images=list(request.images), return_tensors="pt"
            )
            # the engine expanded the image placeholder exactly as the processor does
            assert inputs["input_ids"][0].tolist() == s.prompt_token_ids
            pixels.append(inputs["pixel_values"])
            grids.append(inputs["image_grid_thw"])
        grid = torch.cat(grids) if grids else None
        extra = {"pixel_values": torch.cat(pixels) if pixels else None, "image_grid_thw": grid}
        hf_config = AutoConfig.from_pretrained(hf_dir)
        positions, _ = rope_index(
            ids, grid, attention_mask=attn, config=MRopeIndexConfig.from_hf_config(hf_config)
        )
    else:
        positions = torch.arange(width).expand(len(rows), width).contiguous()
    model.eval()
    with torch.no_grad():
        logits = model(ids, positions, **extra).float()  # [b, s, vocab / TP]
    # columns of the TP-padded vocabulary that are no tokens get probability 0
    local = logits.shape[-1]
    columns = ps.get_tensor_model_parallel_rank() * local + torch.arange(local)
    logits[..., columns >= cfg.model.vocab_size] = -torch.inf
    lp = vocab_parallel_log_probs(logits[:, :-1], ids[:, 1:])
    return [
        lp[i, len(s.prompt_token_ids) - 1 : len(rows[i]) - 1].tolist()
        for i, s in enumerate(samples)
    ]


def _broadcast(obj):
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def consistency_rank(cfg, hf_a: str, hf_b: str, endpoint, images: bool) -> dict:
    """Each engine: sample, recompute, sync from Megatron, sample, recompute."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_revisual.convert.export import stream_hf_tensors
    from megatron_revisual.convert.hf_load import SafetensorsReader, load_hf_weights
    from megatron_revisual.models.qwen25_vl.provider import build_qwen25_vl

    tp_rank, tp = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()
    model = build_qwen25_vl(cfg, pre_process=True, post_process=True)
    load_hf_weights(model, SafetensorsReader(hf_b), cfg.model, tp_rank=tp_rank, tp_size=tp)
    requests = rollout_requests(hf_a, images=images)
    rank0 = dist.get_rank() == 0
    results = {}
    for name in ("vllm", "transformers"):
        engine = None
        if rank0:
            engine = (
                endpoint.connect()
                if name == "vllm"
                else create_engine(HFEngineConfig(model_path=hf_a, **ENGINE_SETTINGS))
            )
        out = {}
        for phase in ("before", "after"):
            batch = _broadcast(engine.generate(requests, SAMPLING) if rank0 else None)
            ours = megatron_logprobs(model, cfg, hf_a, requests, batch.samples)
            engine_lp = [s.logprobs for s in batch.samples]
            out[phase] = logprob_consistency(engine_lp, ours)
            out[f"{phase}_samples"] = len(batch.samples)
            out[f"{phase}_image_samples"] = sum(
                bool(requests[s.request_index].images) for s in batch.samples
            )
            out[f"{phase}_tokens"] = batch.num_generated_tokens
            if phase == "before":
                stream = stream_hf_tensors(model, cfg.model, bucket_bytes=1 << 18)
                if rank0:
                    out["sync"] = dataclasses.asdict(
                        engine.update_weights(stream, bucket_bytes=1 << 18)
                    )
                else:
                    for _ in stream:  # the gathers are collective: follow rank 0 through them
                        pass
        if rank0:
            engine.close()
        results[name] = out
    return results if rank0 else {}


def megatron_cfg(hf_b: Path, *, text_only: bool):
    overrides = [
        f"model.hf_path={hf_b}",
        "model.params_dtype=fp32",
        "parallel.tensor_model_parallel_size=2",
        "parallel.pipeline_model_parallel_size=1",
        "parallel.sequence_parallel=false",
        "cluster.devices_per_node=2",
        "train.global_batch_size=8",
        "train.micro_batch_size=1",
        "train.seq_length=1024",
    ]
    return load_config(ROOT / "configs" / "tiny_cpu_demo.yaml", overrides)


# ---------------------------------------------------------------------------------------------
# Fixtures: checkpoints A (engines start here) and B (Megatron's), one vLLM engine per model


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    from megatron_revisual.testing.tiny_checkpoint import DEFAULT_SPEC, make_tiny_checkpoint

    root = tmp_path_factory.mktemp("rollout")
    tied = dataclasses.replace(DEFAULT_SPEC, tie_word_embeddings=True)
    return {
        "vl_a": make_tiny_checkpoint(root / "vl_a", seed=0),
        "vl_b": make_tiny_checkpoint(root / "vl_b", seed=1),
        "lm_a": make_tiny_checkpoint(root / "lm_a", text_only=True, seed=3, spec=tied),
        "lm_b": make_tiny_checkpoint(root / "lm_b", text_only=True, seed=4, spec=tied),
    }


def _vllm_process(model_dir: Path, *, prepack: bool) -> EngineProcess:
    config = VLLMEngineConfig(
        model_path=str(model_dir),
        enforce_eager=True,
        max_num_seqs=64,
        cpu_kv_cache_gib=1,
        cpu_prepack_weights=prepack,
        **ENGINE_SETTINGS,
    )
    return EngineProcess(
        config, env={"OMP_NUM_THREADS": "1"}, start_timeout_s=600, call_timeout_s=600
    )


# Both CPU weight layouts are synced and checked: the VL engine keeps plain weights (the
# default: load_weights into the live parameters), the text-only one has oneDNN-prepacked
# weights (the layerwise reload, incl. re-packing the tied output layer).
@pytest.fixture(scope="module")
def vl_engine(checkpoints):
    with _vllm_process(checkpoints["vl_a"], prepack=False) as engine:
        yield engine


@pytest.fixture(scope="module")
def lm_engine(checkpoints):
    with _vllm_process(checkpoints["lm_a"], prepack=True) as engine:
        yield engine


def test_each_engine_uses_its_cpu_weight_layout(vl_engine, lm_engine):
    assert vl_engine.capabilities.weight_sync_note.startswith("load_weights into plain CPU weights")
    assert lm_engine.capabilities.weight_sync_note.startswith("in-place layerwise reload")


@pytest.fixture(scope="module")
def hf_vl_engine(checkpoints):
    with create_engine(
        HFEngineConfig(model_path=str(checkpoints["vl_a"]), **ENGINE_SETTINGS)
    ) as engine:
        yield engine


def _consistency(checkpoints, engine, model: str) -> dict:
    hf_a, hf_b = str(checkpoints[f"{model}_a"]), str(checkpoints[f"{model}_b"])
    (results, _) = run_distributed(
        consistency_rank,
        world_size=2,
        tp=2,
        args=(
            megatron_cfg(checkpoints[f"{model}_b"], text_only=model == "lm"),
            hf_a,
            hf_b,
            engine.endpoint,
            model == "vl",
        ),
        timeout_s=900,
    )
    print(f"\n{model} consistency:", json.dumps(results, indent=1))
    return results


@pytest.fixture(scope="module")
def vl_consistency(checkpoints, vl_engine):
    return _consistency(checkpoints, vl_engine, "vl")


@pytest.fixture(scope="module")
def lm_consistency(checkpoints, lm_engine):
    return _consistency(checkpoints, lm_engine, "lm")


# ---------------------------------------------------------------------------------------------
# Acceptance: log-prob consistency after a weight sync from Megatron TP=2


def _check_consistency(result: dict, *, image_samples: int) -> None:
    before, after = result["before"], result["after"]
    for phase in ("before", "after"):
        assert result[f"{phase}_samples"] == 64
        assert result[f"{phase}_image_samples"] == image_samples
    assert after["rollout/logprob_abs_diff_mean"] <= 1e-3
    assert after["rollout/logprob_abs_diff_max"] <= 1e-2
    assert after["rollout/prob_ratio_error_max"] <= 1e-2
    # before the sync the engine ran other weights: the gap is orders of magnitude larger
    assert before["rollout/logprob_abs_diff_mean"] >= 0.05
    assert before["rollout/logprob_abs_diff_mean"] >= 100 * after["rollout/logprob_abs_diff_mean"]
    sync = result["sync"]
    assert sync["bytes"] > 0 and sync["max_bucket_bytes"] <= max(1 << 18, 768 * 128 * 4)


@pytest.mark.parametrize("engine", ["vllm", "transformers"])
def test_vl_logprobs_match_megatron_after_sync(vl_consistency, engine):
    _check_consistency(vl_consistency[engine], image_samples=32)
    # every tensor of the VL checkpoint: 57 (tiny spec: 2 LM layers, 2 vision blocks)
    assert vl_consistency[engine]["sync"]["tensors"] == 57


@pytest.mark.parametrize("engine", ["vllm", "transformers"])
def test_text_logprobs_match_megatron_after_sync(lm_consistency, engine):
    _check_consistency(lm_consistency[engine], image_samples=0)
    # tied embeddings: no lm_head.weight in the stream (2 layers x 12 + embedding + norm)
    assert lm_consistency[engine]["sync"]["tensors"] == 26


# ---------------------------------------------------------------------------------------------
# Sampling parameters, seeds, filtering (both engines, VL model)


@pytest.fixture(params=["vllm", "transformers"])
def engine(request, vl_engine, hf_vl_engine):
    return vl_engine if request.param == "vllm" else hf_vl_engine


def _tokens(batch) -> list[list[int]]:
    return [s.token_ids for s in batch.samples]


def test_n_max_tokens_and_seed_are_honoured(engine, checkpoints):
    requests = rollout_requests(checkpoints["vl_a"], images=True)[:4]
    sampling = SamplingConfig(n=3, max_tokens=5, seed=11)
    batch = engine.generate(requests, sampling)
    assert [(s.request_index, s.sample_index) for s in batch.samples] == [
        (i, j) for i in range(4) for j in range(3)
    ]
    eos = set(
        json.loads((checkpoints["vl_a"] / "generation_config.json").read_text())["eos_token_id"]
    )
    for s in batch.samples:
        assert len(s.token_ids) == len(s.logprobs) <= 5
        assert s.finish_reason == "length" and len(s.token_ids) == 5 or s.token_ids[-1] in eos
        assert all(-12.0 < lp < 0.0 for lp in s.logprobs)
    # the n samples of a request differ; the same seed repeats them exactly
    assert len({tuple(t) for t in _tokens(batch)}) == 12
    again = engine.generate(requests, sampling)
    assert _tokens(again) == _tokens(batch)
    np.testing.assert_allclose(
        [lp for s in again.samples for lp in s.logprobs],
        [lp for s in batch.samples for lp in s.logprobs],
        atol=1e-5,
    )
    other = engine.generate(requests, dataclasses.replace(sampling, seed=12))
    assert sum(a != b for a, b in zip(_tokens(other), _tokens(batch), strict=True)) >= 10


def test_top_k_1_and_tiny_top_p_are_greedy(engine, checkpoints):
    requests = rollout_requests(checkpoints["vl_a"], images=True)[:2]
    greedy = engine.generate(requests, SamplingConfig(n=2, max_tokens=6, temperature=0.0))
    assert _tokens(greedy)[0] == _tokens(greedy)[1]
    top_k = engine.generate(requests, SamplingConfig(n=2, max_tokens=6, top_k=1, seed=3))
    top_p = engine.generate(requests, SamplingConfig(n=2, max_tokens=6, top_p=1e-6, seed=4))
    assert _tokens(top_k) == _tokens(greedy) == _tokens(top_p)


def test_stop_string_ends_the_sample(engine, checkpoints):
    request = rollout_requests(checkpoints["vl_a"], images=False)[1]
    sampling = SamplingConfig(n=1, max_tokens=16, seed=5)
    (full,) = engine.generate([request], sampling).samples
    text = full.text
    # a stop string from the middle of the text, whose first occurrence is not at the start
    for start in range(3, len(text) - 2):
        stop = text[start : start + 2]
        if text.find(stop) >= 3 and stop.strip():
            break
    else:
        pytest.fail(f"no usable stop string in {text!r}")
    (cut,) = engine.generate([request], dataclasses.replace(sampling, stop=(stop,))).samples
    assert cut.finish_reason == "stop" and cut.stop_reason == stop
    assert cut.text == text[: text.find(stop)]
    # same seed, same tokens up to the one that completed the stop string
    assert 0 < len(cut.token_ids) < len(full.token_ids)
    assert cut.token_ids == full.token_ids[: len(cut.token_ids)]


def test_overlong_prompts_and_unreadable_images_are_skipped(engine, checkpoints, tmp_path):
    good = rollout_requests(checkpoints["vl_a"], images=True)[:3]
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    long_prompt = chat_prompt(checkpoints["vl_a"], "why? " * 300, with_image=False)
    requests = [
        good[0],
        dataclasses.replace(good[0], images=(tmp_path / "broken.png",)),
        RolloutRequest(prompt=long_prompt),
        dataclasses.replace(good[0], images=(tmp_path / "missing.png",)),
        good[1],
    ]
    batch = engine.generate(requests, SamplingConfig(n=2, max_tokens=3, seed=0))
    assert batch.skipped_counts() == {"unreadable_image": 2, "prompt_too_long": 1}
    assert sorted((s.request_index, s.reason) for s in batch.skipped) == [
        (1, "unreadable_image"),
        (2, "prompt_too_long"),
        (3, "unreadable_image"),
    ]
    assert (
        "broken.png" in batch.skipped[0].detail
        and "prompt tokens > max_prompt_tokens=256" in batch.skipped[1].detail
    )
    assert sorted({s.request_index for s in batch.samples}) == [0, 4]
    assert len(batch.samples) == 4


def test_engine_capabilities_say_what_free_memory_does(vl_engine, hf_vl_engine):
    # no sleep mode on CPU: free/restore do nothing, and say so
    assert vl_engine.capabilities.name == "vllm" and not vl_engine.capabilities.sleep
    assert "CpuPlatform" in vl_engine.capabilities.sleep_note
    assert vl_engine.capabilities.weight_sync
    assert vl_engine.free_memory() is False and vl_engine.restore_memory() is False
    assert not hf_vl_engine.capabilities.sleep and hf_vl_engine.free_memory() is False


def test_killed_engine_raises_instead_of_hanging(lm_engine, checkpoints):
    # last test of the module: it kills the text model's engine
    request = RolloutRequest(prompt=chat_prompt(checkpoints["lm_a"], "hi", with_image=False))
    assert len(lm_engine.generate([request], SamplingConfig(max_tokens=2)).samples) == 1
    os.kill(lm_engine.endpoint.pid, signal.SIGKILL)
    start = time.monotonic()
    with pytest.raises(EngineCrashedError, match=r"rollout engine process \d+"):
        lm_engine.generate([request], SamplingConfig(max_tokens=2))
    assert time.monotonic() - start < 10
