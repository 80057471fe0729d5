"""Tests for nanochat/optim.py: Newton-Schulz and Polar Express, NorMuon, cautious weight decay, Muon, DistMuon
(2 gloo processes), make_adamw."""

import math
import os
import re

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from nanochat.optim import (
    DistMuon,
    Muon,
    make_adamw,
    normuon_scale,
    zeropower_via_newtonschulz5,
    zeropower_via_polar_express,
)
from tests.conftest import FP64_ATOL, free_port, torch_threads


def _cosine(a, b):
    return (a * b).sum(dim=(-2, -1)) / (a.norm(dim=(-2, -1)) * b.norm(dim=(-2, -1)))


def _polar(G):
    U, _, Vh = torch.linalg.svd(G, full_matrices=False)
    return U @ Vh


def _spread_matrix(*shape, cond=10.0, seed=0):
    """A random (..., m, n) matrix with singular values spread log-uniformly over [1/cond, 1]."""
    g = torch.Generator().manual_seed(seed)
    *batch, m, n = shape
    k = min(m, n)
    U, _ = torch.linalg.qr(torch.randn(*batch, m, k, generator=g))
    V, _ = torch.linalg.qr(torch.randn(*batch, n, k, generator=g))
    S = torch.logspace(0, -math.log10(cond), k)
    return 3.0 * (U * S) @ V.mT  # scaled so the normalisation inside NS matters


# -----------------------------------------------------------------------------
# Newton-Schulz


@pytest.mark.parametrize("shape", [(32, 32), (48, 16), (16, 48), (3, 40, 24)], ids=["square", "tall", "wide", "batch"])
def test_newtonschulz_orthogonalises(shape):
    G = _spread_matrix(*shape)
    X = zeropower_via_newtonschulz5(G)
    assert X.shape == G.shape and X.dtype == torch.float32  # fp32 on CPU by default
    s_in = torch.linalg.svdvals(G)
    assert (s_in.amax(-1) / s_in.amin(-1) > 9).all()  # the input really is spread out...
    s = torch.linalg.svdvals(X)
    # ...and 5 quintic steps with nanochat's coefficients squeeze it into roughly [0.7, 1.2] (not exactly 1)
    assert s.min() > 0.6 and s.max() < 1.25, (s.min().item(), s.max().item())
    # same singular vectors as the input: close to the exact polar factor U V^T
    assert (_cosine(X, _polar(G)) > 0.95).all()


def test_newtonschulz_batched_equals_one_by_one():
    # a batched GEMM against one matrix at a time: other kernels, so in fp64 (tests/conftest.py: FP64_ATOL; five
    # quintic steps amplify a rounding by at most ~3.5^5 ~ 500, still far below the bound)
    G = _spread_matrix(4, 24, 40, seed=1).double()
    X = zeropower_via_newtonschulz5(G, dtype=torch.float64)
    for i in range(4):
        torch.testing.assert_close(X[i], zeropower_via_newtonschulz5(G[i], dtype=torch.float64), atol=FP64_ATOL,
                                   rtol=0)


def test_newtonschulz_bf16_matches_fp32():
    G = _spread_matrix(2, 64, 32, seed=2)
    X32 = zeropower_via_newtonschulz5(G)
    X16 = zeropower_via_newtonschulz5(G, dtype=torch.bfloat16)
    assert X16.dtype == torch.bfloat16
    rel = (X16.float() - X32).norm() / X32.norm()
    assert rel < 0.05, rel.item()  # bf16 has ~3 significant digits; 5 steps accumulate a few percent at most
    assert (_cosine(X16.float(), X32) > 0.998).all()


def test_newtonschulz_steps_improve():
    G = _spread_matrix(32, 32, cond=10.0, seed=3)
    err = [(torch.linalg.svdvals(zeropower_via_newtonschulz5(G, steps=k)) - 1).abs().max() for k in (1, 3, 5)]
    assert err[0] > err[1] > err[2]


