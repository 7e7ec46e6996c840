"""`revisual serve` ends its server with it: SIGTERM (what `timeout`, `kill` and Slurm send) stops
the server's whole session and frees the port; a SIGKILLed wrapper takes the server down too.

vLLM is replaced by a stand-in module on PYTHONPATH (`vllm.entrypoints.openai.api_server`) that
behaves as it does here: serves /v1/models on --port, runs an "engine" child process in its
session, and shuts that engine down on SIGTERM. The process table is checked for every
descendant of the wrapper seen while it served.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from megatron_revisual.data.chat_template import CHAT_TEMPLATE
from megatron_revisual.testing.processes import command_line, descendants, wait_gone

FAKE_SERVER = '''
import argparse, http.server, json, os, signal, subprocess, sys
p = argparse.ArgumentParser()
p.add_argument("--host"); p.add_argument("--port", type=int); p.add_argument("--served-model-name")
args, _ = p.parse_known_args()
engine = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])

def shut_down(*_):
    engine.terminate()
    engine.wait()
    os._exit(0)

signal.signal(signal.SIGTERM, shut_down)

class Models(http.server.BaseHTTPRequestHandler):
    def log_message(self, *a):
        pass

    def do_GET(self):
        body = json.dumps({"data": [{"id": args.served_model_name}]}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

http.server.HTTPServer((args.host, args.port), Models).serve_forever()
'''


def _fake_vllm(root: Path) -> Path:
    pkg = root / "vllm" / "entrypoints" / "openai"
    pkg.mkdir(parents=True)
    for d in (root / "vllm", root / "vllm" / "entrypoints", pkg):
        (d / "__init__.py").write_text("")
    (pkg / "api_server.py").write_text(FAKE_SERVER)
    return root


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _port_free(port: int) -> bool:
    """A new server could listen there (SO_REUSEADDR, as servers set it: TIME_WAIT
    connections of the old one do not count)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            s.listen()
        except OSError:
            return False
    return True


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_serve_leaves_no_process_and_frees_the_port(tmp_path, sig):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"")
    (model / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    port = _free_port()
    path = os.pathsep.join([str(_fake_vllm(tmp_path / "fake")), os.environ.get("PYTHONPATH", "")])
    wrapper = subprocess.Popen(
        [sys.executable, "-m", "megatron_revisual.cli", "serve", str(model), "--port", str(port),
         "--served-model-name", "fake"],
        env={**os.environ, "PYTHONPATH": path}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        text=True,
    )
    tree: set = set()
    try:
        deadline = time.monotonic() + 60
        while True:
            assert wrapper.poll() is None, wrapper.stderr.read()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2) as r:
                    assert json.load(r)["data"][0]["id"] == "fake"
                break
            except OSError:
                assert time.monotonic() < deadline, "the stand-in server did not come up"
                time.sleep(0.1)
        tree = descendants(wrapper.pid)
        commands = [command_line(p) for p, _ in tree]
        assert len(tree) == 2 and any("api_server" in c for c in commands), commands
        os.kill(wrapper.pid, sig)  # the wrapper alone, as `kill` or `timeout` would
        rc = wrapper.wait(timeout=60)
    finally:
        if wrapper.poll() is None:
            wrapper.kill()
    survivors = wait_gone(tree, timeout_s=10)
    for pid, _ in survivors:
        os.kill(pid, signal.SIGKILL)
    assert not survivors, [command_line(p) for p, _ in survivors]
    assert rc == (128 + signal.SIGTERM if sig == signal.SIGTERM else -signal.SIGKILL)
    assert _port_free(port)
