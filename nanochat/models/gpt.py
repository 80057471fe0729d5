"""
GPT: nanochat's model.
- rotary embeddings (base 10000), no positional embeddings
- QK norm (after rotary)
- untied token embedding and lm_head
- relu^2 activation in a 4x MLP
- norm after the token embedding, parameter-free RMSNorm everywhere
- no biases in linear layers
- Group-Query Attention (GQA) support for more efficient inference
- logits softcapped at 15
Exported to and imported from transformers' `nanochat` model type by a renaming of the weights (NanoChatMapping).
"""

from dataclasses import dataclass, field

import torch
import torch.nn as nn

from nanochat.models.base import (
    FP32_EPS,
    BaseLM,
    Rotary,
    apply_rotary_emb,
    attention,
    embedding,
    heads_for_width,
    norm,
)
from nanochat.models.hf_mapping import HFMapping
from nanochat.models.spec import ModelSpec
from nanochat.ops import fused_linear, relu_squared

SOFTCAP = 15  # logits are squashed smoothly into [-15, 15], which keeps early training stable (as nanochat)
ROPE_THETA = 10000  # nanochat's rotary base
NORM_EPS = FP32_EPS  # the eps of norm(), for transformers' config


@dataclass
class GPTConfig:
    sequence_len: int = 1024
    vocab_size: int = 50304
    n_layer: int = 12
    n_head: int = field(default=6, metadata={"help": "number of query heads"})
    n_kv_head: int = field(default=6, metadata={"help": "number of key/value heads (GQA when < n_head)"})
    n_embd: int = field(default=768, metadata={"help": "width (default 64 * depth)"})

    def __post_init__(self):
        for name in ("sequence_len", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"GPTConfig.{name} must be a positive int, got {value!r}")
        if self.n_embd % self.n_head != 0 or (self.n_embd // self.n_head) % 2 != 0:
            raise ValueError(f"GPTConfig: n_embd={self.n_embd} must split into n_head={self.n_head} heads of even "
                             f"size (rotary rotates pairs of channels); change n_head or n_embd")
        if self.n_head % self.n_kv_head != 0:
            raise ValueError(f"GPTConfig: n_head={self.n_head} must be a multiple of n_kv_head={self.n_kv_head} "
                             f"(each key/value head serves n_head/n_kv_head query heads)")


def config_from_depth(depth, max_seq_len, vocab_size, **overrides):
    """nanochat's scaling: width 64 per layer, heads of ~128 channels. `head_dim` sets n_head = n_embd/head_dim,
    as GPT has no head_dim field."""
    n_embd = overrides.pop("n_embd", 64 * depth)  # aspect ratio 64, as nanochat
    head_dim = overrides.pop("head_dim", 128)
    n_head = overrides.pop("n_head", None) or heads_for_width(n_embd, head_dim)
    kwargs = dict(sequence_len=max_seq_len, vocab_size=vocab_size, n_layer=depth, n_head=n_head, n_kv_head=n_head,
                  n_embd=n_embd)
    return GPTConfig(**{**kwargs, **overrides})


# -----------------------------------------------------------------------------
# Hugging Face transformers: GPT is transformers' `nanochat` (NanoChatForCausalLM), renamed


class NanoChatMapping(HFMapping):
    """Every GPTConfig (GQA included) is a NanoChatConfig; import takes the NanoChat configs that are our GPT."""

    hf_type, hf_class = "nanochat", "NanoChatForCausalLM"
    renames = [("transformer.wte.", "model.embed_tokens."), ("transformer.h.", "model.layers."),
               (".attn.c_q.", ".self_attn.q_proj."), (".attn.c_k.", ".self_attn.k_proj."),
               (".attn.c_v.", ".self_attn.v_proj."), (".attn.c_proj.", ".self_attn.o_proj."),
               (".mlp.c_fc.", ".mlp.fc1."), (".mlp.c_proj.", ".mlp.fc2.")]

    def hf_config(self, config, token_ids):
        import transformers

        # NanoChat's pad_token_id is the padding_idx of its embedding; keep it unset (it only affects training)
        return transformers.NanoChatConfig(
            **self.shape_to_hf(config), intermediate_size=4 * config.n_embd, hidden_act="relu2", rms_norm_eps=NORM_EPS,
            rope_parameters={"rope_type": "default", "rope_theta": float(ROPE_THETA)},
            final_logit_softcapping=float(SOFTCAP), **{**token_ids, "pad_token_id": None})

    def import_refusals(self, hf_cfg):
        c, rope = hf_cfg, hf_cfg.rope_parameters or {}
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        checks = [("hidden_act", c.hidden_act, "relu2"), ("intermediate_size", c.intermediate_size, 4 * c.hidden_size),
                  ("final_logit_softcapping", c.final_logit_softcapping, float(SOFTCAP)),
                  ("rope_theta", rope.get("rope_theta"), float(ROPE_THETA)), ("rms_norm_eps", c.rms_norm_eps, NORM_EPS),
                  ("head_dim", head_dim, c.hidden_size // c.num_attention_heads)]
        return super().import_refusals(hf_cfg) + [f"{name}={found!r} (our GPT has {want!r})"
                                                   for name, found, want in checks if found != want]

    def config_from_hf(self, hf_cfg):
        return GPTConfig(**self.shape_from_hf(hf_cfg))


# -----------------------------------------------------------------------------
# The model


class CausalSelfAttention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head = config.n_head, config.n_kv_head
        self.head_dim = config.n_embd // config.n_head
        self.c_q = nn.Linear(config.n_embd, self.n_head * self.head_dim, bias=False)
        self.c_k = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_v = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)

    def forward(self, x, cos_sin, kv_cache):
        B, T, C = x.size()
        q, k, v = fused_linear(x, (self.c_q, self.c_k, self.c_v))
        q = q.view(B, T, self.n_head, self.head_dim)
        k = k.view(B, T, self.n_kv_head, self.head_dim)
        v = v.view(B, T, self.n_kv_head, self.head_dim)
        q, k = apply_rotary_emb(q, *cos_sin), apply_rotary_emb(k, *cos_sin)
        q, k = norm(q), norm(k)  # QK norm
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, T, H, D) -> (B, H, T, D)
        if kv_cache is not None:
            k, v = kv_cache.insert_kv(self.layer_idx, k, v)
        mask = None if kv_cache is None else kv_cache.attn_mask  # set in a fixed-shape decode step only
        y = attention(q, k, v, mask=mask)
        y = y.transpose(1, 2).contiguous().view(B, T, -1)
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x):
        return self.c_proj(relu_squared(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.attn = CausalSelfAttention(config, layer_idx)
        self.mlp = MLP(config)

    def forward(self, x, cos_sin, kv_cache):
        x = x + self.attn(norm(x), cos_sin, kv_cache)
        x = x + self.mlp(norm(x))
        return x


class GPT(BaseLM):
    model_type = "gpt"
    fixed_shape_decode = True
    logit_softcap = SOFTCAP

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.head_dim = config.n_embd // config.n_head
        self.transformer = nn.ModuleDict({
            "wte": embedding(config.vocab_size, config.n_embd),
            "h": nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
        })
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # nanochat's rotation is the reverse of the HF convention apply_rotary_emb uses: negate sin to match it
        self.rotary = Rotary(self.head_dim, config.sequence_len * 10, theta=ROPE_THETA, negate_sin=True)

    @torch.no_grad()
    def init_weights(self):
        """
        wte:                     normal, std 1 (it is normalised right away; Adam's lr is tuned for this scale)
        lm_head:                 normal, std 0.001 (near-uniform predictions at the start)
        attn.c_q/c_k/c_v, c_fc:  uniform, std 1/sqrt(n_embd) (uniform avoids outliers)
        attn.c_proj, mlp.c_proj: zeros (every block starts as the identity)
        """
        nn.init.normal_(self.transformer.wte.weight, mean=0.0, std=1.0)
        nn.init.normal_(self.lm_head.weight, mean=0.0, std=0.001)
        s = 3**0.5 * self.config.n_embd**-0.5  # a uniform on [-s, s] has std s/sqrt(3) = 1/sqrt(n_embd)
        for block in self.transformer.h:
            for lin in (block.attn.c_q, block.attn.c_k, block.attn.c_v, block.mlp.c_fc):
                nn.init.uniform_(lin.weight, -s, s)
            nn.init.zeros_(block.attn.c_proj.weight)
            nn.init.zeros_(block.mlp.c_proj.weight)
        self.rotary.reset()

    def forward(self, idx, targets=None, kv_cache=None, loss_reduction="mean"):
        B, T = idx.size()
        t0 = 0 if kv_cache is None else kv_cache.get_pos()  # decoding continues at the cache's position
        cos_sin = self.rotary(t0, T)
        x = norm(self.transformer.wte(idx))
        for block in self.transformer.h:
            x = self.run_block(block, x, cos_sin, kv_cache)
        x = norm(x)
        return self.logits_or_loss(x, targets, loss_reduction)


SPEC = ModelSpec(
    GPTConfig, GPT, config_from_depth,
    mlp_width_field=None,  # ReLU^2 at 4 x n_embd, as nanochat
    presets={"guide_d20": GPTConfig(sequence_len=2048, vocab_size=65536, n_layer=20, n_head=16, n_kv_head=16,
                                    n_embd=1280)},  # the model-selection guide's d20 config, as written there
    hf=NanoChatMapping(),
)
