"""
Optimizers: Muon for the 2-D matrices inside the transformer blocks, AdamW for everything else.

Muon (MomentUm Orthogonalized by Newton-Schulz, https://kellerjordan.github.io/posts/muon/) runs SGD with
Nesterov momentum and replaces each update by (approximately) its nearest semi-orthogonal matrix, so every
direction of the update moves at a similar rate.

DistMuon is the same optimizer for torch.distributed: the training loop has already averaged the gradients
(every rank holds identical grads), so each rank orthogonalises only its share of the matrices and the new
values are all-gathered. The result equals single-process Muon.
"""

import math

import torch
import torch.distributed as dist


def zeropower_via_newtonschulz5(G, steps=5, dtype=None):
    """
    Approximate U V^T for G = U S V^T with a quintic Newton-Schulz iteration; works on (..., m, n) batches.
    The coefficients maximise the slope at zero instead of converging exactly, so the singular values end up
    spread around 1 (roughly 0.7-1.2) rather than equal to 1, which does not hurt training and needs fewer steps.
    Computes in bf16 on CUDA (fast tensor cores) and fp32 elsewhere (bf16 matmuls are far slower on CPU);
    `dtype` overrides. Returns the result in the compute dtype.
    """
    assert G.ndim >= 2, f"zeropower_via_newtonschulz5 needs a (..., m, n) tensor, got shape {tuple(G.shape)}"
    if dtype is None:
        dtype = torch.bfloat16 if G.device.type == "cuda" else torch.float32
    a, b, c = (3.4445, -4.7750, 2.0315)
    X = G.to(dtype)
    tall = G.size(-2) > G.size(-1)
    if tall:
        X = X.mT  # iterate on the wide orientation so X @ X^T is the smaller Gram matrix
    # Frobenius norm >= spectral norm, so this puts every singular value in [0, 1] where the iteration converges
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    shape = X.shape
    X = X.reshape(-1, *shape[-2:])  # one batch dim, for baddbmm
    for _ in range(steps):
        A = X @ X.mT
        B = torch.baddbmm(A, A, A, beta=b, alpha=c)  # b*A + c*A@A, the scaling and sum inside the GEMM
        X = torch.baddbmm(X, B, X, beta=a)  # a*X + B@X
    X = X.reshape(shape)
    if tall:
        X = X.mT
    return X


class Muon(torch.optim.Optimizer):
    """
    Muon for 2-D parameters only (embeddings, the lm_head and 1-D params belong to AdamW).
    Matrices of the same shape are orthogonalised together in one batched Newton-Schulz call.
    """

    def __init__(self, params, lr=0.02, momentum=0.95, nesterov=True, ns_steps=5):
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps)
        super().__init__(params, defaults)

    def add_param_group(self, param_group):
        # checked here so that both the constructor and later add_param_group calls are covered
        params = param_group["params"]
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        for p in params:
            if p.ndim != 2:
                raise ValueError(f"Muon only optimizes 2-D matrices, got a parameter of shape {tuple(p.shape)}; "
                                 f"give embeddings, biases and norm weights to AdamW instead (make_adamw)")
        super().add_param_group({**param_group, "params": params})

    def _update_(self, params, group):
        """Apply one Muon step in place to same-shape params (all with grads), orthogonalising them as a batch.
        The momentum and the update use foreach ops: one dispatch for all the params of a shape, not one each."""
        grads = [p.grad for p in params]
        for p in params:
            if "momentum_buffer" not in self.state[p]:
                self.state[p]["momentum_buffer"] = torch.zeros_like(p.grad)
        bufs = [self.state[p]["momentum_buffer"] for p in params]
        momentum = group["momentum"]
        torch._foreach_lerp_(bufs, grads, 1 - momentum)  # buf = momentum * buf + (1 - momentum) * g
        directions = torch._foreach_lerp(grads, bufs, momentum) if group["nesterov"] else bufs  # Nesterov
        update = zeropower_via_newtonschulz5(torch.stack(directions), steps=group["ns_steps"])
        rows, cols = params[0].shape
        # an orthogonal update of a tall matrix has a smaller RMS per entry; scale it back up (as nanochat)
        lr = group["lr"] * math.sqrt(max(1.0, rows / cols))
        torch._foreach_add_(params, list(update.to(params[0].dtype).unbind(0)), alpha=-lr)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._apply_updates()
        return loss

    def _apply_updates(self):
        for group in self.param_groups:
            for params in group_by_shape([p for p in group["params"] if p.grad is not None]):
                self._update_(params, group)


