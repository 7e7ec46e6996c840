#!/usr/bin/env bash
# Logits of an HF directory (transformers) vs a Megatron checkpoint loaded at TP x PP; prints one
# JSON line: max_abs_logit_diff, mean_abs_logit_diff, cosine, top1_agreement, weights_match, ...
#
#   HF=/models/Qwen2.5-VL-7B-Instruct CKPT=/ckpt/qwen25vl_7b_mcore TP=2 PP=2 checkpoint_tools/verify.sh
#
# Env: HF, CKPT (required); TP, PP (default 1: the layout to load at, CPU gloo ranks);
# FIRST_STAGE_LAYERS (layers on the first stage when PP does not divide them);
# PROMPT / IMAGE (optional single prompt / image file instead of the built-in batch); PYTHON.
# Both models run in fp32 on CPU: allow ~4 bytes per parameter for each (7B: ~60 GB total).
set -euo pipefail
: "${HF:?set HF to the Hugging Face model directory}"
: "${CKPT:?set CKPT to the Megatron checkpoint directory}"
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-$REPO/.venv/bin/python}"
args=(verify --hf "$HF" --ckpt "$CKPT" --tp "${TP:-1}" --pp "${PP:-1}")
[[ -n "${FIRST_STAGE_LAYERS:-}" ]] && args+=(--first-stage-layers "$FIRST_STAGE_LAYERS")
[[ -n "${PROMPT:-}" ]] && args+=(--prompt "$PROMPT")
[[ -n "${IMAGE:-}" ]] && args+=(--image "$IMAGE")
cd "$REPO"
CUDA_VISIBLE_DEVICES="" OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" exec "$PYTHON" -m megatron_revisual.convert.cli "${args[@]}"