@pytest.mark.parametrize("coeffs", ["newton_schulz", "polar_express"])
def test_gram_iteration_equals_the_plain_one(coeffs):
    # fp32 wide matrices (n >= 2m) iterate on their m x m Gram matrix: the same polynomial of X. In fp64 the two
    # agree to ~1e-12; in fp32 an ill-conditioned input amplifies the Gram form's rounding to ~1e-4 of the result
    # (plain: ~4e-6), far below the bf16 iteration's ~1e-2 that GPUs use; a wrong recurrence is off by O(1)
    from nanochat.optim import NEWTON_SCHULZ_COEFFS, POLAR_EXPRESS_COEFFS, _gram_iteration, _plain_iteration

    schedule = [NEWTON_SCHULZ_COEFFS] * 5 if coeffs == "newton_schulz" else list(POLAR_EXPRESS_COEFFS)
    for G in (_spread_matrix(3, 24, 96, cond=100.0, seed=11), torch.randn(2, 16, 32)):
        X = (G / (G.norm(dim=(-2, -1), keepdim=True) * 1.01)).double()
        for steps in (1, 2, 5):
            exact = _plain_iteration(X, schedule[:steps])
            torch.testing.assert_close(_gram_iteration(X, schedule[:steps]), exact, atol=1e-10, rtol=1e-10)
            rel = (_gram_iteration(X.float(), schedule[:steps]).double() - exact).norm() / exact.norm()
            assert rel < 1e-3, rel.item()
    # the public functions take the Gram form for a wide or tall fp32 matrix: still the polar factor
    G = _spread_matrix(96, 24, cond=100.0, seed=12)
    assert (_cosine(zeropower_via_polar_express(G), _polar(G)) > 0.98).all()


# -----------------------------------------------------------------------------
# Polar Express


@pytest.mark.parametrize("shape", [(32, 32), (48, 16), (16, 48), (3, 40, 24)], ids=["square", "tall", "wide", "batch"])
def test_polar_express_is_closer_to_orthogonal_than_newtonschulz(shape):
    inputs = [_spread_matrix(*shape, cond=100.0, seed=4)]
    if shape[-1] != shape[-2]:  # a square Gaussian matrix has singular values near 0 that no 5 steps can lift
        inputs.append(torch.randn(shape, generator=torch.Generator().manual_seed(5)))
    for G in inputs:
        X = zeropower_via_polar_express(G)
        assert X.shape == G.shape and X.dtype == torch.float32
        err = (torch.linalg.svdvals(X) - 1).abs().max()
        err_classic = (torch.linalg.svdvals(zeropower_via_newtonschulz5(G)) - 1).abs().max()
        # 5 steps put every singular value within ~15% of 1; the fixed coefficients leave ~30%
        assert err < 0.16 and err < 0.6 * err_classic, (err.item(), err_classic.item())
        assert (_cosine(X, _polar(G)) > 0.98).all()


def test_polar_express_bf16_matches_fp32():
    G = _spread_matrix(2, 64, 32, seed=6)
    X32, X16 = zeropower_via_polar_express(G), zeropower_via_polar_express(G, dtype=torch.bfloat16)
    assert X16.dtype == torch.bfloat16
    assert ((X16.float() - X32).norm() / X32.norm()) < 0.05


# -----------------------------------------------------------------------------
# NorMuon


@pytest.mark.parametrize("shape", [(4, 32), (32, 4), (16, 16)], ids=["wide", "tall", "square"])
def test_normuon_evens_out_neurons_and_keeps_the_norm(shape):
    rows, cols = shape
    dim = -1 if rows >= cols else -2  # one statistic per row, or per column of a wide matrix
    g = torch.Generator().manual_seed(7)
    neuron_scale = torch.logspace(-1, 1, max(rows, cols))  # neurons whose updates differ 100x in size
    update = torch.randn(shape, generator=g) * (neuron_scale[:, None] if dim == -1 else neuron_scale[None, :])
    second_moment = torch.zeros((rows, 1) if dim == -1 else (1, cols))
    out = normuon_scale(update, second_moment, beta2=0.95)
    torch.testing.assert_close(out.norm(), update.norm())  # the step size stays Muon's
    rms = out.square().mean(dim=dim).sqrt()
    torch.testing.assert_close(rms, torch.full_like(rms, rms[0].item()))  # every neuron moves alike
    torch.testing.assert_close(second_moment, 0.05 * update.square().mean(dim=dim, keepdim=True))
    # later steps: the running mean only partly follows the new update, and the norm is still kept
    update2 = torch.randn(shape, generator=g)
    out2 = normuon_scale(update2, second_moment, beta2=0.95)
    torch.testing.assert_close(out2.norm(), update2.norm())
    assert not torch.allclose(out2 / out2.norm(), update2 / update2.norm())


