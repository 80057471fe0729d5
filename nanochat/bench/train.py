"""
bench train: tok/s of forward+backward and of a full optimizer step, ours vs the transformers twin with the same
weights; with --profile, the share of forward+backward's time spent in matmuls on each side.
"""

import torch
import torch.nn.functional as F

from nanochat.bench.harness import (
    alternate,
    compare,
    environment,
    fmt,
    make_model,
    print_table,
    quiet,
    setup,
    timer,
    twin,
    write_results,
)
from nanochat.dist import autocast_ctx
from nanochat.log import print0
from nanochat.models import MODEL_TYPES

SIDES = ("ours", "peer")


def peer_loss(peer, x, y):
    """The peer's loss as ours computes it: cross-entropy of every position against its own target."""
    return F.cross_entropy(peer(input_ids=x, use_cache=False).logits.flatten(0, 1).float(), y.flatten())


def training_fns(model, peer, x, y, device_type, compile=False):
    """Forward+backward, and a full step (forward+backward, clip at 1.0, optimizer, zero grads), of ours (AdamW +
    Muon, the trainer's optimizer_step) and of the peer (torch.optim.AdamW, as transformers users train).
    compile: torch.compile both models' forward+loss alike (the optimizers stay eager, as base_train's)."""
    from nanochat.steps import optimizer_step

    optimizers = quiet(model.setup_optimizers)
    peer_adamw = torch.optim.AdamW(peer.parameters(), lr=1e-4)

    def fwdbwd(loss_fn):
        loss_fn = torch.compile(loss_fn) if compile else loss_fn

        def run():
            with autocast_ctx(device_type):
                loss = loss_fn(x, y)
            loss.backward()
        return run

    ours_fwdbwd, peer_fwdbwd = fwdbwd(model), fwdbwd(lambda x, y: peer_loss(peer, x, y))

    def peer_update():
        torch.nn.utils.clip_grad_norm_(peer.parameters(), 1.0)
        peer_adamw.step()
        peer.zero_grad(set_to_none=True)

    return {
        "ours_fwdbwd": timer(lambda: (ours_fwdbwd(), model.zero_grad(set_to_none=True)), device_type),
        "peer_fwdbwd": timer(lambda: (peer_fwdbwd(), peer.zero_grad(set_to_none=True)), device_type),
        "ours_step": timer(ours_fwdbwd, device_type, then=lambda: optimizer_step(model, optimizers, 1.0, 0.95, 1.0)),
        "peer_step": timer(peer_fwdbwd, device_type, then=peer_update),
    }


