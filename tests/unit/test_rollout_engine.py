"""What every rollout engine shares: configs, weight buckets, image loading, prompt filtering."""

from __future__ import annotations

import io
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from megatron_revisual.rollout.engine import (
    EngineConfig,
    PromptPreparer,
    SyncMeter,
    VLLMEngineConfig,
    bucketed,
    load_image,
)
from megatron_revisual.rollout.engine import UnreadableImageError as _Unreadable
from megatron_revisual.rollout.types import RolloutRequest, SamplingConfig


def _stream(sizes: list[int], dtype=torch.float32):
    return [(f"w{i}", torch.full((n,), float(i), dtype=dtype)) for i, n in enumerate(sizes)]


def test_buckets_are_bounded_and_a_large_tensor_travels_alone():
    meter = SyncMeter()
    # fp32: 4 bytes per element; bucket of 40 bytes = 10 elements
    buckets = list(bucketed(_stream([4, 4, 4, 25, 3, 3, 10]), 40, meter=meter))
    assert [[n for n, _ in b] for b in buckets] == [
        ["w0", "w1"],
        ["w2"],
        ["w3"],
        ["w4", "w5"],
        ["w6"],
    ]
    assert (meter.tensors, meter.bytes, meter.buckets, meter.max_bucket_bytes) == (
        7,
        53 * 4,
        5,
        100,
    )
    stats = meter.stats(seconds=2.0)
    assert stats.gb_per_second == pytest.approx(53 * 4 / 2.0 / 1e9)
    assert torch.equal(buckets[1][0][1], torch.full((4,), 2.0))


def test_buckets_cast_without_copying_when_they_can():
    src = _stream([3, 2])
    (bucket,) = bucketed(src, 1 << 20, dtype=torch.float32)
    assert bucket[0][1].data_ptr() == src[0][1].data_ptr()  # same dtype and device: no copy
    (bucket,) = bucketed(src, 1 << 20, dtype=torch.bfloat16)
    assert bucket[1][1].dtype == torch.bfloat16 and bucket[1][1].tolist() == [1.0, 1.0]


def test_bad_streams_are_named():
    with pytest.raises(ValueError, match="w0 appears twice"):
        list(bucketed(_stream([1]) * 2, 100))
    with pytest.raises(TypeError, match=r"expected \(str, Tensor\)"):
        list(bucketed([("w", [1.0])], 100))
    with pytest.raises(TypeError, match="pairs"):
        list(bucketed([torch.zeros(3)], 100))
    with pytest.raises(ValueError, match="bucket_bytes=0"):
        list(bucketed([], 0))


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def test_load_image_from_each_source(tmp_path):
    arr = np.arange(12 * 10 * 3, dtype=np.uint8).reshape(10, 12, 3)
    rgba = Image.fromarray(np.concatenate([arr, np.full((10, 12, 1), 255, np.uint8)], -1), "RGBA")
    (tmp_path / "a.png").write_bytes(_png(rgba))
    for source in (rgba, _png(rgba), tmp_path / "a.png", str(tmp_path / "a.png")):
        img = load_image(source)
        assert img.mode == "RGB" and img.size == (12, 10)
        assert np.array_equal(np.asarray(img), arr)


def test_unreadable_images_say_why(tmp_path):
    truncated = _png(Image.new("RGB", (64, 64), (1, 2, 3)))[:60]
    (tmp_path / "t.png").write_bytes(truncated)
    for source, why in [
        (b"not an image", "UnidentifiedImageError"),
        (tmp_path / "t.png", "OSError|SyntaxError"),
        (tmp_path / "missing.png", "FileNotFoundError"),
        (123, "unsupported image type int"),
    ]:
        with pytest.raises(_Unreadable, match=why):
            load_image(source)


def test_configs_validate():
    with pytest.raises(ValueError, match="dtype='fp32'"):
        EngineConfig(model_path="m", dtype="fp32")
    with pytest.raises(
        ValueError, match=r"max_prompt_tokens=1024 must be in \[1, max_model_len=1024\)"
    ):
        EngineConfig(model_path="m", max_model_len=1024, max_prompt_tokens=1024)
    assert EngineConfig(model_path="m", max_model_len=1024).prompt_limit == 1023
    with pytest.raises(ValueError, match="distributed_executor_backend='ray'"):
        VLLMEngineConfig(model_path="m", distributed_executor_backend="ray")
    for bad, match in [
        ({"n": 0}, "n=0"),
        ({"max_tokens": 0}, "max_tokens=0"),
        ({"temperature": -1.0}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"stop": "x"}, "tuple of strings"),
        ({"stop": ("",)}, "non-empty"),
        ({"suppress_token_ids": (-1,)}, "suppress_token_ids"),
    ]:
        with pytest.raises(ValueError, match=match):
            SamplingConfig(**bad)


