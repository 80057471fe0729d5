"""
Optimizers: Muon for the 2-D matrices inside the transformer blocks, AdamW for everything else.

Muon (MomentUm Orthogonalized by Newton-Schulz, https://kellerjordan.github.io/posts/muon/) runs SGD with
Nesterov momentum and replaces each update by (approximately) its nearest semi-orthogonal matrix, so every
direction of the update moves at a similar rate.

Two variants (`--muon_variant`):
- classic: Keller Jordan's fixed quintic Newton-Schulz coefficients, no weight decay on the matrices.
- nanochat: what nanochat's Muon does since January 2026:
  Polar Express coefficients (https://arxiv.org/abs/2505.16932), a quintic per iteration chosen to get the
  singular values to 1 as fast as possible;
  NorMuon (https://arxiv.org/abs/2510.05491), an Adam-like second moment per row (or column) of the orthogonalised
  update that evens out the step size across neurons, rescaled so the update keeps its norm;
  cautious weight decay (https://arxiv.org/abs/2510.12402), which decays only the entries where the update and the
  parameter have the same sign, i.e. where decay and update pull the same way.

DistMuon is the same optimizer for torch.distributed: the training loop has already averaged the gradients
(every rank holds identical grads), so each rank orthogonalises only its share of the matrices and the new
values are all-gathered. The result equals single-process Muon.
"""

import math

import torch
import torch.distributed as dist

# Keller Jordan's coefficients: the steepest slope at zero that still keeps every singular value in ~[0.7, 1.2]
NEWTON_SCHULZ_COEFFS = (3.4445, -4.7750, 2.0315)
# Polar Express, one (a, b, c) per iteration (computed in the paper for 5 iterations, safety factor 2e-2 and
# cushion 2, as nanochat): the early steps lift tiny singular values fast, the late ones converge them onto 1
POLAR_EXPRESS_COEFFS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)


def _quintic_iteration(G, coeffs, dtype, norm_scale):
    """X <- a X + (b A + c A^2) X with A = X X^T, one (a, b, c) per step, on (..., m, n) batches."""
    assert G.ndim >= 2, f"orthogonalisation needs a (..., m, n) tensor, got shape {tuple(G.shape)}"
    if dtype is None:
        # bf16 on CUDA (fast tensor cores), fp32 elsewhere (bf16 matmuls are far slower on CPU)
        dtype = torch.bfloat16 if G.device.type == "cuda" else torch.float32
    X = G.to(dtype)
    tall = G.size(-2) > G.size(-1)
    if tall:
        X = X.mT  # iterate on the wide orientation so X @ X^T is the smaller Gram matrix
    # Frobenius norm >= spectral norm, so this puts every singular value in [0, 1] where the iteration converges
    X = X / (X.norm(dim=(-2, -1), keepdim=True) * norm_scale + 1e-7)
    shape = X.shape
    X = X.reshape(-1, *shape[-2:])  # one batch dim, for baddbmm
    # the Gram form pays off from an aspect ratio of ~1.5 (in FLOPs); 2 leaves room for its smaller GEMMs' lower speed
    gram = X.dtype == torch.float32 and X.size(-1) >= 2 * X.size(-2)
    X = (_gram_iteration if gram else _plain_iteration)(X, coeffs).reshape(shape)
    if tall:
        X = X.mT
    return X


def _plain_iteration(X, coeffs):
    """The quintic iteration on a wide (batch, m, n) X, normalised already."""
    for a, b, c in coeffs:
        A = X @ X.mT
        B = torch.baddbmm(A, A, A, beta=b, alpha=c)  # b*A + c*A@A, the scaling and sum inside the GEMM
        X = torch.baddbmm(X, B, X, beta=a)  # a*X + B@X
    return X


