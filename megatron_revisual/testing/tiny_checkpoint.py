"""Tiny random Qwen2.5-VL / Qwen2 Hugging Face checkpoints for CPU tests and demos.

Nothing is downloaded: the tokenizer is trained on the fly (see `tiny_tokenizer`), the weights
come from a seeded `torch.Generator`, and every file is written deterministically, so the same
seed gives byte-identical directories. Used by `revisual make-tiny` and by the tests:

    make_tiny_checkpoint("runs/tiny-vl", seed=0)                  # Qwen2.5-VL
    make_tiny_checkpoint("runs/tiny-lm", text_only=True, seed=0)  # Qwen2, text only
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from megatron_revisual.staged_dir import staged_output_dir
from megatron_revisual.testing import tiny_tokenizer

if TYPE_CHECKING:
    from transformers import PretrainedConfig

# Qwen's CLIP-style normalisation constants (preprocessor_config.json of every Qwen2.5-VL size).
QWEN_IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
QWEN_IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclasses.dataclass(frozen=True, kw_only=True)
class TinySpec:
    """Dimensions of the tiny models.

    The LM head_dim is 32 because vLLM's CPU attention rejects 16; two KV heads so that TP=2
    shards them; two vision blocks with block 1 on full attention so both the windowed and the
    full-attention paths run; images up to 224x224 so a picture can span several 112-pixel
    windows.
    """

    # language model
    hidden_size: int = 128
    intermediate_size: int = 256
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    rope_theta: float = 1_000_000.0
    mrope_section: tuple[int, int, int] = (4, 6, 6)  # Qwen's [16, 24, 24] scaled to head_dim 32
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    # tokenizer: BPE tokens (256 bytes + merges), then the special tokens; the embedding is
    # padded past the tokenizer like Qwen's (151936 rows for 151665 tokens)
    bpe_vocab_size: int = 700
    vocab_multiple: int = 64
    # vision tower
    vision_depth: int = 2
    vision_hidden_size: int = 64
    vision_num_heads: int = 2
    vision_intermediate_size: int = 128
    vision_fullatt_block_indexes: tuple[int, ...] = (1,)
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    window_size: int = 112
    tokens_per_second: int = 2
    # image / video preprocessing, in pixels per image or frame
    min_pixels: int = 56 * 56
    max_pixels: int = 112 * 112 * 4
    video_max_pixels: int = 112 * 112
    # weight init: normal(0, init_std); norm weights 1 + normal(0, init_std)
    init_std: float = 0.02

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} is not divisible by "
                f"num_attention_heads={self.num_attention_heads}"
            )
        if self.head_dim < 32:
            raise ValueError(f"head_dim={self.head_dim}: vLLM's CPU attention needs >= 32")
        if sum(self.mrope_section) * 2 != self.head_dim:
            raise ValueError(
                f"mrope_section={self.mrope_section} sums to {sum(self.mrope_section)}, "
                f"expected head_dim/2 = {self.head_dim // 2}"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_key_value_heads={self.num_key_value_heads} does not divide "
                f"num_attention_heads={self.num_attention_heads}"
            )
        if self.bpe_vocab_size < 256:
            raise ValueError(
                f"bpe_vocab_size={self.bpe_vocab_size} is below the 256 byte-level base tokens"
            )
        if self.vocab_multiple < 1:
            raise ValueError(f"vocab_multiple={self.vocab_multiple} must be >= 1")
        bad = [i for i in self.vision_fullatt_block_indexes if not 0 <= i < self.vision_depth]
        if bad:
            raise ValueError(
                f"vision_fullatt_block_indexes {bad} outside "
                f"range(vision_depth={self.vision_depth})"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def tokenizer_size(self) -> int:
        return self.bpe_vocab_size + len(tiny_tokenizer.SPECIAL_TOKENS)

    @property
    def vocab_size(self) -> int:
        """Rows of the embedding and lm_head in config.json (tokenizer size rounded up)."""
        return -(-self.tokenizer_size // self.vocab_multiple) * self.vocab_multiple

    @property
    def special_token_ids(self) -> dict[str, int]:
        return tiny_tokenizer.special_token_ids(self.bpe_vocab_size)


DEFAULT_SPEC = TinySpec()


def _text_config_kwargs(spec: TinySpec, *, mrope: bool) -> dict:
    ids = spec.special_token_ids
    rope: dict = {"rope_type": "default", "rope_theta": spec.rope_theta}
    if mrope:
        rope["mrope_section"] = list(spec.mrope_section)
    return {
        "vocab_size": spec.vocab_size,
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size,
        "num_hidden_layers": spec.num_hidden_layers,
        "num_attention_heads": spec.num_attention_heads,
        "num_key_value_heads": spec.num_key_value_heads,
        "hidden_act": "silu",
        "max_position_embeddings": spec.max_position_embeddings,
        "max_window_layers": spec.num_hidden_layers,
        "use_sliding_window": False,
        "rms_norm_eps": spec.rms_norm_eps,
        "rope_parameters": rope,
        "attention_dropout": 0.0,
        "initializer_range": spec.init_std,
        "bos_token_id": ids[tiny_tokenizer.PAD_TOKEN],
        "eos_token_id": ids[tiny_tokenizer.EOS_TOKEN],
        "pad_token_id": ids[tiny_tokenizer.PAD_TOKEN],
    }


def build_hf_config(spec: TinySpec = DEFAULT_SPEC, *, text_only: bool = False) -> PretrainedConfig:
    """The transformers config object: `Qwen2Config` if text_only else `Qwen2_5_VLConfig`."""
    from transformers import Qwen2_5_VLConfig, Qwen2Config

    if text_only:
        return Qwen2Config(
            **_text_config_kwargs(spec, mrope=False),
            tie_word_embeddings=spec.tie_word_embeddings,
            architectures=["Qwen2ForCausalLM"],
            dtype="float32",
        )
    ids = spec.special_token_ids
    return Qwen2_5_VLConfig(
        text_config=_text_config_kwargs(spec, mrope=True),
        vision_config={
            "depth": spec.vision_depth,
            "hidden_size": spec.vision_hidden_size,
            "num_heads": spec.vision_num_heads,
            "intermediate_size": spec.vision_intermediate_size,
            "hidden_act": "silu",
            "in_channels": 3,
            "patch_size": spec.patch_size,
            "temporal_patch_size": spec.temporal_patch_size,
            "spatial_merge_size": spec.spatial_merge_size,
            "window_size": spec.window_size,
            "fullatt_block_indexes": list(spec.vision_fullatt_block_indexes),
            "out_hidden_size": spec.hidden_size,
            "tokens_per_second": spec.tokens_per_second,
            "initializer_range": spec.init_std,
        },
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=spec.tie_word_embeddings,
        architectures=["Qwen2_5_VLForConditionalGeneration"],
        dtype="float32",
    )


def checkpoint_tensor_shapes(config: PretrainedConfig) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes exactly as `save_pretrained` of transformers writes them.

    transformers 5 keeps `model.language_model.*` / `model.visual.*` in memory but saves the
    original Hub names (`model.layers.*`, `visual.*`, `lm_head.weight`), dropping the tied
    lm_head; we ask transformers for that renaming instead of hard-coding it.
    """
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText
    from transformers.core_model_loading import revert_weight_conversion
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    auto = AutoModelForCausalLM if config.model_type == "qwen2" else AutoModelForImageTextToText
    # Meta device: no memory, and the global torch RNG is left untouched.
    with torch.device("meta"):
        model = auto.from_config(config)
    state = remove_tied_weights_from_state_dict(model.state_dict(), model)
    state = revert_weight_conversion(model, state)
    return {name: tuple(t.shape) for name, t in state.items()}


