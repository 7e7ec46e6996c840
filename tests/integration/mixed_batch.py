"""The parity tests' shared inputs: a tiny checkpoint with QKV scaled x4 (attention far from
uniform, so rope and window errors show) and the mixed batch — two images of different sizes,
a text-only row, an image whose 10 x 14 grid is not a multiple of the window — right-padded."""

from __future__ import annotations

from pathlib import Path


def scaled_tiny_checkpoint(hf_dir: Path) -> Path:
    from safetensors.torch import load_file, save_file

    from megatron_revisual.testing.tiny_checkpoint import make_tiny_checkpoint

    make_tiny_checkpoint(hf_dir, seed=3)
    weights = load_file(hf_dir / "model.safetensors")
    for name in weights:
        if any(k in name for k in ("q_proj", "k_proj", "attn.qkv")):
            weights[name] = weights[name] * 4
    save_file(weights, hf_dir / "model.safetensors", metadata={"format": "pt"})
    return hf_dir


def mixed_batch_inputs(hf_dir: Path):
    """(processor, inputs) for the three chats, right-padded."""
    from transformers import AutoProcessor

    from megatron_revisual.demo import demo_image

    proc = AutoProcessor.from_pretrained(hf_dir)
    proc.tokenizer.padding_side = "right"
    chats = [
        [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Compare the two figures."}],
        [{"type": "text", "text": "What is 3 + 4? Think step by step, then answer."}],
        [{"type": "image"}, {"type": "text", "text": "Describe the triangle."}],
    ]
    texts = [proc.apply_chat_template([{"role": "user", "content": c}], add_generation_prompt=True) for c in chats]
    images = [demo_image(84, 56), demo_image(168, 112), demo_image(196, 140)]
    return proc, proc(text=texts, images=images, padding=True, return_tensors="pt")
