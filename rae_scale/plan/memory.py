"""Per-GPU memory of one training setting: the split the planner prints, in bytes.

Persistent state, counted exactly from the parameter shapes (FSDP2 shards dim 0 in world-size chunks,
rank 0 holding the largest; DeepSpeed ZeRO partitions a flat buffer):
  weights    fp32 master weights (DDP, FSDP shard); DeepSpeed: the module in the compute dtype plus
             its fp32 master partition
  gradients  fp32, as the parameters (DDP: plus the reducer's buckets, another fp32 copy)
  optimizer  AdamW: exp_avg + exp_avg_sq fp32 and a 4-byte step per tensor; Muon: one fp32 momentum
             per 2-D tensor, AdamW's state for the rest
  ema        DDP: a full copy; FSDP: sharded like the model; DeepSpeed: a full fp32 copy per rank
  frozen     stage 1's encoder, LPIPS and DINO backbone (fp32, replicated), the discriminator heads
             (trained with plain DDP and AdamW)
Activations: the measured per-sample bytes (rae_scale.plan.probe) x micro-batch; a checkpointed block
keeps only its inputs, and one block's activations are recomputed at a time in backward.
Communication: DDP's reducer buckets (one more fp32 copy of the gradients); DeepSpeed's gradient
reduction buffers, allocated whole at reduce_bucket_size elements however small the model (5e8 by
default: 1 GB in bf16 per GPU; two with overlap_comm in ZeRO-1/2), read from parallel.deepspeed.
Transient: autocast's bf16 weight copies (DDP bf16), FSDP's gathered block parameters (current and
prefetched) and the unsharded gradient of one block, ZeRO-3's gathered parameters (the whole module when
it is smaller than stage3_max_reuse_distance), AdamW's foreach temporary at the step (4 bytes per local
parameter; the fused kernel, auto's choice on a GPU, has none).
Peak = persistent + max(forward/backward, optimizer step): during backward activations are freed as
gradients appear, so the peak is max(activations + one block's gradients, gradients + one block's
activations). Headroom = CUDA context + allocator fragmentation, added on top (GPU only).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from rae_scale.plan.inventory import Job, Params

STRATEGIES = ("ddp", "fsdp", "zero1", "zero2", "zero3")
AC_MODES = ("none", "every_k", "full")
CUDA_CONTEXT = 1.0 * 2**30  # CUDA context, cuBLAS / NCCL workspaces
FRAGMENTATION = 0.08  # the caching allocator's reserved-but-unused share at the peak
DS_REDUCE_BUCKET = 500_000_000  # DeepSpeed's default reduce_bucket_size (elements)
DS_ALIGN = 2  # DeepSpeed's nccl_start_alignment_factor: flat partitions are padded to world x this


def fsdp_shard(shape: tuple[int, ...], world: int) -> int:
    """Elements of rank 0's FSDP2 shard of a tensor (dim 0 in chunks of ceil(n / world))."""
    if not shape:
        return 1
    return math.ceil(shape[0] / world) * math.prod(shape[1:])


def zero_partition(numel: int, world: int) -> int:
    """Elements of one rank's ZeRO-1/2 partition of a flat buffer of `numel` (padded to world x DS_ALIGN)."""
    return math.ceil(numel / (world * DS_ALIGN)) * DS_ALIGN


def deepspeed_option(overrides: dict, key: str, default):
    """A DeepSpeed config value as the engine will see it: parallel.deepspeed's dotted override
    ("zero_optimization.overlap_comm"), else the same key inside a section override, else `default`."""
    if key in overrides:
        return overrides[key]
    section, _, leaf = key.rpartition(".")
    node = overrides.get(section)
    return node.get(leaf, default) if isinstance(node, dict) else default


def zero_count(overrides: dict, key: str, default: float) -> int:
    """An element count of DeepSpeed's zero_optimization section (JSON allows 5e8 or "5e8")."""
    return int(float(deepspeed_option(overrides, f"zero_optimization.{key}", default)))


def zero_reduce_buffer(overrides: dict, stage: int, numel: int) -> int:
    """Elements of ZeRO's gradient-reduction buffers. With contiguous_gradients (the default) each is
    a torch.empty of reduce_bucket_size: ZeRO-1/2 allocate it at every backward, two with overlap_comm
    (default off); ZeRO-3 one, at start-up. Without it, one bucket of gradients (at most numel)."""
    size = zero_count(overrides, "reduce_bucket_size", DS_REDUCE_BUCKET)
    if not deepspeed_option(overrides, "zero_optimization.contiguous_gradients", True):
        return min(numel, size)
    overlap = deepspeed_option(overrides, "zero_optimization.overlap_comm", stage == 3)
    return size * (2 if overlap and stage < 3 else 1)


