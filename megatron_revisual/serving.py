"""`revisual serve MODEL_DIR`: vLLM's OpenAI-compatible server for a Qwen2.5-VL checkpoint.

The server runs as a child process (``python -m vllm.entrypoints.openai.api_server``); `revisual
eval` and any OpenAI client then talk to ``http://HOST:PORT/v1``. The chat template is the
checkpoint's own; a checkpoint without one gets this project's Qwen2.5-VL template. Any other
vLLM flag goes through ``--vllm-args="..."`` unchanged.

    # CPU, a tiny model (vLLM-CPU; KV cache size in GiB):
    revisual make-tiny --out runs/tiny
    VLLM_CPU_KVCACHE_SPACE=1 revisual serve runs/tiny --port 8000 --served-model-name tiny \\
        --dtype float32 --max-model-len 1024 --vllm-args="--enforce-eager"
    # GPUs:
    revisual serve /ckpt/Revisual-R1-final --tensor-parallel-size 4 --port 8000

MODEL_DIR is a Hugging Face directory (config.json + *.safetensors) or a Megatron checkpoint
(converted or written by training), which is first exported to HF with `revisual convert
mcore-to-hf` into --export-dir (default: MODEL_DIR + "_hf"; an existing complete export is reused).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import IO

__all__ = [
    "ModelDirError",
    "VLLMServer",
    "add_serve_arguments",
    "build_server_command",
    "check_model_dir",
    "run_serve",
    "servable_model_dir",
]

_CHAT_TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")
_MEGATRON_MARKERS = ("latest_checkpointed_iteration.txt", "common.pt", ".metadata")


class ModelDirError(ValueError):
    """MODEL_DIR is not a servable Hugging Face checkpoint directory."""


def _megatron_marker(path: Path) -> str | None:
    for name in _MEGATRON_MARKERS:
        if (path / name).exists():
            return name
    iters = sorted(p.name for p in path.glob("iter_*") if p.is_dir())
    if iters:
        return f"{iters[-1]}/"
    meta = path / "metadata.json"
    if meta.is_file():
        try:
            if "sharded_backend" in json.loads(meta.read_text(encoding="utf-8")):
                return "metadata.json (dist_checkpointing)"
        except (json.JSONDecodeError, UnicodeDecodeError):
            pass
    return None


def check_model_dir(model_dir: str | Path) -> Path:
    """The resolved directory if it is an HF checkpoint vLLM can load; else `ModelDirError`
    naming what was found and what is expected."""
    path = Path(model_dir).expanduser().resolve()
    if not path.is_dir():
        raise ModelDirError(f"{path}: not a directory; expected a Hugging Face model directory")
    has_config = (path / "config.json").is_file()
    has_weights = any(path.glob("*.safetensors")) or any(path.glob("*.bin"))
    if has_config and has_weights:
        return path
    marker = _megatron_marker(path)
    if marker:
        raise ModelDirError(
            f"{path} is a Megatron checkpoint (found {marker}); vLLM needs a Hugging Face "
            "directory (config.json + *.safetensors): export it with `revisual convert "
            "mcore-to-hf` (`revisual serve` does that itself)"
        )
    missing = [
        n for n, ok in (("config.json", has_config), ("*.safetensors", has_weights)) if not ok
    ]
    raise ModelDirError(
        f"{path}: not a Hugging Face model directory, missing {' and '.join(missing)}"
    )


def servable_model_dir(model_dir: str | Path, export_dir: str | Path | None = None) -> Path:
    """An HF directory vLLM can serve: `model_dir` itself, or the HF export of a Megatron
    checkpoint (written to `export_dir`, default MODEL_DIR + "_hf", reused when complete)."""
    path = Path(model_dir).expanduser().resolve()
    try:
        return check_model_dir(path)
    except ModelDirError:
        if not path.is_dir() or _megatron_marker(path) is None:
            raise
    out = Path(export_dir).expanduser().resolve() if export_dir else path.with_name(path.name + "_hf")
    try:
        return check_model_dir(out)
    except ModelDirError:
        pass
    from megatron_revisual.convert.dist_ckpt import convert_mcore_to_hf

    print(f"exporting Megatron checkpoint {path} to {out}", flush=True)
    convert_mcore_to_hf(path, out)
    return check_model_dir(out)


def _has_chat_template(path: Path) -> bool:
    if any((path / name).is_file() for name in _CHAT_TEMPLATE_FILES):
        return True
    for name in ("tokenizer_config.json", "processor_config.json"):
        file = path / name
        if file.is_file() and "chat_template" in json.loads(file.read_text(encoding="utf-8")):
            return True
    return False


def _default_chat_template_file() -> str:
    """This project's Qwen2.5-VL template in a temporary file, for checkpoints without one."""
    from megatron_revisual.data.chat_template import CHAT_TEMPLATE

    fd, name = tempfile.mkstemp(prefix="qwen25vl-chat-template-", suffix=".jinja")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(CHAT_TEMPLATE)
    return name