# -----------------------------------------------------------------------------
# Muon


def test_cautious_weight_decay_by_hand():
    """A Hadamard-shaped gradient is orthogonal with equal rows, so Polar Express and NorMuon keep its direction:
    the update is k * [[1, 1], [1, -1]] with k > 0, and the decay mask follows from the signs by hand."""
    init = torch.tensor([[2.0, -3.0], [4.0, 5.0]])
    # update sign [[+, +], [+, -]] against param sign [[+, -], [+, +]]: agree in the first column only
    mask = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    lr, wd = 0.1, 0.5
    moved = {}
    for variant, decay in [("nanochat", 0.0), ("nanochat", wd), ("classic", 0.0), ("classic", wd)]:
        p = torch.nn.Parameter(init.clone())
        p.grad = torch.tensor([[1.0, 1.0], [1.0, -1.0]])
        Muon([p], lr=lr, variant=variant, weight_decay=decay).step()
        moved[variant, decay] = p.detach()
    update = (init - moved["nanochat", 0.0]) / lr
    torch.testing.assert_close(update / update[0, 0], torch.tensor([[1.0, 1.0], [1.0, -1.0]]))
    # cautious: decayed by lr * wd * p where update and param agree, untouched where they disagree
    torch.testing.assert_close(moved["nanochat", 0.0] - moved["nanochat", wd], lr * wd * init * mask)
    # classic Muon's decay (when asked for) is plain decoupled decay, everywhere
    torch.testing.assert_close(moved["classic", 0.0] - moved["classic", wd], lr * wd * init)


def test_muon_variant_state_and_errors():
    p = torch.nn.Parameter(torch.randn(8, 4))
    opt = Muon([p], variant="nanochat")
    assert opt.param_groups[0]["weight_decay"] == 0.2 and Muon([p]).param_groups[0]["weight_decay"] == 0.0
    p.grad = torch.randn(8, 4)
    opt.step()
    assert opt.state[p]["second_moment"].shape == (8, 1)  # one number per row of a tall matrix
    with pytest.raises(ValueError, match="unknown Muon variant 'fast'; choose one of classic, nanochat"):
        Muon([p], variant="fast")


def _reference_muon(W, grads, lr, momentum, nesterov, ns_steps=5):
    """Muon written out by hand for a single matrix, one step per grad."""
    W = W.clone()
    buf = torch.zeros_like(W)
    scale = math.sqrt(max(1.0, W.shape[0] / W.shape[1]))
    for g in grads:
        buf = momentum * buf + (1 - momentum) * g
        direction = (1 - momentum) * g + momentum * buf if nesterov else buf
        W = W - lr * scale * zeropower_via_newtonschulz5(direction, steps=ns_steps)
    return W


