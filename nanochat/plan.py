"""
What a pretraining run will be, decided before it starts: the batch split (micro-batches x ranks x accumulation),
the number of steps, parameters and FLOPs per token, and a memory estimate. base_train prints it with --dry_run;
nanochat.bench uses the same describe() and checks estimate_peak_memory() against measured peaks (bench memory).

The memory estimate runs the real model's training step (forward, backward, clipping, AdamW + Muon) on fake tensors
under a dispatch mode that counts the bytes of the tensors alive after every op: the peak of what the step holds,
temporaries included, without a formula to keep in sync with the models. On CPU the process's own memory (Python,
torch, kernels) is measured and added, since the reported peak there is the process's max RSS.
"""

import contextlib
import dataclasses
import io
import os

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from nanochat.dist import autocast_dtype
from nanochat.log import UserError, print0
from nanochat.models import MODEL_TYPES, build_model, config_from_depth, overrides_for

CUDA_TOTAL_BATCH = 524288  # tokens per optimizer step on GPU (nanochat's default, ~0.5M)
CPU_RUNTIME_BYTES = 600 * 2**20  # Python + torch resident on CPU where the OS cannot tell us (measured on Linux)
# glibc serves tensors below its mmap threshold, which rises to 32 MiB after the first large free, from its heap and
# keeps their memory when they are freed; small allocations in between fragment it. Measured (scripts.bench memory,
# gpt and alcoholic, d4-d8, batch 4-8 x 256-512): max RSS = tensors' peak + ~0.5 x the peak of those heap tensors,
# ~1.3x with activation checkpointing, whose recomputation in backward fragments more. (A fixed MALLOC_MMAP_THRESHOLD_
# removes the excess but makes CPU training ~1.6x slower.)
GLIBC_MMAP_MAX = 32 * 2**20
CPU_HEAP_RETENTION = {False: 0.5, True: 1.3}  # by activation_checkpointing