def build_server_command(
    model_dir: str | Path,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    served_model_name: str | None = None,
    tensor_parallel_size: int = 1,
    dtype: str = "auto",
    max_model_len: int | None = None,
    chat_template: str | None = None,
    limit_images: int = 1,
    extra_args: Sequence[str] = (),
) -> list[str]:
    """The vLLM server command line for an HF checkpoint (checked by `check_model_dir`)."""
    path = check_model_dir(model_dir)
    if chat_template is None and not _has_chat_template(path):
        chat_template = _default_chat_template_file()
    cmd = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(path),
        "--served-model-name", served_model_name or path.name,
        "--host", host,
        "--port", str(port),
        "--dtype", dtype,
        "--tensor-parallel-size", str(tensor_parallel_size),
        # One image per prompt, as every benchmark has; no video, so start-up profiling does
        # not build a dummy video.
        "--limit-mm-per-prompt", json.dumps({"image": limit_images, "video": 0}),
    ]  # fmt: skip
    if max_model_len is not None:
        cmd += ["--max-model-len", str(max_model_len)]
    if chat_template is not None:
        cmd += ["--chat-template", str(chat_template)]
    return cmd + list(extra_args)


def _terminate_with_parent() -> None:
    """In the server's child process before exec: SIGTERM when the parent dies (Linux)."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG


class _StopSignal(Exception):
    def __init__(self, signum: int) -> None:
        super().__init__(f"signal {signum}")
        self.signum = signum


def _raise_stop(signum: int, _frame: object) -> None:
    for sig in (signal.SIGTERM, signal.SIGHUP):  # one stop at a time: let stop() finish
        signal.signal(sig, signal.SIG_IGN)
    raise _StopSignal(signum)


class VLLMServer:
    """A vLLM server child process: ``with VLLMServer(cmd) as server: server.base_url``.

    ``wait_ready`` polls ``/v1/models`` until the model is listed; the log goes to ``log``
    (inherited stdout/stderr if None).
    """

    def __init__(
        self,
        command: Sequence[str],
        *,
        log: IO | None = None,
        env: dict[str, str] | None = None,
        ready_timeout: float = 600.0,
    ) -> None:
        self.command = list(command)
        self.host = self.command[self.command.index("--host") + 1]
        self.port = int(self.command[self.command.index("--port") + 1])
        self.model = self.command[self.command.index("--served-model-name") + 1]
        self.log = log
        self.env = env
        self.ready_timeout = ready_timeout
        self.process: subprocess.Popen | None = None

    @property
    def base_url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/v1"

    def start(self) -> VLLMServer:
        # A new session, so that stop() can end vLLM's engine processes with it; SIGTERM to
        # the server if this process dies without calling stop() (SIGKILL), so that vLLM shuts
        # its engine down instead of serving on.
        self.process = subprocess.Popen(
            self.command,
            stdout=self.log,
            stderr=subprocess.STDOUT if self.log is not None else None,
            env=self.env,
            start_new_session=True,
            preexec_fn=_terminate_with_parent,
        )
        return self

    def wait_ready(self, timeout: float | None = None) -> None:
        assert self.process is not None, "start() first"
        deadline = time.monotonic() + (timeout or self.ready_timeout)
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"vLLM server exited with code {self.process.returncode} before it was ready"
                )
            try:
                with urllib.request.urlopen(f"{self.base_url}/models", timeout=5) as r:
                    models = [m["id"] for m in json.load(r).get("data", [])]
                if self.model in models:
                    return
            except (urllib.error.URLError, OSError, ValueError):
                pass
            time.sleep(1.0)
        raise TimeoutError(
            f"vLLM server at {self.base_url} not ready after {timeout or self.ready_timeout} s"
        )

    def stop(self, timeout: float = 30.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        except ProcessLookupError:
            pass

    def __enter__(self) -> VLLMServer:
        self.start()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `revisual serve`."""
    p = parser
    p.add_argument("model_dir", type=Path, help="Hugging Face directory or Megatron checkpoint")
    p.add_argument(
        "--export-dir", type=Path, default=None,
        help='where a Megatron checkpoint is exported to HF (default: MODEL_DIR + "_hf")',
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: all)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--served-model-name", default=None, help="name for --model-name (default: directory name)"
    )
    p.add_argument("--tensor-parallel-size", type=int, default=1)
    p.add_argument("--dtype", default="auto", help="auto, bfloat16, float16, float32")
    p.add_argument(
        "--max-model-len", type=int, default=None, help="context length (default: the model's)"
    )
    p.add_argument(
        "--chat-template", default=None, help="override the checkpoint's chat template (file)"
    )
    p.add_argument("--dry-run", action="store_true", help="print the vLLM command and exit")
    p.add_argument(
        "--vllm-args",
        default="",
        help='more vLLM server flags, one string, given with "=": --vllm-args="--enforce-eager"',
    )