@pytest.mark.parametrize("nesterov", [True, False])
@pytest.mark.parametrize("num_steps", [1, 2])
def test_muon_matches_reference(nesterov, num_steps):
    torch.manual_seed(0)
    shapes = [(16, 4), (16, 4), (4, 16), (8, 8)]  # two of one shape: orthogonalised together in one batch
    init = [torch.randn(s) for s in shapes]
    grads = [[torch.randn(s) for s in shapes] for _ in range(num_steps)]
    params = [torch.nn.Parameter(w.clone()) for w in init]
    opt = Muon(params, lr=0.05, momentum=0.9, nesterov=nesterov)
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        with torch_threads(1):
            opt.step()
        for p, g in zip(params, step_grads):
            assert torch.equal(p.grad, g)  # the grad itself is left untouched
    # fp32 (Muon's Gram iteration exists in fp32 only), one thread on both sides. The update is the same function
    # of the same inputs; Muon applies it in place (one rounding) where the reference subtracts (two), and batches
    # the two equal shapes into one GEMM: ~1 ulp of |W| <= 4 per step (seen: 1.2e-7 per step), 2 steps, so
    # atol 1e-6 + rtol 1e-5 leaves a factor > 4
    for i, p in enumerate(params):
        with torch_threads(1):
            expected = _reference_muon(init[i], [gs[i] for gs in grads], lr=0.05, momentum=0.9, nesterov=nesterov)
        torch.testing.assert_close(p.detach(), expected, atol=1e-6, rtol=1e-5)
    # the tall matrix moved sqrt(16/4) = 2x further than the equally sized wide one (RMS of the update)
    if num_steps == 1:
        tall = (params[0].detach() - init[0]).norm()
        wide = (params[2].detach() - init[2]).norm()
        assert 1.8 < tall / wide < 2.2


def test_muon_skips_params_without_grad():
    a, b = torch.nn.Parameter(torch.randn(8, 8)), torch.nn.Parameter(torch.randn(8, 8))
    before = b.detach().clone()
    a.grad = torch.randn(8, 8)
    Muon([a, b]).step()
    assert torch.equal(b.detach(), before)
    assert len(Muon([a]).state) == 0


@pytest.mark.parametrize("shape", [(8,), (2, 3, 4)])
def test_muon_rejects_non_matrices(shape):
    with pytest.raises(ValueError, match=rf"2-D.*shape {re.escape(str(shape))}.*AdamW"):
        Muon([torch.nn.Parameter(torch.randn(4, 4)), torch.nn.Parameter(torch.randn(*shape))])
    opt = Muon([torch.nn.Parameter(torch.randn(4, 4))])
    with pytest.raises(ValueError, match="2-D"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(*shape))]})


def test_distmuon_needs_process_group():
    with pytest.raises(RuntimeError, match="process group"):
        DistMuon([torch.nn.Parameter(torch.randn(4, 4))])


# -----------------------------------------------------------------------------
# DistMuon on 2 gloo processes

# 5 matrices (odd) in 3 shape buckets across 2 param groups, so the sharding is uneven
DIST_SHAPES = [[(8, 4), (8, 4), (4, 8), (8, 4)], [(6, 6)]]
DIST_LRS = [0.02, 0.01]


def _make_param_groups():
    g = torch.Generator().manual_seed(123)
    return [{"params": [torch.nn.Parameter(torch.randn(s, generator=g)) for s in shapes], "lr": lr}
            for shapes, lr in zip(DIST_SHAPES, DIST_LRS)]


def _set_grads(groups, step):
    g = torch.Generator().manual_seed(1000 + step)  # the same averaged grads on every rank, as after DDP
    for group in groups:
        for p in group["params"]:
            p.grad = torch.randn(p.shape, generator=g)


def _snapshot(groups):
    return [p.detach().clone() for group in groups for p in group["params"]]


