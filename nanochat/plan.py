"""
What a pretraining run will be, decided before it starts: the batch split (micro-batches x ranks x accumulation),
the number of steps, parameters and FLOPs per token, and a memory estimate. base_train prints it with --dry_run;
scripts.bench uses the same describe().
"""

import dataclasses

import torch

from nanochat.common import UserError, print0
from nanochat.models import MODEL_TYPES, config_from_depth, config_overrides

CUDA_TOTAL_BATCH = 524288  # tokens per optimizer step on GPU (nanochat's default, ~0.5M)


def batch_plan(args, device_type, world_size):
    """(tokens per step, gradient accumulation steps, a note when the default differs from nanochat's)."""
    tokens_per_fwdbwd = args.device_batch_size * args.max_seq_len * world_size
    total = args.total_batch_size
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
            f"{args.device_batch_size} * {args.max_seq_len} * {world_size} = {tokens_per_fwdbwd}. "
            f"Use e.g. --total_batch_size={lower} or --total_batch_size={lower + tokens_per_fwdbwd}.")
    return total, total // tokens_per_fwdbwd, note


def plan_iterations(args, num_params, flops_per_token, total_batch):
    """(steps, which flag decided it): --num_iterations, else --target_flops, else --target_param_data_ratio."""
    if args.num_iterations > 0:
        return args.num_iterations, "--num_iterations"
    if args.target_flops > 0:
        return max(1, round(args.target_flops / (flops_per_token * total_batch))), "--target_flops"
    if args.target_param_data_ratio > 0:
        tokens = args.target_param_data_ratio * num_params
        return max(1, int(tokens // total_batch)), f"--target_param_data_ratio={args.target_param_data_ratio:g}"
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


def estimate_peak_memory(model, batch_size, seq_len, device_type):
    """Bytes: weights + grads + optimizer state (fp32) + activations saved for backward, counted by running forward
    on the meta device with saved-tensor hooks (no memory is allocated). Not counted: weights saved by their own
    layers (already counted), a tensor saved twice, and (T, T) attention matrices, which flash attention never
    stores. `model` lives on the meta device."""
    groups = model.num_params_by_group()
    n_params, n_muon = groups["total"], groups["matrices"]
    static = {t.untyped_storage()._cdata for t in [*model.parameters(), *model.buffers()]}
    seen, saved = set(), 0

    def pack(t):
        nonlocal saved
        key = (t.untyped_storage()._cdata, t.storage_offset(), tuple(t.shape))
        attention_matrix = t.ndim >= 2 and t.shape[-1] == t.shape[-2] == seq_len
        if key[0] not in static and key not in seen and not attention_matrix:
            seen.add(key)
            saved += t.numel() * t.element_size()
        return t

    idx = torch.zeros(batch_size, seq_len, dtype=torch.long, device="meta")
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(idx, idx)
    if device_type == "cuda":
        saved //= 2  # bf16 autocast stores most activations in half the bytes
    # params + grads + Adam (2 moments on non-Muon params) + Muon (1 momentum buffer)
    states = 4 * (2 * n_params + 2 * (n_params - n_muon) + n_muon)
    return states + saved


def print_dry_run(args, vocab_size, device_type, world_size):
    """The plan of this run, for the chosen type and, beside it, every other registered type."""
    total_batch, grad_accum, note = batch_plan(args, device_type, world_size)
    print0(f"Dry run: depth={args.depth} max_seq_len={args.max_seq_len} vocab_size={vocab_size} "
           f"device={device_type} world_size={world_size}")
    print0(f"Batch plan: {args.device_batch_size} x {args.max_seq_len} tokens x {world_size} ranks x "
           f"{grad_accum} accumulation steps = {total_batch:,} tokens/step {note}")
    for model_type in [args.model_type] + [t for t in MODEL_TYPES if t != args.model_type]:
        # the chosen type gets every flag (an unknown one is an error); the others the flags they understand
        overrides = config_overrides(args, None if model_type == args.model_type else model_type)
        config = config_from_depth(model_type, args.depth, args.max_seq_len, vocab_size, **overrides)
        model = meta_model(model_type, config)
        groups = model.num_params_by_group()
        flops = model.estimate_flops()
        mem = estimate_peak_memory(model, args.device_batch_size, args.max_seq_len, device_type)
        iters, why = plan_iterations(args, groups["total"], flops, total_batch)
        chosen = " (chosen)" if model_type == args.model_type else ""
        print0(f"\n[{model_type}{chosen}] {config}")
        print0("  params: " + ", ".join(f"{k}={v:,}" for k, v in groups.items()))
        print0(f"  FLOPs/token: {flops:.3e}; iterations: {iters:,} ({why}); "
               f"total training FLOPs: {flops * total_batch * iters:.3e}")
        print0(f"  estimated peak memory per device: {mem / 2**30:.2f} GiB (eager; torch.compile saves less)")
