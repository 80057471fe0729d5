"""Every registered architecture through the shared model interface: shapes, parity of the KV cache with a full
forward, losses, sampling, gradients, optimizer groups, FLOPs, config validation and the registry; and what is
particular to GPT and to Alcoholic."""

import dataclasses
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from nanochat.engine import KVCache
from nanochat.models import (
    MODEL_TYPES,
    build_model,
    config_fields,
    config_from_depth,
    config_from_dict,
    config_to_dict,
    get_model_spec,
    presets,
)
from nanochat.models.alcoholic import AlcoholicNanoConfig
from nanochat.models.base import RMSNorm, rotary_tables
from nanochat.models.gpt import GPTConfig
from nanochat.optim import Muon
from tests.conftest import FP64_ATOL, perturb

TYPES = list(MODEL_TYPES)
VOCAB, SEQ = 128, 32


def small_config(model_type, **overrides):
    # depth 2, width 64, 4 heads of 16 sharing 2 key/value heads (GQA)
    return config_from_depth(model_type, 2, SEQ, VOCAB, **{"n_embd": 64, "head_dim": 16, "n_kv_head": 2, **overrides})


def make_model(model_type, seed=0, dtype=torch.float32, **overrides):
    torch.manual_seed(seed)
    return perturb(build_model(model_type, small_config(model_type, **overrides)), seed).to(dtype).eval()


def make_model64(model_type, seed=0, **overrides):
    """For tests that compare two computations of one function: in fp64 their difference has a bound that holds at
    any thread count (tests/conftest.py: FP64_ATOL)."""
    return make_model(model_type, seed, torch.float64, **overrides)


def tokens(B, T, seed=0):
    return torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


# -----------------------------------------------------------------------------
# The guide's seed configs


def gpt_seed_config():
    return GPTConfig(
        sequence_len=2048,
        vocab_size=65536,
        n_layer=20,
        n_head=16,
        n_kv_head=16,
        n_embd=1280,
    )


def alcoholic_seed_config():
    return AlcoholicNanoConfig(
        sequence_len=2048,
        vocab_size=65536,
        n_layer=20,
        n_head=16,
        n_kv_head=8,  # Typically half of n_head
        n_embd=1280,
        intermediate_size=5120,  # 4x n_embd
        rope_theta=1_000_000.0,
        qk_norm=True,
        norm_type="rmsnorm",
        mlp_type="swiglu",
        dropout=0.0,
    )


def closed_form_params(model_type, c):
    """Parameter count from the config fields alone."""
    V, C, L = c.vocab_size, c.n_embd, c.n_layer
    if model_type == "gpt":
        D = C // c.n_head
        attn = C * C + 2 * C * c.n_kv_head * D + C * C  # c_q, c_k, c_v, c_proj
        return 2 * V * C + L * (attn + 2 * C * 4 * C)  # wte, lm_head; c_fc, c_proj
    D = c.head_dim or C // c.n_head
    attn = 2 * C * c.n_head * D + 2 * C * c.n_kv_head * D + (2 * D if c.qk_norm else 0)
    mlp = (3 if c.mlp_type == "swiglu" else 2) * C * c.intermediate_size
    return 2 * V * C + 2 * C + L * (attn + mlp + 2 * C)  # + embed_norm, norm; per layer two norms


@pytest.mark.parametrize("model_type,make_config,expected", [
    ("gpt", gpt_seed_config, 560_988_160),
    ("alcoholic", alcoholic_seed_config, 659_349_120),
])
def test_seed_configs_build_and_count(model_type, make_config, expected):
    config = make_config()
    with torch.device("meta"):
        model = get_model_spec(model_type).model_cls(config)
        idx = torch.zeros(2, 8, dtype=torch.long)
        logits = model(idx)
        loss = model(idx, idx)
    assert logits.shape == (2, 8, 65536) and logits.dtype == torch.float32
    assert loss.shape == ()
    counts = model.num_params_by_group()
    assert counts["total"] == closed_form_params(model_type, config) == expected
    assert counts["total"] == sum(v for k, v in counts.items() if k != "total")
    assert counts["embedding"] == counts["lm_head"] == 65536 * 1280
    assert presets()[f"{model_type}/guide_d20"] == (model_type, config)  # the registry's preset is the guide's


@pytest.mark.parametrize("model_type,variant", [("gpt", {}), ("alcoholic", {}), ("alcoholic", {"qk_norm": False}),
                                                ("alcoholic", {"mlp_type": "relu2"}), ("alcoholic", {"head_dim": 24})])
def test_closed_form_count_small(model_type, variant):
    config = small_config(model_type)
    config = dataclasses.replace(config, **variant)  # replace() keeps head_dim as a field (24*4 != 64 is allowed)
    with torch.device("meta"):
        model = get_model_spec(model_type).model_cls(config)
    assert sum(p.numel() for p in model.parameters()) == closed_form_params(model_type, config)