def run_serve(args: argparse.Namespace) -> int:
    """`revisual serve`: run vLLM's server in the foreground until it exits, is interrupted
    (130) or terminated (143); either way the server and its engine processes end with it."""
    try:
        model_dir = servable_model_dir(args.model_dir, args.export_dir)
        cmd = build_server_command(
            model_dir,
            host=args.host,
            port=args.port,
            served_model_name=args.served_model_name,
            tensor_parallel_size=args.tensor_parallel_size,
            dtype=args.dtype,
            max_model_len=args.max_model_len,
            chat_template=args.chat_template,
            extra_args=shlex.split(args.vllm_args),
        )
    except (ModelDirError, FileExistsError) as e:
        print(f"revisual serve: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # a failed export names the checkpoint file / tensor itself
        from megatron_revisual.convert.safetensors_io import ConvertError

        if not isinstance(e, ConvertError):
            raise
        print(f"revisual serve: error: {e}", file=sys.stderr)
        return 2
    print(shlex.join(cmd), flush=True)
    if args.dry_run:
        return 0
    # SIGTERM (timeout, kill, Slurm) and SIGHUP stop the server as Ctrl-C does: its whole
    # session, so the port is free when this returns (128 + the signal, as a shell reports it)
    previous = {sig: signal.signal(sig, _raise_stop) for sig in (signal.SIGTERM, signal.SIGHUP)}
    server = VLLMServer(cmd)
    try:
        server.start()
        print(f"serving {server.model!r} at {server.base_url}", flush=True)
        return server.process.wait()
    except KeyboardInterrupt:
        return 128 + signal.SIGINT
    except _StopSignal as e:
        print(f"revisual serve: got signal {e.signum}; stopping the server", file=sys.stderr)
        return 128 + e.signum
    finally:
        server.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="revisual serve", description=__doc__.split("\n\n")[0])
    add_serve_arguments(parser)
    return run_serve(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
