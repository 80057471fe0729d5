"""
Pretrain a base model of either architecture. One process:
    python -m scripts.base_train --model_type=alcoholic --depth=4 --device_batch_size=1 --num_iterations=50
Many GPUs (or CPU processes with gloo):
    torchrun --standalone --nproc_per_node=8 -m scripts.base_train -- --model_type=gpt --depth=20
The loop knows nothing of the architecture: the registry builds the model, the model builds its optimizers.
"""

import argparse
import json
import math
import os
import sys
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from nanochat.checkpoint import (
    CheckpointError,
    checkpoint_dir,
    default_model_tag,
    find_last_step,
    load_model_from_dir,
    load_rank_state,
    rank_state_path,
    save_checkpoint,
)
from nanochat.common import (
    DummyWandb,
    autocast_ctx,
    compute_cleanup,
    compute_init,
    get_base_dir,
    get_peak_flops,
    logger,
    one_line,
    parse_args,
    print0,
    run_cli,
    str2bool,
    synchronize,
)
from nanochat.core_eval import evaluate_core, prepare_bundle
from nanochat.dataloader import DataLoader
from nanochat.loss_eval import evaluate_bpb
from nanochat.models import DEPTH_KNOBS, MODEL_TYPES, build_model, config_fields, config_from_depth
from nanochat.tokenizer import get_token_bytes

CUDA_TOTAL_BATCH = 524288  # tokens per optimizer step on GPU (nanochat's default, ~0.5M)
ARCH_OVERRIDES = ("n_head", "n_kv_head", "head_dim", "intermediate_size", "rope_theta", "qk_norm", "norm_type",
                  "mlp_type", "dropout", "norm_eps", "logit_softcap")


def build_parser():
    p = argparse.ArgumentParser(description="Pretrain a base model (gpt or alcoholic).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--run", default="dummy", help="wandb run name ('dummy' = no wandb)")
    p.add_argument("--device_type", default="", help="cuda|mps|cpu (empty = autodetect)")
    p.add_argument("--model_type", default="gpt", help=f"architecture: {', '.join(MODEL_TYPES)}")
    p.add_argument("--depth", type=int, default=20, help="number of layers; width = 64 * depth")
    p.add_argument("--max_seq_len", type=int, default=2048, help="context length")
    p.add_argument("--device_batch_size", type=int, default=32, help="sequences per device per micro-step")
    p.add_argument("--total_batch_size", type=int, default=-1,
                   help=f"tokens per optimizer step (-1: {CUDA_TOTAL_BATCH} on CUDA, one micro-batch elsewhere)")
    p.add_argument("--num_iterations", type=int, default=-1, help="optimizer steps (-1: from flops or data ratio)")
    p.add_argument("--target_flops", type=float, default=-1.0, help="compute budget deciding num_iterations")
    p.add_argument("--target_param_data_ratio", type=float, default=20, help="tokens per parameter (Chinchilla=20)")
    p.add_argument("--embedding_lr", type=float, default=0.2)
    p.add_argument("--unembedding_lr", type=float, default=0.004)
    p.add_argument("--matrix_lr", type=float, default=0.02, help="Muon learning rate")
    p.add_argument("--weight_decay", type=float, default=0.0)
    p.add_argument("--grad_clip", type=float, default=1.0, help="max gradient norm (0 = off)")
    p.add_argument("--warmup_ratio", type=float, default=0.0)
    p.add_argument("--warmdown_ratio", type=float, default=0.2)
    p.add_argument("--final_lr_frac", type=float, default=0.0)
    p.add_argument("--eval_every", type=int, default=250, help="validation bpb every N steps (-1 = only at the end)")
    p.add_argument("--eval_tokens", type=int, default=-1,
                   help=f"validation tokens (-1: {20 * CUDA_TOTAL_BATCH} on CUDA, 16 batches elsewhere)")
    p.add_argument("--core_metric_every", type=int, default=-1,
                   help="CORE metric every N steps and at the end (-1 = off; scripts.base_eval runs it afterwards)")
    p.add_argument("--core_metric_max_per_task", type=int, default=500, help="examples per CORE task in training")
    p.add_argument("--sample_every", type=int, default=2000, help="print samples every N steps (-1 = end only)")
    p.add_argument("--save_every", type=int, default=-1, help="checkpoint every N steps (-1 = end only)")
    p.add_argument("--model_tag", default="", help="checkpoint directory name (default {model_type}_d{depth})")
    p.add_argument("--resume", type=str2bool, nargs="?", const=True, default=False,
                   help="continue from the latest complete checkpoint of this model_tag")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--compile", type=str2bool, default=None, help="torch.compile the model (default: on CUDA only)")
    p.add_argument("--dry_run", type=str2bool, nargs="?", const=True, default=False,
                   help="print parameter counts, FLOPs, batch plan and a memory estimate, then exit")
    arch = p.add_argument_group("architecture overrides (any config field of the chosen model type)")
    for name in ("n_head", "n_kv_head", "head_dim", "intermediate_size"):
        arch.add_argument(f"--{name}", type=int, default=None)
    for name in ("rope_theta", "dropout", "norm_eps", "logit_softcap"):
        arch.add_argument(f"--{name}", type=float, default=None)
    arch.add_argument("--qk_norm", type=str2bool, default=None)
    arch.add_argument("--norm_type", default=None)
    arch.add_argument("--mlp_type", default=None)
    return p