# -----------------------------------------------------------------------------
# KV cache parity


@pytest.mark.parametrize("model_type", TYPES)
def test_prefill_then_decode_matches_full_forward(model_type):
    model = make_model64(model_type)
    idx = tokens(2, 20)
    with torch.no_grad():
        full = model(idx)
        cache = model.make_kv_cache(2, 20)
        steps = [model(idx[:, :8], kv_cache=cache)]  # prefill a prompt chunk
        for t in range(8, 20):  # then token by token
            steps.append(model(idx[:, t:t + 1], kv_cache=cache))
    assert cache.pos == 20
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=FP64_ATOL, rtol=0)


@pytest.mark.parametrize("model_type", TYPES)
def test_chunked_decode_matches_full_forward(model_type):
    model = make_model64(model_type)
    idx = tokens(2, 20, seed=1)
    with torch.no_grad():
        full = model(idx)
        cache = model.make_kv_cache(2, 24)
        outs, t = [], 0
        for chunk in (6, 5, 1, 4, 4):  # Tq > 1 onto a non-empty cache, mixed with single tokens
            outs.append(model(idx[:, t:t + chunk], kv_cache=cache))
            t += chunk
    torch.testing.assert_close(torch.cat(outs, dim=1), full, atol=FP64_ATOL, rtol=0)


@pytest.mark.parametrize("model_type", TYPES)
def test_kv_cache_expand_after_batch1_prefill(model_type):
    model = make_model64(model_type)
    prompt = tokens(1, 10, seed=2)
    nxt = torch.tensor([[3], [3], [77]])  # rows 0 and 1 continue identically, row 2 differently
    with torch.no_grad():
        cache = model.make_kv_cache(1, 16)
        model(prompt, kv_cache=cache)
        before = [t[:, :, :10].clone() for kv in cache.layers for t in kv]
        assert cache.expand(3) is cache
        assert cache.batch_size == 3 and cache.pos == 10
        for row in range(3):  # every row holds the prefilled prefix
            for t, b in zip([t for kv in cache.layers for t in kv], before, strict=True):
                torch.testing.assert_close(t[row:row + 1, :, :10], b, atol=0, rtol=0)
        step = model(nxt, kv_cache=cache)[:, -1]
        ref = torch.stack([model(torch.cat([prompt, nxt[r:r + 1]], dim=1))[0, -1] for r in range(3)])
    # Rows of one batch are equal up to rounding, not bitwise: a GEMM may give rows to different threads or vector
    # lanes, which sum in another order (seen in fp32: 4.8e-7 with 2 threads under load); in fp64 FP64_ATOL bounds
    # that, far below the gap to row 2, which continues differently.
    torch.testing.assert_close(step[0], step[1], atol=FP64_ATOL, rtol=0)
    assert (step[0] - step[2]).abs().max() > 1e-2
    torch.testing.assert_close(step, ref, atol=FP64_ATOL, rtol=0)


@pytest.mark.parametrize("model_type", TYPES)
@pytest.mark.parametrize("fixed_shape", [False, True])
def test_decode_matches_full_forward(model_type, fixed_shape):
    # the fixed-shape step writes each token with index_copy_ into the preallocated cache and attends over every
    # slot under a mask, captured as one graph (backend="eager": the graph without inductor's compilation); the
    # logits must be those of a full recompute, also for rows expanded from a batch-1 prefill
    model = make_model64(model_type)
    if fixed_shape:
        model.compile_decode(backend="eager")
    idx = tokens(1, 16, seed=3)
    nxt = tokens(3, 8, seed=4)
    with torch.no_grad():
        cache = model.make_kv_cache(1, 24)
        model(idx, kv_cache=cache)
        cache.expand(3)
        steps = [model.decode(nxt[:, t:t + 1], cache) for t in range(8)]
        full = model(torch.cat([idx.expand(3, -1), nxt], dim=1))[:, 16:]
    assert cache.pos == 24 and cache.step_pos is None
    torch.testing.assert_close(torch.stack(steps, dim=1), full, atol=FP64_ATOL, rtol=0)
    with pytest.raises(RuntimeError, match="KV cache overflow"):
        model.decode(nxt[:, :1], cache)


@pytest.mark.slow
@pytest.mark.parametrize("model_type", TYPES)
def test_compiled_decode_matches_eager(model_type):
    model = make_model(model_type)
    idx = tokens(1, 12, seed=5)
    eager = list(model.generate(idx[0].tolist(), 6, temperature=0.0))
    model = make_model(model_type).compile_decode()
    compiled = list(model.generate(idx[0].tolist(), 6, temperature=0.0))
    assert compiled == eager
    # on CPU the weights are frozen into the compiled step: once they change, decoding refuses to go on with them
    with torch.no_grad():
        model.lm_head.weight.mul_(2)
    with pytest.raises(RuntimeError, match="weights changed after compile_decode"):
        list(model.generate(idx[0].tolist(), 6, temperature=0.0))