def random_weights(
    shapes: dict[str, tuple[int, ...]], *, seed: int, std: float
) -> dict[str, torch.Tensor]:
    """fp32 weights drawn in sorted-name order from one seeded generator.

    Norm weights (the only 1-D `.weight` tensors here) are 1 + noise rather than exactly 1, and
    biases are non-zero, so that a conversion which drops or swaps them changes the outputs.
    """
    gen = torch.Generator(device="cpu").manual_seed(seed)
    out = {}
    for name in sorted(shapes):
        t = torch.empty(shapes[name], dtype=torch.float32).normal_(0.0, std, generator=gen)
        if name.endswith(".weight") and len(shapes[name]) == 1:
            t += 1.0
        out[name] = t
    return out


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _canonicalize_json(path: Path) -> None:
    # transformers already sorts most of its files; re-dumping makes every JSON file follow one
    # byte-stable format regardless of how each saver orders keys.
    _write_json(path, json.loads(path.read_text(encoding="utf-8")))


def _save_processor(out: Path, hf_tokenizer, spec: TinySpec) -> None:
    from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    common = {
        "patch_size": spec.patch_size,
        "temporal_patch_size": spec.temporal_patch_size,
        "merge_size": spec.spatial_merge_size,
        "image_mean": list(QWEN_IMAGE_MEAN),
        "image_std": list(QWEN_IMAGE_STD),
    }
    image_processor = Qwen2VLImageProcessor(
        min_pixels=spec.min_pixels, max_pixels=spec.max_pixels, **common
    )
    # transformers 5.19 cannot build the processor without an explicit video processor.
    video_processor = Qwen2VLVideoProcessor(
        min_pixels=spec.min_pixels, max_pixels=spec.video_max_pixels, **common
    )
    processor = Qwen2_5_VLProcessor(
        image_processor=image_processor,
        tokenizer=hf_tokenizer,
        video_processor=video_processor,
        chat_template=tiny_tokenizer.CHAT_TEMPLATE,
    )
    processor.save_pretrained(out)
    # transformers 5 nests both processors in processor_config.json; the separate files are
    # what older readers of Qwen checkpoints (and the Hub originals) have.
    nested = json.loads((out / "processor_config.json").read_text(encoding="utf-8"))
    _write_json(out / "preprocessor_config.json", nested["image_processor"])
    _write_json(out / "video_preprocessor_config.json", nested["video_processor"])


