"""
Bits per byte: a loss that does not depend on the tokenizer's vocabulary size, so models with different
tokenizers (or none of ours) can be compared. Sum of per-token losses (nats) over the sum of the UTF-8 bytes
those tokens stand for, divided by ln 2. Special tokens (0 bytes) and ignored targets (-1) are left out.
"""

import math

import torch
import torch.distributed as dist


@torch.no_grad()
def evaluate_bpb(model, batches, steps, token_bytes):
    """Average bits per byte over `steps` batches of (inputs, targets); all-reduced across DDP ranks."""
    device = token_bytes.device
    total_nats = torch.zeros((), dtype=torch.float64, device=device)
    total_bytes = torch.zeros((), dtype=torch.int64, device=device)
    for _ in range(steps):
        x, y = next(batches)
        loss = model(x, y, loss_reduction="none").reshape(-1)
        y = y.reshape(-1)
        valid = y >= 0
        nbytes = torch.where(valid, token_bytes[y.clamp(min=0)], torch.zeros_like(y))
        counted = nbytes > 0
        total_nats += (loss.double() * counted).sum()
        total_bytes += nbytes.sum()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(total_nats)
        dist.all_reduce(total_bytes)
    if total_bytes.item() == 0:
        return float("inf")
    return total_nats.item() / (math.log(2) * total_bytes.item())


@torch.no_grad()
def evaluate_loss(model, batches, steps):
    """Mean cross-entropy (nats per token) over the targets that count (not -1) of `steps` batches; all-reduced
    across DDP ranks. The held-out loss of chat stages, where only some tokens are supervised."""
    total, count = None, None
    for _ in range(steps):
        x, y = next(batches)
        loss = model(x, y, loss_reduction="sum").double()
        n = (y >= 0).sum()
        total, count = (loss, n) if total is None else (total + loss, count + n)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(total)
        dist.all_reduce(count)
    return total.item() / max(1, count.item())
