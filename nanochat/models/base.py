"""
What every model shares: norms, rotary embeddings, the KV cache, the attention call, and BaseLM, which holds
the methods that do not depend on the architecture (loss, generate, optimizers, FLOPs, parameter groups).
A model file then only holds its config, its blocks, __init__, init_weights and forward, and, to export to and
import from Hugging Face transformers, an HFMapping.
"""

import math
import warnings

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from nanochat.common import print0
from nanochat.optim import MUON_VARIANTS, DistMuon, Muon, make_adamw

# -----------------------------------------------------------------------------
# Norms


# F.rms_norm's default eps is the machine epsilon of the op's math type: fp32's for fp32 and bf16 inputs. Naming it
# keeps that function in fp64 too (tests compare computations there), where the default would be fp64's.
FP32_EPS = torch.finfo(torch.float32).eps


def at_least_fp32(x):
    """bf16/fp16 -> fp32; fp32 and fp64 stay as they are."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def norm(x):
    """Parameter-free RMSNorm (nanochat's GPT)."""
    return F.rms_norm(x, (x.size(-1),), eps=FP32_EPS)


class RMSNorm(nn.Module):
    """Learnable RMSNorm (Qwen3's): normalise in fp32 whatever the input dtype, then scale by a weight (init 1)."""

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def reset_parameters(self):
        nn.init.ones_(self.weight)

    def forward(self, x):
        # at least fp32 (bf16 inputs are normalised in fp32, fp64 ones stay fp64); the result goes back to the input
        # dtype so that k and v (and the KV cache) share one dtype under autocast
        y = F.rms_norm(at_least_fp32(x), (x.size(-1),), at_least_fp32(self.weight), self.eps)
        return y.to(x.dtype)

    def extra_repr(self):
        return f"{self.weight.numel()}, eps={self.eps}"


# -----------------------------------------------------------------------------
# Activations


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


# -----------------------------------------------------------------------------
# Rotary position embeddings (https://arxiv.org/abs/2104.09864)


def apply_rotary_emb(x, cos, sin):
    """
    Rotate x of shape (B, T, H, D) with tables of shape (1, T, 1, D/2), in the Hugging Face / Qwen convention:
    split the head into halves (x1, x2), y1 = x1*cos - x2*sin, y2 = x2*cos + x1*sin.
    nanochat's GPT uses y1 = x1*cos + x2*sin, y2 = x2*cos - x1*sin, which is the same formula with sin negated,
    i.e. a rotation by the opposite angle; GPT therefore builds its tables with negate_sin=True.
    """
    assert x.ndim == 4, f"apply_rotary_emb expects (B, T, H, D), got shape {tuple(x.shape)}"
    d = x.shape[3] // 2
    x1, x2 = x[..., :d], x[..., d:]
    if cos.dtype != x.dtype:  # tables are kept in fp32; rotate in the activations' dtype
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=3)


def embedding(num_embeddings, embedding_dim):
    """nn.Embedding without its default normal_ init, which init_weights() replaces anyway: on the meta device
    normal_ is a Python reference op whose first call imports torch._dynamo (~1.2 s of every process start)."""
    return nn.Embedding(num_embeddings, embedding_dim, _weight=torch.empty(num_embeddings, embedding_dim))


def rotary_tables(seq_len, head_dim, theta, negate_sin=False, device=None):
    """cos and sin of shape (1, seq_len, 1, head_dim/2), computed in fp32."""
    assert head_dim % 2 == 0, f"rotary embeddings need an even head_dim, got {head_dim}"
    channels = torch.arange(0, head_dim, 2, dtype=torch.float32, device=device)
    inv_freq = 1.0 / (theta ** (channels / head_dim))
    t = torch.arange(seq_len, dtype=torch.float32, device=device)
    freqs = torch.outer(t, inv_freq)
    cos, sin = freqs.cos(), freqs.sin()
    if negate_sin:
        sin = -sin
    return cos[None, :, None, :], sin[None, :, None, :]