def zero3_persistent(shapes: list[tuple[int, ...]], overrides: dict) -> int:
    """Elements ZeRO-3 keeps whole on every rank besides their partitions: each tensor of at most
    stage3_param_persistence_threshold elements (1e5 by default: biases and norms at scale, most of a
    small model), until their sum would pass stage3_model_persistence_threshold."""
    small = zero_count(overrides, "stage3_param_persistence_threshold", 1e5)
    cap = zero_count(overrides, "stage3_model_persistence_threshold", 2**63 - 1)
    total = 0
    for numel in (math.prod(x) for x in shapes):
        if numel <= small and total + numel <= cap:
            total += numel
    return total


def zero3_gathered(overrides: dict, module: int, block: int) -> int:
    """Elements ZeRO-3 holds gathered during forward and backward. It releases a parameter only when its
    next use is more than stage3_max_reuse_distance elements away (1e9 by default): below that the whole
    module stays gathered from its forward to its backward; above it the running block, the prefetch
    bucket (stage3_prefetch_bucket_size) and the block after. Never more than stage3_max_live_parameters."""
    live = zero_count(overrides, "stage3_max_live_parameters", 1e9)
    if module <= zero_count(overrides, "stage3_max_reuse_distance", 1e9):
        return min(module, live)
    return min(2 * block + zero_count(overrides, "stage3_prefetch_bucket_size", 5e7), live)


def zero3_partition(shapes: list[tuple[int, ...]], world: int) -> int:
    """ZeRO-3 partitions every parameter on its own: ceil(numel / world) each."""
    return sum(math.ceil(math.prod(s) / world) for s in shapes)


def optimizer_bytes(shapes: list[tuple[int, ...]], optimizer: str, local=lambda s: math.prod(s)) -> int:
    """Optimizer state bytes for tensors of these shapes (local elements by `local`)."""
    total = 0
    for s in shapes:
        n = local(s)
        if optimizer == "muon" and len(s) == 2:
            total += 4 * n  # momentum_buffer
        else:
            total += 8 * n + 4  # exp_avg, exp_avg_sq, step
    return total


@dataclass
class Setting:
    strategy: str
    ac: str
    micro_batch: int
    world: int
    precision: str = "bf16"
    ac_every: int = 2

    @property
    def compute_bytes(self) -> int:
        """Bytes per element of the compute dtype (sharded modules hold their weights in it)."""
        return 2 if self.precision == "bf16" else 4

    @property
    def mode(self) -> str:
        """The activation probe's compute mode for this setting."""
        if self.precision == "fp32":
            return "fp32"
        return "autocast" if self.strategy == "ddp" else "bf16"


@dataclass
class Memory:
    """Per-GPU bytes of one setting."""

    weights: float
    gradients: float
    optimizer: float
    ema: float
    frozen: float
    activations: float
    transient: float
    peak: float  # predicted peak allocated bytes (no headroom)
    headroom: float
    parts: dict = field(default_factory=dict)

    @property
    def total(self) -> float:
        return self.peak + self.headroom

    def as_dict(self) -> dict:
        keys = ("weights", "gradients", "optimizer", "ema", "frozen", "activations", "transient", "peak",
                "headroom", "total")
        return {k: getattr(self, k) for k in keys}


def _state_bytes(p: Params, s: Setting, optimizer: str, deepspeed: dict) -> dict[str, float]:
    """weights / gradients / optimizer / ema (persistent) and the comm transient of the trained model
    (deepspeed: the job's parallel.deepspeed overrides)."""
    w, cb = s.world, s.compute_bytes
    every = [*p.trainable, *p.frozen]
    buffers = 4 * p.n_buffers
    if s.strategy == "ddp":
        weights = 4 * sum(math.prod(x) for x in every) + buffers
        grads = 4 * p.n_trainable
        comm = 4 * p.n_trainable  # the reducer's bucket copies
        opt = optimizer_bytes(p.trainable, optimizer)
        ema = weights
        transient = 2 * p.n_trainable if s.precision == "bf16" else 0  # autocast's weight cache
        local_trainable = p.n_trainable
    elif s.strategy == "fsdp":
        shard = lambda x: fsdp_shard(x, w)  # noqa: E731
        weights = 4 * sum(shard(x) for x in every) + buffers
        grads = 4 * sum(shard(x) for x in p.trainable)
        comm = 0
        opt = optimizer_bytes(p.trainable, optimizer, shard)
        ema = weights
        block = p.largest_block
        root = sum(math.prod(x) for x in every) - sum(sum(math.prod(x) for x in b) for b in p.blocks)
        # gathered: the root (kept through backward), the running block and the prefetched one;
        # one block's unsharded gradient and its fp32 reduce-scatter input
        transient = cb * (root + 2 * block) + block * (cb + 4)
        local_trainable = sum(shard(x) for x in p.trainable)
    else:
        stage = int(s.strategy[-1])
        n = p.n_trainable
        part = zero3_partition(p.trainable, w) if stage == 3 else zero_partition(n, w)
        module = sum(math.prod(x) for x in every)
        frozen = sum(math.prod(x) for x in p.frozen)
        # ZeRO-1/2 move the trainable parameters into one flat buffer padded to world x partition
        held = zero3_partition(every, w) + zero3_persistent(every, deepspeed) if stage == 3 else part * w + frozen
        weights = cb * held + buffers + 4 * part  # the module (compute dtype) + the fp32 master partition
        # this rank's fp32 averaged partition; ZeRO-1 too: DeepSpeed (0.19, measured) reduces its full
        # gradients bucket by bucket through the reduction buffer and keeps only the partition, as ZeRO-2
        grads = 4 * part
        comm = cb * zero_reduce_buffer(deepspeed, stage, n)
        opt = optimizer_bytes([(part,)], "adamw") if optimizer == "adamw" else (
            4 * part * p.n_2d / max(n, 1) + 8 * part * (1 - p.n_2d / max(n, 1)))
        ema = 4 * module + buffers
        transient = cb * zero3_gathered(deepspeed, module, p.largest_block) if stage == 3 else 0
        local_trainable = part
    return dict(weights=weights, gradients=grads, comm=comm, optimizer=opt, ema=ema, transient=transient,
                local_trainable=local_trainable)