def _gram_iteration(X, coeffs):
    """
    The same iteration on the m x m Gram matrix of a wide (batch, m, n) X (Gram Newton-Schulz, Dao AI Lab 2026):
    every X_k is Q_k X_0 with Q_k a polynomial in R_0 = X_0 X_0^T, so iterate Q_{k+1} = Q_k P_k and
    R_{k+1} = P_k R_k P_k with P_k = a I + b R_k + c R_k^2, and multiply by X_0 once at the end. All of them
    commute, so this equals the plain iteration up to rounding; it costs 2 m^2 n + ~17 m^3 multiply-adds
    against 5 (2 m^2 n + m^3). Used in fp32 only, where rounding stays at the plain iteration's level (in half
    precision the Gram form needs restarts to stay stable).
    """
    R = X @ X.mT
    Q = None
    for i, (a, b, c) in enumerate(coeffs):
        Z = torch.baddbmm(R, R, R, beta=b, alpha=c)  # P_k - a I
        if Q is None:  # Q_1 = P_0
            Q = Z.clone()
            Q.diagonal(dim1=-2, dim2=-1).add_(a)
        else:
            Q = torch.baddbmm(Q, Q, Z, beta=a)  # Q P_k
        if i < len(coeffs) - 1:
            RZ = torch.baddbmm(R, R, Z, beta=a)  # R P_k
            R = torch.baddbmm(RZ, Z, RZ, beta=a)  # P_k R P_k
    return Q @ X


def zeropower_via_newtonschulz5(G, steps=5, dtype=None):
    """
    Approximate U V^T for G = U S V^T with a quintic Newton-Schulz iteration; works on (..., m, n) batches.
    The coefficients maximise the slope at zero instead of converging exactly, so the singular values end up
    spread around 1 (roughly 0.7-1.2) rather than equal to 1, which does not hurt training and needs fewer steps.
    Computes in bf16 on CUDA and fp32 elsewhere; `dtype` overrides. Returns the result in the compute dtype.
    """
    return _quintic_iteration(G, [NEWTON_SCHULZ_COEFFS] * steps, dtype, norm_scale=1.0)


def zeropower_via_polar_express(G, steps=5, dtype=None):
    """
    Approximate U V^T like zeropower_via_newtonschulz5, with the Polar Express schedule of coefficients: after 5
    steps the singular values lie within ~15% of 1 even for ill-conditioned inputs, where the fixed coefficients
    leave 0.7-1.2 or worse. Steps beyond the schedule repeat its last, most conservative, polynomial.
    """
    coeffs = [POLAR_EXPRESS_COEFFS[min(i, len(POLAR_EXPRESS_COEFFS) - 1)] for i in range(steps)]
    # the coefficients assume the spectral norm is at most 1 with a 1% margin (the paper's safety factor)
    return _quintic_iteration(G, coeffs, dtype, norm_scale=1.01)


def normuon_scale(update, second_moment, beta2):
    """
    NorMuon: divide each row of the orthogonalised `update` (..., m, n) (each column, if it is wide) by the root of
    its running mean square, then rescale to the Frobenius norm the update had. `second_moment`, the (..., m, 1) or
    (..., 1, n) running mean, is updated in place. Muon's output gives some neurons larger steps than others; this
    evens them out the way Adam does per weight, for one number per neuron.
    """
    dim = -1 if update.size(-2) >= update.size(-1) else -2  # one value per row, or per column of a wide matrix
    second_moment.lerp_(update.square().mean(dim=dim, keepdim=True), 1 - beta2)
    scaled = update * second_moment.clamp_min(1e-10).rsqrt()
    # keeping the norm keeps Muon's step size (and the lr), and cancels the buffer's bias towards its initial 0
    return scaled * (update.norm(dim=(-2, -1), keepdim=True) / scaled.norm(dim=(-2, -1), keepdim=True).clamp_min(1e-10))


# what each --muon_variant turns on; weight_decay is per unit of learning rate (decoupled, as AdamW)
MUON_VARIANTS = {
    "classic": dict(polar_express=False, normuon_beta2=None, weight_decay=0.0, cautious=False),
    # beta2 0.95 and weight decay 0.2 (at width 768; models/base.py scales it) as nanochat when it adopted them
    "nanochat": dict(polar_express=True, normuon_beta2=0.95, weight_decay=0.2, cautious=True),
}


