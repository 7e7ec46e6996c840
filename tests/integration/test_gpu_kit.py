"""benchmarks/gpu_kit.sh on a stand-in for the lent GPU machine: its install step works from the
downloaded wheels alone (--no-index --no-deps into a target directory) and gpu_check then runs
every check it can there.

The GPU machine (the device tool's KINDS.md, read 2026-11-17) has CPython 3.12 with torch 2.11,
transformers 5.17 and the packages listed below, and no megatron-core, Transformer Engine or
vLLM. The stand-in is a fresh venv of this Python whose only packages are those of that list that
this environment has, linked from it (torch 2.13 here: a CPU build of torch 2.11 is not
reachable from these machines, download.pytorch.org is blocked and PyPI's is a multi-GB CUDA
build). The kit's wheels come from PyPI (README "The GPU kit"); the check then runs with --tiny
on the CPU, where Transformer Engine's and vLLM's checks must say they are skipped.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from importlib.metadata import distribution
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
GPU_MACHINE_PACKAGES = """
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi
charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core cuda-pathfinder
cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock flatbuffers flax fonttools
formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize hypothesis idna
imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver
lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe
matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals
networkx ninja numba numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime
nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13
nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript
opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy peft
pillow pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments pyparsing
pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist
python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image
scikit-learn scipy seaborn sentencepiece sentence-transformers shellingham simplejson six sortedcontainers
statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm
tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope
triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wrapt xarray xxhash yarl zipp
""".split()
KIT_LIMIT_BYTES = 32 * 2**20  # of the 64 MiB a device call carries, the checkout takes the rest


def _with_requirements(names: list[str]) -> list:
    """The distributions of `names` this environment has, and everything they require here (our
    versions need what theirs need: e.g. this huggingface-hub imports httpx2, the machine's httpx)."""
    from packaging.requirements import Requirement

    found, todo = {}, list(names)
    while todo:
        name = re.sub(r"[-_.]+", "-", todo.pop()).lower()
        if name in found:
            continue
        try:
            dist = distribution(name)
        except Exception:  # noqa: BLE001 - a package of that machine this environment lacks
            continue
        found[name] = dist
        for line in dist.requires or ():
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return list(found.values())


def _stand_in(root: Path) -> Path:
    """A venv holding only the GPU machine's packages (those this environment has, linked)."""
    venv = root / "box"
    subprocess.run([sys._base_executable, "-m", "venv", str(venv)], check=True, capture_output=True)
    linked = root / "box-packages"
    linked.mkdir()
    site = Path(distribution("torch").locate_file(""))
    for dist in _with_requirements(GPU_MACHINE_PACKAGES):
        tops = {Path(str(f)).parts[0] for f in dist.files or () if not str(f).startswith("..")}
        for top in tops:
            if not (linked / top).exists() and (site / top).exists():
                (linked / top).symlink_to(site / top)
    (next(venv.glob("lib/python3.*/site-packages")) / "gpu_machine.pth").write_text(f"{linked}\n")
    return venv / "bin" / "python"


def test_the_kit_installs_from_its_wheels_alone_and_runs_every_check_it_can(tmp_path):
    python = _stand_in(tmp_path)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    # the stand-in has torch and transformers, and none of what the kit carries
    probe = "import torch, transformers; import importlib.util as u; print(u.find_spec('megatron') is None)"
    done = subprocess.run([str(python), "-c", probe], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert done.stdout.strip() == "True", done.stderr[-2000:]

    wheels = tmp_path / "whl"
    kit = ["bash", str(ROOT / "benchmarks" / "gpu_kit.sh")]
    done = subprocess.run([*kit, "download"], capture_output=True, text=True, timeout=600,
                          env={**env, "PYTHON": sys.executable, "KIT_WHEELS": str(wheels)})
    assert done.returncode == 0, done.stderr[-3000:]
    carried = sorted(p.name for p in wheels.glob("*.whl"))
    assert any(n.startswith("megatron_core-0.19.2-cp312") for n in carried), carried
    assert sum(p.stat().st_size for p in wheels.glob("*.whl")) < KIT_LIMIT_BYTES

    out = tmp_path / "out"
    done = subprocess.run([*kit, "run", "--tiny"], capture_output=True, text=True, timeout=900, cwd=tmp_path,
                          env={**env, "PYTHON": str(python), "KIT_WHEELS": str(wheels), "OUT": str(out),
                               "KIT_TARGET": str(tmp_path / "target")})
    lines = [json.loads(x) for x in (out / "gpu_check.jsonl").read_text().splitlines()]
    by_name = {x["check"]: x for x in lines}
    assert list(by_name) == ["setup", "logits_vs_transformers", "sft_packed_steps", "checkpoint_async_roundtrip",
                             "grpo_steps", "te_fp8", "vllm_generate_sleep_sync"], done.stderr[-3000:]
    for name in ("setup", "logits_vs_transformers", "sft_packed_steps", "checkpoint_async_roundtrip", "grpo_steps"):
        assert by_name[name]["status"] == "passed", by_name[name]
    assert by_name["te_fp8"]["status"] == "skipped: transformer_engine missing"
    assert by_name["vllm_generate_sleep_sync"]["status"] == "skipped: vllm missing"
    assert done.returncode == 0
    # megatron-core came from the carried wheel, not from anywhere else
    assert re.search(rf"{len(carried)} wheels into {re.escape(str(tmp_path / 'target'))}", done.stderr)