def _dist_worker(rank, world_size, port, out_dir, variant):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        groups = _make_param_groups()
        opt = DistMuon(groups, momentum=0.9, variant=variant)
        for step in range(3):
            _set_grads(groups, step)
            opt.step()
        after3 = _snapshot(groups)
        torch.save(opt.state_dict(), f"{out_dir}/optim_rank{rank}.pt")
        for step in (3, 4):
            _set_grads(groups, step)
            opt.step()
        continued = _snapshot(groups)

        # resume: fresh params at the step-3 values, fresh optimizer, this rank's saved state
        fresh = _make_param_groups()
        for p, value in zip([p for g in fresh for p in g["params"]], after3):
            p.data.copy_(value)
        opt2 = DistMuon(fresh, momentum=0.9, variant=variant)
        state = torch.load(f"{out_dir}/optim_rank{rank}.pt", weights_only=True)
        other = dict(state, dist={"rank": 1 - rank, "world_size": world_size})
        try:
            opt2.load_state_dict(other)
            raise AssertionError("loading another rank's state must fail")
        except ValueError as e:
            assert "resume with the same number of processes" in str(e)
        opt2.load_state_dict(state)
        for step in (3, 4):
            _set_grads(fresh, step)
            opt2.step()
        resumed = _snapshot(fresh)
        torch.save({"after3": after3, "continued": continued, "resumed": resumed, "num_state": len(state["state"])},
                   f"{out_dir}/result_rank{rank}.pt")
    finally:
        dist.destroy_process_group()
    # results are on disk: skip interpreter teardown, where gloo's leftover threads now and then abort
    # the process with "terminate called without an active exception" (a torch teardown race)
    os._exit(0)


# the default variant in the default suite; the classic one shares the sharding and communication (--slow)
@pytest.mark.parametrize("variant", [pytest.param("classic", marks=pytest.mark.slow), "nanochat"])
def test_distmuon_matches_muon_on_two_processes(tmp_path, variant):
    world_size = 2
    mp.spawn(_dist_worker, args=(world_size, free_port(), str(tmp_path), variant), nprocs=world_size, join=True)

    # the same steps in this process, on one thread as each worker: the same kernels; what differs is only which
    # matrices are batched into one GEMM (each rank stacks the ones it owns) and gloo's broadcast, which copies
    with torch_threads(1):
        groups = _make_param_groups()
        opt = Muon(groups, momentum=0.9, variant=variant)
        for step in range(3):
            _set_grads(groups, step)
            opt.step()
        after3 = _snapshot(groups)
        for step in (3, 4):
            _set_grads(groups, step)
            opt.step()
        continued = _snapshot(groups)

    num_state = []
    for rank in range(world_size):
        result = torch.load(tmp_path / f"result_rank{rank}.pt", weights_only=True)
        for got, want in zip(result["after3"], after3):
            torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
        for got, want in zip(result["continued"], continued):
            torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
        for got, want in zip(result["resumed"], result["continued"]):
            assert torch.equal(got, want)
        num_state.append(result["num_state"])
    # each rank keeps momentum only for the params it owns; together they cover all 5 exactly once
    assert sum(num_state) == 5 and all(n > 0 for n in num_state), num_state


# -----------------------------------------------------------------------------
# AdamW


def test_make_adamw_keeps_groups():
    emb, head, norm = (torch.nn.Parameter(torch.randn(s)) for s in [(10, 4), (4, 10), (4,)])
    groups = [
        {"params": [emb], "lr": 0.2, "initial_lr": 0.2},
        {"params": iter([head, norm]), "lr": 0.004, "initial_lr": 0.004},  # a one-shot iterator is fine too
    ]
    opt = make_adamw(groups, weight_decay=0.1)
    assert isinstance(opt, torch.optim.AdamW)
    assert [g["params"] for g in opt.param_groups] == [[emb], [head, norm]]
    assert [(g["lr"], g["initial_lr"]) for g in opt.param_groups] == [(0.2, 0.2), (0.004, 0.004)]
    for g in opt.param_groups:
        assert g["betas"] == (0.8, 0.95) and g["eps"] == 1e-10 and g["weight_decay"] == 0.1
        assert not g["fused"] and g["foreach"]  # fused AdamW is CUDA-only
    for p in (emb, head, norm):
        p.grad = torch.ones_like(p)
    before = emb.detach().clone()
    opt.step()
    # first Adam step moves each weight by ~lr (plus decoupled weight decay lr * wd * w)
    torch.testing.assert_close(emb.detach(), before * (1 - 0.2 * 0.1) - 0.2, atol=1e-5, rtol=0)


def test_make_adamw_plain_param_list():
    p = torch.nn.Parameter(torch.randn(3, 3))
    opt = make_adamw([p])
    assert opt.param_groups[0]["params"] == [p] and not opt.param_groups[0]["fused"]
