"""Cluster launchers' shared logic: what a launch runs and the dry-run check before submitting.

    bash slurm/submit.sh --nodes 2 --gpus-per-node 8 configs/qwen25_vl_7b_8xh100.yaml --dryrun
    .venv/bin/python launch_scripts/launch.py --recipe configs/tiny_cpu_demo.yaml --executor local

- plan.py        LaunchPlan, recipe validation at nodes x ranks per node
- sbatch.py      slurm/submit.sh: validate, create the log directory, sbatch slurm/train.sbatch
- nemo.py        NeMo-Run LocalExecutor (torchrun) / SlurmExecutor (one srun task per rank)
- slurm_rank.py  SLURM_PROCID/LOCALID -> RANK/LOCAL_RANK, then exec of the trainer
- slurm_jobs.py  follow a Slurm job to its end without sacct
"""