@pytest.fixture(scope="module")
def tiny_vl(tmp_path_factory):
    from megatron_revisual.testing.tiny_checkpoint import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("prep") / "vl", seed=0)


def test_prompt_tokens_count_expanded_images_as_the_processor_does(tiny_vl, caplog):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_vl)
    content = [{"type": "image"}, {"type": "text", "text": "Find x."}]
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True
    )
    sizes = [(56, 56), (84, 56), (196, 140), (300, 20), (448, 448)]
    images = [Image.new("RGB", s, (9, 9, 9)) for s in sizes]
    expected = [len(processor(text=[prompt], images=[im])["input_ids"][0]) for im in images]
    limit = sorted(expected)[2]  # the two largest images make their prompts too long
    prep = PromptPreparer(tiny_vl, prompt_limit=limit, max_images=1)
    assert prep.placeholder_token_ids == tuple(
        processor.tokenizer.convert_tokens_to_ids(["<|image_pad|>", "<|video_pad|>"])
    )
    requests = [RolloutRequest.with_image(prompt, im) for im in images]
    requests.insert(1, RolloutRequest.with_image(prompt, b"\x00broken"))
    with caplog.at_level(logging.WARNING):
        prepared, skipped = prep.prepare(requests)
    index = [0, 2, 3, 4, 5]  # request index of each image (the broken one is request 1)
    kept = [i for i, n in enumerate(expected) if n <= limit]
    assert len(kept) == 3
    assert [p.index for p in prepared] == [index[i] for i in kept]
    assert [p.prompt_tokens for p in prepared] == [expected[i] for i in kept]
    too_long = [(index[i], "prompt_too_long") for i, n in enumerate(expected) if n > limit]
    assert [(s.request_index, s.reason) for s in skipped] == sorted(
        [(1, "unreadable_image"), *too_long]
    )
    assert "skipping request 1: unreadable image 0 (<7 bytes>)" in caplog.text
    with pytest.raises(
        ValueError, match="request 0: the prompt has 1 <\\|image_pad\\|> placeholders but 0 images"
    ):
        prep.prepare([RolloutRequest(prompt=prompt)])
    with pytest.raises(ValueError, match="2 images, but this engine takes at most 1"):
        prep.prepare([RolloutRequest(prompt=prompt, images=(images[0], images[0]))])
    assert prep.suppressed(SamplingConfig(suppress_token_ids=(5, prep.image_token_id))) == sorted(
        {5, *prep.placeholder_token_ids}
    )


def test_an_engine_start_leaves_a_resumed_trainers_rng_where_it_was(monkeypatch):
    """vLLM's worker reseeds Python, NumPy and torch (`set_random_seed(model_config.seed)`,
    vllm/v1/worker/{gpu,cpu}_worker.py) when an engine starts inside the trainer's process. A
    stand-in engine class calls that same vLLM function at start (a mock: no engine is built). A
    run resumed after step 1 restores its RNG, then starts its engine: its step-2 draws must equal
    the uninterrupted run's step-2 draws, as `create_engine` keeps the generators as they were."""
    import random

    from vllm.utils.torch_utils import set_random_seed

    from megatron_revisual.parallel.rng import rng_state, set_rng_state
    from megatron_revisual.rollout import registry, vllm_engine

    class ReseedingEngine:
        def __init__(self, config):
            set_random_seed(config.seed)

    monkeypatch.setattr(vllm_engine, "VLLMEngine", ReseedingEngine)
    config = VLLMEngineConfig(model_path="unused", dtype="float32", seed=0)

    def draws():
        return (random.random(), float(np.random.random()), float(torch.rand(1)))

    torch.manual_seed(1234), random.seed(1234), np.random.seed(1234)
    registry.create_engine(config)  # the uninterrupted run: its engine starts with the stage
    step1 = draws()
    saved = rng_state()  # the checkpoint after step 1
    step2 = draws()

    torch.manual_seed(99), random.seed(99), np.random.seed(99)  # a new process ...
    set_rng_state(saved)  # ... restores the checkpoint's RNG, then starts its engine
    registry.create_engine(config)
    assert draws() == step2
    set_random_seed(0)  # what an unguarded start leaves: the resumed run would draw these instead
    assert draws() not in (step1, step2)
