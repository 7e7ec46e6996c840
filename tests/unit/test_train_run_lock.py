"""One trainer per output directory (`train.run_lock`), and what a starting save may delete."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from megatron_revisual.train.checkpointing import remove_stale_writes
from megatron_revisual.train.run_lock import LOCK_FILE, OutputDirBusy, RunLock, claim_run_dirs
from megatron_revisual.train.runner import prepare_inputs

HOST = socket.gethostname()


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _record(path, **fields) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"host": HOST, "started": 0, "command": "revisual train x.yaml", **fields}))


def test_a_second_trainer_is_refused_naming_the_holder(tmp_path):
    first = RunLock(tmp_path / "run")
    assert first.acquire() is None
    record = json.loads((tmp_path / "run" / LOCK_FILE).read_text())
    assert (record["host"], record["pid"]) == (HOST, os.getpid())
    with pytest.raises(OutputDirBusy) as e:
        RunLock(tmp_path / "run").acquire()
    assert f"pid {os.getpid()} on host {HOST}" in str(e.value)
    assert str(tmp_path / "run" / LOCK_FILE) in str(e.value)
    first.release()
    assert not (tmp_path / "run" / LOCK_FILE).exists()
    with RunLock(tmp_path / "run") as again:  # free again once released
        assert again.held


def test_a_stale_lock_of_a_dead_process_on_this_host_is_taken_over(tmp_path):
    dead = _dead_pid()
    _record(tmp_path / LOCK_FILE, pid=dead)
    lock = RunLock(tmp_path)
    note = lock.acquire()
    assert note is not None and "took over the stale lock" in note and f"pid {dead} on host {HOST}" in note
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    lock.release()


def test_a_live_pid_or_another_host_is_never_taken_over(tmp_path):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        # a record without the flock (e.g. written by an older version) of a live process
        _record(tmp_path / "a" / LOCK_FILE, pid=sleeper.pid)
        with pytest.raises(OutputDirBusy, match=f"pid {sleeper.pid} on host {HOST}"):
            RunLock(tmp_path / "a").acquire()
    finally:
        sleeper.kill()
        sleeper.wait()
    _record(tmp_path / "b" / LOCK_FILE, pid=_dead_pid(), host="gpu-node-17")
    with pytest.raises(OutputDirBusy) as e:
        RunLock(tmp_path / "b").acquire()
    assert "another host" in str(e.value) and "gpu-node-17" in str(e.value)
    assert f"delete {tmp_path / 'b' / LOCK_FILE}" in str(e.value)


def test_the_lock_is_taken_before_prepare_writes_anything(tmp_path):
    out = tmp_path / "run"
    holder = RunLock(out)
    holder.acquire()
    raw = {"output_dir": str(out), "prepare": {"synthetic_data": str(out / "data")}}
    with pytest.raises(OutputDirBusy):
        prepare_inputs(raw)
    assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE]
    holder.release()


def test_a_checkpoint_dir_outside_the_output_dir_is_locked_too(tmp_path):
    raw = {"output_dir": str(tmp_path / "out"), "checkpoint": {"dir": str(tmp_path / "ckpt")}}
    locks = claim_run_dirs(raw)
    try:
        assert [lock.path for lock in locks] == [tmp_path / "out" / LOCK_FILE, tmp_path / "ckpt" / LOCK_FILE]
        with pytest.raises(OutputDirBusy):  # another run sharing only the checkpoint dir
            claim_run_dirs({"output_dir": str(tmp_path / "other"), "checkpoint": {"dir": str(tmp_path / "ckpt")}})
        assert not (tmp_path / "other" / LOCK_FILE).exists()  # nothing half-taken
    finally:
        for lock in locks:
            lock.release()


def test_staging_dirs_of_a_live_writer_are_kept(tmp_path):
    writer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = tmp_path / f".iter_0000004.partial-{writer.pid}@{HOST}-k2j4"
        dead = tmp_path / f".iter_0000002.partial-{_dead_pid()}@{HOST}-a9x1"
        remote = tmp_path / f".iter_0000003.partial-{writer.pid}@other-node-b7-q1w2"
        for d in (live, dead, remote):
            d.mkdir()
        removed = remove_stale_writes(tmp_path)
        assert sorted(p.name for p in removed) == sorted([dead.name, remote.name])
        assert [p.name for p in tmp_path.iterdir()] == [live.name]
    finally:
        writer.kill()
        writer.wait()


def test_a_requeued_slurm_job_takes_over_its_own_lock_from_another_node(tmp_path, monkeypatch):
    _record(tmp_path / LOCK_FILE, pid=1, host="gpu-node-17", slurm_job="4242")
    monkeypatch.setenv("SLURM_JOB_ID", "4243")  # another job: refused
    with pytest.raises(OutputDirBusy, match="another host"):
        RunLock(tmp_path).acquire()
    monkeypatch.setenv("SLURM_JOB_ID", "4242")  # the same job, started again after a requeue
    lock = RunLock(tmp_path)
    assert "an earlier run of Slurm job 4242" in lock.acquire()
    assert json.loads((tmp_path / LOCK_FILE).read_text())["slurm_job"] == "4242"
    lock.release()
