"""
bench memory: the measured peak memory of real training steps, in a fresh process per run, vs the estimate that
base_train --dry_run prints (nanochat.plan.estimate_peak_memory).

    python -m nanochat.bench.memory '<spec json>'   # the fresh process: prints training_memory(spec) as JSON
"""

import json
import os
import subprocess
import sys

import torch

from nanochat.bench.harness import environment, fmt, print_table, quiet, setup, write_results
from nanochat.log import print0
from nanochat.models import MODEL_TYPES, build_model, config_from_depth

GIB = 2**30
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def training_memory(spec):
    """Peak memory of spec["steps"] training steps as the trainer runs them (forward_backward, optimizer_step):
    max allocated on CUDA, max RSS on CPU; and the runtime baseline as --dry_run measures it (on CPU the RSS after
    a tiny warm-up step, before the model is built). Meant for a fresh process."""
    from nanochat.mfu import peak_memory
    from nanochat.plan import current_rss, runtime_baseline
    from nanochat.steps import forward_backward, optimizer_step

    device_type = spec["device_type"]
    baseline = runtime_baseline(device_type)
    torch.manual_seed(0)
    model = build_model(spec["model_type"], config_from_depth(spec["model_type"], spec["depth"], spec["seq_len"],
                                                              spec["vocab_size"], head_dim=spec["head_dim"]),
                        device=device_type).train()
    model.activation_checkpointing = spec["activation_checkpointing"]
    optimizers = quiet(model.setup_optimizers)
    B, T, V = spec["batch_size"], spec["seq_len"], spec["vocab_size"]
    for _ in range(spec["steps"]):
        x = torch.randint(0, V, (B, T), device=device_type)
        forward_backward(model, [(x, x)], False, 1, device_type)
        optimizer_step(model, optimizers, 1.0, 0.95, 1.0)
    peak = peak_memory(device_type)
    if device_type != "cuda":  # the kernel updates max RSS lazily: it can lag the resident memory of this moment
        peak = max(peak, current_rss() or 0)
    return {"peak": peak, "baseline": baseline, "delta": peak - baseline}


def measure_in_subprocess(spec):
    """training_memory(spec) in a fresh Python process, so that no figure carries another's memory."""
    cmd = [sys.executable, "-m", "nanochat.bench.memory", json.dumps(spec)]
    env = dict(os.environ)
    if spec.get("threads"):
        env["OMP_NUM_THREADS"] = str(spec["threads"])
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO_ROOT)
    if out.returncode != 0:
        raise RuntimeError(f"memory measurement of {spec['model_type']} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def estimate(model_type, args, device_type, ckpt, baseline):
    """The estimate as --dry_run makes it (estimate_peak_memory), with the runtime baseline of the fresh process."""
    from nanochat.plan import allocator_held, tensor_peak_bytes

    config = config_from_depth(model_type, args.depth, args.seq_len, args.vocab_size, head_dim=args.head_dim)
    counted = tensor_peak_bytes(model_type, config, args.batch_size, args.seq_len, device_type, ckpt)
    held = allocator_held(counted, device_type, ckpt)
    return {"peak": held + baseline, "tensors": counted.peak, "heap_tensors": counted.heap_peak, "held": held,
            "baseline": baseline}


def measure(model_type, args, device_type, ckpt):
    """The JSON entry of one model type with or without activation checkpointing: measured, estimate, ratios."""
    spec = dict(model_type=model_type, depth=args.depth, batch_size=args.batch_size, seq_len=args.seq_len,
                vocab_size=args.vocab_size, head_dim=args.head_dim, steps=args.steps, activation_checkpointing=ckpt,
                device_type=device_type, threads=args.threads)
    measured = measure_in_subprocess(spec)
    est = estimate(model_type, args, device_type, ckpt, measured["baseline"])
    return {"measured": measured, "estimate": est, "ratio": est["peak"] / measured["peak"],
            "tensors_ratio": est["tensors"] / measured["delta"] if measured["delta"] > 0 else None,
            "activation_checkpointing": ckpt}


def table_row(key, e):
    measured, est = e["measured"], e["estimate"]
    return [key, fmt(measured["peak"] / GIB, ".2f"), fmt(est["peak"] / GIB, ".2f"), fmt(e["ratio"], ".3f"),
            fmt(measured["delta"] / GIB, ".2f"), fmt(est["tensors"] / GIB, ".2f"), fmt(e["tensors_ratio"], ".3f")]


def run(args):
    device_type = setup(args)
    shapes = dict(depth=args.depth, batch_size=args.batch_size, seq_len=args.seq_len, vocab_size=args.vocab_size,
                  head_dim=args.head_dim, steps=args.steps)
    results = {"shapes": shapes, "env": environment(args, device_type)}
    print0(f"memory: d{args.depth}, batch {args.batch_size} x seq {args.seq_len}, vocab {args.vocab_size}, "
           f"{args.steps} training steps in a fresh process per run, {device_type}")
    rows = []
    for ckpt in {"off": [False], "on": [True], "both": [False, True]}[args.activation_checkpointing]:
        for model_type in MODEL_TYPES:
            key = model_type + ("+ckpt" if ckpt else "")
            results[key] = measure(model_type, args, device_type, ckpt)
            rows.append(table_row(key, results[key]))
    what = "max allocated" if device_type == "cuda" else "max RSS"
    print_table(["model", f"measured ({what}) GiB", "estimate GiB", "est/meas", "measured - baseline GiB",
                 "tensors' peak GiB", "tensors/(meas - base)"], rows)
    on_cpu = (", plus what glibc's heap keeps (plan.CPU_HEAP_RETENTION) and the process's RSS after a tiny warm-up "
              "step") if device_type != "cuda" else ""
    print0("estimate: nanochat.plan.estimate_peak_memory (base_train --dry_run): the tensors' peak in a training "
           "step, counted on fake tensors" + on_cpu)
    write_results(args, "memory", results)
    return results


if __name__ == "__main__":  # the fresh process of measure_in_subprocess
    print0(json.dumps(training_memory(json.loads(sys.argv[1]))))
