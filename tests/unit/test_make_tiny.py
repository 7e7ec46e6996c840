"""The tiny checkpoint generator: loadable by transformers, deterministic, written atomically."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from megatron_revisual.testing import tiny_checkpoint
from megatron_revisual.testing.tiny_checkpoint import DEFAULT_SPEC, TinySpec, make_tiny_checkpoint

SPEC = DEFAULT_SPEC


def _sha256_of_files(d: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir())}


def _safetensors_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    with safe_open(str(path), "pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def _gradient_image(height: int, width: int) -> Image.Image:
    arr = np.zeros((height, width, 3), dtype=np.uint8)
    arr[..., 0] = np.linspace(0, 255, width, dtype=np.uint8)[None, :]
    arr[..., 1] = np.linspace(0, 255, height, dtype=np.uint8)[:, None]
    arr[..., 2] = 128
    return Image.fromarray(arr)


@pytest.fixture(scope="module")
def vl_dir(tmp_path_factory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "vl", seed=0)


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "lm", text_only=True, seed=0)


def test_vl_checkpoint_runs_in_transformers(vl_dir: Path):
    from transformers import AutoModelForImageTextToText, AutoProcessor, Qwen2_5_VLProcessor

    assert sorted(p.name for p in vl_dir.iterdir()) == [
        "chat_template.jinja",
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "preprocessor_config.json",
        "processor_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "video_preprocessor_config.json",
    ]
    processor = AutoProcessor.from_pretrained(vl_dir)
    assert isinstance(processor, Qwen2_5_VLProcessor)
    tok = processor.tokenizer
    ids = SPEC.special_token_ids
    assert len(tok) == SPEC.tokenizer_size == 714
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == ids["<|im_end|>"] == 702
    assert tok.pad_token == "<|endoftext|>" and tok.pad_token_id == 700
    assert tok.convert_tokens_to_ids("<|image_pad|>") == ids["<|image_pad|>"] == 712

    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image"},
                {"type": "text", "text": "Find the area. Put the answer in \\boxed{}."},
            ],
        }
    ]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        "<|vision_start|><|image_pad|><|vision_end|>Find the area. Put the answer in "
        "\\boxed{}.<|im_end|>\n<|im_start|>assistant\n"
    )
    inputs = processor(text=[text], images=[_gradient_image(56, 84)], return_tensors="pt")
    # 56x84 pixels -> 4x6 patches of 14 -> 24 patches, 6 LM tokens after the 2x2 merge.
    assert inputs["image_grid_thw"].tolist() == [[1, 4, 6]]
    assert inputs["pixel_values"].shape == (24, 3 * 2 * 14 * 14)
    n_image_tokens = int((inputs["input_ids"] == ids["<|image_pad|>"]).sum())
    assert n_image_tokens == int(inputs["image_grid_thw"].prod()) // 4 == 6

    model, info = AutoModelForImageTextToText.from_pretrained(
        vl_dir, dtype=torch.float32, output_loading_info=True
    )
    assert type(model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    assert {k: v for k, v in info.items() if v} == {}  # nothing missing, unexpected, mismatched
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape == (1, inputs["input_ids"].shape[1], SPEC.vocab_size)
    assert SPEC.vocab_size == 768
    assert torch.isfinite(logits).all()
    # init std 0.02 keeps logits near zero (softmax not saturated), so greedy and sampling
    # tests see a spread-out, non-degenerate distribution
    assert 0.05 < logits.std().item() < 1.0


def test_text_only_checkpoint_runs_in_transformers(lm_dir: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert not (lm_dir / "processor_config.json").exists()
    config = json.loads((lm_dir / "config.json").read_text())
    assert config["model_type"] == "qwen2" and config["architectures"] == ["Qwen2ForCausalLM"]
    tok = AutoTokenizer.from_pretrained(lm_dir)
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "What is 12 + 30?"}],
        add_generation_prompt=True,
        tokenize=False,
    )
    assert prompt.endswith("<|im_start|>user\nWhat is 12 + 30?<|im_end|>\n<|im_start|>assistant\n")
    enc = tok(prompt, return_tensors="pt")
    model, info = AutoModelForCausalLM.from_pretrained(
        lm_dir, dtype=torch.float32, output_loading_info=True
    )
    assert {k: v for k, v in info.items() if v} == {}
    with torch.no_grad():
        logits = model(**enc).logits
    assert logits.shape == (1, enc["input_ids"].shape[1], 768)
    assert torch.isfinite(logits).all()
    assert not torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)


def test_tokenizer_round_trips_reasoning_text(vl_dir: Path):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(vl_dir)
    raw = Tokenizer.from_file(str(vl_dir / "tokenizer.json"))
    text = "<think>\nWait, $\\frac{3}{8}$ of 1024 is 384.</think> So \\boxed{384}. héllo 中文"
    ids = tok(text)["input_ids"]
    assert tok.decode(ids) == text
    assert raw.encode(text).ids == ids  # transformers rebuilds the pipeline; it must agree
    # frequent corpus words were merged: "<think>" -> "<think" ">", "\\boxed{" -> "\\" "boxed" "{"
    assert len(tok("<think>")["input_ids"]) == 2
    assert len(tok("\\boxed{")["input_ids"]) == 3
    # BPE merges learnt from the corpus: far fewer tokens than UTF-8 bytes
    assert len(ids) < 0.7 * len(text.encode())


def test_weight_names_match_save_pretrained(vl_dir: Path, tmp_path: Path):
    from transformers import AutoModelForImageTextToText

    ours = _safetensors_shapes(vl_dir / "model.safetensors")
    model = AutoModelForImageTextToText.from_pretrained(vl_dir, dtype=torch.float32)
    model.save_pretrained(tmp_path)
    assert _safetensors_shapes(tmp_path / "model.safetensors") == ours
    assert len(ours) == 57
    assert ours["lm_head.weight"] == (768, 128)
    assert ours["model.embed_tokens.weight"] == (768, 128)
    assert ours["model.layers.0.self_attn.k_proj.weight"] == (2 * 32, 128)
    assert ours["visual.blocks.0.attn.qkv.weight"] == (3 * 64, 64)
    assert ours["visual.patch_embed.proj.weight"] == (64, 3, 2, 14, 14)
    assert ours["visual.merger.mlp.0.weight"] == (4 * 64, 4 * 64)
    assert ours["visual.merger.mlp.2.weight"] == (128, 4 * 64)
    with safe_open(str(vl_dir / "model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}
        norm = f.get_tensor("model.norm.weight")
        bias = f.get_tensor("model.layers.0.self_attn.q_proj.bias")
        assert f.get_tensor("lm_head.weight").dtype == torch.float32
    assert abs(norm.mean().item() - 1.0) < 0.01 and norm.std().item() > 0.005
    assert bias.abs().max().item() > 0.0


def test_tied_text_only_checkpoint(tmp_path: Path):
    from transformers import AutoModelForCausalLM

    spec = dataclasses.replace(SPEC, tie_word_embeddings=True)
    out = make_tiny_checkpoint(tmp_path / "tied", text_only=True, spec=spec)
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
    names = _safetensors_shapes(out / "model.safetensors")
    assert "lm_head.weight" not in names and len(names) == 26  # 27 when untied
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)


def test_same_seed_is_byte_identical_across_processes(vl_dir: Path, tmp_path: Path):
    # A fresh interpreter: Rust HashMap seeds and PYTHONHASHSEED differ from this process.
    script = (
        "import sys; from megatron_revisual.testing.tiny_checkpoint import make_tiny_checkpoint; "
        "make_tiny_checkpoint(sys.argv[1], seed=0)"
    )
    again = tmp_path / "again"
    subprocess.run([sys.executable, "-c", script, str(again)], check=True, timeout=300)
    reference = _sha256_of_files(vl_dir)
    assert len(reference) == 9
    assert _sha256_of_files(again) == reference

    other = make_tiny_checkpoint(tmp_path / "seed1", seed=1)
    other_hashes = _sha256_of_files(other)
    assert other_hashes["model.safetensors"] != reference["model.safetensors"]
    # the seed changes the weights only; tokenizer and configs are shared
    del other_hashes["model.safetensors"], reference["model.safetensors"]
    assert other_hashes == reference


def test_existing_dir_needs_overwrite(tmp_path: Path, monkeypatch):
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    with pytest.raises(FileExistsError, match="not empty.*overwrite=True"):
        make_tiny_checkpoint(out, text_only=True)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]

    # A failure while writing leaves the old directory untouched and no staging dirs behind.
    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    with monkeypatch.context() as m:
        m.setattr(tiny_checkpoint, "_write_checkpoint", boom)
        with pytest.raises(RuntimeError, match="disk full"):
            make_tiny_checkpoint(out, text_only=True, overwrite=True)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]

    assert make_tiny_checkpoint(out, text_only=True, overwrite=True) == out.resolve()
    assert "keep.txt" not in {p.name for p in out.iterdir()}
    assert (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    # an empty directory is not "existing data"
    (tmp_path / "empty").mkdir()
    assert (make_tiny_checkpoint(tmp_path / "empty", text_only=True) / "config.json").is_file()


def test_config_dimensions(vl_dir: Path):
    config = json.loads((vl_dir / "config.json").read_text())
    text, vision = config["text_config"], config["vision_config"]
    head_dim = text["hidden_size"] // text["num_attention_heads"]
    assert head_dim == 32 >= 32
    assert sum(text["rope_parameters"]["mrope_section"]) == head_dim // 2 == 16
    assert text["num_key_value_heads"] == 2 and text["num_hidden_layers"] == 2
    assert text["vocab_size"] == 768 >= SPEC.tokenizer_size
    assert config["tie_word_embeddings"] is False
    assert vision["hidden_size"] // vision["num_heads"] == 32
    assert vision["out_hidden_size"] == text["hidden_size"]
    assert (vision["depth"], vision["fullatt_block_indexes"]) == (2, [1])
    assert (vision["patch_size"], vision["temporal_patch_size"]) == (14, 2)
    assert (vision["spatial_merge_size"], vision["window_size"]) == (2, 112)
    ids = SPEC.special_token_ids
    assert config["image_token_id"] == ids["<|image_pad|>"]
    assert config["video_token_id"] == ids["<|video_pad|>"]
    assert config["vision_start_token_id"] == ids["<|vision_start|>"]
    assert config["vision_end_token_id"] == ids["<|vision_end|>"]
    pre = json.loads((vl_dir / "preprocessor_config.json").read_text())
    assert pre["size"] == {"shortest_edge": 56 * 56, "longest_edge": 112 * 112 * 4}


def test_spec_rejects_bad_dimensions():
    with pytest.raises(ValueError, match="vLLM's CPU attention needs >= 32"):
        TinySpec(hidden_size=64, num_attention_heads=4, mrope_section=(2, 3, 3))
    with pytest.raises(ValueError, match=r"sums to 12, expected head_dim/2 = 16"):
        TinySpec(mrope_section=(4, 4, 4))