def _checkpointed(n_blocks: int, ac: str, every: int) -> list[bool]:
    if ac == "none":
        return [False] * n_blocks
    if ac == "full":
        return [True] * n_blocks
    return [i % every == 0 for i in range(n_blocks)]


def activation_bytes(job: Job, s: Setting) -> tuple[float, float]:
    """(activations kept for backward, the largest single block's activations) for the micro-batch."""
    probe = job.activations(s.mode)
    ckpt = _checkpointed(len(probe.blocks), s.ac, s.ac_every)
    kept = probe.other + sum(inp if c else full for full, inp, c in zip(probe.blocks, probe.block_inputs, ckpt))
    recompute = max((full for full, c in zip(probe.blocks, ckpt) if c), default=0.0)  # one block rebuilt at a time
    side = job.side_activations(s.mode) if job.side_activations else 0.0
    biggest = max(probe.blocks, default=0.0)
    return s.micro_batch * (kept + recompute + side), s.micro_batch * biggest


def step_temporary(job: Job, local_params: int, gpu: bool) -> int:
    """Bytes AdamW's step allocates besides its state: the foreach kernels one fp32 tensor as large as the
    local parameters (the denominator), the fused kernel and the per-tensor loop next to nothing.
    optimizer.implementation auto is fused on a GPU and foreach on the CPU (rae_scale.optim.adamw)."""
    impl = job.optimizer_implementation
    foreach = impl == "foreach" or (impl == "auto" and not gpu)
    return 4 * local_params if (job.optimizer == "adamw" and foreach) else 0


def plan_memory(job: Job, s: Setting, *, gpu: bool = True) -> Memory:
    """The per-GPU memory split of `job` under setting `s` (gpu=False: no headroom, CPU optimizer)."""
    st = _state_bytes(job.trained, s, job.optimizer, job.deepspeed)
    frozen = 4 * sum(job.frozen_params.values())
    if job.side_trained is not None:  # discriminator heads: DDP + AdamW, weights, grads, buckets, state
        h = job.side_trained
        frozen += 4 * (h.n_trainable + h.n_frozen + h.n_buffers) + 8 * h.n_trainable
        frozen += optimizer_bytes(h.trainable, "adamw")
    acts, block_acts = activation_bytes(job, s)
    # the largest block's gradients at once in backward: sharded under FSDP (its unsharded ones are in the
    # transient); under DDP fp32, under ZeRO in the module's dtype, whole until they reach the buckets
    largest = job.trained.largest_block
    if s.strategy == "fsdp":
        block_grad = 4 * largest / s.world
    else:
        block_grad = (4 if s.strategy == "ddp" else s.compute_bytes) * largest
    persistent = st["weights"] + st["optimizer"] + st["ema"] + st["comm"] + frozen
    fwd_bwd = max(acts + block_grad, st["gradients"] + block_acts) + st["transient"]
    step_tmp = step_temporary(job, st["local_trainable"], gpu)
    peak = persistent + max(fwd_bwd, st["gradients"] + step_tmp)
    headroom = (CUDA_CONTEXT + FRAGMENTATION * peak) if gpu else 0.0
    return Memory(weights=st["weights"], gradients=st["gradients"] + st["comm"], optimizer=st["optimizer"],
                  ema=st["ema"], frozen=frozen, activations=acts, transient=st["transient"] + step_tmp,
                  peak=peak, headroom=headroom, parts=st)