def test_kv_cache_overflow_and_shape_errors():
    cache = KVCache(batch_size=1, num_heads=2, seq_len=4, head_dim=8, num_layers=1)
    k = torch.randn(1, 2, 3, 8)
    cache.insert_kv(0, k, k)
    assert cache.pos == 3
    with pytest.raises(RuntimeError, match=r"KV cache overflow: 3 cached \+ 2 new positions > seq_len=4"):
        cache.insert_kv(0, torch.randn(1, 2, 2, 8), torch.randn(1, 2, 2, 8))
    assert cache.pos == 3
    with pytest.raises(ValueError, match="kv_heads=2, head_dim=8"):
        cache.insert_kv(0, torch.randn(1, 3, 1, 8), torch.randn(1, 3, 1, 8))
    cache.expand(2)
    with pytest.raises(ValueError, match="each of the 2 prefilled rows the same number of times: batch_size=3"):
        cache.expand(3)
    cache.reset()
    assert cache.pos == 0


@pytest.mark.parametrize("model_type", TYPES)
def test_model_kv_cache_overflow_is_a_clear_error(model_type):
    model = make_model(model_type)
    cache = model.make_kv_cache(1, 5)
    with torch.no_grad():
        model(tokens(1, 4), kv_cache=cache)
        with pytest.raises(RuntimeError, match="KV cache overflow"):
            model(tokens(1, 2), kv_cache=cache)


# -----------------------------------------------------------------------------
# Loss


@pytest.mark.parametrize("model_type", TYPES)
def test_loss_reductions_and_ignore_index(model_type):
    model = make_model64(model_type)
    idx, targets = tokens(2, 16, seed=3), tokens(2, 16, seed=4)
    with torch.no_grad():
        logits = model(idx)
        mean = model(idx, targets)
        per_token = model(idx, targets, loss_reduction="none")
    assert per_token.shape == (2, 16)
    manual = -F.log_softmax(logits, dim=-1).gather(-1, targets[..., None])[..., 0]
    torch.testing.assert_close(per_token, manual, atol=FP64_ATOL, rtol=0)
    torch.testing.assert_close(per_token.mean(), mean, atol=FP64_ATOL, rtol=0)

    masked = targets.clone()
    masked[0, :5] = -1
    masked[1, -3:] = -1
    keep = masked != -1
    with torch.no_grad():
        mean_masked = model(idx, masked)
        per_token_masked = model(idx, masked, loss_reduction="none")
    assert torch.all(per_token_masked[~keep] == 0)
    torch.testing.assert_close(per_token_masked[keep], manual[keep], atol=FP64_ATOL, rtol=0)
    torch.testing.assert_close(mean_masked, manual[keep].mean(), atol=FP64_ATOL, rtol=0)
    with pytest.raises(ValueError, match="loss_reduction"):
        model(idx, targets, loss_reduction="avg")


