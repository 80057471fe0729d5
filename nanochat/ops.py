"""
Fused kernels in plain PyTorch: fewer passes over memory than autograd's composition of the same ops, with the same
results (tests/test_ops.py checks each against its unfused form).
- LinearCrossEntropy: lm_head + softcap + cross-entropy by chunks of rows, gradients computed in the forward pass
- relu_squared: relu(x)^2 with a one-product backward
- fused_linear: q, k, v (or gate and up) as one GEMM on concatenated weights
"""

import torch
import torch.nn.functional as F


def at_least_fp32(x):
    """bf16/fp16 -> fp32; fp32 and fp64 stay as they are."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


class ReluSquared(torch.autograd.Function):
    """relu(x)^2 with its backward in one product, grad * 2 relu(x): autograd's relu -> square takes four passes
    over the (B, T, 4C) activations (square's backward re-powers its input, then relu's masks), this takes two
    (d4 on CPU: 10.2 -> 6.1 ms per MLP, forward and backward). The same gradient, bit for bit."""

    @staticmethod
    def forward(ctx, x):
        r = F.relu(x)
        ctx.save_for_backward(r)
        return r * r

    @staticmethod
    def backward(ctx, grad):
        (r,) = ctx.saved_tensors
        return grad * r * 2  # 0 where x <= 0, as relu's own gradient


def relu_squared(x):
    return ReluSquared.apply(x)


def fused_linear(x, linears):
    """x through several bias-free nn.Linear of the same input as one GEMM on their concatenated weights: fewer,
    larger GEMMs, and in backward one GEMM for x's gradient instead of one per projection plus their sum (q, k, v:
    ~1.4x faster on CPU at width 256). The parameters stay separate, so the state_dict keys are unchanged and Muon
    still orthogonalises each matrix alone. The concatenation copies the weights: a one-token decode step, where
    that copy costs more than the GEMMs it saves, keeps the separate projections."""
    if x.size(-2) == 1:
        return [lin(x) for lin in linears]
    weight = torch.cat([lin.weight for lin in linears])
    return F.linear(x, weight).split([lin.out_features for lin in linears], dim=-1)


class LinearCrossEntropy(torch.autograd.Function):
    """
    sum of cross_entropy(softcap(x @ weight.T), targets) over the targets != -1, by chunks of rows, with the
    gradients computed in the forward pass (as Liger-Kernel's fused linear cross-entropy): each chunk's fp32
    logits are made, used and dropped while still in cache, so neither the (N, V) logits nor the softcap's and
    log-softmax's copies of them are kept for backward, which only scales the two saved gradients.
    Same math (and the same matmul dtype under autocast) as lm_head -> float -> softcap -> F.cross_entropy.
    """

    @staticmethod
    def forward(ctx, x, weight, targets, softcap, chunk_size=None):
        if chunk_size is None:  # CPU: chunks that stay in cache; GPU: fewer kernels (and a smaller compiled graph)
            chunk_size = 512 if x.device.type == "cpu" else 1024
        if torch.is_autocast_enabled(x.device.type):  # the lm_head's matmul dtype, as the unfused path
            dtype = torch.get_autocast_dtype(x.device.type)
        else:
            dtype = torch.promote_types(x.dtype, weight.dtype)
        w = weight.to(dtype)
        with torch.autocast(x.device.type, enabled=False):
            grad_x = torch.empty_like(x)
            acc = torch.promote_types(dtype, torch.float32)  # fp32 accumulators (fp64 in an fp64 run)
            grad_w = torch.zeros_like(weight, dtype=acc)
            loss = torch.zeros((), dtype=acc, device=x.device)
            for i in range(0, x.size(0), chunk_size):
                xs, ts = x[i:i + chunk_size].to(dtype), targets[i:i + chunk_size]
                g = LinearCrossEntropy.chunk(xs, w, ts, softcap, loss)
                grad_x[i:i + chunk_size] = g @ w
                grad_w += g.T @ xs  # accumulated in fp32 across the chunks
        ctx.save_for_backward(grad_x, grad_w.to(weight.dtype))
        return loss

    @staticmethod
    def chunk(xs, w, ts, softcap, loss):
        """Adds the chunk's summed loss to `loss`; returns d loss / d logits (in w's dtype). Every pass over the
        (rows, V) logits is in place, on chunks small enough to stay in cache: on CPU these elementwise passes cost
        as much as the chunk's matmuls."""
        logits = at_least_fp32(xs @ w.T)
        if softcap:
            # c * tanh(z / c) = 2c * sigmoid(2z / c) - c, and its derivative 1 - tanh^2 = 4 s (1 - s): ATen's CPU
            # sigmoid is ~8x faster than its tanh; the two forms differ by ~1e-7 relative
            s = logits.mul_(2 / softcap).sigmoid_()
            logits = s.mul(2 * softcap).sub_(softcap)
        keep = (ts != -1).unsqueeze(1)
        safe = ts.clamp(min=0).unsqueeze(1)
        target_logits = logits.gather(1, safe)
        peak = logits.amax(dim=1, keepdim=True)
        e = logits.sub_(peak).exp_()  # the logits are not needed after this: reuse their memory
        total = e.sum(dim=1, keepdim=True)
        loss += ((peak + total.log() - target_logits) * keep).sum()
        # d loss / d logits = softmax - one_hot(target), 0 on ignored rows, then through the softcap; the
        # softcap's factor 4 and the rows' keep go in the one scale per row
        scale = keep / total * (4 if softcap else 1)
        g = e.mul_(scale)
        g.scatter_add_(1, safe, -scale * total)
        if softcap:
            g.mul_(s.addcmul_(s, s, value=-1))  # s (1 - s), in s's memory
        return g.to(xs.dtype)

    @staticmethod
    def backward(ctx, grad_loss):
        grad_x, grad_w = ctx.saved_tensors
        return grad_x * grad_loss, grad_w * grad_loss, None, None, None