class Muon(torch.optim.Optimizer):
    """
    Muon for 2-D parameters only (embeddings, the lm_head and 1-D params belong to AdamW).
    Matrices of the same shape are orthogonalised together in one batched call.
    variant: a key of MUON_VARIANTS. weight_decay: None = the variant's; it is applied as lr * weight_decay * p
    (cautiously, only where update and parameter agree in sign, in the nanochat variant).
    """

    def __init__(self, params, lr=0.02, momentum=0.95, nesterov=True, ns_steps=5, variant="classic", weight_decay=None):
        if variant not in MUON_VARIANTS:
            raise ValueError(f"unknown Muon variant {variant!r}; choose one of {', '.join(MUON_VARIANTS)}")
        if weight_decay is None:
            weight_decay = MUON_VARIANTS[variant]["weight_decay"]
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps, variant=variant,
                        weight_decay=weight_decay)
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

    def _momentum_directions(self, params, group):
        """Update the params' momentum buffers with their grads and return the (Nesterov) directions to
        orthogonalise. foreach ops: one dispatch for all the params of a shape, not one each."""
        grads = [p.grad for p in params]
        for p in params:
            if "momentum_buffer" not in self.state[p]:
                self.state[p]["momentum_buffer"] = torch.zeros_like(p.grad)
        bufs = [self.state[p]["momentum_buffer"] for p in params]
        momentum = group["momentum"]
        torch._foreach_lerp_(bufs, grads, 1 - momentum)  # buf = momentum * buf + (1 - momentum) * g
        return torch._foreach_lerp(grads, bufs, momentum) if group["nesterov"] else bufs

    def _normuon(self, params, update, beta2):
        """NorMuon on a batch of same-shape updates, with each param's own second-moment buffer."""
        rows, cols = params[0].shape
        shape = (rows, 1) if rows >= cols else (1, cols)
        for p in params:
            if "second_moment" not in self.state[p]:
                self.state[p]["second_moment"] = torch.zeros(shape, dtype=torch.float32, device=p.device)
        second_moment = torch.stack([self.state[p]["second_moment"] for p in params])
        update = normuon_scale(update.float(), second_moment, beta2)
        for p, s in zip(params, second_moment):
            self.state[p]["second_moment"].copy_(s)
        return update

    def _update_(self, params, group):
        """Apply one Muon step in place to same-shape params (all with grads), orthogonalising them as a batch."""
        variant = MUON_VARIANTS[group["variant"]]
        g = torch.stack(self._momentum_directions(params, group))
        orthogonalise = zeropower_via_polar_express if variant["polar_express"] else zeropower_via_newtonschulz5
        update = orthogonalise(g, steps=group["ns_steps"])
        if variant["normuon_beta2"] is not None:
            update = self._normuon(params, update, variant["normuon_beta2"])
        rows, cols = params[0].shape
        # an orthogonal update of a tall matrix has a smaller RMS per entry; scale it back up (as nanochat)
        lr = group["lr"] * math.sqrt(max(1.0, rows / cols))
        wd = group["weight_decay"]
        update = list(update.to(params[0].dtype).unbind(0))
        if wd:
            for p, u in zip(params, update):
                # cautious: no decay where the update pushes the weight away from 0, which decay would fight
                decay = p * (p * u >= 0) if variant["cautious"] else p
                p.sub_(decay, alpha=lr * wd)
        torch._foreach_add_(params, update, alpha=-lr)

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
    contiguous blocks; each rank owns one block, keeps momentum (and NorMuon) state only for it, orthogonalises
    it, and an all_gather gives every rank every new value. Block ownership rotates from one shape group to the
    next so that small groups do not all land on rank 0. state_dict() therefore holds only this rank's state:
    save and load it per rank, with the same world size.
    """

    def __init__(self, params, lr=0.02, momentum=0.95, nesterov=True, ns_steps=5, variant="classic", weight_decay=None):
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("DistMuon needs an initialized torch.distributed process group "
                               "(launch with torchrun, which compute_init() joins); use Muon for a single process")
        super().__init__(params, lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps, variant=variant,
                         weight_decay=weight_decay)
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
