"""
Alcoholic: a Qwen3-style model in nanochat's frame.
- SwiGLU MLP (gate/up/down) with a configurable intermediate size (relu^2 up/down optional)
- learnable RMSNorm (or LayerNorm without bias) before attention and MLP, after the token embedding
  (embed_norm) and before the lm_head (model.norm)
- optional learnable per-head QK norm, applied before rotary (Qwen3's order; nanochat's GPT norms after)
- rotary embeddings with a configurable base (1e6 by default, for longer contexts)
- GQA, no biases, untied embeddings, optional dropout and logit softcap
Parameter names follow transformers' Qwen3 so that export is a renaming. The extra embed_norm folds into the
embedding table on export: a norm of a looked-up row depends on the token id only. A Qwen3 imported from
transformers has no such norm: embed_norm=False leaves it out (Qwen3Mapping).
"""

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanochat.models.base import (
    BaseLM,
    RMSNorm,
    Rotary,
    apply_rotary_emb,
    attention,
    embedding,
    heads_for_width,
)
from nanochat.models.hf_mapping import HFMapping
from nanochat.models.spec import ModelSpec
from nanochat.ops import fused_linear, relu_squared

NORM_TYPES = ("rmsnorm", "layernorm")
MLP_TYPES = ("swiglu", "relu2")


@dataclass
class AlcoholicNanoConfig:
    sequence_len: int = 2048
    vocab_size: int = 65536
    n_layer: int = 20
    n_head: int = field(default=16, metadata={"help": "number of query heads"})
    n_kv_head: int = field(default=8, metadata={"help": "number of key/value heads (default about n_head / 2)"})
    n_embd: int = field(default=1280, metadata={"help": "width (default 64 * depth)"})
    intermediate_size: int = field(default=5120, metadata={"help": "MLP hidden width (default 4 * n_embd)"})
    rope_theta: float = field(default=1_000_000.0, metadata={"help": "rotary base; larger suits longer contexts"})
    qk_norm: bool = field(default=True, metadata={"help": "learnable RMSNorm of queries and keys, before rotary"})
    norm_type: str = field(default="rmsnorm", metadata={"help": f"one of {NORM_TYPES}"})
    mlp_type: str = field(default="swiglu", metadata={"help": f"one of {MLP_TYPES}"})
    dropout: float = field(default=0.0, metadata={"help": "dropout on attention and residual branches (training)"})
    head_dim: int | None = field(default=None, metadata={
        "help": "channels per head (default n_embd / n_head); any even value, attention width n_head * head_dim"})
    norm_eps: float = field(default=1e-6, metadata={"help": "epsilon of every norm"})
    logit_softcap: float | None = field(default=None, metadata={"help": "squash logits into [-c, c] (default off)"})
    qk_norm_after_rope: bool = field(default=False, metadata={
        "help": "norm queries and keys after rotary (nanochat's GPT order) instead of before it (Qwen3's)"})
    final_norm: bool = field(default=True, metadata={"help": "the output norm before the lm_head"})
    embed_norm: bool = field(default=True, metadata={
        "help": "norm after the token embedding; False for a plain Qwen3 (imported from transformers)"})

    def __post_init__(self):
        for name in ("sequence_len", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd", "intermediate_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"AlcoholicNanoConfig.{name} must be a positive int, got {value!r}")
        if self.n_head % self.n_kv_head != 0:
            raise ValueError(f"AlcoholicNanoConfig: n_head={self.n_head} must be a multiple of "
                             f"n_kv_head={self.n_kv_head} (each key/value head serves n_head/n_kv_head query heads)")
        if self.head_dim is None and self.n_embd % self.n_head != 0:
            raise ValueError(f"AlcoholicNanoConfig: n_embd={self.n_embd} is not divisible by n_head={self.n_head}; "
                             f"change n_head or set head_dim explicitly")
        head_dim = self.head_dim if self.head_dim is not None else self.n_embd // self.n_head
        if not isinstance(head_dim, int) or head_dim <= 0 or head_dim % 2 != 0:
            raise ValueError(f"AlcoholicNanoConfig: head_dim={head_dim} must be a positive even int "
                             f"(rotary rotates pairs of channels)")
        if self.norm_type not in NORM_TYPES:
            raise ValueError(f"AlcoholicNanoConfig: unknown norm_type={self.norm_type!r}; supported: {NORM_TYPES}")
        if self.mlp_type not in MLP_TYPES:
            raise ValueError(f"AlcoholicNanoConfig: unknown mlp_type={self.mlp_type!r}; supported: {MLP_TYPES}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"AlcoholicNanoConfig: dropout={self.dropout} must be in [0, 1)")
        for name in ("rope_theta", "norm_eps", "logit_softcap"):  # dropout is checked above (nan fails the range)
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"AlcoholicNanoConfig: {name}={value!r} must be a finite number > 0"
                                 + (" or None" if name == "logit_softcap" else ""))


