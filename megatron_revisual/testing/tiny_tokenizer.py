"""A small Qwen2-style byte-level BPE tokenizer, trained at call time from a corpus in this file.

Tiny test checkpoints need a tokenizer that behaves like Qwen's (byte-level BPE with Qwen2's
pre-tokenizer, the same special tokens, the Qwen2.5-VL chat format) without downloading one.
The training is deterministic: the corpus is fixed text plus numbers drawn from a fixed
``random.Random`` seed, so every call writes byte-identical files.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import TYPE_CHECKING

from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    trainers,
)

from megatron_revisual.data.chat_template import CHAT_TEMPLATE

if TYPE_CHECKING:
    from transformers import Qwen2Tokenizer

# Qwen's special tokens, in Qwen's id order; they are appended after the BPE vocab as added
# tokens, as in the real tokenizer (id = bpe_vocab_size + index).
SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
EOS_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|endoftext|>"

# Qwen2's pre-tokenizer split (letters, single digits, punctuation runs, newlines, spaces).
# transformers' Qwen2Tokenizer rebuilds its pipeline with this regex from vocab and merges, so
# the tokenizer.json must use the same one or raw `tokenizers` and transformers would disagree.
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


_PASSAGES = (
    "<think>\nFirst, let me understand the problem. We need to find the value of x such that "
    "the equation holds. Let me think step by step.\n</think>\n",
    "Wait, that does not look right. Let me check the calculation again. Hmm, maybe I made a "
    "mistake in the second step. Actually, the sum should be computed before the product.",
    "Therefore, the final answer is \\boxed{42}. So the answer is \\boxed{x = 3}.",
    "Consider the triangle ABC with sides a, b and c. By the Pythagorean theorem, "
    "$a^2 + b^2 = c^2$. The area of the triangle is $\\frac{1}{2} a b$.",
    "Let $f(x) = x^2 - 4x + 3$. Then $f'(x) = 2x - 4$, and setting it to zero gives $x = 2$. "
    "The minimum value is $f(2) = -1$.",
    "We have $\\sqrt{16} = 4$ and $\\sqrt{2} \\approx 1.414$. The probability is "
    "$\\frac{3}{8}$, so the expected value equals $\\sum_{i=1}^{n} p_i x_i$.",
    "In the image, there is a circle inscribed in a square. The radius of the circle is 5, so "
    "the side of the square is 10 and the shaded area is $100 - 25\\pi$.",
    "The figure shows a bar chart. The tallest bar corresponds to the year 2020, and the "
    "difference between the largest and the smallest value is 17.",
    "Solve for $y$: $3y + 7 = 22$. Subtracting 7 from both sides, $3y = 15$, hence $y = 5$.",
    "The integral $\\int_0^1 x^2 \\, dx = \\frac{1}{3}$. The limit "
    "$\\lim_{n \\to \\infty} (1 + \\frac{1}{n})^n = e$.",
    "If the angle is $30^\\circ$, then $\\sin 30^\\circ = \\frac{1}{2}$ and "
    "$\\cos 60^\\circ = \\frac{1}{2}$, while $\\tan 45^\\circ = 1$.",
    "Answer the question based on the image. Put your final answer within \\boxed{}.",
    "You are a helpful assistant. Please reason step by step, and put your final answer "
    "within \\boxed{}.",
    "The matrix $\\begin{pmatrix} 1 & 2 \\\\ 3 & 4 \\end{pmatrix}$ has determinant $-2$.",
    "Since the function is increasing on the interval $[0, \\infty)$, the maximum is attained "
    "at the right endpoint. This completes the proof.",
)
_WORDS = (
    "the number answer value total sum product difference ratio length width height area "
    "perimeter angle circle square triangle point line graph table image figure apples students "
    "minutes therefore because first second then next finally check compute equation solution "
    "probability integer prime even odd divisible"
).split()


def training_corpus() -> list[str]:
    """The fixed training text: hand-written passages plus generated arithmetic reasoning."""
    rng = random.Random(1234)
    lines = [p for p in _PASSAGES for _ in range(3)]
    for _ in range(600):
        a, b = rng.randint(0, 999), rng.randint(1, 99)
        w1, w2, w3 = rng.choice(_WORDS), rng.choice(_WORDS), rng.choice(_WORDS)
        op = rng.choice(("+", "-", "\\times", "\\div"))
        lines.append(
            f"<think>\nThe {w1} is {a} and the {w2} is {b}. We compute ${a} {op} {b}$, "
            f"then check the {w3}.\n</think>\nThe answer is \\boxed{{{a + b}}}."
        )
        lines.append(f"Let $x_{{{b}}} = \\frac{{{a}}}{{{b}}}$; the {w1} of the {w2} is {a * b}.")
    return lines


def train_tokenizer(bpe_vocab_size: int) -> Tokenizer:
    """Train the byte-level BPE on `training_corpus()` and append Qwen's special tokens.

    Raises if the corpus cannot reach `bpe_vocab_size`, so that the checkpoint's vocab layout
    (special-token ids) is exactly what the caller's spec says.
    """
    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_QWEN2_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=bpe_vocab_size,
        min_frequency=2,
        show_progress=False,
        # All 256 byte symbols, so any text round-trips.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    tokenizer.train_from_iterator(training_corpus(), trainer=trainer)
    if tokenizer.get_vocab_size() != bpe_vocab_size:
        raise RuntimeError(
            f"tiny tokenizer training reached {tokenizer.get_vocab_size()} tokens, expected "
            f"bpe_vocab_size={bpe_vocab_size}; lower it or enlarge training_corpus()"
        )
    tokenizer.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS]
    )
    return tokenizer


def special_token_ids(bpe_vocab_size: int) -> dict[str, int]:
    """Ids of the special tokens for a tokenizer trained with `bpe_vocab_size` merges+bytes."""
    return {tok: bpe_vocab_size + i for i, tok in enumerate(SPECIAL_TOKENS)}


def save_tokenizer(tokenizer: Tokenizer, out_dir: Path, *, model_max_length: int) -> Qwen2Tokenizer:
    """Save as a transformers `Qwen2Tokenizer` (tokenizer.json, tokenizer_config.json and
    chat_template.jinja) and return that transformers tokenizer."""
    from transformers import Qwen2Tokenizer

    hf_tokenizer = Qwen2Tokenizer(
        tokenizer_object=tokenizer,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=None,
        bos_token=None,
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
        errors="replace",
        split_special_tokens=False,
        chat_template=CHAT_TEMPLATE,
    )
    hf_tokenizer.save_pretrained(out_dir)
    return hf_tokenizer