def batch_plan(config, device_type, world_size):
    """(tokens per step, gradient accumulation steps, a note when the default differs from nanochat's)."""
    tokens_per_fwdbwd = config.device_batch_size * config.max_seq_len * world_size
    total = config.total_batch_size
    note = ""
    if total <= 0:
        if device_type == "cuda":
            total = CUDA_TOTAL_BATCH
        else:
            total = tokens_per_fwdbwd
            note = (f"--total_batch_size not set on {device_type}: one micro-batch per step ({total:,} tokens) "
                    f"instead of {CUDA_TOTAL_BATCH:,}")
    if total % tokens_per_fwdbwd != 0:
        lower = max(tokens_per_fwdbwd, total // tokens_per_fwdbwd * tokens_per_fwdbwd)
        raise UserError(
            f"--total_batch_size={total} is not a multiple of device_batch_size * max_seq_len * world_size = "
            f"{config.device_batch_size} * {config.max_seq_len} * {world_size} = {tokens_per_fwdbwd}. "
            f"Use e.g. --total_batch_size={lower} or --total_batch_size={lower + tokens_per_fwdbwd}.")
    return total, total // tokens_per_fwdbwd, note


def plan_iterations(config, num_params, flops_per_token, total_batch):
    """(steps, which flag decided it): --num_iterations, else --target_flops, else --target_param_data_ratio."""
    if config.num_iterations > 0:
        return config.num_iterations, "--num_iterations"
    if config.target_flops > 0:
        return max(1, round(config.target_flops / (flops_per_token * total_batch))), "--target_flops"
    if config.target_param_data_ratio > 0:
        tokens = config.target_param_data_ratio * num_params
        return max(1, int(tokens // total_batch)), f"--target_param_data_ratio={config.target_param_data_ratio:g}"
    raise UserError("set one of --num_iterations, --target_flops or --target_param_data_ratio")


def human(n):
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def meta_model(model_type, config):
    """The model on the meta device: shapes and parameter counts without memory or init."""
    with torch.device("meta"):
        return MODEL_TYPES[model_type].model_cls(config)


def describe(model_type, config):
    """Shape, params by group and FLOPs/token."""
    model = meta_model(model_type, config)
    c = dataclasses.asdict(config)
    shape = f"L{c['n_layer']} C{c['n_embd']} H{c['n_head']}/{c['n_kv_head']} D{model.head_dim}"
    return dict(shape=shape, **model.num_params_by_group(), flops=model.estimate_flops())


class LiveBytes(TorchDispatchMode):
    """Counts the bytes of every tensor storage alive after each op and keeps the high-water mark: what a caching
    allocator that frees at once would hold at its peak; and the high-water mark of the tensors small enough for
    glibc's heap. Storages are held weakly, so a tensor that autograd or Python drops stops counting once gone."""

    def __init__(self, tensors=()):
        super().__init__()
        self.live, self.peak, self.heap_peak = {}, 0, 0
        for t in tensors:
            self.track(t)

    def track(self, t):
        storage = t.untyped_storage()
        ref = StorageWeakRef(storage)
        if ref not in self.live:
            self.live[ref] = storage.nbytes()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.track(t)
        self.live = {ref: n for ref, n in self.live.items() if not ref.expired()}
        self.peak = max(self.peak, sum(self.live.values()))
        self.heap_peak = max(self.heap_peak, sum(n for n in self.live.values() if n < GLIBC_MMAP_MAX))
        return out


def tensor_peak_bytes(model_type, config, batch_size, seq_len, device_type, activation_checkpointing=False):
    """LiveBytes of a training step as the trainer runs it (forward, backward, grad clipping,
    AdamW + Muon step, zero_grad) once the optimizer state exists, counted on fake tensors: every op is dispatched,
    none computes or allocates. On a machine without the device, its precision is simulated on fake CPU tensors
    (CUDA: bf16 autocast)."""
    from nanochat.steps import optimizer_step

    device = "cuda" if device_type == "cuda" and torch.cuda.is_available() else "cpu"
    amp = autocast_dtype(device_type)
    with FakeTensorMode(), torch.device(device):
        model = MODEL_TYPES[model_type].model_cls(config)
        model.init_weights()
        model.activation_checkpointing = activation_checkpointing
        with contextlib.redirect_stdout(io.StringIO()):  # setup_optimizers prints its LR scaling
            optimizers = model.setup_optimizers()
        idx = torch.zeros(batch_size, seq_len, dtype=torch.long)
        with LiveBytes([*model.parameters(), *model.buffers()]) as tracker:
            for p in model.parameters():  # a step on zero grads creates the optimizer state, as the first step does
                p.grad = torch.zeros_like(p)
            optimizer_step(model, optimizers, 1.0, 0.95, grad_clip=1.0)
            with torch.autocast(device, dtype=amp, enabled=amp != torch.float32):
                loss = model(idx, idx, loss_reduction="sum")
            loss.backward()
            del loss
            optimizer_step(model, optimizers, 1.0, 0.95, grad_clip=1.0)
    return tracker


def current_rss():
    """Resident bytes of this process now (Linux), else None."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):
        return None


def warm_up_runtime():
    """One real training step of a tiny model of every type: the first step pages in kernels and sets up thread
    pools and allocator caches (~0.1 GB on CPU), memory a run holds whatever its size."""
    from nanochat.steps import optimizer_step

    for model_type in MODEL_TYPES:
        model = build_model(model_type, config_from_depth(model_type, 1, 16, 64, head_dim=32))
        with contextlib.redirect_stdout(io.StringIO()):
            optimizers = model.setup_optimizers()
        idx = torch.zeros(2, 16, dtype=torch.long)
        model(idx, idx).backward()
        optimizer_step(model, optimizers, 1.0, 0.95, grad_clip=1.0)


def runtime_baseline(device_type):
    """Bytes the process holds besides the run's tensors, as peak_memory() counts them: on CUDA nothing (max
    allocated counts tensors only); on CPU the resident memory of Python, torch and what this process has loaded,
    measured here after a warm-up step."""
    if device_type == "cuda":
        return 0
    warm_up_runtime()
    return current_rss() or CPU_RUNTIME_BYTES


def allocator_held(tensors, device_type, activation_checkpointing=False):
    """Bytes the allocator holds at the peak of `tensors` (a LiveBytes): on CUDA the tensors' peak (max allocated
    counts tensors), on CPU also what glibc's heap keeps of freed tensors (CPU_HEAP_RETENTION)."""
    if device_type == "cuda":
        return tensors.peak
    return tensors.peak + int(tensors.heap_peak * CPU_HEAP_RETENTION[bool(activation_checkpointing)])


def estimate_peak_memory(model_type, config, batch_size, seq_len, device_type, activation_checkpointing=False,
                         world_size=1):
    """Bytes at the peak of a training run, as base_train reports it: the tensors' peak (weights, grads, optimizer
    state, activations and the temporaries of every op, counted on fake tensors), on CPU plus what glibc's heap keeps
    and the runtime's own memory; with DDP, its gradient buckets (one more fp32 copy of the weights). Eager mode;
    torch.compile saves activations differently."""
    tensors = tensor_peak_bytes(model_type, config, batch_size, seq_len, device_type, activation_checkpointing)
    buckets = 4 * meta_model(model_type, config).num_params_by_group()["total"] if world_size > 1 else 0
    return allocator_held(tensors, device_type, activation_checkpointing) + buckets + runtime_baseline(device_type)


def print_dry_run(run, vocab_size, device_type, world_size):
    """The plan of this run, for the chosen type and, beside it, every other registered type."""
    total_batch, grad_accum, note = batch_plan(run, device_type, world_size)
    print0(f"Dry run: depth={run.depth} max_seq_len={run.max_seq_len} vocab_size={vocab_size} "
           f"device={device_type} world_size={world_size}")
    print0(f"Batch plan: {run.device_batch_size} x {run.max_seq_len} tokens x {world_size} ranks x "
           f"{grad_accum} accumulation steps = {total_batch:,} tokens/step {note}")
    for model_type in [run.model_type] + [t for t in MODEL_TYPES if t != run.model_type]:
        # the chosen type gets every flag (an unknown one is an error); the others the flags they understand
        overrides = run.model if model_type == run.model_type else overrides_for(model_type, run.model)
        config = config_from_depth(model_type, run.depth, run.max_seq_len, vocab_size, **overrides)
        model = meta_model(model_type, config)
        groups = model.num_params_by_group()
        flops = model.estimate_flops()
        mem = estimate_peak_memory(model_type, config, run.device_batch_size, run.max_seq_len, device_type,
                                   run.activation_checkpointing, world_size)
        iters, why = plan_iterations(run, groups["total"], flops, total_batch)
        chosen = " (chosen)" if model_type == run.model_type else ""
        print0(f"\n[{model_type}{chosen}] {config}")
        print0("  params: " + ", ".join(f"{k}={v:,}" for k, v in groups.items()))
        print0(f"  FLOPs/token: {flops:.3e}; iterations: {iters:,} ({why}); "
               f"total training FLOPs: {flops * total_batch * iters:.3e}")
        ckpt = ", activation checkpointing" if run.activation_checkpointing else ""
        print0(f"  estimated peak memory per device: {mem / 2**30:.2f} GiB (eager{ckpt}; torch.compile saves less)")
