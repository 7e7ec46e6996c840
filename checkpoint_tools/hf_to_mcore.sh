#!/usr/bin/env bash
# HF directory -> Megatron-Core distributed checkpoint (torch_dist; loads at any TP/PP/DP).
#
#   HF=/models/Qwen2.5-VL-7B-Instruct OUT=/ckpt/qwen25vl_7b_mcore checkpoint_tools/hf_to_mcore.sh
#   TP=2 PP=2 OVERWRITE=1 HF=... OUT=... checkpoint_tools/hf_to_mcore.sh
#
# Env: HF, OUT (required); TP, PP (default 1: how many CPU ranks write it); FIRST_STAGE_LAYERS
# (layers on the first stage when PP does not divide them; default: the most even split); OVERWRITE=1 to
# replace OUT; PYTHON (default: the repo's .venv). Runs on CPU (GPUs hidden); memory stays at
# about the largest tensor plus the interpreter, whatever the model size.
set -euo pipefail
: "${HF:?set HF to the Hugging Face model directory}"
: "${OUT:?set OUT to the checkpoint directory to write}"
TP="${TP:-1}"
PP="${PP:-1}"
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-$REPO/.venv/bin/python}"
args=(hf-to-mcore --hf "$HF" --out "$OUT" --tp "$TP" --pp "$PP")
[[ -n "${FIRST_STAGE_LAYERS:-}" ]] && args+=(--first-stage-layers "$FIRST_STAGE_LAYERS")
[[ "${OVERWRITE:-0}" == "1" ]] && args+=(--overwrite)
cd "$REPO"
CUDA_VISIBLE_DEVICES="" OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" exec "$PYTHON" -m megatron_revisual.convert.cli "${args[@]}"
