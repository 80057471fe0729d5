"""The proof that a new architecture is one file plus one registry entry: a LLaMA-style model defined only here
(SwiGLU, learnable RMSNorm, no QK norm, GQA, untied embeddings), registered for one test, goes through training,
resume, loading by type, generation, CORE, chat_eval and the dry run with no change to any other file.
Its mapping onto transformers' `llama` is here too: tests/test_hf.py exports and imports it."""

from dataclasses import dataclass, field

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from nanochat.checkpoint import load_model, read_meta
from nanochat.core_eval import OFFLINE_BUNDLE_DIR, evaluate_task, load_bundle, load_task_data
from nanochat.engine import Engine
from nanochat.models import MODEL_TYPES, ModelSpec, presets
from nanochat.models.base import BaseLM, RMSNorm, Rotary, apply_rotary_emb, attention, heads_for_width
from nanochat.models.hf_mapping import HFMapping
from scripts import base_train, chat_eval

# -----------------------------------------------------------------------------
# The architecture: what would be nanochat/models/llama.py


@dataclass
class LlamaConfig:
    sequence_len: int = 2048
    vocab_size: int = 32000
    n_layer: int = 16
    n_head: int = field(default=8, metadata={"help": "number of query heads"})
    n_kv_head: int = field(default=4, metadata={"help": "number of key/value heads"})
    n_embd: int = field(default=1024, metadata={"help": "width (default 64 * depth)"})
    ffn_hidden: int = field(default=2816, metadata={"help": "SwiGLU hidden width (default 8/3 * n_embd, rounded)"})
    rope_theta: float = field(default=10000.0, metadata={"help": "rotary base"})


