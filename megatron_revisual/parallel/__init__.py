"""Process groups, CPU/gloo support and parallel-layout checks for Megatron-Core.

Nothing here imports Transformer Engine or apex: this package is the CPU path too.
"""

from megatron_revisual.parallel.cpu_compat import install_cpu_compat
from megatron_revisual.parallel.harness import (
    ParallelLayout,
    RankError,
    destroy_parallel,
    initialize_parallel,
    run_distributed,
)

__all__ = [
    "ParallelLayout",
    "RankError",
    "destroy_parallel",
    "initialize_parallel",
    "install_cpu_compat",
    "run_distributed",
]
