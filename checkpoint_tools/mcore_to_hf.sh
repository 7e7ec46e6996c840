#!/usr/bin/env bash
# Megatron-Core checkpoint (from hf_to_mcore.sh or a training run) -> HF directory
# (safetensors shards <= MAX_SHARD_SIZE, index, config, tokenizer, processor, chat template).
#
#   CKPT=/ckpt/qwen25vl_7b_mcore OUT=/models/qwen25vl_7b_out checkpoint_tools/mcore_to_hf.sh
#   CKPT=runs/mrl_7b/checkpoints HF_CONFIG=/models/Qwen2.5-VL-7B-Instruct OUT=... checkpoint_tools/mcore_to_hf.sh
#
# Env: CKPT, OUT (required; CKPT may be a training save dir with latest_checkpointed_iteration.txt);
# HF_CONFIG (HF directory whose config/tokenizer/processor files to use; default: the copies
# stored in the checkpoint); MAX_SHARD_SIZE (default 5GB); OVERWRITE=1; PYTHON.
set -euo pipefail
: "${CKPT:?set CKPT to the Megatron checkpoint directory}"
: "${OUT:?set OUT to the Hugging Face directory to write}"
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-$REPO/.venv/bin/python}"
args=(mcore-to-hf --ckpt "$CKPT" --out "$OUT" --max-shard-size "${MAX_SHARD_SIZE:-5GB}")
[[ -n "${HF_CONFIG:-}" ]] && args+=(--hf-config "$HF_CONFIG")
[[ "${OVERWRITE:-0}" == "1" ]] && args+=(--overwrite)
cd "$REPO"
CUDA_VISIBLE_DEVICES="" OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" exec "$PYTHON" -m megatron_revisual.convert.cli "${args[@]}"
