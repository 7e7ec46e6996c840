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


WARN_SCRIPT = textwrap.dedent("""
    import logging, sys
    from megatron_revisual.logfiles import redirect_stdio, warnings_to_console
    redirect_stdio(sys.argv[1])
    warnings_to_console()
    warnings_to_console()  # a second call adds no second handler
    log = logging.getLogger("megatron_revisual.data.datasets")
    log.warning("rows.jsonl: skipped %d of %d rows", 4, 44)
    log.info("rows.jsonl: 40 usable rows")
    logging.getLogger("vllm").warning("a library's warning")
""")


def test_package_warnings_reach_the_console_once_and_info_does_not(tmp_path):
    log = tmp_path / "rank0.log"
    env = {k: v for k, v in os.environ.items() if k != "REVISUAL_VERBOSE"}
    proc = subprocess.run([sys.executable, "-c", WARN_SCRIPT, str(log)], capture_output=True, text=True,
                          env=env, check=True)
    assert proc.stderr == "WARNING megatron_revisual.data.datasets: rows.jsonl: skipped 4 of 44 rows\n"
    assert "a library's warning" in log.read_text() and "usable rows" not in proc.stderr