def _write_checkpoint(out: Path, *, text_only: bool, seed: int, spec: TinySpec) -> None:
    from safetensors.torch import save_file
    from transformers import GenerationConfig

    config = build_hf_config(spec, text_only=text_only)
    config.save_pretrained(out)
    ids = spec.special_token_ids
    # No sampling defaults: vLLM applies generation_config.json to every request.
    GenerationConfig(
        bos_token_id=ids[tiny_tokenizer.PAD_TOKEN],
        eos_token_id=[ids[tiny_tokenizer.EOS_TOKEN], ids[tiny_tokenizer.PAD_TOKEN]],
        pad_token_id=ids[tiny_tokenizer.PAD_TOKEN],
    ).save_pretrained(out)

    tokenizer = tiny_tokenizer.train_tokenizer(spec.bpe_vocab_size)
    hf_tokenizer = tiny_tokenizer.save_tokenizer(
        tokenizer, out, model_max_length=spec.max_position_embeddings
    )
    if not text_only:
        _save_processor(out, hf_tokenizer, spec)

    weights = random_weights(checkpoint_tensor_shapes(config), seed=seed, std=spec.init_std)
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "model.safetensors").chmod(0o644)  # safetensors creates it owner-only

    for path in out.glob("*.json"):
        if path.name != "tokenizer.json":  # written by `tokenizers` itself, already stable
            _canonicalize_json(path)


def make_tiny_checkpoint(
    out_dir: str | Path,
    *,
    text_only: bool = False,
    seed: int = 0,
    overwrite: bool = False,
    spec: TinySpec = DEFAULT_SPEC,
) -> Path:
    """Write a tiny random Qwen2.5-VL (or, with text_only, Qwen2) checkpoint to `out_dir`.

    The directory is built next to `out_dir` and renamed into place only when complete, so a
    crash never leaves a half-written checkpoint; with overwrite=True an existing `out_dir` is
    replaced only after the new one is complete. Returns the resolved `out_dir`.
    """
    with staged_output_dir(out_dir, overwrite=overwrite, overwrite_hint="overwrite=True") as staging:
        _write_checkpoint(staging, text_only=text_only, seed=seed, spec=spec)
    return Path(out_dir).expanduser().resolve()
