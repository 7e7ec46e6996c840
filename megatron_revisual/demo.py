"""The tiny CPU demo: a smoke run of everything that exists, end to end.

    .venv/bin/revisual demo                                  # configs/tiny_cpu_demo.yaml
    .venv/bin/revisual demo train.train_iters=3 --skip-vllm

1. `make-tiny` writes a random Qwen2.5-VL HF checkpoint at model.hf_path (kept if present);
2. Hugging Face transformers runs it on a chat prompt with an image;
3. our Megatron-Core Qwen2.5-VL, loaded from that checkpoint, trains on text for
   train.train_iters steps on cluster.devices_per_node gloo ranks with the config's TP/PP/SP
   and optimizer;
4. vLLM (CPU) generates from the checkpoint with an image.
Outputs go to output_dir: the checkpoint, `smoke_metrics.jsonl`, `demo_summary.json`.
Exit code 0 only when every step ran and the training loss went down.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from megatron_revisual.config import config_from_dict, read_raw_config, validate_config

DEMO_QUESTION = "What is 3 + 4? Put the final answer in \\boxed{}."


def demo_image(width: int = 84, height: int = 56):
    """A deterministic RGB gradient, so the demo needs no image file."""
    from PIL import Image

    img = Image.new("RGB", (width, height))
    img.putdata([(x * 255 // width, y * 255 // height, 128) for y in range(height) for x in range(width)])
    return img


def chat_messages(question: str, with_image: bool) -> list[dict[str, Any]]:
    content: list[dict[str, Any]] = [{"type": "image"}] if with_image else []
    content.append({"type": "text", "text": question})
    return [{"role": "user", "content": content}]


def hf_forward_with_image(hf_dir: Path) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(hf_dir)
    model = AutoModelForImageTextToText.from_pretrained(hf_dir, dtype=torch.float32).eval()
    prompt = processor.apply_chat_template(chat_messages(DEMO_QUESTION, True), add_generation_prompt=True)
    inputs = processor(text=[prompt], images=[demo_image()], return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits
        generated = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    image_pad = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    return {
        "logits_shape": list(logits.shape),
        "image_tokens": int((inputs["input_ids"] == image_pad).sum()),
        "image_grid_thw": inputs["image_grid_thw"].tolist(),
        "greedy_new_tokens": generated[0, inputs["input_ids"].shape[1] :].tolist(),
        "finite": bool(torch.isfinite(logits).all()),
    }


def megatron_smoke(cfg, hf_dir: Path) -> list[dict[str, float]]:
    from transformers import AutoTokenizer

    from megatron_revisual.parallel import run_distributed
    from megatron_revisual.testing.tiny_tokenizer import training_corpus
    from megatron_revisual.train.smoke import smoke_train_rank

    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    token_ids = tokenizer("\n".join(training_corpus()), verbose=False)["input_ids"]
    p = cfg.parallel
    results = run_distributed(
        smoke_train_rank,
        world_size=cfg.cluster.world_size,
        tp=p.tensor_model_parallel_size,
        pp=p.pipeline_model_parallel_size,
        cp=p.context_parallel_size,
        seed=cfg.train.seed,
        args=(cfg, token_ids),
        timeout_s=900,
    )
    return results[0]


def vllm_generate_with_image(hf_dir: Path) -> dict[str, Any]:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    # In-process engine: no extra engine process on a 2-core machine, and weight reloads reach it.
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from vllm import LLM, SamplingParams

    llm = LLM(
        model=str(hf_dir),
        dtype="float32",
        max_model_len=1024,
        enforce_eager=True,
        limit_mm_per_prompt={"image": 1},
        seed=0,
    )
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    outputs = llm.chat([chat_messages_vllm(DEMO_QUESTION)], params, use_tqdm=False)
    out = outputs[0].outputs[0]
    return {"token_ids": list(out.token_ids), "text": out.text}


def chat_messages_vllm(question: str) -> list[dict[str, Any]]:
    import base64
    import io

    buf = io.BytesIO()
    demo_image().save(buf, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    return [
        {
            "role": "user",
            "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": question}],
        }
    ]


def run_demo(config_path: str | Path, overrides: list[str], *, skip_vllm: bool = False) -> int:
    from megatron_revisual.testing.tiny_checkpoint import make_tiny_checkpoint

    raw = read_raw_config(config_path, overrides)
    hf_dir = Path(raw.get("model", {}).get("hf_path") or "runs/tiny_cpu_demo/hf_tiny")
    if not (hf_dir / "config.json").exists():
        make_tiny_checkpoint(hf_dir, seed=int(raw.get("train", {}).get("seed", 0)))
        print(f"[1/4] make-tiny: wrote {hf_dir}")
    else:
        print(f"[1/4] make-tiny: reusing {hf_dir}")
    raw.setdefault("model", {})["hf_path"] = str(hf_dir)
    cfg = config_from_dict(raw, source=str(config_path))
    validate_config(cfg)
    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {"config": str(config_path), "overrides": list(overrides)}

    t0 = time.perf_counter()
    summary["hf"] = hf = hf_forward_with_image(hf_dir)
    print(f"[2/4] transformers: logits {hf['logits_shape']}, {hf['image_tokens']} image tokens, "
          f"greedy {hf['greedy_new_tokens']} ({time.perf_counter() - t0:.1f}s)")

    t0 = time.perf_counter()
    history = megatron_smoke(cfg, hf_dir)
    with open(out_dir / "smoke_metrics.jsonl", "w") as f:
        for row in history:
            f.write(json.dumps(row) + "\n")
    p = cfg.parallel
    print(f"[3/4] megatron-core: TP={p.tensor_model_parallel_size} PP={p.pipeline_model_parallel_size} "
          f"SP={p.sequence_parallel} on {cfg.cluster.world_size} gloo ranks ({time.perf_counter() - t0:.1f}s)")
    for row in history:
        print(f"      step {row['step']}: loss {row['loss']:.4f}  grad_norm {row['grad_norm']:.3f}  lr {row['lr']:.2e}")
    summary["megatron"] = history

    if skip_vllm:
        print("[4/4] vLLM: skipped (--skip-vllm)")
    else:
        t0 = time.perf_counter()
        summary["vllm"] = gen = vllm_generate_with_image(hf_dir)
        print(f"[4/4] vLLM: generated {gen['token_ids']} with an image ({time.perf_counter() - t0:.1f}s)")

    (out_dir / "demo_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    ok = hf["finite"] and history[-1]["loss"] < history[0]["loss"]
    print(f"demo {'OK' if ok else 'FAILED'}: summary in {out_dir / 'demo_summary.json'}")
    return 0 if ok else 1