class Rotary(nn.Module):
    """
    Cached rotary tables. They are cheap, so seq_len (10x the training context, as nanochat) is precomputed;
    asking for positions beyond that recomputes larger tables with a warning instead of failing.
    Buffers are not persistent: they are never saved in checkpoints, and init_weights() recomputes them
    (a model built on the meta device and moved with to_empty() holds garbage until then).
    """

    def __init__(self, head_dim, seq_len, theta, negate_sin=False):
        super().__init__()
        self.head_dim, self.theta, self.negate_sin = head_dim, theta, negate_sin
        # computed on the CPU, then moved, even under torch.device("meta"): meta arange runs as a Python reference
        # op, and the first of those imports torch._dynamo (~1.2 s of every process start)
        cos, sin = rotary_tables(seq_len, head_dim, theta, negate_sin, device="cpu")
        self.register_buffer("cos", cos.to(torch.get_default_device()), persistent=False)
        self.register_buffer("sin", sin.to(torch.get_default_device()), persistent=False)

    def reset(self, seq_len=None):
        seq_len = seq_len or self.cos.size(1)
        self.cos, self.sin = rotary_tables(seq_len, self.head_dim, self.theta, self.negate_sin, self.cos.device)

    def forward(self, start, length):
        """Tables for positions start .. start+length-1. start may be a (1,) tensor (a fixed-shape decode step,
        length 1): then the tables are gathered on the device, with no Python int that would change every step."""
        if isinstance(start, torch.Tensor):
            return self.cos[:, start], self.sin[:, start]
        end = start + length
        if end > self.cos.size(1):
            new_len = max(end, 2 * self.cos.size(1))
            warnings.warn(f"position {end - 1} is beyond the {self.cos.size(1)} precomputed rotary positions; "
                          f"extending the tables to {new_len} (the model was trained on much shorter sequences)",
                          stacklevel=2)
            self.reset(new_len)
        return self.cos[:, start:end], self.sin[:, start:end]


# -----------------------------------------------------------------------------
# KV cache