@pytest.mark.parametrize("model_type", TYPES)
def test_fused_training_loss_matches_logits_loss(model_type):
    # with gradients on, "sum" and "mean" go through LinearCrossEntropy (chunks, gradients in the forward pass):
    # loss and every gradient must equal those of the full logits' cross-entropy, ignored targets included
    from nanochat.ops import LinearCrossEntropy

    idx, targets = tokens(2, 16, seed=6), tokens(2, 16, seed=7)
    targets[0, :5] = -1
    results = []
    for fused in (True, False):
        model = make_model64(model_type).train()
        if fused:
            loss = model(idx, targets) + model(idx, targets, loss_reduction="sum") / 100
        else:
            logits = model(idx)
            ce = F.cross_entropy(logits.view(-1, VOCAB), targets.view(-1), ignore_index=-1, reduction="sum")
            loss = ce / (targets != -1).sum() + ce / 100
        loss.backward()
        results.append((loss.detach(), [p.grad for p in model.parameters()]))
    (fused_loss, fused_grads), (ref_loss, ref_grads) = results
    torch.testing.assert_close(fused_loss, ref_loss, atol=FP64_ATOL, rtol=0)
    for g, r in zip(fused_grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, atol=FP64_ATOL, rtol=0)
    # chunk boundaries do not matter
    x = torch.randn(37, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(VOCAB, 8, dtype=torch.float64)
    t = tokens(1, 37)[0]
    one = LinearCrossEntropy.apply(x, w, t, 15.0, 64)
    torch.testing.assert_close(LinearCrossEntropy.apply(x, w, t, 15.0, 5), one, atol=FP64_ATOL, rtol=0)


def test_gpt_logits_are_softcapped_at_15():
    model = make_model("gpt")
    with torch.no_grad():
        model.lm_head.weight.mul_(1000)
        logits = model(tokens(1, 8))
    assert logits.abs().max() <= 15 and logits.abs().max() > 14.9


def test_alcoholic_softcap_is_optional():
    model = make_model("alcoholic")
    with torch.no_grad():
        model.lm_head.weight.mul_(1000)
        assert model(tokens(1, 8)).abs().max() > 100  # no softcap by default
    capped = make_model("alcoholic", logit_softcap=5.0)
    with torch.no_grad():
        capped.lm_head.weight.mul_(1000)
        assert capped(tokens(1, 8)).abs().max() <= 5.0


# -----------------------------------------------------------------------------
# Generation


@pytest.mark.parametrize("model_type", TYPES)
def test_generate_is_deterministic_per_seed(model_type):
    model = make_model(model_type)
    prompt = [5, 17, 42]
    a = list(model.generate(prompt, 20, temperature=1.0, seed=1))
    b = list(model.generate(prompt, 20, temperature=1.0, seed=1))
    c = list(model.generate(prompt, 20, temperature=1.0, seed=2))
    assert len(a) == 20 and all(isinstance(t, int) and 0 <= t < VOCAB for t in a)
    assert a == b and a != c


@pytest.mark.parametrize("model_type", TYPES)
def test_greedy_generate_equals_argmax_of_full_forward(model_type):
    model = make_model(model_type)
    prompt = [5, 17, 42]
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(12):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    assert list(model.generate(prompt, 12, temperature=0.0)) == ids[3:]
    assert list(model.generate(prompt, 12, temperature=0.7, top_k=1)) == ids[3:]


# -----------------------------------------------------------------------------
# Gradients and optimizers


@pytest.mark.parametrize("model_type", TYPES)
def test_gradients_reach_every_parameter(model_type):
    model = make_model(model_type).train()
    model(tokens(2, 16), tokens(2, 16, seed=1)).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient for {name}"


@pytest.mark.parametrize("model_type", TYPES)
def test_optimizer_groups(model_type):
    torch.manual_seed(0)
    model = build_model(model_type, small_config(model_type))
    adamw, muon = model.setup_optimizers(unembedding_lr=0.004, embedding_lr=0.2, matrix_lr=0.02, weight_decay=0.1)
    assert isinstance(adamw, torch.optim.AdamW) and type(muon) is Muon
    names = {id(p): n for n, p in model.named_parameters()}
    seen = {}
    for opt in (adamw, muon):
        for group in opt.param_groups:
            assert group["initial_lr"] == group["lr"]
            for p in group["params"]:
                assert id(p) not in seen, f"{names[id(p)]} is in two groups"
                seen[id(p)] = (opt, group["name"])
    assert set(seen) == set(names), "every parameter must be in a group"
    scale = (64 / 768) ** -0.5
    embedding = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    for pid, name in names.items():
        opt, group = seen[pid]
        p = dict(model.named_parameters())[name]
        if p.ndim == 2 and pid not in embedding and p is not model.lm_head.weight:  # a matrix inside the blocks
            assert opt is muon, name
        else:
            assert opt is adamw, name
        if p.ndim == 1:
            assert group == "norms", name
    lrs = {g["name"]: g for g in adamw.param_groups}
    assert lrs["lm_head"]["lr"] == pytest.approx(0.004 * scale)
    assert lrs["embedding"]["lr"] == pytest.approx(0.2 * scale)
    assert lrs["embedding"]["weight_decay"] == 0.1
    assert muon.param_groups[0]["lr"] == 0.02 and muon.param_groups[0]["momentum"] == 0.95
    norms = [p for p in model.parameters() if p.ndim == 1]
    if norms:
        assert len(lrs["norms"]["params"]) == len(norms)
        assert lrs["norms"]["lr"] == pytest.approx(0.004 * scale) and lrs["norms"]["weight_decay"] == 0.0
    else:
        assert "norms" not in lrs  # no empty group


def test_nanochat_muon_weight_decay_scales_with_width_and_ramps_down():
    from nanochat.steps import optimizer_step, weight_decay_multiplier

    model = build_model("gpt", small_config("gpt"))  # width 64: below the smallest width the scaling was measured at
    adamw, muon = model.setup_optimizers(weight_decay=0.1, muon_variant="nanochat")
    group = muon.param_groups[0]
    assert group["variant"] == "nanochat"
    assert group["weight_decay"] == group["initial_weight_decay"] == pytest.approx(0.2 * (768 / 256) ** 2)  # capped
    model(tokens(2, 16), tokens(2, 16, seed=1)).backward()
    optimizer_step(model, [adamw, muon], lrm=1.0, momentum=0.95, grad_clip=1.0, wdm=weight_decay_multiplier(3, 4))
    assert group["weight_decay"] == pytest.approx(0.25 * group["initial_weight_decay"])
    assert all(g["weight_decay"] in (0.0, 0.1) for g in adamw.param_groups)  # AdamW's decay is not ramped
    _, classic = model.setup_optimizers(muon_variant="classic")
    assert classic.param_groups[0]["weight_decay"] == 0.0 and classic.param_groups[0]["variant"] == "classic"


def test_optimizer_groups_of_norm_weights():
    """GPT's norms have no weights; Alcoholic's are embed_norm, norm and, per layer, 2 norms + q_norm, k_norm."""
    for model_type, count in (("gpt", 0), ("alcoholic", 2 + 2 * 4)):
        adamw, _ = build_model(model_type, small_config(model_type)).setup_optimizers()
        assert sum(len(g["params"]) for g in adamw.param_groups if g["name"] == "norms") == count


@pytest.mark.parametrize("model_type", TYPES)
def test_a_few_optimizer_steps_fit_a_batch(model_type):
    torch.manual_seed(0)
    model = build_model(model_type, small_config(model_type))
    optimizers = model.setup_optimizers()
    idx, targets = tokens(4, 16), tokens(4, 16, seed=1)
    losses = []
    for _ in range(10):
        loss = model(idx, targets)
        loss.backward()
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[0] == pytest.approx(math.log(VOCAB), abs=0.05)  # small lm_head init: near-uniform predictions
    assert losses[-1] < losses[0] - 1.0


# -----------------------------------------------------------------------------
# Architecture


def test_gpt_has_no_trainable_norm_params():
    model = build_model("gpt", small_config("gpt"))
    assert model.num_params_by_group()["norms"] == 0
    assert all(p.ndim == 2 for p in model.parameters())
    assert not any(isinstance(m, (RMSNorm, nn.LayerNorm)) for m in model.modules())
    names = {n for n, _ in model.named_parameters()}
    assert {"transformer.wte.weight", "lm_head.weight", "transformer.h.1.attn.c_q.weight",
            "transformer.h.1.attn.c_k.weight", "transformer.h.1.attn.c_v.weight", "transformer.h.1.attn.c_proj.weight",
            "transformer.h.1.mlp.c_fc.weight", "transformer.h.1.mlp.c_proj.weight"} <= names
    assert len(names) == 2 + 2 * 6


def test_alcoholic_parameter_names_and_mlp():
    config = small_config("alcoholic", intermediate_size=96)
    model = build_model("alcoholic", config)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    mlp = {n: s for n, s in shapes.items() if n.startswith("model.layers.0.mlp.")}
    assert mlp == {"model.layers.0.mlp.gate_proj.weight": (96, 64), "model.layers.0.mlp.up_proj.weight": (96, 64),
                   "model.layers.0.mlp.down_proj.weight": (64, 96)}
    layer = {n[len("model.layers.1."):]: s for n, s in shapes.items() if n.startswith("model.layers.1.")}
    assert layer == {
        "self_attn.q_proj.weight": (64, 64), "self_attn.k_proj.weight": (32, 64), "self_attn.v_proj.weight": (32, 64),
        "self_attn.o_proj.weight": (64, 64), "self_attn.q_norm.weight": (16,), "self_attn.k_norm.weight": (16,),
        "mlp.gate_proj.weight": (96, 64), "mlp.up_proj.weight": (96, 64), "mlp.down_proj.weight": (64, 96),
        "input_layernorm.weight": (64,), "post_attention_layernorm.weight": (64,),
    }
    top = {n for n in shapes if not n.startswith("model.layers.")}
    assert top == {"model.embed_tokens.weight", "model.embed_norm.weight", "model.norm.weight", "lm_head.weight"}
    assert all(torch.all(p == 1) for n, p in model.named_parameters() if p.ndim == 1)


def test_alcoholic_without_qk_norm_has_no_qk_norm_params():
    model = make_model("alcoholic", qk_norm=False)
    assert not any("q_norm" in n or "k_norm" in n for n, _ in model.named_parameters())
    assert model(tokens(1, 8)).shape == (1, 8, VOCAB)


@pytest.mark.parametrize("variant", [{"mlp_type": "relu2"}, {"norm_type": "layernorm"},
                                     {"mlp_type": "relu2", "norm_type": "layernorm", "qk_norm": False}])
def test_alcoholic_variants_build_train_and_decode(variant):
    model = make_model64("alcoholic", **variant)
    if variant.get("mlp_type") == "relu2":
        assert not hasattr(model.model.layers[0].mlp, "gate_proj")
    if variant.get("norm_type") == "layernorm":
        norms = [m for m in model.modules() if isinstance(m, nn.LayerNorm)]
        assert len(norms) == 2 + 2 * 2 + (2 * 2 if model.config.qk_norm else 0)
        assert all(m.bias is None for m in norms)
        assert not any(isinstance(m, RMSNorm) for m in model.modules())
    idx = tokens(2, 12)
    model.train()
    model(idx, idx).backward()
    assert all(p.grad is not None for p in model.parameters())
    model.eval()
    with torch.no_grad():
        full = model(idx)
        cache = model.make_kv_cache(2, 12)
        inc = torch.cat([model(idx[:, :7], kv_cache=cache), model(idx[:, 7:], kv_cache=cache)], dim=1)
    torch.testing.assert_close(inc, full, atol=FP64_ATOL, rtol=0)


def test_rotary_bases_differ_as_configured():
    gpt = build_model("gpt", small_config("gpt"))
    alc = build_model("alcoholic", small_config("alcoholic"))
    alc_5e5 = build_model("alcoholic", small_config("alcoholic", rope_theta=5e5))
    D = 16
    for model, theta, sign in ((gpt, 10000.0, -1), (alc, 1e6, 1), (alc_5e5, 5e5, 1)):
        assert model.rotary.cos.shape == (1, SEQ * 10, 1, D // 2) and model.rotary.cos.dtype == torch.float32
        inv_freq = theta ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)
        # the tables are fp32: inv_freq (a power and a division) is within 3 ulps of the exact value, the angle
        # pos * inv_freq adds one rounding, and cos/sin one more, so |error| <= pos * 4u + u = 29u ~ 1.7e-6 at
        # pos = 7 (u = 2^-24, inv_freq <= 1); elementwise ops, so no thread count changes it
        pos = 7
        torch.testing.assert_close(model.rotary.cos[0, pos, 0].double(), torch.cos(pos * inv_freq), atol=2e-6, rtol=0)
        torch.testing.assert_close(model.rotary.sin[0, pos, 0].double(), sign * torch.sin(pos * inv_freq),
                                   atol=2e-6, rtol=0)  # GPT negates sin (nanochat's rotation direction)


def test_dropout_only_in_training():
    torch.manual_seed(0)
    model = make_model("alcoholic", dropout=0.5)
    reference = make_model("alcoholic")  # same seed -> same weights, no dropout
    idx = tokens(2, 12)
    with torch.no_grad():
        torch.testing.assert_close(model(idx), reference(idx), atol=0, rtol=0)
        model.train()
        a, b = model(idx), model(idx)
    assert not torch.allclose(a, b)


@pytest.mark.parametrize("model_type", TYPES)
def test_rotary_extension_warns_and_matches_fresh_tables(model_type):
    model = make_model64(model_type, sequence_len=4)  # 40 positions precomputed
    idx = tokens(1, 48)
    with torch.no_grad():
        short = model(idx[:, :40])
        with pytest.warns(UserWarning, match="beyond the 40 precomputed rotary positions"):
            long = model(idx)
    assert model.rotary.cos.size(1) == 80
    cos, sin = rotary_tables(80, 16, model.rotary.theta, model.rotary.negate_sin)  # test_rotary_bases checks these
    torch.testing.assert_close(model.rotary.cos, cos, atol=0, rtol=0)
    torch.testing.assert_close(model.rotary.sin, sin, atol=0, rtol=0)
    torch.testing.assert_close(long[:, :40], short, atol=FP64_ATOL, rtol=0)


# -----------------------------------------------------------------------------
# Building, configs, registry


@pytest.mark.parametrize("model_type", TYPES)
def test_build_model_initialises_everything_deterministically(model_type):
    config = small_config(model_type)
    with torch.device("meta"):
        model = get_model_spec(model_type).model_cls(config)
    model.to_empty(device="cpu")
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            t.fill_(float("nan"))
    torch.manual_seed(0)
    model.init_weights()
    assert all(torch.isfinite(t).all() for t in list(model.parameters()) + list(model.buffers()))
    torch.manual_seed(0)
    again = build_model(model_type, config)
    for (n, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        torch.testing.assert_close(a, b, atol=0, rtol=0, msg=n)
    assert model.model_type == model_type and again.get_device().type == "cpu"
    # zeros: the output projections of attention and MLP, 2 matrices per block, and nothing else
    zero = [p for p in again.parameters() if torch.all(p == 0)]
    assert len(zero) == 2 * config.n_layer and all(p.ndim == 2 and p.size(0) == config.n_embd for p in zero)


def test_config_from_depth_defaults():
    g = config_from_depth("gpt", 20, 2048, 65536)
    assert (g.n_layer, g.n_embd, g.n_head, g.n_kv_head, g.sequence_len, g.vocab_size) == (20, 1280, 10, 10, 2048, 65536)
    a = config_from_depth("alcoholic", 20, 2048, 65536)
    assert (a.n_layer, a.n_embd, a.n_head, a.n_kv_head, a.intermediate_size) == (20, 1280, 10, 5, 5120)
    assert a.head_dim is None and a.rope_theta == 1e6 and a.qk_norm and a.mlp_type == "swiglu"
    for depth, n_head, n_kv in ((1, 1, 1), (2, 1, 1), (4, 2, 1), (6, 3, 1), (12, 6, 3), (16, 8, 4)):
        c = config_from_depth("alcoholic", depth, 256, 512)
        assert (c.n_embd, c.n_head, c.n_kv_head) == (64 * depth, n_head, n_kv)
        assert config_from_depth("gpt", depth, 256, 512).n_head == n_head


def test_config_from_depth_overrides():
    c = config_from_depth("gpt", 4, 256, 512, head_dim=64, n_kv_head=None, rope_theta=None)  # None -> ignored
    assert (c.n_head, c.n_kv_head) == (4, 4)
    c = config_from_depth("alcoholic", 4, 256, 512, head_dim=32, n_embd=128, mlp_type="relu2", qk_norm=False)
    assert (c.n_embd, c.n_head, c.n_kv_head, c.intermediate_size, c.mlp_type, c.qk_norm) == \
        (128, 4, 2, 512, "relu2", False)
    c = config_from_depth("alcoholic", 4, 256, 512, n_head=8)
    assert (c.n_head, c.n_kv_head) == (8, 4)
    with pytest.raises(ValueError, match=r"unknown override 'rope_theta' for model_type 'gpt'; valid fields: .*n_embd"):
        config_from_depth("gpt", 4, 256, 512, rope_theta=1e6)
    with pytest.raises(ValueError, match=r"unknown override 'n_layers'.*n_layer"):
        config_from_depth("alcoholic", 4, 256, 512, n_layers=3)
    with pytest.raises(ValueError, match=r"n_embd=320 with head_dim=128 gives n_head=3.*e\.g\. one of \[2, 4"):
        config_from_depth("gpt", 5, 256, 512)
    assert config_from_depth("gpt", 5, 256, 512, head_dim=64).n_head == 5


def test_config_validation_errors():
    with pytest.raises(ValueError, match="n_head=4 must be a multiple of n_kv_head=3"):
        AlcoholicNanoConfig(n_embd=64, n_head=4, n_kv_head=3)
    with pytest.raises(ValueError, match=r"unknown mlp_type='geglu'; supported: \('swiglu', 'relu2'\)"):
        AlcoholicNanoConfig(mlp_type="geglu")
    with pytest.raises(ValueError, match=r"unknown norm_type='batchnorm'; supported: \('rmsnorm', 'layernorm'\)"):
        AlcoholicNanoConfig(norm_type="batchnorm")
    with pytest.raises(ValueError, match=r"dropout=1.0 must be in \[0, 1\)"):
        AlcoholicNanoConfig(dropout=1.0)
    with pytest.raises(ValueError, match="n_embd=100 is not divisible by n_head=16"):
        AlcoholicNanoConfig(n_embd=100)
    with pytest.raises(ValueError, match="head_dim=7 must be a positive even int"):
        AlcoholicNanoConfig(head_dim=7)
    with pytest.raises(ValueError, match="intermediate_size must be a positive int, got 0"):
        AlcoholicNanoConfig(intermediate_size=0)
    with pytest.raises(ValueError, match="n_head=6 must be a multiple of n_kv_head=4"):
        GPTConfig(n_head=6, n_kv_head=4)
    with pytest.raises(ValueError, match="n_embd=100 must split into n_head=6"):
        GPTConfig(n_embd=100)
    assert AlcoholicNanoConfig(n_embd=64, n_head=4, n_kv_head=2, head_dim=32).head_dim == 32  # wide heads are fine


def test_registry_errors_and_round_trip():
    with pytest.raises(ValueError, match="unknown model_type 'llama'; valid types: gpt, alcoholic"):
        get_model_spec("llama")
    with pytest.raises(ValueError, match="valid types: gpt, alcoholic"):
        config_from_depth("llama", 4, 256, 512)
    with pytest.raises(TypeError, match="needs a GPTConfig"):
        build_model("gpt", AlcoholicNanoConfig())
    for model_type in TYPES:
        config = small_config(model_type)
        d = config_to_dict(config)
        assert list(d) == config_fields(model_type)
        assert config_from_dict(model_type, d) == config
    unknown = r"'gpt' has unknown keys \['intermediate_size', 'rope_theta'.*valid fields: sequence_len"
    with pytest.raises(ValueError, match=unknown):
        config_from_dict("gpt", config_to_dict(small_config("alcoholic")))


# -----------------------------------------------------------------------------
# FLOPs


@pytest.mark.parametrize("model_type", TYPES)
def test_estimate_flops_matches_flop_counter(model_type):
    model = build_model(model_type, small_config(model_type))
    idx = tokens(2, SEQ)
    counter = FlopCounterMode(display=False)
    # The CPU flash-attention kernel is invisible to FlopCounterMode; the math backend runs attention as bmm's
    with counter, sdpa_kernel(SDPBackend.MATH):
        model(idx, idx).backward()
    measured = counter.get_total_flops() / idx.numel()
    estimate = model.estimate_flops()
    assert abs(estimate - measured) / measured < 0.10
    # the matmuls alone are 6 x (non-embedding matrix params) per token (norm weights are not matmuls)
    counts = model.num_params_by_group()
    mm = counter.get_flop_counts()["Global"][torch.ops.aten.mm] / idx.numel()
    assert mm == 6 * (counts["lm_head"] + counts["matrices"])


# -----------------------------------------------------------------------------
# Parity with transformers' reference implementations (GPT == nanochat, Alcoholic == qwen3 with embed_norm folded),
# through the one mapping in nanochat/hf.py (tests/test_hf.py covers export, import and the tokenizer)


@pytest.mark.parametrize("model_type", TYPES)
def test_matches_transformers(model_type):
    pytest.importorskip("transformers")
    from nanochat.hf import to_hf

    model = make_model(model_type)
    hf = to_hf(model)
    idx = tokens(2, 24)
    # fp32 on both sides, through the same kernels (F.linear, F.scaled_dot_product_attention, F.rms_norm): bitwise
    # equal at 1, 2 and 4 threads. Should a CPU or a transformers release take another kernel, each side stays
    # within its fp32 rounding of the exact logits (measured against this model in fp64: <= 2.1e-6 for logits up to
    # 4, i.e. ~8 ulps), so the two differ by at most twice that; 1e-5 leaves a factor 2 more
    with torch.no_grad():
        torch.testing.assert_close(model(idx), hf(idx).logits, atol=1e-5, rtol=0)


# -----------------------------------------------------------------------------
# torch.compile


@pytest.mark.slow
@pytest.mark.parametrize("model_type", TYPES)
def test_torch_compile_matches_eager(model_type):
    model = make_model64(model_type).train()
    idx, targets = tokens(2, 16), tokens(2, 16, seed=1)
    eager = model(idx, targets)
    eager.backward()
    eager_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    compiled = torch.compile(model)
    loss = compiled(idx, targets)
    loss.backward()
    torch.testing.assert_close(loss, eager, atol=FP64_ATOL, rtol=0)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, eager_grads[n], atol=FP64_ATOL, rtol=0, msg=n)


@pytest.mark.parametrize("model_type", list(MODEL_TYPES))
def test_activation_checkpointing_keeps_the_gradients(model_type):
    # with dropout where the architecture has it: checkpointing must replay the same random numbers in backward
    dropout = {"dropout": 0.1} if "dropout" in config_fields(model_type) else {}
    config = config_from_depth(model_type, 2, 16, 64, head_dim=32, **dropout)
    torch.manual_seed(0)
    model = perturb(build_model(model_type, config)).double().train()
    x = torch.randint(0, 64, (2, 16))
    grads, saved = {}, {}
    for on in (False, True):
        model.activation_checkpointing = on
        model.zero_grad(set_to_none=True)
        saved[on] = []
        torch.manual_seed(1)
        with torch.autograd.graph.saved_tensors_hooks(lambda t, on=on: saved[on].append(t) or t, lambda t: t):
            loss = model(x, x)
        loss.backward()
        grads[on] = [p.grad.clone() for p in model.parameters()]
    assert len(saved[True]) < len(saved[False])  # the blocks kept nothing for backward: it did checkpoint
    for a, b in zip(grads[False], grads[True], strict=True):
        torch.testing.assert_close(a, b, atol=FP64_ATOL, rtol=0)


def test_relu_squared_matches_autograd_bit_for_bit():
    # the fused backward (grad * 2 relu(x)) must give exactly autograd's relu -> square gradient, zeros included
    from nanochat.ops import relu_squared

    x = torch.randn(4, 33, generator=torch.Generator().manual_seed(0))
    x[0, :5] = 0.0
    grad = torch.randn(4, 33, generator=torch.Generator().manual_seed(1))
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    F.relu(a).square().backward(grad)
    relu_squared(b).backward(grad)
    assert torch.equal(relu_squared(x), F.relu(x).square())
    assert torch.equal(a.grad, b.grad)
    assert torch.autograd.gradcheck(relu_squared, (torch.randn(3, 5, dtype=torch.float64, requires_grad=True),))
