"""
One optimizer step, as every stage takes it: the learning-rate, momentum and weight-decay schedules, the summed
loss of the micro-batches divided by the step's supervised tokens (all ranks), clipping and the optimizers' update.
"""

import math
from contextlib import nullcontext

import torch
import torch.distributed as dist

from nanochat.dist import autocast_ctx

# -----------------------------------------------------------------------------
# Schedules


def lr_multiplier(it, num_iterations, config):
    """Linear warmup, constant, linear warmdown to final_lr_frac."""
    warmup = round(config.warmup_ratio * num_iterations)
    warmdown = round(config.warmdown_ratio * num_iterations)
    if it < warmup:
        return (it + 1) / warmup
    if it <= num_iterations - warmdown:
        return 1.0
    progress = (num_iterations - it) / warmdown
    return progress + (1 - progress) * config.final_lr_frac


def muon_momentum(it, warmup=300):
    """0.85 -> 0.95 over the first `warmup` steps (nanochat): low momentum while the weights move fast."""
    frac = min(it / warmup, 1) if warmup > 0 else 1
    return (1 - frac) * 0.85 + frac * 0.95


def weight_decay_multiplier(it, num_iterations):
    """Muon's weight decay ramps linearly from full to 0 over the run (nanochat: better than a constant)."""
    return 1 - it / num_iterations


def setup_optimizers(model, config):
    """The model's optimizers with the run's learning rates, all scaled by --init_lr_frac."""
    optimizers = model.setup_optimizers(unembedding_lr=config.unembedding_lr, embedding_lr=config.embedding_lr,
                                        matrix_lr=config.matrix_lr, weight_decay=config.weight_decay,
                                        muon_variant=config.muon_variant,
                                        matrix_weight_decay=None if config.matrix_weight_decay == -1
                                        else config.matrix_weight_decay)
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"] = group["initial_lr"] * config.init_lr_frac
    return optimizers


def optimizer_step(model, optimizers, lrm, momentum, grad_clip, wdm=1.0):
    """Clip, set the learning rates (and Muon's momentum and weight decay), step, zero the grads. Returns the
    gradient norm before clipping (a tensor)."""
    # foreach: one norm over all grads instead of a Python loop per parameter (not the default on CPU; MPS has none)
    foreach = True if model.get_device().type in ("cpu", "cuda") else None
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else math.inf,
                                               foreach=foreach)
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"] * lrm
            if "momentum" in group:
                group["momentum"] = momentum
            if "initial_weight_decay" in group:
                group["weight_decay"] = group["initial_weight_decay"] * wdm
        opt.step()
    model.zero_grad(set_to_none=True)
    return grad_norm


# -----------------------------------------------------------------------------
# One step's forward and backward


def token_loss_sum(model, x, y):
    return model(x, y, loss_reduction="sum")


def forward_backward(model, batches, ddp, world_size, device_type, loss_fn=token_loss_sum, count=None):
    """Backward of sum(loss_fn over the micro-batches) / (supervised tokens in the step, all ranks). A batch is
    (inputs, targets, *extra), loss_fn(model, *batch) sums its per-token losses. Returns (mean loss, number of
    supervised tokens); (None, 0) when there is none, and then nothing is run. `count`: the number of supervised
    tokens when the caller knows it (every target counts), which saves counting them on the device."""
    if count is None:
        count = sum((batch[1] >= 0).sum() for batch in batches)
        if ddp:
            dist.all_reduce(count)
        count = int(count)  # a host-device sync: the optimizer step is skipped when it is 0
    if count == 0:
        return None, 0
    scale = world_size / count  # DDP averages the gradients of the ranks: undo that, then divide by the count
    loss_sum = torch.zeros((), device=batches[0][0].device)
    for i, batch in enumerate(batches):
        sync = i == len(batches) - 1  # DDP all-reduces the gradients on the last micro-batch only
        with (model.no_sync() if ddp and not sync else nullcontext()), autocast_ctx(device_type):
            loss = loss_fn(model, *batch)
        (loss * scale).backward()
        loss_sum += loss.detach()
    if ddp:
        dist.all_reduce(loss_sum)
    return loss_sum / count, count