class KVCache:
    """
    Keys and values of every layer, preallocated: one (B, H_kv, T_max, D) key tensor and one value tensor per layer
    (separate tensors, not views of one: a compiled decode step then writes each in place, where a view of a
    shared buffer makes inductor copy the whole buffer every step). insert_kv() writes the new positions and
    returns views up to them; pos advances after the last layer, so all layers of one forward pass write at the
    same offset. With dtype/device None the tensors are allocated on the first insert, in the dtype and on the
    device of the keys (bf16 under CUDA autocast, fp32 on CPU).
    In a fixed-shape decode step (BaseLM.decode) step_pos holds the position as a (1,) tensor: the new token is
    written there with index_copy_, get_pos() returns that tensor, insert_kv() returns the whole tensors and
    attn_mask says which of their slots are filled, so the step's shapes never change (as gpt-fast's cache).
    """

    def __init__(self, batch_size, num_heads, seq_len, head_dim, num_layers, device=None, dtype=None):
        self.shape = (num_layers, 2, batch_size, num_heads, seq_len, head_dim)
        self.layers = None  # [(k, v)] per layer, each (B, H_kv, T_max, D)
        if device is not None and dtype is not None:
            self._allocate(device, dtype)
        self.device, self.dtype = device, dtype
        self.pos = 0
        self.step_pos = None  # a (1,) long tensor during a fixed-shape decode step, else None
        self.slots = None  # arange(T_max) on the device, for attn_mask
        self._static = None  # the tensors last marked static for CUDA graphs

    def _allocate(self, device, dtype):
        L, _, B, H, T, D = self.shape
        self.layers = [tuple(torch.zeros(B, H, T, D, device=device, dtype=dtype) for _ in range(2)) for _ in range(L)]

    @property
    def batch_size(self):
        return self.shape[2]

    @property
    def seq_len(self):
        return self.shape[4]

    def reset(self):
        self.pos = 0

    def get_pos(self):
        return self.pos if self.step_pos is None else self.step_pos

    @property
    def attn_mask(self):
        """None, except in a fixed-shape decode step: (1, T_max) bool, True for the slots up to the new token."""
        return None if self.step_pos is None else self._mask

    def begin_step(self):
        """Enter a fixed-shape decode step at pos (BaseLM.decode). The position tensor is reused and updated in
        place, so a compiled step (or a CUDA graph) always reads it from the same memory."""
        if self.layers is None:
            raise RuntimeError("a fixed-shape decode step needs a filled KV cache: prefill the prompt first")
        if self.pos >= self.seq_len:
            raise RuntimeError(f"KV cache overflow: all seq_len={self.seq_len} positions are taken; create the "
                               f"cache with a larger seq_len (prompt length + max new tokens)")
        device = self.layers[0][0].device
        if self.slots is None or self.slots.device != device:
            self.slots = torch.arange(self.seq_len, device=device).unsqueeze(0)  # (Tq=1, T_max)
            self._pos = torch.zeros(1, dtype=torch.long, device=device)
            self._mask = torch.zeros(1, self.seq_len, dtype=torch.bool, device=device)
        if device.type == "cuda" and self._static is not self.layers:
            # a CUDA graph may then update these in place (gpt-fast keeps its cache as module buffers for this)
            for t in [t for kv in self.layers for t in kv] + [self._pos, self._mask]:
                torch._dynamo.mark_static_address(t)
            self._static = self.layers
        self._pos.fill_(self.pos)
        torch.le(self.slots, self.pos, out=self._mask)  # once per step, shared by all layers
        self.step_pos = self._pos

    def end_step(self):
        self.step_pos = None
        self.pos += 1

    def insert_kv(self, layer_idx, k, v):
        """k, v: (B, H_kv, T_new, D). Returns (k_all, v_all) of shape (B, H_kv, pos + T_new, D), or the whole
        tensors (B, H_kv, T_max, D) in a fixed-shape decode step."""
        if self.step_pos is not None:
            k_all, v_all = self.layers[layer_idx]
            k_all.index_copy_(2, self.step_pos, k.to(k_all.dtype))
            v_all.index_copy_(2, self.step_pos, v.to(v_all.dtype))
            return k_all, v_all
        B, H, T_new, D = k.shape
        _, _, B0, H0, T_max, D0 = self.shape
        if (B, H, D) != (B0, H0, D0):
            raise ValueError(f"KV cache holds (batch={B0}, kv_heads={H0}, head_dim={D0}) but got keys with "
                             f"(batch={B}, kv_heads={H}, head_dim={D}); build it with model.make_kv_cache()")
        t0, t1 = self.pos, self.pos + T_new
        if t1 > T_max:
            raise RuntimeError(f"KV cache overflow: {t0} cached + {T_new} new positions > seq_len={T_max}; "
                               f"create the cache with a larger seq_len (prompt length + max new tokens)")
        if self.layers is None:
            self._allocate(self.device or k.device, self.dtype or k.dtype)
        k_all, v_all = self.layers[layer_idx]
        k_all[:, :, t0:t1] = k
        v_all[:, :, t0:t1] = v
        if layer_idx == self.shape[0] - 1:
            self.pos = t1
        return k_all[:, :, :t1], v_all[:, :, :t1]

    def expand(self, batch_size):
        """After the prefill of B prompts, repeat each row batch_size // B times, in place (to sample several
        continuations of each prompt; rows stay grouped by prompt). Returns self."""
        B = self.shape[2]
        if batch_size == B:
            return self
        if batch_size % B:
            raise ValueError(f"KVCache.expand repeats each of the {B} prefilled rows the same number of times: "
                             f"batch_size={batch_size} is not a multiple of {B}")
        L, two, _, H, T_max, D = self.shape
        self.shape = (L, two, batch_size, H, T_max, D)
        if self.layers is not None:
            def grown(t):
                new = t.new_zeros(batch_size, H, T_max, D)
                new[:, :, :self.pos] = t[:, :, :self.pos].repeat_interleave(batch_size // B, dim=0)
                return new
            self.layers = [(grown(k), grown(v)) for k, v in self.layers]
        return self


# -----------------------------------------------------------------------------
# Attention


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


def attention(q, k, v, dropout_p=0.0, mask=None):
    """
    q: (B, H, Tq, D); k, v: (B, H_kv, Tk, D) with H a multiple of H_kv (GQA). A mask (True = attend) is used as
    given (a fixed-shape decode step: KVCache.attn_mask); without one, three cases:
    - Tq == Tk: training, or a prefill into an empty cache -> plain causal attention
    - Tq == 1: decoding one token -> it sees every cached position, no mask
    - 1 < Tq < Tk: a chunk appended to a non-empty cache -> the whole prefix plus causal within the chunk
    """
    Tq, Tk = q.size(2), k.size(2)
    if k.dtype != q.dtype:  # a cache allocated in another dtype than the activations
        k, v = k.to(q.dtype), v.to(q.dtype)
    gqa = q.size(1) != k.size(1)
    if mask is not None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, enable_gqa=gqa)
    if Tq == Tk:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p, enable_gqa=gqa)
    if Tq == 1:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, enable_gqa=gqa)
    # query i sits at absolute position Tk - Tq + i and may see keys 0 .. Tk - Tq + i (True = attend)
    mask = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device).tril(diagonal=Tk - Tq)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, enable_gqa=gqa)