def config_from_depth(depth, max_seq_len, vocab_size, **overrides):
    """Same width and heads as GPT at each depth (so the two compare fairly); half as many key/value heads
    (the largest divisor of n_head that is <= n_head // 2) and a 4x intermediate size. `head_dim` sets
    n_head = n_embd/head_dim, as for GPT."""
    n_embd = overrides.pop("n_embd", 64 * depth)
    head_dim = overrides.pop("head_dim", 128)
    n_head = overrides.pop("n_head", None) or heads_for_width(n_embd, head_dim)
    n_kv_head = max([d for d in range(1, max(1, n_head // 2) + 1) if n_head % d == 0])
    kwargs = dict(sequence_len=max_seq_len, vocab_size=vocab_size, n_layer=depth, n_head=n_head,
                  n_kv_head=n_kv_head, n_embd=n_embd, intermediate_size=4 * n_embd)
    return AlcoholicNanoConfig(**{**kwargs, **overrides})


# -----------------------------------------------------------------------------
# Hugging Face transformers: Alcoholic with the default settings is transformers' `qwen3` (Qwen3ForCausalLM)


class Qwen3Mapping(HFMapping):
    """Same parameter names. Our input norm (embed_norm) folds into the embedding table on export; an imported
    Qwen3 gets embed_norm=False. Settings Qwen3 does not have are refused."""

    hf_type, hf_class = "qwen3", "Qwen3ForCausalLM"

    def export_refusals(self, config, ignore_dropout=False):
        c, reasons = config, []
        if c.logit_softcap is not None:
            reasons.append(f"logit_softcap={c.logit_softcap} (Qwen3 has no logit softcap)")
        if c.norm_type != "rmsnorm":
            reasons.append(f"norm_type={c.norm_type!r} (Qwen3's norms are RMSNorm)")
        if c.mlp_type != "swiglu":
            reasons.append(f"mlp_type={c.mlp_type!r} (Qwen3's MLP is SwiGLU)")
        if not c.qk_norm:
            reasons.append("qk_norm=False (Qwen3 always norms queries and keys)")
        if c.qk_norm_after_rope:
            reasons.append("qk_norm_after_rope=True (Qwen3 norms queries and keys before rotary)")
        if not c.final_norm:
            reasons.append("final_norm=False (Qwen3 always norms before the lm_head)")
        if c.dropout > 0 and not ignore_dropout:
            reasons.append(f"dropout={c.dropout} (a training setting, off at inference; Qwen3 only drops attention "
                           f"probabilities, not the residual branches, so fine-tuning would differ; pass "
                           f"--ignore_dropout to export the inference model, with dropout 0)")
        return reasons

    def hf_config(self, config, token_ids):
        import transformers

        c = config
        return transformers.Qwen3Config(
            **self.shape_to_hf(c), intermediate_size=c.intermediate_size, head_dim=c.head_dim or c.n_embd // c.n_head,
            hidden_act="silu", rms_norm_eps=c.norm_eps, use_sliding_window=False,
            rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta}, **token_ids)

    def state_dict_to_hf(self, model):
        sd = dict(model.state_dict())
        if model.config.embed_norm:  # the norm of a looked-up row depends only on the token: fold it into the table
            del sd["model.embed_norm.weight"]
            sd["model.embed_tokens.weight"] = model.model.embed_norm(sd["model.embed_tokens.weight"])
        return sd

    def import_refusals(self, hf_cfg):
        c, reasons = hf_cfg, super().import_refusals(hf_cfg)
        if c.hidden_act not in ("silu", "swish"):  # the same function
            reasons.append(f"hidden_act={c.hidden_act!r} (Alcoholic's SwiGLU uses silu)")
        if getattr(c, "sliding_window", None) is not None or any(t != "full_attention" for t in c.layer_types or []):
            reasons.append("sliding-window attention layers (ours attend to the full context)")
        return reasons

    def config_from_hf(self, hf_cfg):
        c = hf_cfg
        head_dim = c.head_dim or c.hidden_size // c.num_attention_heads
        return AlcoholicNanoConfig(
            **self.shape_from_hf(c), intermediate_size=c.intermediate_size,
            rope_theta=float(c.rope_parameters["rope_theta"]), norm_eps=c.rms_norm_eps,
            head_dim=None if head_dim == c.hidden_size // c.num_attention_heads else head_dim,
            embed_norm=False)  # a plain Qwen3 has no input norm


# -----------------------------------------------------------------------------
# The model


def make_norm(config, dim):
    if config.norm_type == "layernorm":
        return nn.LayerNorm(dim, eps=config.norm_eps, bias=False)
    return RMSNorm(dim, eps=config.norm_eps)


class Attention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head = config.n_head, config.n_kv_head
        self.head_dim = config.head_dim or config.n_embd // config.n_head
        self.dropout = config.dropout  # on the attention probabilities
        self.qk_norm, self.qk_norm_after_rope = config.qk_norm, config.qk_norm_after_rope
        self.q_proj = nn.Linear(config.n_embd, self.n_head * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_head * self.head_dim, config.n_embd, bias=False)
        if config.qk_norm:  # per head, over head_dim: one weight vector shared by all heads (Qwen3)
            self.q_norm = make_norm(config, self.head_dim)
            self.k_norm = make_norm(config, self.head_dim)

    def forward(self, x, cos_sin, kv_cache):
        B, T, C = x.size()
        q, k, v = fused_linear(x, (self.q_proj, self.k_proj, self.v_proj))
        q = q.view(B, T, self.n_head, self.head_dim)
        k = k.view(B, T, self.n_kv_head, self.head_dim)
        v = v.view(B, T, self.n_kv_head, self.head_dim)
        if self.qk_norm and not self.qk_norm_after_rope:
            q, k = self.q_norm(q), self.k_norm(k)  # before rotary, as Qwen3
        q, k = apply_rotary_emb(q, *cos_sin), apply_rotary_emb(k, *cos_sin)
        if self.qk_norm and self.qk_norm_after_rope:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, T, H, D) -> (B, H, T, D)
        if kv_cache is not None:
            k, v = kv_cache.insert_kv(self.layer_idx, k, v)
        mask = None if kv_cache is None else kv_cache.attn_mask  # set in a fixed-shape decode step only
        y = attention(q, k, v, dropout_p=self.dropout if self.training else 0.0, mask=mask)
        y = y.transpose(1, 2).contiguous().view(B, T, -1)
        return self.o_proj(y)


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.mlp_type = config.mlp_type
        if config.mlp_type == "swiglu":
            self.gate_proj = nn.Linear(config.n_embd, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.n_embd, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.n_embd, bias=False)

    def forward(self, x):
        if self.mlp_type == "swiglu":
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(relu_squared(self.up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.dropout = config.dropout  # on the residual branches
        self.input_layernorm = make_norm(config, config.n_embd)  # attn_norm
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = make_norm(config, config.n_embd)  # mlp_norm
        self.mlp = MLP(config)

    def drop(self, y):
        return F.dropout(y, self.dropout, self.training) if self.dropout > 0 else y

    def forward(self, x, cos_sin, kv_cache):
        x = x + self.drop(self.self_attn(self.input_layernorm(x), cos_sin, kv_cache))
        x = x + self.drop(self.mlp(self.post_attention_layernorm(x)))
        return x


class Alcoholic(BaseLM):
    model_type = "alcoholic"
    fixed_shape_decode = True

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.head_dim = config.head_dim or config.n_embd // config.n_head
        self.logit_softcap = config.logit_softcap
        self.model = nn.ModuleDict({
            "embed_tokens": embedding(config.vocab_size, config.n_embd),
            **({"embed_norm": make_norm(config, config.n_embd)} if config.embed_norm else {}),  # input norm
            "layers": nn.ModuleList([DecoderLayer(config, i) for i in range(config.n_layer)]),
            **({"norm": make_norm(config, config.n_embd)} if config.final_norm else {}),  # output norm
        })
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.rotary = Rotary(self.head_dim, config.sequence_len * 10, theta=config.rope_theta)

    @torch.no_grad()
    def init_weights(self):
        """
        embed_tokens:                         normal, std 1 (normalised right away; Adam's lr is tuned for this)
        lm_head:                              normal, std 0.001
        q/k/v_proj, gate/up_proj:             uniform, std 1/sqrt(fan_in)
        o_proj, down_proj:                    zeros (every block starts as the identity)
        norm weights:                         ones
        """
        nn.init.normal_(self.model.embed_tokens.weight, mean=0.0, std=1.0)
        nn.init.normal_(self.lm_head.weight, mean=0.0, std=0.001)
        for layer in self.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            for lin in (attn.q_proj, attn.k_proj, attn.v_proj, mlp.up_proj, getattr(mlp, "gate_proj", None)):
                if lin is not None:
                    s = 3**0.5 * lin.in_features**-0.5  # a uniform on [-s, s] has std 1/sqrt(fan_in)
                    nn.init.uniform_(lin.weight, -s, s)
            nn.init.zeros_(attn.o_proj.weight)
            nn.init.zeros_(mlp.down_proj.weight)
        for m in self.modules():
            if isinstance(m, (RMSNorm, nn.LayerNorm)):
                nn.init.ones_(m.weight)
        self.rotary.reset()

    def forward(self, idx, targets=None, kv_cache=None, loss_reduction="mean"):
        B, T = idx.size()
        t0 = 0 if kv_cache is None else kv_cache.get_pos()  # decoding continues at the cache's position
        cos_sin = self.rotary(t0, T)
        x = self.model.embed_tokens(idx)
        if self.config.embed_norm:
            x = self.model.embed_norm(x)
        for layer in self.model.layers:
            x = self.run_block(layer, x, cos_sin, kv_cache)
        if self.config.final_norm:
            x = self.model.norm(x)
        return self.logits_or_loss(x, targets, loss_reduction)


SPEC = ModelSpec(
    AlcoholicNanoConfig, Alcoholic, config_from_depth,
    mlp_width_field="intermediate_size",
    # the model-selection guide's d20 config, as written there
    presets={"guide_d20": AlcoholicNanoConfig(
        sequence_len=2048, vocab_size=65536, n_layer=20, n_head=16, n_kv_head=8, n_embd=1280, intermediate_size=5120,
        rope_theta=1_000_000.0, qk_norm=True, norm_type="rmsnorm", mlp_type="swiglu", dropout=0.0)},
    memory_advice=("Alcoholic uses more memory than GPT at the same depth: SwiGLU keeps three MLP activations per "
                   "layer for the backward pass where ReLU² keeps two."),
    hf=Qwen3Mapping(),
    # scripts.compare --ablate: one of Alcoholic's choices switched to GPT's at a time (a value may be a function of
    # the config at the run's depth)
    ablations={
        "relu2": {"mlp_type": "relu2"},  # the ReLU² MLP for SwiGLU
        "rope10k": {"rope_theta": 10_000.0},  # GPT's RoPE base for 1,000,000
        "qknorm_after_rope": {"qk_norm_after_rope": True},  # QK norm after RoPE, as GPT, not before
        "no_io_norms": {"embed_norm": False, "final_norm": False},  # no input/output norms
        "mha": {"n_kv_head": lambda config: config.n_head},  # n_kv_head = n_head: no grouped-query attention
    },
)
