#!/usr/bin/env bash
# The GPU check for a bare GPU machine: Python 3.12 with torch and transformers preinstalled, no
# megatron-core, Transformer Engine or vLLM, no network; only what a command carries.
#
#   bash benchmarks/gpu_kit.sh download            # here, with PyPI: the wheels into .whl/
#   bash benchmarks/gpu_kit.sh run [gpu_check args] # there: install .whl/ into a target dir, check
#
# `download` fetches the wheels benchmarks/gpu_kit.txt lists (megatron-core, the transformers of
# our pins, the graders the GRPO check's rewards import: about 15 MB) for CPython 3.12 on x86_64
# Linux, without their dependencies: the machine has those (torch, numpy, tokenizers, ...). It is
# README's `pip download` command ("The GPU kit"). Transformer Engine (~300 MB with its CUDA
# core) and vLLM (~400 MB) do not fit a 64 MiB carry: their checks print "skipped: <package>
# missing".
#
# `run` installs every carried wheel with --no-index --no-deps into $KIT_TARGET (default
# /tmp/revisual-kit), puts it and this checkout first on PYTHONPATH, runs benchmarks/gpu_check.py
# (one GPU, the 7B widths with 2 layers, bf16; or whatever arguments follow, e.g. --tiny on a
# CPU) and writes its JSON lines, one per check, to $OUT/gpu_check.jsonl (the whole log beside
# it). Bounded by $KIT_TIMEOUT_S (default 420 s: under 8 minutes with the install). Exit code:
# gpu_check's.
#
# Variables: PYTHON (default python3), KIT_WHEELS (default <checkout>/.whl), KIT_TARGET, OUT
# (default <checkout>/gpu_kit_out), KIT_TIMEOUT_S.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-python3}"
wheels="${KIT_WHEELS:-$root/.whl}"
target="${KIT_TARGET:-/tmp/revisual-kit}"
out="${OUT:-$root/gpu_kit_out}"

case "${1:-}" in
  download)
    mkdir -p "$wheels"
    "$python" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      -d "$wheels" -r "$root/benchmarks/gpu_kit.txt"
    du -sh "$wheels"
    ;;
  run)
    shift
    shopt -s nullglob
    carried=("$wheels"/*.whl)
    if [ ${#carried[@]} -eq 0 ]; then
      echo "gpu_kit: no wheels in $wheels: run 'bash benchmarks/gpu_kit.sh download' where PyPI is reachable" >&2
      exit 2
    fi
    mkdir -p "$out"
    t0=$(date +%s)
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$target" "${carried[@]}"
    echo "gpu_kit: ${#carried[@]} wheels into $target in $(( $(date +%s) - t0 )) s" >&2
    export PYTHONPATH="$root:$target${PYTHONPATH:+:$PYTHONPATH}"
    export PYTHONUNBUFFERED=1
    set +e
    timeout "${KIT_TIMEOUT_S:-420}" "$python" "$root/benchmarks/gpu_check.py" "$@" 2>&1 | tee "$out/gpu_check.log"
    rc=${PIPESTATUS[0]}
    set -e
    grep '^{"check"' "$out/gpu_check.log" > "$out/gpu_check.jsonl" || true
    echo "gpu_kit: $(wc -l < "$out/gpu_check.jsonl") checks in $out/gpu_check.jsonl, exit $rc," \
         "$(( $(date +%s) - t0 )) s in all" >&2
    exit "$rc"
    ;;
  *)
    echo "usage: bash benchmarks/gpu_kit.sh download | run [gpu_check.py arguments]" >&2
    exit 2
    ;;
esac