# -----------------------------------------------------------------------------
# Sampling


def sample_next_token(logits, rng=None, temperature=1.0, top_k=None, top_p=None):
    """logits (B, V) -> next ids (B, 1). temperature 0 is greedy; top_k keeps the k most likely tokens; top_p keeps
    the smallest set whose probability reaches p (nucleus sampling, Holtzman et al. 2019)."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if temperature == 0.0:
        return torch.argmax(logits, dim=-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None and top_k > 0 and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, sorted_idx = torch.sort(logits, dim=-1, descending=True)
        cumulative = torch.cumsum(F.softmax(sorted_logits, dim=-1), dim=-1)
        # drop a token when the tokens before it already reach top_p; the most likely one always stays, also when
        # top_p is so small (< 1e-45) that it rounds to 0 in float32 and `0 >= top_p` would drop it too
        drop_sorted = (cumulative - F.softmax(sorted_logits, dim=-1)) >= top_p
        drop_sorted[:, 0] = False
        drop = drop_sorted.scatter(-1, sorted_idx, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = F.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=rng)


# -----------------------------------------------------------------------------
# The training loss


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


# -----------------------------------------------------------------------------
# Shapes


def heads_for_width(n_embd, head_dim):
    """nanochat's rule: as many heads of ~head_dim as cover n_embd; the width must split evenly between them."""
    n_head = max(1, math.ceil(n_embd / head_dim))
    if n_embd % n_head != 0 or (n_embd // n_head) % 2 != 0:
        good = [d for d in range(2, n_embd + 1, 2) if n_embd % d == 0]
        raise ValueError(f"n_embd={n_embd} with head_dim={head_dim} gives n_head={n_head}, which does not split "
                         f"n_embd into even-sized heads; pass a head_dim that divides n_embd, e.g. one of {good}, "
                         f"or pick another depth")
    return n_head


# -----------------------------------------------------------------------------
# BaseLM


class BaseLM(nn.Module):
    """
    Shared model interface. Subclasses set model_type, self.config (with n_layer, n_head, n_kv_head, n_embd,
    sequence_len, vocab_size), self.head_dim, self.logit_softcap, self.lm_head, and one nn.Embedding;
    they implement init_weights() and forward(idx, targets=None, kv_cache=None, loss_reduction="mean").
    """

    model_type = None
    logit_softcap = None
    memory_advice = ""  # printed after an out-of-memory error, e.g. why this architecture needs more memory
    presets = {}  # named configs (name -> config), e.g. the d20 configs of the model-selection guide
    hf_mapping = None  # an HFMapping: how this architecture maps onto a transformers model type (None: it does not)
    activation_checkpointing = False  # recompute each block's activations in backward instead of keeping them

    def run_block(self, block, x, cos_sin, kv_cache):
        """One transformer block. With activation_checkpointing, while gradients are recorded, only the block's
        input is kept for backward, where its forward runs again: activation memory drops from every tensor a
        block saves to one (B, T, C) tensor per block, for ~1/3 more compute (one more forward). Non-reentrant
        checkpointing replays dropout with the same random numbers, so the gradients are unchanged."""
        if self.activation_checkpointing and kv_cache is None and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(block, x, cos_sin, kv_cache, use_reentrant=False)
        return block(x, cos_sin, kv_cache)

    def get_device(self):
        return next(self.parameters()).device

    def logits_or_loss(self, x, targets=None, loss_reduction="mean"):
        """Final hidden states (B, T, C) -> fp32 logits (B, T, V), or the cross-entropy loss against targets
        (positions with target -1 are ignored; "none" returns per-token losses of shape (B, T), 0 where ignored).
        "mean" is over the targets that count; with none at all it is 0 with zero gradients, never NaN."""
        fusable = x.device.type in ("cpu", "cuda")  # not on meta (dry runs), nor where autocast is not known
        if targets is not None and loss_reduction in ("mean", "sum") and torch.is_grad_enabled() and fusable:
            # training: fused by chunks, the (B*T, V) logits are never held whole (LinearCrossEntropy)
            loss = LinearCrossEntropy.apply(x.reshape(-1, x.size(-1)), self.lm_head.weight, targets.reshape(-1),
                                            self.logit_softcap or 0.0)
            return loss / (targets != -1).sum().clamp(min=1) if loss_reduction == "mean" else loss
        logits = at_least_fp32(self.lm_head(x))  # fp32 (or fp64) for the softcap and the loss
        if self.logit_softcap:
            logits = self.logit_softcap * torch.tanh(logits / self.logit_softcap)
        if targets is None:
            return logits
        if loss_reduction not in ("mean", "sum", "none"):
            raise ValueError(f"loss_reduction must be 'mean', 'sum' or 'none', got {loss_reduction!r}")
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1,
                               reduction="sum" if loss_reduction == "mean" else loss_reduction)
        if loss_reduction == "mean":
            return loss / (targets != -1).sum().clamp(min=1)
        return loss.view(targets.shape) if loss_reduction == "none" else loss

    # Decoding. A model whose attention reads kv_cache.get_pos() for rotary and passes kv_cache.attn_mask to
    # attention() can take the fixed-shape step that compile_decode() compiles
    fixed_shape_decode = False
    _compiled_step = None

    def decode(self, ids, kv_cache):
        """One new token per row, ids (B, 1), after a prefill of kv_cache -> fp32 logits (B, V); advances the cache.
        Eager, a plain forward over the filled part of the cache (the fastest uncompiled). After compile_decode(),
        a fixed-shape step (KVCache.begin_step): every call has the same shapes, so it is compiled once."""
        if self._compiled_step is None:
            return self.forward(ids, kv_cache=kv_cache)[:, -1]
        if self._frozen_versions is not None and self._frozen_versions != self._param_versions():
            raise RuntimeError("the weights changed after compile_decode() froze them into the compiled CPU decode "
                               "step, which would keep decoding with the old ones; decode without compile_decode(), "
                               "or load the new weights in a fresh process and compile again")
        kv_cache.begin_step()
        try:
            logits = self._compiled_step(ids, kv_cache)
        finally:
            kv_cache.end_step()
        # a CUDA graph writes its next output into the same memory: hand out a copy
        return logits.clone() if logits.is_cuda else logits

    def _fixed_shape_step(self, ids, kv_cache):
        return self.forward(ids, kv_cache=kv_cache)[:, -1]

    _frozen_versions = None

    def _param_versions(self):
        return [p._version for p in self.parameters()]  # every in-place change of a tensor bumps its version

    def compile_decode(self, backend="inductor"):
        """torch.compile the one-token decode step (as gpt-fast): on CUDA with CUDA graphs (mode reduce-overhead),
        which removes the per-kernel launch cost that dominates small batches; on CPU with inductor's freezing,
        which folds the weights into the compiled step as constants (d4, batch 1: 1.1-1.4x the eager step;
        docs/benchmarks.md). Frozen weights cannot change afterwards: decode() refuses once they have. The first
        steps pay the compilation, and again when the cache is expanded to more rows.
        backend="eager" only captures the graph (tests). Returns the model."""
        if self.fixed_shape_decode:
            device = self.get_device().type
            inductor = backend == "inductor"
            kwargs = {}
            if inductor and device == "cuda":
                kwargs["mode"] = "reduce-overhead"
            elif inductor and device == "cpu":
                kwargs["options"] = {"freezing": True}
                self._frozen_versions = self._param_versions()
            self._compiled_step = torch.compile(self._fixed_shape_step, backend=backend, fullgraph=True,
                                                dynamic=False, **kwargs)
        return self

    def make_kv_cache(self, batch_size, seq_len, device=None, dtype=None):
        c = self.config
        return KVCache(batch_size, c.n_kv_head, seq_len, self.head_dim, c.n_layer, device or self.get_device(),
                       dtype)

    def param_groups(self):
        """Every parameter in exactly one of: embedding (nn.Embedding weights), lm_head, norms (all 1-D params,
        i.e. learnable norm weights) and matrices (2-D params inside the blocks)."""
        embedding = [p for m in self.modules() if isinstance(m, nn.Embedding) for p in m.parameters()]
        lm_head = list(self.lm_head.parameters())
        taken = {id(p) for p in embedding + lm_head}
        rest = [(n, p) for n, p in self.named_parameters() if id(p) not in taken]
        odd = [n for n, p in rest if p.ndim > 2]
        assert not odd, f"parameters with more than 2 dims have no optimizer group: {odd}"
        groups = {"embedding": embedding, "lm_head": lm_head, "norms": [p for _, p in rest if p.ndim < 2],
                  "matrices": [p for _, p in rest if p.ndim == 2]}
        ids = [id(p) for ps in groups.values() for p in ps]
        assert len(ids) == len(set(ids)) == len(list(self.parameters())), "a parameter is in no group or in two"
        return groups

    def num_params_by_group(self):
        counts = {name: sum(p.numel() for p in ps) for name, ps in self.param_groups().items()}
        counts["total"] = sum(p.numel() for p in self.parameters())
        return counts

    def estimate_flops(self):
        """FLOPs per token for forward + backward (https://arxiv.org/abs/2204.02311): 6 per non-embedding
        parameter (2 forward, 4 backward) plus attention scores and values over the full context: per layer,
        head and key, 2*D (q.k) + 2*D (p.v) forward, times 3 with backward. The embedding is a lookup, no FLOPs."""
        c = self.config
        nparams = sum(p.numel() for p in self.parameters())
        nparams_embedding = sum(p.numel() for p in self.param_groups()["embedding"])
        return 6 * (nparams - nparams_embedding) + 12 * c.n_layer * c.n_head * self.head_dim * c.sequence_len

    def setup_optimizers(self, unembedding_lr=0.004, embedding_lr=0.2, matrix_lr=0.02, weight_decay=0.0,
                         muon_variant="nanochat", matrix_weight_decay=None):
        """[AdamW for embedding, lm_head and norm weights, Muon for the matrices inside the blocks]. weight_decay is
        AdamW's; Muon's is matrix_weight_decay, None = muon_variant's rule (nanochat.optim.MUON_VARIANTS)."""
        groups = self.param_groups()
        # AdamW learning rates were tuned at width 768 (nanochat); scale them by 1/sqrt(width / 768)
        scale = (self.config.n_embd / 768) ** -0.5
        print0(f"Scaling the LR for the AdamW parameters by 1/sqrt({self.config.n_embd}/768) = {scale:.6f}")
        adam_groups = [
            dict(name="lm_head", params=groups["lm_head"], lr=unembedding_lr * scale),
            dict(name="embedding", params=groups["embedding"], lr=embedding_lr * scale),
            # Norm gains start at 1 and Adam moves every weight by ~lr per step: the embedding's 0.2 would swing
            # them by 20% a step, the small unembedding lr keeps them near 1. No weight decay: it would pull the
            # gains towards 0, i.e. towards switching the normalised signal off.
            dict(name="norms", params=groups["norms"], lr=unembedding_lr * scale, weight_decay=0.0),
        ]
        adamw = make_adamw([g for g in adam_groups if g["params"]], weight_decay=weight_decay)
        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        muon_cls = DistMuon if distributed else Muon
        # nanochat's sweeps (d8-d20) found the best Muon weight decay ~ 1/width^2, given at width 768; extrapolated
        # no further than width 256 (d4, measured in docs/benchmarks.md): at width 64 it would reach lr * wd ~ 0.6
        muon_wd = matrix_weight_decay
        if muon_wd is None:
            muon_wd = MUON_VARIANTS[muon_variant]["weight_decay"] * (768 / max(self.config.n_embd, 256)) ** 2
        muon = muon_cls([dict(name="matrices", params=groups["matrices"])], lr=matrix_lr, momentum=0.95,
                        variant=muon_variant, weight_decay=muon_wd)
        muon.param_groups[0]["initial_weight_decay"] = muon_wd  # the trainer ramps it down to 0 over the run
        optimizers = [adamw, muon]
        for opt in optimizers:
            for group in opt.param_groups:
                group["initial_lr"] = group["lr"]  # the LR scheduler multiplies this
        return optimizers

    @torch.inference_mode()
    def generate(self, tokens, max_tokens, temperature=1.0, top_k=None, seed=42):
        """Sample up to max_tokens continuations of one prompt (list of ids) with a KV cache; yields int ids.
        Dropout stays on if the model is in training mode: call model.eval() first."""
        assert isinstance(tokens, list) and len(tokens) > 0, "tokens must be a non-empty list of ints"
        device = self.get_device()
        rng = None
        if temperature > 0:
            rng = torch.Generator(device=device)
            rng.manual_seed(seed)
        kv_cache = self.make_kv_cache(1, len(tokens) + max_tokens)
        ids = torch.tensor([tokens], dtype=torch.long, device=device)
        logits = self.forward(ids, kv_cache=kv_cache)[:, -1, :]
        for i in range(max_tokens):
            ids = sample_next_token(logits, rng, temperature, top_k)
            yield ids.item()
            if i + 1 < max_tokens:
                logits = self.decode(ids, kv_cache)


