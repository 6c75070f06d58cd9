"""Launchers: run rae_scale jobs on this machine (torchrun), on Slurm (sbatch) and on Ray (Jobs API).

local.py: torchrun agent with preemption forwarding and exit-code mapping; slurm.py + render.py:
sbatch templates from slurm/; ray_jobs.py: Jobs API submission and local Ray nodes; ray_train.py:
the Ray Train (TorchTrainer) entrypoint.
"""
