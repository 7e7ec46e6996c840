"""The GPU install set resolves: torch, vLLM, Megatron-Core, transformers and Transformer Engine at
the versions launch_scripts/constraints.txt pins, for Python 3.12 on x86_64 Linux; and the
Dockerfile that installs it can work on an NGC base (never built here: no Docker engine).

Resolution only: `uv pip compile` reads wheel metadata without downloading the wheels (several
GB of CUDA libraries) and resolves for the GPU platform from this CPU machine. pip cannot do
this here: `pip install --dry-run --report` downloads every wheel whole and must build
transformer-engine-torch, which PyPI has as source only, to read its requirements (that build
needs torch and the CUDA toolkit). Its requirements are therefore given as its sdist's PKG-INFO
states them, in pyproject's [tool.uv.dependency-metadata].
Needs the package index (CI reaches PyPI), through the system's certificate store
(`--system-certs`: the machines' TLS goes through a certificate uv does not bundle).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[2]
CONSTRAINTS = ROOT / "launch_scripts" / "constraints.txt"
GPU_PLATFORM = ["--python-version", "3.12", "--python-platform", "x86_64-manylinux_2_28"]


def _uv() -> str:
    uv = Path(sys.executable).with_name("uv")
    found = str(uv) if uv.exists() else shutil.which("uv")
    assert found, "uv is not installed: run launch_scripts/setup_env.sh (it is in the dev extra)"
    return found


def _pins(text: str) -> dict[str, str]:
    lines = (line.split("#", 1)[0].strip() for line in text.splitlines())
    return {(r := Requirement(line)).name: str(r.specifier).removeprefix("==") for line in lines if line}


def _resolve(constraints: Path, out: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [_uv(), "pip", "compile", str(ROOT / "pyproject.toml"), "--extra", "gpu", "--constraint", str(constraints),
         *GPU_PLATFORM, "--system-certs", "--no-header", "--quiet", "--output-file", str(out)],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )


def test_the_gpu_set_resolves_at_the_pinned_versions(tmp_path):
    done = _resolve(CONSTRAINTS, tmp_path / "gpu.txt")
    assert done.returncode == 0, done.stderr
    resolved = dict(re.findall(r"^([A-Za-z0-9_.\-]+)==(\S+)", (tmp_path / "gpu.txt").read_text(), re.M))
    pins = _pins(CONSTRAINTS.read_text())
    for name in ("torch", "torchvision", "megatron-core", "transformers", "vllm", "transformer-engine",
                 "transformer-engine-torch", "transformer-engine-cu13"):
        assert resolved.get(name) == pins[name], f"{name}: resolved {resolved.get(name)}, pinned {pins[name]}"
    assert "flash-attn" not in resolved  # nothing uses it (pyproject's gpu extra says why)
    # one CUDA major for torch's libraries and Transformer Engine's core
    assert {"nvidia-nccl-cu13", "nvidia-cudnn-cu13", "transformer-engine-cu13"} <= set(resolved)
    assert "transformer-engine-cu12" not in resolved and "nvidia-nccl-cu12" not in resolved


def test_a_set_that_cannot_resolve_fails_and_names_the_conflict(tmp_path):
    broken = tmp_path / "constraints.txt"
    # Transformer Engine's torch extension of 2.20.2 needs its core at the same version
    broken.write_text(CONSTRAINTS.read_text().replace("transformer-engine-cu13==2.20.2",
                                                      "transformer-engine-cu13==2.19.0"))
    done = _resolve(broken, tmp_path / "gpu.txt")
    assert done.returncode != 0
    assert "transformer-engine-cu13==2.19.0" in done.stderr.replace("\n", " "), done.stderr


def test_the_source_only_packages_metadata_is_for_the_pinned_versions():
    pins = _pins(CONSTRAINTS.read_text())
    given = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["uv"]["dependency-metadata"]
    assert {m["name"]: m["version"] for m in given} == {"transformer-engine-torch": pins["transformer-engine-torch"]}
    te = next(m for m in given if m["name"] == "transformer-engine-torch")
    assert f"transformer_engine_cu13=={pins['transformer-engine-cu13']}" in te["requires-dist"]


@pytest.mark.parametrize("name", ["torch", "vllm", "megatron-core", "transformers"])
def test_cpu_and_gpu_share_one_pin(name):
    # the GPU set is resolved against the same file the CPU environment is installed from
    assert name in _pins(CONSTRAINTS.read_text())


def test_the_dockerfile_copies_what_exists_and_installs_under_the_constraints():
    text = (ROOT / "launch_scripts" / "Dockerfile").read_text()
    sources = re.findall(r"^COPY (.+) \S+$", text, re.M)
    assert sources, "no COPY line"
    for line in sources:
        for src in line.split():
            assert (ROOT / src).exists(), f"Dockerfile copies {src}, which is not in the repository"
    installs = re.findall(r"pip install [^\n]*", text)
    assert installs and all("-c launch_scripts/constraints.txt" in line for line in installs), installs
    assert '".[gpu]"' in text


def _instructions(text: str) -> list[str]:
    """The Dockerfile's instructions, continuation lines and heredocs joined, comments dropped."""
    text = re.sub(r"<<'PY'\n.*?\nPY\n", "<<PY\n", text, flags=re.S)
    text = re.sub(r"\\\n", " ", text)
    return [line for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def test_the_dockerfile_clears_ngcs_pip_constraint_before_it_installs_and_checks_the_result():
    """NGC PyTorch images (>= 25.03) set PIP_CONSTRAINT=/etc/pip/constraint.txt, pinning their own
    torch: the pinned torch 2.13.0 cannot be installed under it. It must be emptied (or unset)
    before the first pip install; `pip check` and an import of the whole stack end the build."""
    steps = _instructions((ROOT / "launch_scripts" / "Dockerfile").read_text())
    first_install = next(i for i, s in enumerate(steps) if "pip install" in s)
    cleared = [i for i, s in enumerate(steps)
               if re.search(r":\s*>\s*/etc/pip/constraint\.txt|rm -f /etc/pip/constraint\.txt"
                            r"|ENV PIP_CONSTRAINT=\s*$", s)]
    assert cleared and cleared[0] < first_install, "PIP_CONSTRAINT is not cleared before the first pip install"
    install = steps[first_install]
    assert install.index("pip check") > install.rindex("pip install")
    smoke = install[install.index("import torch"):]
    for module in ("transformer_engine.pytorch", "vllm", "megatron.core"):
        assert module in smoke, module
    assert "flash_attn" not in install and "flash-attn" not in install
    # NGC's own builds against its torch are removed before PyPI's torch replaces it
    removal = next(s for s in steps if "pip uninstall" in s)
    assert steps.index(removal) < first_install
    for name in ("torch", "transformer-engine", "flash-attn", "apex", "torch-tensorrt"):
        assert f" {name} " in f" {removal} ", name


def test_the_dockerfile_base_is_cuda_13_0_like_the_torch_wheels():
    text = (ROOT / "launch_scripts" / "Dockerfile").read_text()
    assert re.search(r"^ARG NGC_PYTORCH_TAG=25\.10-py3$", text, re.M)  # NGC 25.10: CUDA 13.0.2
    assert 'cuda != "13.0"' in text  # and the build stops on another toolkit


def test_the_gpu_kit_carries_the_pinned_versions():
    lines = (ROOT / "benchmarks" / "gpu_kit.txt").read_text()
    kit = _pins(lines)
    assert "megatron-core" in kit
    pins = _pins(CONSTRAINTS.read_text())
    assert {name: pins[name] for name in kit} == kit
