"""redirect_stdio: everything a process writes (Python, raw fd writes as C++ does, child
processes) goes to the log file; console() still reaches the terminal; verbose keeps all."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import os, subprocess, sys, warnings
    from megatron_revisual.logfiles import console, redirect_stdio
    out = redirect_stdio(sys.argv[1])
    print("python stdout")
    print("python stderr", file=sys.stderr)
    warnings.warn("a library warning")
    os.write(2, b"raw fd 2\\n")
    subprocess.run([sys.executable, "-c", "print('child process')"], check=True)
    print("for the user", file=console())
    assert out is console()
    again = redirect_stdio(sys.argv[1] + ".second")
    print("second file")
    print("still the user's", file=again)
""")


def _run(tmp_path, verbose: bool) -> tuple[subprocess.CompletedProcess, str]:
    log = tmp_path / "logs" / "rank0.log"  # the directory does not exist yet
    env = {k: v for k, v in os.environ.items() if k != "REVISUAL_VERBOSE"}
    if verbose:
        env["REVISUAL_VERBOSE"] = "1"
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(log)], capture_output=True, text=True, env=env,
                          check=True)
    return proc, log.read_text() if log.exists() else ""


def test_everything_goes_to_the_file_but_the_console_lines(tmp_path):
    proc, log = _run(tmp_path, verbose=False)
    assert proc.stdout == ""
    assert proc.stderr == "for the user\nstill the user's\n"
    for text in ("python stdout", "python stderr", "a library warning", "raw fd 2", "child process"):
        assert text in log, text
    assert "for the user" not in log and "second file" not in log
    assert (tmp_path / "logs" / "rank0.log.second").read_text() == "second file\n"


def test_verbose_keeps_everything_on_the_terminal(tmp_path):
    proc, log = _run(tmp_path, verbose=True)
    assert log == "" and not (tmp_path / "logs").exists()
    assert "python stdout" in proc.stdout and "child process" in proc.stdout
    assert "raw fd 2" in proc.stderr and "for the user" in proc.stderr
