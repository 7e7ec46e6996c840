"""The tiny checkpoints run in the real vLLM CPU engine and agree with transformers.

vLLM is started in a child process (this file doubles as its script: `python
tests/integration/test_vllm_tiny.py MODEL_DIR OUT_JSON`), once per model, so that its process
groups, thread pinning and environment never leak into the pytest process.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytestmark = [pytest.mark.integration, pytest.mark.vllm]

NUM_TOKENS = 8
VLLM_ENV = {
    # Keep the engine core in the worker process: simpler and ~10 s faster to start.
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    # GiB of KV cache; the default would reserve a large share of the machine's memory.
    "VLLM_CPU_KVCACHE_SPACE": "1",
}


def _image() -> Image.Image:
    # 140x196 pixels -> 10x14 patches: more than one 112-pixel window (8x8 patches), with a
    # partial window at the edge, so the window permutation and padding both matter.
    arr = np.zeros((140, 196, 3), dtype=np.uint8)
    arr[..., 0] = np.linspace(0, 255, 196, dtype=np.uint8)[None, :]
    arr[..., 1] = np.linspace(0, 255, 140, dtype=np.uint8)[:, None]
    arr[..., 2] = 90
    return Image.fromarray(arr)


def _prompts(model_dir: Path, *, with_image: bool) -> list[tuple[str, bool]]:
    """(chat-templated prompt text, has image) pairs, rendered by the checkpoint's template."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    text_msgs = [{"role": "user", "content": "Solve 3 + 4 and put the answer in \\boxed{}."}]
    prompts = [
        (tok.apply_chat_template(text_msgs, add_generation_prompt=True, tokenize=False), False)
    ]
    if with_image:
        image_msgs = [
            {
                "role": "user",
                "content": [{"type": "image"}, {"type": "text", "text": "What is the area?"}],
            }
        ]
        rendered = tok.apply_chat_template(image_msgs, add_generation_prompt=True, tokenize=False)
        prompts.insert(0, (rendered, True))
    return prompts


def _run_vllm(model_dir: Path, with_image: bool) -> list[dict]:
    from vllm import LLM, SamplingParams

    # video 0: otherwise start-up profiling also builds and encodes a dummy video.
    mm = {"limit_mm_per_prompt": {"image": 1, "video": 0}} if with_image else {}
    llm = LLM(
        model=str(model_dir),
        dtype="float32",
        max_model_len=1024,
        enforce_eager=True,
        max_num_seqs=2,
        seed=0,
        **mm,
    )
    params = SamplingParams(
        temperature=0.0, max_tokens=NUM_TOKENS, min_tokens=NUM_TOKENS, ignore_eos=True, logprobs=1
    )
    requests = [
        {"prompt": text, "multi_modal_data": {"image": _image()}} if has_image else {"prompt": text}
        for text, has_image in _prompts(model_dir, with_image=with_image)
    ]
    results = []
    for out in llm.generate(requests, params, use_tqdm=False):
        completion = out.outputs[0]
        results.append(
            {
                "prompt_token_ids": list(out.prompt_token_ids),
                "token_ids": list(completion.token_ids),
                "logprobs": [
                    lp[t].logprob
                    for lp, t in zip(completion.logprobs, completion.token_ids, strict=True)
                ],
            }
        )
    return results


def _vllm_in_subprocess(model_dir: Path, out_json: Path, *, with_image: bool) -> list[dict]:
    cmd = [sys.executable, __file__, str(model_dir), str(out_json)]
    if with_image:
        cmd.append("--image")
    env = {**os.environ, **VLLM_ENV}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (
        f"vLLM worker failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    )
    return json.loads(out_json.read_text())


def _hf_greedy(model_dir: Path, *, with_image: bool) -> list[dict]:
    import torch
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForImageTextToText,
        AutoProcessor,
        AutoTokenizer,
    )

    if with_image:
        processor = AutoProcessor.from_pretrained(model_dir)
        model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32)
    else:
        processor = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    results = []
    for text, has_image in _prompts(model_dir, with_image=with_image):
        if has_image:
            inputs = processor(text=[text], images=[_image()], return_tensors="pt")
        else:
            inputs = processor(text=[text], return_tensors="pt")
        with torch.no_grad():
            out = model.generate(
                **inputs,
                do_sample=False,
                max_new_tokens=NUM_TOKENS,
                min_new_tokens=NUM_TOKENS,
                output_logits=True,
                return_dict_in_generate=True,
            )
        prompt_len = inputs["input_ids"].shape[1]
        new_ids = out.sequences[0, prompt_len:].tolist()
        logprobs = [
            torch.log_softmax(step_logits[0].float(), dim=-1)[tok].item()
            for step_logits, tok in zip(out.logits, new_ids, strict=True)
        ]
        results.append(
            {
                "prompt_token_ids": inputs["input_ids"][0].tolist(),
                "token_ids": new_ids,
                "logprobs": logprobs,
            }
        )
    return results


def _assert_same_generation(vllm_out: list[dict], hf_out: list[dict], vocab_size: int) -> None:
    assert len(vllm_out) == len(hf_out)
    for v, h in zip(vllm_out, hf_out, strict=True):
        # vLLM expanded <|image_pad|> through the same processor files
        assert v["prompt_token_ids"] == h["prompt_token_ids"]
        assert len(v["token_ids"]) == NUM_TOKENS
        assert all(0 <= t < vocab_size for t in v["token_ids"])
        assert v["token_ids"] == h["token_ids"]
        # a random model spreads probability: ~log(1/768) = -6.6 per token
        assert -8.0 < v["logprobs"][0] < -3.0
        np.testing.assert_allclose(v["logprobs"], h["logprobs"], atol=1e-4)


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory) -> dict[str, Path]:
    from megatron_revisual.testing.tiny_checkpoint import DEFAULT_SPEC, make_tiny_checkpoint

    root = tmp_path_factory.mktemp("tiny_vllm")
    # The text-only model is tied, so vLLM's tied lm_head path is exercised too.
    tied = dataclasses.replace(DEFAULT_SPEC, tie_word_embeddings=True)
    return {
        "vl": make_tiny_checkpoint(root / "vl", seed=0),
        "lm": make_tiny_checkpoint(root / "lm", text_only=True, seed=3, spec=tied),
    }


def test_vllm_vl_matches_transformers(tiny_dirs, tmp_path: Path):
    model_dir = tiny_dirs["vl"]
    vllm_out = _vllm_in_subprocess(model_dir, tmp_path / "vl.json", with_image=True)
    hf_out = _hf_greedy(model_dir, with_image=True)
    # 140x196 -> grid (1, 10, 14) -> 140 patches / 4 = 35 image tokens
    image_pad = json.loads((model_dir / "config.json").read_text())["image_token_id"]
    assert vllm_out[0]["prompt_token_ids"].count(image_pad) == 35
    assert image_pad not in vllm_out[1]["prompt_token_ids"]
    _assert_same_generation(vllm_out, hf_out, vocab_size=768)


def test_vllm_text_only_matches_transformers(tiny_dirs, tmp_path: Path):
    model_dir = tiny_dirs["lm"]
    vllm_out = _vllm_in_subprocess(model_dir, tmp_path / "lm.json", with_image=False)
    hf_out = _hf_greedy(model_dir, with_image=False)
    _assert_same_generation(vllm_out, hf_out, vocab_size=768)


if __name__ == "__main__":
    model_dir, out_json = Path(sys.argv[1]), Path(sys.argv[2])
    results = _run_vllm(model_dir, with_image="--image" in sys.argv[3:])
    out_json.write_text(json.dumps(results))