def matmul_share(fn, device_type, rounds=2):
    """(ms per call, ms of it in matrix multiplications) of fn, from torch.profiler's self times (the device's on
    CUDA). The time outside the matmuls bounds what any rewrite of the same matmuls can gain: total / matmul."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device_type == "cuda" else [])
    fn()
    with profile(activities=activities) as prof:
        for _ in range(rounds):
            fn()
    key = "self_device_time_total" if device_type == "cuda" else "self_cpu_time_total"
    events = prof.key_averages()
    total = sum(getattr(e, key) for e in events)
    mm = sum(getattr(e, key) for e in events if e.key in ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"))
    return total / rounds / 1e3, mm / rounds / 1e3


def build_pair(model_type, args, device_type):
    """Our model in training mode and its twin set up alike (checkpointing included), or (model, None, why)."""
    model = make_model(model_type, args, args.seq_len, device_type).train()
    model.activation_checkpointing = args.activation_checkpointing
    peer, why = twin(model)
    if peer is not None:
        peer.train()
        if args.activation_checkpointing:
            peer.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model, peer, why


def measure(model, peer, args, device_type):
    """The comparison of ours and the peer on one random batch (the JSON entry of a model type)."""
    B, T = args.batch_size, args.seq_len
    x = torch.randint(0, args.vocab_size, (B, T), device=device_type)
    y = torch.randint(0, args.vocab_size, (B, T), device=device_type)
    with torch.no_grad():  # the same weights compute the same loss: the two do the same work
        ours_loss = model(x, y).item()
        peer_loss_value = peer_loss(peer, x, y).item()
    fns = training_fns(model, peer, x, y, device_type, args.compile)
    t = alternate(fns, args.n)
    figures = {side: {"fwdbwd_tok_s": B * T / t[f"{side}_fwdbwd"]["s"],
                      "step_tok_s": B * T / t[f"{side}_step"]["s"],
                      "fwdbwd_ms": 1e3 * t[f"{side}_fwdbwd"]["s"], "step_ms": 1e3 * t[f"{side}_step"]["s"],
                      "optimizer_ms": 1e3 * t[f"{side}_step"]["then_s"]}
               for side in SIDES}
    if args.profile:  # where forward+backward's time goes: matmuls or the rest
        for side in SIDES:
            total, mm = matmul_share(fns[f"{side}_fwdbwd"], device_type)
            figures[side].update(profiled_ms=total, matmul_ms=mm, matmul_share=mm / total)
    return dict(compare(figures["ours"], figures["peer"]), peer_class=type(peer).__name__,
                loss_diff=abs(ours_loss - peer_loss_value), flops_per_token=model.estimate_flops())


def table_rows(model_type, r, profile):
    """Two table rows, ours (with the ratios) and the peer."""
    rows = []
    for side in SIDES:
        name = f"{model_type} {'ours' if side == 'ours' else r['peer_class']}"
        ratios = [fmt(r["ratio"][k], ".2f") if side == "ours" else "" for k in ("fwdbwd_tok_s", "step_tok_s")]
        share = [fmt(100 * r[side]["matmul_share"], ".0f") + "%"] if profile else []
        rows.append([name, fmt(r[side]["fwdbwd_tok_s"], ",.0f"), fmt(r[side]["step_tok_s"], ",.0f"),
                     fmt(r[side]["optimizer_ms"]), *ratios, *share])
    return rows


def run(args):
    device_type = setup(args)
    B, T = args.batch_size, args.seq_len
    shapes = dict(depth=args.depth, batch_size=B, seq_len=T, vocab_size=args.vocab_size, head_dim=args.head_dim,
                  activation_checkpointing=args.activation_checkpointing, compile=args.compile)
    results = {"shapes": shapes, "env": environment(args, device_type)}
    print0(f"train: d{args.depth}, batch {B} x seq {T}, vocab {args.vocab_size}, {device_type} "
           f"({'bf16 autocast' if device_type == 'cuda' else 'fp32'}), {torch.get_num_threads()} threads, "
           f"median of {args.n}" + (", activation checkpointing" if args.activation_checkpointing else "")
           + (", both compiled" if args.compile else ""))
    rows = []
    for model_type in MODEL_TYPES:
        model, peer, why = build_pair(model_type, args, device_type)
        if peer is None:
            print0(f"{model_type}: no transformers twin ({why}); skipped")
            continue
        results[model_type] = measure(model, peer, args, device_type)
        rows += table_rows(model_type, results[model_type], args.profile)
    print_table(["model", "fwd+bwd tok/s", "step tok/s", "optimizer ms", "ours/peer fwd+bwd", "ours/peer step"]
                + (["matmul share"] if args.profile else []), rows)
    print0("step: forward+backward, grad clip, optimizer (ours AdamW+Muon, peer torch AdamW), zero grads; optimizer "
           "ms: the step's clip, optimizer and zero grads; loss_diff in the JSON: |our loss - peer loss| on one batch")
    if args.profile:
        print0("matmul share: of forward+backward's profiled time, in mm/addmm/bmm; both sides run the same matmuls, "
               "so no rewrite of them beats the peer by more than its time / its matmul time")
    write_results(args, "train", results)
    return results
