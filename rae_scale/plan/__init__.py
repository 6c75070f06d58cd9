"""Memory and throughput planner (`rae-scale plan`): does a job fit on N GPUs, with which strategy,
activation checkpointing and micro-batch, how fast and at what cost. Pure functions over the job's
config: models are built on the meta device (exact parameter counts), activations come from a small
measured probe on CPU (probe.py)."""
from rae_scale.plan.hardware import GPUS, get_gpu
from rae_scale.plan.inventory import Job, build_job
from rae_scale.plan.memory import STRATEGIES, Memory, Setting, plan_memory
from rae_scale.plan.planner import DEFAULT_MFU, Row, plan

__all__ = ["DEFAULT_MFU", "GPUS", "Job", "Memory", "Row", "STRATEGIES", "Setting", "build_job", "get_gpu", "plan",
           "plan_memory"]
