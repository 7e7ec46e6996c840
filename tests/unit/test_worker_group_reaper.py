"""The reaper a launcher's worker starts (`reap_worker_group_on_exit`) must end what the rank
started, never another rank.

A Slurm step puts all its tasks in the first task's process group (checked on the local cluster:
`srun -n2` gives task 1 the pgid of task 0), so a rank-0 reaper there killed rank 1 whenever
rank 0 exited first (the NeMo-Run Slurm test saw 'task 1 died by signal: 9' and a requeue after
a complete run). The test builds that layout by hand: a group leader ("rank 0") and a member
that is not its child ("rank 1").
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

LEADER = """
import os, sys
from megatron_revisual.parallel.harness import reap_worker_group_on_exit
reap_worker_group_on_exit(os.environ)
print("ready", flush=True)
sys.stdin.readline()  # exits when told
"""

# Plays slurmstepd: in a session of its own, starts "rank 0" as a group leader and "rank 1" (not
# rank 0's child) in rank 0's group, lets rank 0 exit, and prints whether rank 1 outlived it.
STEPD = """
import os, subprocess, sys, time
leader = subprocess.Popen([sys.executable, "-c", sys.argv[1]], stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, text=True, process_group=0)
assert leader.stdout.readline().strip() == "ready"
member = subprocess.Popen(["sleep", "60"], process_group=leader.pid)
assert os.getpgid(member.pid) == leader.pid
leader.stdin.write("\\n")
leader.stdin.flush()
assert leader.wait(timeout=30) == 0
deadline = time.monotonic() + 3
while time.monotonic() < deadline and member.poll() is None:
    time.sleep(0.1)
print("alive" if member.poll() is None else f"died {member.returncode}", flush=True)
if member.poll() is None:
    member.kill()
"""


def _other_rank_after_rank0_exits(launcher_env: dict[str, str]) -> str:
    """'alive' when the group's other member outlived the leader by 3 s, else 'died <code>'."""
    env = {k: v for k, v in os.environ.items() if k not in ("TORCHELASTIC_RUN_ID", "SLURM_STEP_ID")}
    env.update(launcher_env)
    done = subprocess.run([sys.executable, "-c", STEPD, LEADER], env=env, capture_output=True,
                          text=True, timeout=60, start_new_session=True)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the reaper is Linux-only")
def test_a_slurm_task_leaves_the_other_tasks_of_its_step_alive() -> None:
    assert _other_rank_after_rank0_exits({"SLURM_STEP_ID": "0", "SLURM_PROCID": "0"}) == "alive"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the reaper is Linux-only")
def test_a_torchrun_worker_reaps_its_own_session() -> None:
    # torchrun gives each worker a session of its own; whatever is in it when the worker exits
    # was started by the worker (Megatron's async-writer Manager) and is killed with it.
    assert _other_rank_after_rank0_exits({"TORCHELASTIC_RUN_ID": "t", "SLURM_STEP_ID": "0"}) == "died -9"