def config_from_depth(depth, max_seq_len, vocab_size, **overrides):
    n_embd = overrides.pop("n_embd", 64 * depth)
    n_head = overrides.pop("n_head", None) or heads_for_width(n_embd, overrides.pop("head_dim", 128))
    # LLaMA's SwiGLU: 2/3 of a 4x MLP (the same parameters with three matrices), rounded up to a multiple of 32
    kwargs = dict(sequence_len=max_seq_len, vocab_size=vocab_size, n_layer=depth, n_head=n_head,
                  n_kv_head=max(1, n_head // 2), n_embd=n_embd, ffn_hidden=-(-8 * n_embd // 3 // 32) * 32)
    return LlamaConfig(**{**kwargs, **overrides})


class LlamaMapping(HFMapping):
    """Exactly transformers' LlamaForCausalLM (with head_dim = n_embd / n_head and RMSNorm eps 1e-6)."""

    hf_type, hf_class = "llama", "LlamaForCausalLM"
    renames = [("embed.", "model.embed_tokens."), ("final_norm.", "model.norm."), ("layers.", "model.layers."),
               (".attn_norm.", ".input_layernorm."), (".mlp_norm.", ".post_attention_layernorm."),
               (".wq.", ".self_attn.q_proj."), (".wk.", ".self_attn.k_proj."), (".wv.", ".self_attn.v_proj."),
               (".wo.", ".self_attn.o_proj."), (".w_gate.", ".mlp.gate_proj."), (".w_up.", ".mlp.up_proj."),
               (".w_down.", ".mlp.down_proj.")]

    def hf_config(self, config, token_ids):
        import transformers

        return transformers.LlamaConfig(
            **self.shape_to_hf(config), intermediate_size=config.ffn_hidden, hidden_act="silu", rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta}, mlp_bias=False, **token_ids)

    def import_refusals(self, hf_cfg):
        c = hf_cfg
        checks = [("hidden_act", c.hidden_act, "silu"), ("rms_norm_eps", c.rms_norm_eps, 1e-6),
                  ("mlp_bias", c.mlp_bias, False), ("head_dim", c.head_dim, c.hidden_size // c.num_attention_heads)]
        return super().import_refusals(c) + [f"{k}={v!r} (ours: {want!r})" for k, v, want in checks if v != want]

    def config_from_hf(self, hf_cfg):
        return LlamaConfig(**self.shape_from_hf(hf_cfg), ffn_hidden=hf_cfg.intermediate_size,
                           rope_theta=float(hf_cfg.rope_parameters["rope_theta"]))


class LlamaBlock(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        C, D = config.n_embd, config.n_embd // config.n_head
        self.layer_idx, self.n_head, self.n_kv_head, self.head_dim = layer_idx, config.n_head, config.n_kv_head, D
        self.attn_norm, self.mlp_norm = RMSNorm(C), RMSNorm(C)
        self.wq, self.wk = nn.Linear(C, config.n_head * D, bias=False), nn.Linear(C, config.n_kv_head * D, bias=False)
        self.wv, self.wo = nn.Linear(C, config.n_kv_head * D, bias=False), nn.Linear(C, C, bias=False)
        self.w_gate = nn.Linear(C, config.ffn_hidden, bias=False)
        self.w_up = nn.Linear(C, config.ffn_hidden, bias=False)
        self.w_down = nn.Linear(config.ffn_hidden, C, bias=False)

    def forward(self, x, cos_sin, kv_cache):
        B, T, C = x.size()
        h = self.attn_norm(x)
        q = apply_rotary_emb(self.wq(h).view(B, T, self.n_head, self.head_dim), *cos_sin).transpose(1, 2)
        k = apply_rotary_emb(self.wk(h).view(B, T, self.n_kv_head, self.head_dim), *cos_sin).transpose(1, 2)
        v = self.wv(h).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        if kv_cache is not None:
            k, v = kv_cache.insert_kv(self.layer_idx, k, v)
        x = x + self.wo(attention(q, k, v).transpose(1, 2).contiguous().view(B, T, C))
        h = self.mlp_norm(x)
        return x + self.w_down(F.silu(self.w_gate(h)) * self.w_up(h))


class Llama(BaseLM):
    model_type = "llama"

    def __init__(self, config):
        super().__init__()
        self.config, self.head_dim = config, config.n_embd // config.n_head
        self.embed = nn.Embedding(config.vocab_size, config.n_embd)
        self.layers = nn.ModuleList([LlamaBlock(config, i) for i in range(config.n_layer)])
        self.final_norm = RMSNorm(config.n_embd)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.rotary = Rotary(self.head_dim, config.sequence_len * 10, theta=config.rope_theta)

    @torch.no_grad()
    def init_weights(self):
        nn.init.normal_(self.embed.weight, std=1.0)
        nn.init.normal_(self.lm_head.weight, std=0.001)
        for layer in self.layers:
            for lin in (layer.wq, layer.wk, layer.wv, layer.w_gate, layer.w_up):
                nn.init.uniform_(lin.weight, -(3 / lin.in_features) ** 0.5, (3 / lin.in_features) ** 0.5)
            nn.init.zeros_(layer.wo.weight)
            nn.init.zeros_(layer.w_down.weight)
        for m in self.modules():
            if isinstance(m, RMSNorm):
                m.reset_parameters()
        self.rotary.reset()

    def forward(self, idx, targets=None, kv_cache=None, loss_reduction="mean"):
        cos_sin = self.rotary(0 if kv_cache is None else kv_cache.pos, idx.size(1))
        x = self.embed(idx)
        for layer in self.layers:
            x = layer(x, cos_sin, kv_cache)
        return self.logits_or_loss(self.final_norm(x), targets, loss_reduction)


SPEC = ModelSpec(LlamaConfig, Llama, config_from_depth, mlp_width_field="ffn_hidden", hf=LlamaMapping(),
                 presets={"tiny": LlamaConfig(sequence_len=64, vocab_size=512, n_layer=1, n_head=2, n_kv_head=1,
                                              n_embd=64, ffn_hidden=192)})


# -----------------------------------------------------------------------------


@pytest.fixture
def llama(monkeypatch):
    """The one registry line, undone after the test."""
    monkeypatch.setitem(MODEL_TYPES, "llama", SPEC)


def test_a_third_architecture_runs_everywhere(base_env, llama, capsys):
    tiny = ["--model_type=llama", "--depth=1", "--head_dim=32", "--max_seq_len=32", "--device_batch_size=2",
            "--eval_every=-1", "--eval_tokens=128", "--sample_every=-1", "--ffn_hidden=96"]  # a flag of its own
    assert presets()["llama/tiny"][0] == "llama"

    # the plan, beside the other architectures
    assert base_train.main([*tiny, "--dry_run"]) is None
    out = capsys.readouterr().out
    assert "[llama (chosen)] LlamaConfig(" in out and "ffn_hidden=96" in out
    assert all(f"[{t}]" in out for t in MODEL_TYPES if t != "llama")

    # pretraining, then resuming from its checkpoint
    base_train.main([*tiny, "--num_iterations=2"])
    result = base_train.main([*tiny, "--num_iterations=3", "--resume"])
    assert result["step"] == 3 and "Resuming" in capsys.readouterr().out
    assert read_meta(result["checkpoint_dir"], 3)["model_type"] == "llama"

    # loading picks the class from the checkpoint
    model, tokenizer, meta = load_model("base", model_tag="llama_d1")
    assert type(model) is Llama and meta["model_type"] == "llama" and model.config.ffn_hidden == 96

    # generation: the engine's KV-cache decoding equals the model's own greedy decoding
    prompt = tokenizer.encode("The capital of France is", prepend="<|bos|>")
    rows, _ = Engine(model, tokenizer).generate_batch(prompt, num_samples=2, max_tokens=6, temperature=0.0)
    greedy = list(model.generate(prompt, 6, temperature=0))
    assert len(rows[0]) > len(prompt) and all(row[len(prompt):] == greedy[:len(row) - len(prompt)] for row in rows)

    # CORE's three kinds of task (multiple choice, schema, language modelling) on the shipped offline bundle
    for task in load_bundle(OFFLINE_BUNDLE_DIR):
        if task["label"] in ("copa", "winogrande", "lambada_openai"):  # zero-shot: two items are enough
            data = load_task_data(OFFLINE_BUNDLE_DIR, task)
            assert evaluate_task(model, tokenizer, data, "cpu", task, max_per_task=2) in (0.0, 0.5, 1.0)

    # chat_eval from the command line (its --model_type choices come from the registry)
    results = chat_eval.main(["-i", "base", "--model_tag=llama_d1", "--model_type=llama", "-a", "ARC-Easy|Arithmetic",
                              "--max_problems=2", "--max_new_tokens=4", "--device_type=cpu"])
    assert set(results) == {"ARC-Easy", "Arithmetic"} and all(0.0 <= acc <= 1.0 for acc in results.values())
    assert "chat_eval/ChatCORE" in read_meta(result["checkpoint_dir"], 3)["metrics"]



@pytest.mark.parametrize("match, key", [("--param_match", "total"), ("--flop_match", "flops")])
def test_compare_matches_a_third_architecture_through_its_own_width_field(llama, match, key):
    """scripts.compare adjusts the field the ModelSpec names (ffn_hidden here, not intermediate_size)."""
    from nanochat import cli
    from nanochat.compare.runs import plan_runs
    from nanochat.config import BaseTrainConfig, CompareConfig
    from nanochat.models import config_from_depth
    from nanochat.plan import describe

    config, rest = cli.parse(CompareConfig, ["--model_types", "gpt", "llama", "--depth", "4", match,
                                             "--max_seq_len=256"], known=True)
    runs = plan_runs(config, cli.parse(BaseTrainConfig, rest), vocab_size=4096)
    (width,) = runs[1].arm.overrides.items()
    assert width[0] == "ffn_hidden" and runs[1].tag == f"cmp_llama_d4_{match[2]}m_s1"
    shapes = {r.arm.model_type: describe(r.arm.model_type, config_from_depth(r.arm.model_type, 4, 256, 4096,
                                                                            **r.arm.overrides)) for r in runs[:2]}
    assert abs(shapes["llama"][key] - shapes["gpt"][key]) <= 0.01 * shapes["gpt"][key]