# -----------------------------------------------------------------------------
# Plans: everything decided before training, printed so the user can check it


def arch_overrides(args):
    return {k: getattr(args, k) for k in ARCH_OVERRIDES if getattr(args, k) is not None}


def make_config(model_type, args, vocab_size, overrides):
    return config_from_depth(model_type, args.depth, args.max_seq_len, vocab_size, **overrides)


def batch_plan(args, device_type, world_size):
    tokens_per_fwdbwd = args.device_batch_size * args.max_seq_len * world_size
    total = args.total_batch_size
    note = ""
    if total <= 0:
        if device_type == "cuda":
            total = CUDA_TOTAL_BATCH
        else:
            total = tokens_per_fwdbwd
            note = (f"--total_batch_size not set on {device_type}: one micro-batch per step ({total:,} tokens) "
                    f"instead of {CUDA_TOTAL_BATCH:,}")
    if total % tokens_per_fwdbwd != 0:
        lower = max(tokens_per_fwdbwd, total // tokens_per_fwdbwd * tokens_per_fwdbwd)
        raise SystemExit(
            f"--total_batch_size={total} is not a multiple of device_batch_size * max_seq_len * world_size = "
            f"{args.device_batch_size} * {args.max_seq_len} * {world_size} = {tokens_per_fwdbwd}. "
            f"Use e.g. --total_batch_size={lower} or --total_batch_size={lower + tokens_per_fwdbwd}.")
    return total, total // tokens_per_fwdbwd, note


def plan_iterations(args, num_params, flops_per_token, total_batch):
    if args.num_iterations > 0:
        return args.num_iterations, "--num_iterations"
    if args.target_flops > 0:
        return max(1, round(args.target_flops / (flops_per_token * total_batch))), "--target_flops"
    if args.target_param_data_ratio > 0:
        tokens = args.target_param_data_ratio * num_params
        return max(1, int(tokens // total_batch)), f"--target_param_data_ratio={args.target_param_data_ratio:g}"
    raise SystemExit("set one of --num_iterations, --target_flops or --target_param_data_ratio")


def lr_multiplier(it, num_iterations, args):
    """Linear warmup, constant, linear warmdown to final_lr_frac."""
    warmup = round(args.warmup_ratio * num_iterations)
    warmdown = round(args.warmdown_ratio * num_iterations)
    if it < warmup:
        return (it + 1) / warmup
    if it <= num_iterations - warmdown:
        return 1.0
    progress = (num_iterations - it) / warmdown
    return progress + (1 - progress) * args.final_lr_frac


def muon_momentum(it):
    """0.85 -> 0.95 over the first 300 steps (nanochat): low momentum while the weights move fast."""
    frac = min(it / 300, 1)
    return (1 - frac) * 0.85 + frac * 0.95


def estimate_peak_memory(model, batch_size, seq_len, device_type):
    """Bytes: weights + grads + optimizer state (fp32) + activations saved for backward, counted by running forward
    on the meta device with saved-tensor hooks (no memory is allocated). Not counted: weights saved by their own
    layers (already counted), a tensor saved twice, and (T, T) attention matrices, which flash attention never
    stores. `model` lives on the meta device."""
    groups = model.num_params_by_group()
    n_params, n_muon = groups["total"], groups["matrices"]
    static = {t.untyped_storage()._cdata for t in [*model.parameters(), *model.buffers()]}
    seen, saved = set(), 0

    def pack(t):
        nonlocal saved
        key = (t.untyped_storage()._cdata, t.storage_offset(), tuple(t.shape))
        attention_matrix = t.ndim >= 2 and t.shape[-1] == t.shape[-2] == seq_len
        if key[0] not in static and key not in seen and not attention_matrix:
            seen.add(key)
            saved += t.numel() * t.element_size()
        return t

    idx = torch.zeros(batch_size, seq_len, dtype=torch.long, device="meta")
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(idx, idx)
    if device_type == "cuda":
        saved //= 2  # bf16 autocast stores most activations in half the bytes
    # params + grads + Adam (2 moments on non-Muon params) + Muon (1 momentum buffer)
    states = 4 * (2 * n_params + 2 * (n_params - n_muon) + n_muon)
    return states + saved


def print_dry_run(args, vocab_size, overrides, device_type, world_size):
    total_batch, grad_accum, note = batch_plan(args, device_type, world_size)
    print0(f"Dry run: depth={args.depth} max_seq_len={args.max_seq_len} vocab_size={vocab_size} "
           f"device={device_type} world_size={world_size}")
    print0(f"Batch plan: {args.device_batch_size} x {args.max_seq_len} tokens x {world_size} ranks x "
           f"{grad_accum} accumulation steps = {total_batch:,} tokens/step {note}")
    for model_type in [args.model_type] + [t for t in MODEL_TYPES if t != args.model_type]:
        valid = {k: v for k, v in overrides.items() if k in config_fields(model_type) or k in DEPTH_KNOBS}
        config = make_config(model_type, args, vocab_size, valid)
        with torch.device("meta"):
            model = MODEL_TYPES[model_type].model_cls(config)
        groups = model.num_params_by_group()
        flops = model.estimate_flops()
        mem = estimate_peak_memory(model, args.device_batch_size, args.max_seq_len, device_type)
        iters, why = plan_iterations(args, groups["total"], flops, total_batch)
        chosen = " (chosen)" if model_type == args.model_type else ""
        print0(f"\n[{model_type}{chosen}] {config}")
        print0("  params: " + ", ".join(f"{k}={v:,}" for k, v in groups.items()))
        print0(f"  FLOPs/token: {flops:.3e}; iterations: {iters:,} ({why}); "
               f"total training FLOPs: {flops * total_batch * iters:.3e}")
        print0(f"  estimated peak memory per device: {mem / 2**30:.2f} GiB (eager; torch.compile saves less)")


# -----------------------------------------------------------------------------
# Data and tokenizer: prepared on first use so the first run needs no manual step


def ensure_data_and_tokenizer(rank):
    from nanochat import dataset
    from nanochat.tokenizer import get_tokenizer

    if rank == 0:
        data_dir = dataset.get_data_dir()  # builds the embedded corpus shards when no real shards exist
        try:
            get_tokenizer()
        except FileNotFoundError:
            if os.path.abspath(data_dir) != os.path.abspath(os.path.join(get_base_dir(), "embedded_data")):
                raise SystemExit(f"No tokenizer in {os.path.join(get_base_dir(), 'tokenizer')}. Train one on your "
                                 f"data first: python -m scripts.tok_train --vocab_size=65536")
            from scripts.tok_train import train_tokenizer
            logger.info("No tokenizer found: training a 4096-token BPE tokenizer on the embedded corpus "
                        "(same as: python -m scripts.tok_train --vocab_size=4096)")
            train_tokenizer(vocab_size=4096)
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    return get_tokenizer()


# -----------------------------------------------------------------------------


class NonFiniteLoss(RuntimeError):
    pass


def oom_advice(args):
    """The guide's troubleshooting advice, turned into the concrete next flags for this run."""
    B, T, depth = args.device_batch_size, args.max_seq_len, args.depth
    flags = {"model_type": args.model_type, "depth": depth, "device_batch_size": B, "max_seq_len": T}
    if B > 1:  # halve the batch first: gradient accumulation keeps the total batch (and the results) the same
        flags["device_batch_size"] = B // 2
    elif T > 256:
        flags["max_seq_len"] = T // 2
    else:
        flags["depth"] = max(1, depth - 4)
    now = " ".join(f"--{k}={v}" for k, v in flags.items() if k in ("model_type", "depth")) + \
        f" --device_batch_size={B} --max_seq_len={T}"
    lines = [f"CUDA out of memory with {now}.",
             "Try, in this order (gradient accumulation keeps the total batch size the same):",
             f"  - Reduce --device_batch_size (e.g. {B} -> {max(1, B // 2)})",
             f"  - Reduce --max_seq_len (e.g. {T} -> {max(1, T // 2)})",
             f"  - Reduce --depth (e.g. {depth} -> {max(1, depth - 4)})",
             "Next try: python -m scripts.base_train " + " ".join(f"--{k}={v}" for k, v in flags.items())]
    if args.model_type == "alcoholic":
        lines.append("Alcoholic uses more memory than GPT at the same depth (SwiGLU has three MLP matrices).")
    return "\n".join(lines)


def append_metrics(path, record):
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def truncate_metrics(path, from_step):
    """On resume, drop records of steps that will be recomputed, so the file reads as one run."""
    if not os.path.exists(path):
        return
    kept = []
    with open(path) as f:
        for line in f:
            try:
                if json.loads(line)["step"] < from_step:
                    kept.append(line)
            except (json.JSONDecodeError, KeyError):
                pass  # a line cut short by a killed process
    with open(path, "w") as f:
        f.writelines(kept)


def rng_state():
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def sample(model, tokenizer, device):
    prompts = ["The capital of France is", "Once upon a time", "And God said,", "It is a truth universally"]
    model.eval()
    for prompt in prompts:
        tokens = tokenizer.encode(prompt, prepend=tokenizer.get_bos_token_id())
        out = list(model.generate(tokens, max_tokens=16, temperature=0))
        print0(f"  {prompt!r} -> {tokenizer.decode(out)!r}")
    model.train()


def fmt_time(seconds):
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def train(args):
    ddp, rank, local_rank, world_size, device = compute_init(args.device_type, seed=args.seed)
    device_type = device.type
    master = rank == 0
    if args.model_type not in MODEL_TYPES:
        raise SystemExit(f"--model_type={args.model_type!r} is not known; valid: {', '.join(MODEL_TYPES)}")
    tokenizer = ensure_data_and_tokenizer(rank)
    vocab_size = tokenizer.get_vocab_size()
    overrides = arch_overrides(args)
    if args.dry_run:
        print_dry_run(args, vocab_size, overrides, device_type, world_size)
        return None

    # Model: fresh, or the latest complete checkpoint of this tag when resuming
    model_tag = args.model_tag or default_model_tag(args.model_type, args.depth)
    ckpt_dir = checkpoint_dir("base", model_tag)
    metrics_path = os.path.join(ckpt_dir, "metrics.jsonl")
    start_step, resume_state, meta = 0, None, None
    if args.resume:
        try:
            start_step = find_last_step(ckpt_dir)
        except CheckpointError as e:
            raise SystemExit(f"--resume: {e}. Start without --resume to train from scratch.") from None
        model, meta = load_model_from_dir(ckpt_dir, device, phase="train", step=start_step,
                                          model_type=args.model_type, tokenizer=tokenizer)
        resume_state = load_rank_state(ckpt_dir, start_step, rank)
        print0(f"Resuming {ckpt_dir} from step {start_step}")
    else:
        config = make_config(args.model_type, args, vocab_size, overrides)
        model = build_model(args.model_type, config, device=device)
    config = model.config
    orig_model = model  # the plain module: saving, evaluation and sampling use it

    num_params = sum(p.numel() for p in model.parameters())
    flops_per_token = model.estimate_flops()
    total_batch, grad_accum, note = batch_plan(args, device_type, world_size)
    num_iterations, why = plan_iterations(args, num_params, flops_per_token, total_batch)
    print0(f"Model: {args.model_type} {config}")
    print0("Parameters: " + ", ".join(f"{k}={v:,}" for k, v in model.num_params_by_group().items()))
    print0(f"FLOPs per token: {flops_per_token:.3e}")
    if note:
        print0(note)
    print0(f"Batch: {args.device_batch_size} x {args.max_seq_len} x {world_size} ranks x {grad_accum} accumulation "
           f"= {total_batch:,} tokens/step; {num_iterations:,} steps ({why}); "
           f"{total_batch * num_iterations:,} tokens, {total_batch * num_iterations / num_params:.2f} tokens/param")

    optimizers = model.setup_optimizers(unembedding_lr=args.unembedding_lr, embedding_lr=args.embedding_lr,
                                        matrix_lr=args.matrix_lr, weight_decay=args.weight_decay)
    train_loader = DataLoader(args.device_batch_size, args.max_seq_len, "train", tokenizer=tokenizer, device=device)
    if resume_state is not None:
        try:
            for opt, state in zip(optimizers, resume_state["optimizers"], strict=True):
                opt.load_state_dict(state)
            train_loader.load_state_dict(resume_state["dataloader"])
            set_rng_state(resume_state["rng"])
        except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as e:  # a damaged or foreign rank state
            raise CheckpointError(f"{rank_state_path(ckpt_dir, start_step, rank)} does not fit this run "
                                  f"({type(e).__name__}: {one_line(e)}); start without --resume") from e
        if master:
            truncate_metrics(metrics_path, start_step)
    elif master and os.path.exists(metrics_path):
        os.remove(metrics_path)  # a fresh run of this tag starts a fresh metrics file

    use_compile = device_type == "cuda" if args.compile is None else args.compile
    if use_compile:
        model = torch.compile(model, dynamic=False)
    if ddp:
        model = DDP(model, device_ids=[local_rank] if device_type == "cuda" else None)
    token_bytes = get_token_bytes(device=device)
    eval_tokens = args.eval_tokens if args.eval_tokens > 0 else (
        20 * CUDA_TOTAL_BATCH if device_type == "cuda" else 16 * args.device_batch_size * args.max_seq_len * world_size)
    eval_steps = max(1, eval_tokens // (args.device_batch_size * args.max_seq_len * world_size))
    peak_flops = get_peak_flops(device_type)
    if peak_flops:
        print0(f"MFU is measured against {peak_flops / 1e12:.3g} TFLOP/s per device"
               + (" (a measured fp32 matmul on this CPU)" if device_type == "cpu" else ""))
    wandb_run = DummyWandb()
    if args.run != "dummy" and master:
        try:
            import wandb
        except ImportError:
            raise SystemExit("--run needs wandb: pip install wandb (or use --run=dummy)") from None
        wandb_run = wandb.init(project="nanochat", name=args.run, config=vars(args))
    if master:
        os.makedirs(ckpt_dir, exist_ok=True)
    core_bundle = None
    if args.core_metric_every > 0:
        core_bundle, note, _ = prepare_bundle()
        print0(f"CORE every {args.core_metric_every} steps on {core_bundle} ({note})")

    def save(step, val_bpb, smooth_loss, loader_state):
        # the token buffer of the loader state goes only into the per-rank file: meta stays small and readable
        position = {k: v for k, v in loader_state.items() if k != "buffer"}
        meta = {"train_args": vars(args), "tokenizer_hash": tokenizer.hash, "dataloader_state": position,
                "metrics": {"val_bpb": val_bpb, "train_loss": smooth_loss}, "num_iterations": num_iterations}
        rank_state = {"optimizers": [o.state_dict() for o in optimizers], "dataloader": loader_state,
                      "rng": rng_state()}
        save_checkpoint(ckpt_dir, step, orig_model, meta, rank_state=rank_state, rank=rank)

    # The loop. Batches are fetched one ahead (overlaps host->device copies with compute); `loader_state` is the
    # loader's state *before* the pending batch, which is what a checkpoint must record to resume exactly.
    loader_state = train_loader.state_dict()
    x, y = next(train_loader)
    step, val_bpb, smooth_loss, ema_dt, train_time = start_step, None, 0.0, None, 0.0
    if meta is not None:
        val_bpb = meta.get("metrics", {}).get("val_bpb")
    while True:
        last_step = step == num_iterations
        if last_step or (args.eval_every > 0 and step % args.eval_every == 0):
            orig_model.eval()
            val_loader = DataLoader(args.device_batch_size, args.max_seq_len, "val", tokenizer=tokenizer,
                                    device=device)
            with autocast_ctx(device_type):
                val_bpb = evaluate_bpb(orig_model, val_loader, eval_steps, token_bytes)
            orig_model.train()
            print0(f"step {step:05d} | validation bpb {val_bpb:.4f}")
            if master:
                append_metrics(metrics_path, {"step": step, "val_bpb": val_bpb})
            wandb_run.log({"step": step, "val/bpb": val_bpb})
        if core_bundle and (last_step or (step > start_step and step % args.core_metric_every == 0)):
            orig_model.eval()
            with autocast_ctx(device_type):
                core = evaluate_core(orig_model, tokenizer, device, core_bundle, args.core_metric_max_per_task,
                                     progress=False)["core"]
            orig_model.train()
            print0(f"step {step:05d} | CORE {core:.4f}")
            if master:
                append_metrics(metrics_path, {"step": step, "core": core})
            wandb_run.log({"step": step, "core_metric": core})
        if master and (last_step or (args.sample_every > 0 and step > start_step and step % args.sample_every == 0)):
            print0("Samples:")
            with autocast_ctx(device_type):
                sample(orig_model, tokenizer, device)
        if last_step or (args.save_every > 0 and step > start_step and step % args.save_every == 0):
            save(step, val_bpb, smooth_loss, loader_state)
        if last_step:
            break

        synchronize(device_type)
        t0 = time.time()
        loss_sum = torch.zeros((), device=device)
        for micro_step in range(grad_accum):
            sync = micro_step == grad_accum - 1
            with (model.no_sync() if ddp and not sync else nullcontext()), autocast_ctx(device_type):
                loss = model(x, y)
            loss_sum += loss.detach()
            (loss / grad_accum).backward()
            loader_state = train_loader.state_dict()
            x, y = next(train_loader)
        train_loss = loss_sum / grad_accum
        if ddp:
            dist.all_reduce(train_loss, op=dist.ReduceOp.SUM)
            train_loss /= world_size
        train_loss = train_loss.item()
        if not math.isfinite(train_loss):
            raise NonFiniteLoss(step)
        grad_norm = None
        if args.grad_clip > 0:  # after the DDP all-reduce, so every rank clips the same averaged gradient
            grad_norm = torch.nn.utils.clip_grad_norm_(orig_model.parameters(), args.grad_clip).item()
        lrm = lr_multiplier(step, num_iterations, args)
        for opt in optimizers:
            for group in opt.param_groups:
                group["lr"] = group["initial_lr"] * lrm
                if "momentum" in group:
                    group["momentum"] = muon_momentum(step)
        for opt in optimizers:
            opt.step()
        orig_model.zero_grad(set_to_none=True)
        synchronize(device_type)
        dt = time.time() - t0

        # Logging: tokens/s over all ranks and accumulation steps; MFU against the device's peak; ETA from an EMA
        smooth_loss = train_loss if step == start_step else 0.9 * smooth_loss + 0.1 * train_loss
        steps_done = step - start_step
        if steps_done >= 1:  # the first step includes compilation and warm-up
            train_time += dt
            ema_dt = dt if ema_dt is None else 0.9 * ema_dt + 0.1 * dt
        tok_per_sec = total_batch / dt
        mfu = 100 * flops_per_token * tok_per_sec / (peak_flops * world_size) if peak_flops else None
        eta = fmt_time((num_iterations - step - 1) * (ema_dt or dt))
        print0(f"step {step + 1:05d}/{num_iterations:05d} ({100 * (step + 1) / num_iterations:5.1f}%) | "
               f"loss {train_loss:.6f} | lrm {lrm:.3f} | "
               + (f"grad norm {grad_norm:.3f} | " if grad_norm is not None else "")
               + f"dt {dt * 1000:.0f}ms | tok/s {tok_per_sec:,.0f} | "
               + (f"mfu {mfu:.2f}% | " if mfu is not None else "") + f"eta {eta}")
        record = {"step": step, "loss": train_loss, "lrm": lrm, "dt": dt, "tok_per_sec": tok_per_sec}
        if mfu is not None:
            record["mfu"] = mfu
        if master:
            append_metrics(metrics_path, record)
        wandb_run.log({"step": step, "train/loss": train_loss, "train/lrm": lrm, "train/tok_per_sec": tok_per_sec})
        step += 1

    if device_type == "cuda":
        peak_mem = torch.cuda.max_memory_allocated() / 2**30
        print0(f"Peak memory: {peak_mem:.2f} GiB")
    print0(f"Done: {num_iterations} steps, training time {fmt_time(train_time)}, final validation bpb "
           f"{val_bpb:.4f}. Checkpoint: {ckpt_dir}")
    wandb_run.finish()
    return {"val_bpb": val_bpb, "checkpoint_dir": ckpt_dir, "step": step}


def main(argv=None):
    args = parse_args(build_parser(), argv)
    try:
        return train(args)
    except NonFiniteLoss as e:
        step = e.args[0]
        tag = args.model_tag or default_model_tag(args.model_type, args.depth)
        ckpt_dir = checkpoint_dir("base", tag)
        try:
            last = f"the last good checkpoint is step {find_last_step(ckpt_dir)} in {ckpt_dir} (left untouched)"
        except CheckpointError:
            last = "no checkpoint had been saved yet"
        print0(f"ERROR: the training loss became NaN/inf at step {step}; stopping without saving. {last}. "
               f"Try a lower learning rate (e.g. --matrix_lr, --embedding_lr) or --grad_clip=1.0, then --resume.")
        sys.exit(1)
    except torch.OutOfMemoryError:
        print0(oom_advice(args))
        sys.exit(2)
    finally:
        compute_cleanup()


if __name__ == "__main__":
    run_cli(main)
