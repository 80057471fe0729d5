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

from nanochat.engine import KVCache, compile_decode_step, decode_step, sample_next_token
from nanochat.limits import ROTARY_PRECOMPUTED
from nanochat.log import print0
from nanochat.ops import LinearCrossEntropy, at_least_fp32
from nanochat.optim import MUON_VARIANTS, DistMuon, Muon, make_adamw

# -----------------------------------------------------------------------------
# Norms


# F.rms_norm's default eps is the machine epsilon of the op's math type: fp32's for fp32 and bf16 inputs. Naming it
# keeps that function in fp64 too (tests compare computations there), where the default would be fp64's.
FP32_EPS = torch.finfo(torch.float32).eps


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
    Cached rotary tables for `seq_len` positions (10x the training context, as nanochat): at most ROTARY_PRECOMPUTED
    of them are computed when the model is built (a context declared by a checkpoint or a transformers config costs
    no more than that), the rest when first needed (a forward that reaches them, or a KV cache made for them).
    Positions beyond seq_len are computed too, with a warning instead of a failure.
    Buffers are not persistent: they are never saved in checkpoints, and init_weights() recomputes them
    (a model built on the meta device and moved with to_empty() holds garbage until then).
    """

    def __init__(self, head_dim, seq_len, theta, negate_sin=False):
        super().__init__()
        self.head_dim, self.theta, self.negate_sin = head_dim, theta, negate_sin
        self.max_positions = seq_len  # served without a warning
        n = min(seq_len, ROTARY_PRECOMPUTED)
        device = torch.get_default_device()
        if device.type == "meta":  # shapes only: init_weights() computes the tables once the model has a device
            cos = sin = torch.empty(1, n, 1, head_dim // 2, device=device)
        else:  # computed on the CPU, then moved: meta arange runs as a Python reference op, and the first of those
            # imports torch._dynamo (~1.2 s of every process start)
            cos, sin = (t.to(device) for t in rotary_tables(n, head_dim, theta, negate_sin, device="cpu"))
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def reset(self, seq_len=None):
        seq_len = seq_len or self.cos.size(1)
        self.cos, self.sin = rotary_tables(seq_len, self.head_dim, self.theta, self.negate_sin, self.cos.device)

    def ensure(self, end):
        """Make the tables cover positions 0 .. end-1 (a warning past seq_len: the model never saw such positions)."""
        size = self.cos.size(1)
        if end <= size:
            return
        # doubling (amortised), but no further than max_positions while the positions asked for are within it
        new_len = max(end, 2 * size if end > self.max_positions else min(2 * size, self.max_positions))
        if end > self.max_positions:
            warnings.warn(f"position {end - 1} is beyond the {self.max_positions} precomputed rotary positions (10x "
                          f"the context); extending the tables to {new_len} (the model was trained on much shorter "
                          f"sequences)", stacklevel=3)
        self.reset(new_len)

    def forward(self, start, length):
        """Tables for positions start .. start+length-1. start may be a (1,) tensor (a fixed-shape decode step,
        length 1): then the tables are gathered on the device, with no Python int that would change every step
        (the KV cache made the tables long enough, BaseLM.make_kv_cache)."""
        if isinstance(start, torch.Tensor):
            return self.cos[:, start], self.sin[:, start]
        end = start + length
        self.ensure(end)
        return self.cos[:, start:end], self.sin[:, start:end]


# -----------------------------------------------------------------------------
# Attention


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
# Shapes


def heads_for_width(n_embd, head_dim):
    """nanochat's rule: as many heads of ~head_dim as cover n_embd; the width must split evenly between them."""
    if not (isinstance(head_dim, int) and head_dim > 0 and isinstance(n_embd, int) and n_embd > 0):
        raise ValueError(f"head_dim={head_dim!r} and n_embd={n_embd!r} must be positive integers")
    n_head = max(1, math.ceil(n_embd / head_dim))
    if n_embd % n_head != 0 or (n_embd // n_head) % 2 != 0:
        good = [d for d in range(2, n_embd + 1, 2) if n_embd % d == 0]  # n_embd <= MAX_WIDTH: checked before
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

    # Decoding (nanochat/engine.py). A model whose attention reads kv_cache.get_pos() for rotary and passes
    # kv_cache.attn_mask to attention() can take the fixed-shape step that compile_decode() compiles
    fixed_shape_decode = False

    def decode(self, ids, kv_cache):
        """One new token per row, ids (B, 1), after a prefill of kv_cache -> fp32 logits (B, V); advances the cache
        (engine.decode_step: eager, or the step compile_decode() compiled)."""
        return decode_step(self, ids, kv_cache)

    def compile_decode(self, backend="inductor"):
        """torch.compile the one-token decode step (engine.compile_decode_step). Returns the model."""
        return compile_decode_step(self, backend)

    def make_kv_cache(self, batch_size, seq_len, device=None, dtype=None):
        """A KV cache for seq_len positions; the rotary tables are made to cover them now, before any (compiled)
        decode step reads them."""
        for m in self.modules():
            if isinstance(m, Rotary):
                m.ensure(seq_len)
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
        if temperature > 0:  # (sample_next_token decides when a temperature is greedy)
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
