"""
bench infer: the decode benchmark on a real checkpoint with a batch-size sweep; on CUDA also the memory-bandwidth
and compute utilisation of a decode step, and the peak memory.
"""

import dataclasses

import torch

from nanochat.bench.decode import decode_rows, decode_table
from nanochat.bench.harness import environment, fmt, setup, twin, write_results
from nanochat.log import UserError, print0

# Memory bandwidth of known GPUs (bytes/s), for the bandwidth utilisation of decoding
PEAK_BANDWIDTH = [("H200", 4.8e12), ("H100", 3.35e12), ("H800", 3.35e12), ("GH200", 4.0e12), ("B200", 8.0e12),
                  ("A100", 2.0e12), ("A800", 2.0e12), ("L40S", 0.864e12), ("L4", 0.3e12), ("A10G", 0.6e12),
                  ("A10", 0.6e12), ("RTX 4090", 1.0e12), ("RTX 3090", 0.936e12), ("V100", 0.9e12), ("T4", 0.32e12)]

PROMPT_TEXT = "The history of the city begins with a small settlement on the river, where traders met to exchange "


def peak_bandwidth(name):
    return next((bw for key, bw in PEAK_BANDWIDTH if key in name.upper()), None)


def decode_utilisation(model, rows, context, tpot_ms):
    """(bandwidth, compute) utilisation of one decode step as fractions of the GPU's peaks, lower bounds: the step
    reads every weight once (as stored) and the rows' keys and values (bf16), and multiplies 2 FLOPs per weight
    per row plus attention over the context."""
    from nanochat.mfu import get_peak_flops

    c = model.config
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    kv_bytes = rows * context * c.n_layer * 2 * c.n_kv_head * model.head_dim * 2
    n_embedding = sum(p.numel() for p in model.param_groups()["embedding"])
    n_params = sum(p.numel() for p in model.parameters())
    flops = rows * (2 * (n_params - n_embedding) + 4 * c.n_layer * c.n_head * model.head_dim * context)
    seconds = tpot_ms / 1e3
    bandwidth, peak = peak_bandwidth(torch.cuda.get_device_name()), get_peak_flops("cuda")
    return ((weight_bytes + kv_bytes) / seconds / bandwidth if bandwidth else None,
            flops / seconds / peak if peak else None)


def checkpoint_prompt(model, tokenizer, args):
    """args.prompt_len tokens of English text, after checking that the prompt and the new tokens fit the context."""
    prompt = (tokenizer.encode(PROMPT_TEXT, prepend=tokenizer.get_bos_token_id()) * args.prompt_len)[:args.prompt_len]
    context = model.config.sequence_len
    if args.prompt_len + args.max_tokens > context:
        raise UserError(f"--prompt_len + --max_tokens = {args.prompt_len + args.max_tokens} > the model's context "
                        f"{context}; lower them")
    return prompt


def add_utilisation(model, entries, prompt_len, max_tokens):
    """Bandwidth and compute utilisation of every batch size's decode step, at the mid-decode context (prompt plus
    half the new tokens), into our figures."""
    for key, e in entries.items():
        if key.startswith("batch"):
            bw, compute = decode_utilisation(model, int(key[5:]), prompt_len + max_tokens // 2, e["ours"]["tpot_ms"])
            e["ours"].update(bandwidth_util=bw, compute_util=compute)
            print0(f"{key}: bandwidth {fmt(bw and 100 * bw, '.1f')}%, compute "
                   f"{fmt(compute and 100 * compute, '.1f')}%, peak memory {e['ours']['peak_mem_gib']:.2f} GiB")


def run(args):
    from nanochat.checkpoint import load_model

    device_type = setup(args)
    model, tokenizer, meta = load_model(args.source, device=device_type, model_tag=args.model_tag, step=args.step)
    model.eval()
    if args.compile:
        model.compile_decode()
    prompt = checkpoint_prompt(model, tokenizer, args)
    peer, why = twin(model)
    if peer is None:
        print0(f"no transformers twin ({why}): ours only")
    model_type = model.model_type
    print0(f"infer: {args.source}/{meta['model_tag']} ({model_type}), prompt {len(prompt)}, {args.max_tokens} new "
           f"tokens, batch sizes {args.batch_sizes}, {device_type}, median of {args.n}"
           + (", ours with compile_decode()" if args.compile else ""))
    shapes = dict(source=args.source, model_tag=meta["model_tag"], step=meta.get("step"), model_type=model_type,
                  config=dataclasses.asdict(model.config), prompt_len=len(prompt), max_tokens=args.max_tokens,
                  batch_sizes=args.batch_sizes, compile=args.compile)
    results = {"shapes": shapes, "env": environment(args, device_type)}
    results[model_type] = decode_rows(model_type, model, peer, prompt, args, device_type, args.batch_sizes,
                                      tokenizer.get_vocab_size())
    if device_type == "cuda":
        add_utilisation(model, results[model_type], len(prompt), args.max_tokens)
    decode_table(results, [model_type])
    write_results(args, "infer", results)
    return results
