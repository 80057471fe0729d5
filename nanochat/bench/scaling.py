"""bench scaling: forward+backward tok/s and FLOPs/token of every model type over depth, tabled and plotted."""

import os

import torch

from nanochat.bench.harness import alternate, environment, fmt, print_table, setup, timer, write_results
from nanochat.dist import autocast_ctx
from nanochat.log import print0
from nanochat.models import MODEL_TYPES, build_model, config_from_depth
from nanochat.plan import human


def fwdbwd_timer(model, x, device_type):
    def fwdbwd():
        with autocast_ctx(device_type):
            loss = model(x, x)
        loss.backward()
        model.zero_grad(set_to_none=True)

    return timer(fwdbwd, device_type)


def measure_depth(depth, args, head_dim, device_type):
    """({type: model}, {type: {"s": seconds per forward+backward}}) of every type at this depth, in turns."""
    fns, models = {}, {}
    for t in MODEL_TYPES:
        torch.manual_seed(0)
        config = config_from_depth(t, depth, args.seq_len, args.vocab_size, head_dim=head_dim)
        model = models[t] = build_model(t, config, device=device_type).train()
        x = torch.randint(0, args.vocab_size, (args.batch_size, args.seq_len), device=device_type)
        fns[t] = fwdbwd_timer(model, x, device_type)
    return models, alternate(fns, args.n)


def record(r, depth, model, tok_s):
    """Appends one depth's figures to a type's series; returns its table row's figures."""
    flops = model.estimate_flops()
    r["depth"].append(depth)
    r["params"].append(sum(p.numel() for p in model.parameters()))
    r["flops_per_token"].append(flops)
    r["tok_s"].append(tok_s)
    r["tflops"].append(flops * tok_s / 1e12)
    return [human(r["params"][-1]), human(flops), fmt(tok_s, ",.0f"), fmt(flops * tok_s / 1e9, ",.1f")]


def run(args):
    device_type = setup(args)
    B, T = args.batch_size, args.seq_len
    # one head_dim for every depth: 64 splits every width (64 x depth) into whole heads, where the types' default
    # of 128 does not at odd depths
    head_dim = args.head_dim or 64
    results = {"shapes": dict(depths=args.depths, batch_size=B, seq_len=T, vocab_size=args.vocab_size,
                              head_dim=head_dim),
               "env": environment(args, device_type)}
    results.update({t: {"depth": [], "params": [], "flops_per_token": [], "tok_s": [], "tflops": []}
                    for t in MODEL_TYPES})
    print0(f"scaling: forward+backward tok/s over depth, batch {B} x seq {T}, vocab {args.vocab_size}, head_dim "
           f"{head_dim}, {device_type}, median of {args.n}")
    rows = []
    for depth in args.depths:
        models, times = measure_depth(depth, args, head_dim, device_type)
        for t, model in models.items():
            rows.append([f"{t} d{depth}", *record(results[t], depth, model, B * T / times[t]["s"])])
        del models  # free this depth's models before building the next, larger ones
    print_table(["model", "params", "FLOPs/token", "tok/s", "GFLOP/s"], rows)
    write_results(args, "scaling", results)
    plot_scaling(results, os.path.join(args.out, "scaling.png"))
    return results


def plot_scaling(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for t in MODEL_TYPES:
        r = results[t]
        ax1.plot(r["depth"], r["tok_s"], marker="o", label=t)
        ax2.plot(r["depth"], r["flops_per_token"], marker="o", label=t)
    ax1.set(xlabel="depth", ylabel="tokens/s (forward+backward)", yscale="log", title="training throughput")
    ax2.set(xlabel="depth", ylabel="FLOPs/token", yscale="log", title="training FLOPs per token")
    for ax in (ax1, ax2):
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    print0(f"wrote {path}")