# -----------------------------------------------------------------------------
# The mapping onto a Hugging Face transformers model type (nanochat/hf.py does the rest: files, tokenizer)


def rename(key, renames):
    """Apply (old, new) substring renames to a parameter name, in order."""
    for old, new in renames:
        key = key.replace(old, new)
    return key


class HFMapping:
    """
    How one architecture maps onto one transformers model type, exactly or not at all: a config with no exact
    equivalent on the other side is refused with the reasons, never turned into a subtly different model.
    A model class sets `hf_mapping = SomeMapping()`; nanochat/hf.py finds it through the registry, for export
    (model.hf_mapping) and for import (the mapping whose hf_type is the directory's model_type).
    transformers is an optional dependency: import it inside the methods that need it, never at module level.
    """

    hf_type = None  # transformers' model_type, e.g. "qwen3"
    hf_class = None  # the transformers class, e.g. "Qwen3ForCausalLM"
    renames = ()  # (ours, theirs) substring renames of parameter names, in order (reversed for import)
    # theirs: a model with tied embeddings saves no lm_head; import makes one, a copy of the embedding
    embedding_key, lm_head_key = "model.embed_tokens.weight", "lm_head.weight"

    # Export
    def export_refusals(self, config, ignore_dropout=False):
        """Why this config has no exact transformers equivalent ([] if it has one)."""
        return []

    def hf_config(self, config, token_ids):
        """The transformers config of `config`; token_ids: bos/eos/pad token ids (empty without a tokenizer)."""
        raise NotImplementedError

    def state_dict_to_hf(self, model):
        """Our weights under transformers' names."""
        return {rename(k, self.renames): v for k, v in model.state_dict().items()}

    # Import
    def import_refusals(self, hf_cfg):
        """Why this transformers config has no exact equivalent here ([] if it has one). The checks that hold for
        every architecture of ours: plain RoPE, no biases, no attention dropout alone."""
        reasons = []
        rope = hf_cfg.rope_parameters or {}
        if rope.get("rope_type", "default") != "default":
            reasons.append(f"rope_type={rope.get('rope_type')!r} (only plain RoPE, no scaling)")
        if getattr(hf_cfg, "attention_bias", False):
            reasons.append("attention_bias=True (our projections have no biases)")
        if getattr(hf_cfg, "attention_dropout", 0.0):
            reasons.append(f"attention_dropout={hf_cfg.attention_dropout} (ours also drops the residual branches)")
        return reasons

    def config_from_hf(self, hf_cfg):
        """Our config of a transformers config that import_refusals accepted (a ValueError if it does not fit)."""
        raise NotImplementedError

    def state_dict_from_hf(self, sd):
        """transformers' weights (untied already) -> ours."""
        return {rename(k, [(new, old) for old, new in reversed(self.renames)]): v for k, v in sd.items()}

    # What every architecture of ours shares with transformers' decoder configs
    @staticmethod
    def shape_to_hf(config):
        c = config
        return dict(vocab_size=c.vocab_size, hidden_size=c.n_embd, num_hidden_layers=c.n_layer,
                    num_attention_heads=c.n_head, num_key_value_heads=c.n_kv_head,
                    max_position_embeddings=c.sequence_len, attention_bias=False, attention_dropout=0.0,
                    tie_word_embeddings=False)

    @staticmethod
    def shape_from_hf(hf_cfg):
        c = hf_cfg
        return dict(sequence_len=c.max_position_embeddings, vocab_size=c.vocab_size, n_layer=c.num_hidden_layers,
                    n_head=c.num_attention_heads, n_kv_head=c.num_key_value_heads or c.num_attention_heads,
                    n_embd=c.hidden_size)