def group_by_shape(params):
    """Split params into lists of equal shape and dtype, in order of first appearance (same on every rank)."""
    buckets = {}
    for p in params:
        buckets.setdefault((tuple(p.shape), p.dtype), []).append(p)
    return list(buckets.values())


class DistMuon(Muon):
    """
    Muon across the ranks of a torch.distributed group (gloo or NCCL). Gradients must already be averaged
    (DDP does it in backward). Within each group of equal-shape matrices, the params are cut into world_size
    contiguous blocks; each rank owns one block, keeps momentum only for it, orthogonalises it, and an
    all_gather gives every rank every new value. Block ownership rotates from one shape group to the next so
    that small groups do not all land on rank 0. state_dict() therefore holds only this rank's momentum:
    save and load it per rank, with the same world size.
    """

    def __init__(self, params, lr=0.02, momentum=0.95, nesterov=True, ns_steps=5):
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("DistMuon needs an initialized torch.distributed process group "
                               "(launch with torchrun, which compute_init() joins); use Muon for a single process")
        super().__init__(params, lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps)
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()

    def _apply_updates(self):
        rank, world_size = self.rank, self.world_size
        # every rank must walk the same buckets in the same order, so bucket all params, grads or not
        buckets = [(group, params) for group in self.param_groups for params in group_by_shape(group["params"])]
        pending = []  # launch every all_gather before waiting on any, so communication overlaps computation
        for b, (group, params) in enumerate(buckets):
            block = math.ceil(len(params) / world_size)
            mine = params[((rank - b) % world_size) * block:][:block]
            with_grad = [p for p in mine if p.grad is not None]  # a param without grad keeps its value
            if with_grad:
                self._update_(with_grad, group)
            local = params[0].new_zeros(block, *params[0].shape)  # zero padding when the block is short
            if mine:
                local[:len(mine)] = torch.stack(mine)
            if local.device.type not in ("cpu", "cuda"):
                local = local.cpu()  # gloo only moves CPU (and CUDA) tensors
            gathered = [torch.empty_like(local) for _ in range(world_size)]
            pending.append((gathered, dist.all_gather(gathered, local, async_op=True)))
        for b, ((group, params), (gathered, work)) in enumerate(zip(buckets, pending)):
            work.wait()
            block = math.ceil(len(params) / world_size)
            for r in range(world_size):
                owned = params[((r - b) % world_size) * block:][:block]
                for p, value in zip(owned, gathered[r]):
                    p.copy_(value)

    def state_dict(self):
        state = super().state_dict()
        state["dist"] = {"rank": self.rank, "world_size": self.world_size}
        return state

    def load_state_dict(self, state_dict):
        state_dict = dict(state_dict)
        saved = state_dict.pop("dist", None)
        here = {"rank": self.rank, "world_size": self.world_size}
        if saved is not None and saved != here:
            raise ValueError(f"DistMuon state was saved by rank {saved['rank']} of {saved['world_size']} but is "
                             f"being loaded on rank {self.rank} of {self.world_size}; each rank owns different "
                             f"params, so resume with the same number of processes and each rank's own file")
        super().load_state_dict(state_dict)


def make_adamw(param_groups, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.0):
    """AdamW for embeddings, lm_head and 1-D params. Extra group keys (e.g. "initial_lr") are kept."""
    param_groups = list(param_groups)
    if param_groups and isinstance(param_groups[0], dict):
        param_groups = [{**g, "params": list(g["params"])} for g in param_groups]
        params = [p for g in param_groups for p in g["params"]]
    else:
        params = param_groups
    fused = len(params) > 0 and all(p.device.type == "cuda" for p in params)
    return torch.optim.AdamW(param_groups, betas=betas, eps=eps, weight_decay=weight_decay,
                             fused=fused or None, foreach=None if fused else True)
