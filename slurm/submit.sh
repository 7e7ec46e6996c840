#!/usr/bin/env bash
# Submit slurm/train.sbatch after validating the recipe at the requested shape and creating the
# log directory (#SBATCH --output cannot create directories). Prints the job id.
#
#   bash slurm/submit.sh --nodes 2 --gpus-per-node 8 --exclusive configs/qwen25_vl_7b_8xh100.yaml
#   bash slurm/submit.sh --container nvcr.io/nvidia/pytorch:25.01-py3 --dryrun configs/qwen25_vl_7b_8xh100.yaml
#   bash slurm/submit.sh --backend gloo --gpus-per-node 2 configs/tiny_cpu_demo.yaml output_dir=runs/tiny_slurm
#
# All options: bash slurm/submit.sh --help (megatron_revisual/launch/sbatch.py).
# REVISUAL_PYTHON picks the python that runs the check [.venv/bin/python, else python3].
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ -n "${REVISUAL_PYTHON:-}" ]; then
  python_bin="$REVISUAL_PYTHON"
elif [ -x "$root/.venv/bin/python" ]; then
  python_bin="$root/.venv/bin/python"
else
  python_bin=python3
fi
cd "$root"
exec "$python_bin" -m megatron_revisual.launch.sbatch "$@"
