"""
The training loop of every stage. base_train, mid_train and chat_sft call `train()`; chat_rl uses its pieces
(flags, learning-rate schedule, optimizer step, checkpoints, logging).

The loop knows neither the architecture (the model builds its own optimizers) nor the data: a loader yields
(inputs, targets) micro-batches, with target -1 where nothing is to be learned, and has state_dict() /
load_state_dict(), so a checkpoint records where the data stands and --resume continues bit for bit.

Every supervised token weighs the same: a step's loss is the sum of the per-token losses of all its micro-batches
on all ranks, divided by the number of supervised tokens in the step. A step with no supervised token at all
changes nothing (no backward, no optimizer step).
"""

import argparse
import math
import os
import sys
import time
from collections import namedtuple
from contextlib import nullcontext

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from nanochat.checkpoint import (
    CheckpointError,
    checkpoint_dir,
    find_last_step,
    get_rng_state,
    load_model_from_dir,
    load_rank_state,
    rank_state_path,
    save_checkpoint,
    set_rng_state,
)
from nanochat.cli import (
    auto_or_non_negative_float,
    auto_or_positive_int,
    fraction,
    non_negative_float,
    positive_int,
    str2bool,
)
from nanochat.dist import autocast_ctx, compute_cleanup, get_dist_info, synchronize
from nanochat.log import UserError, fmt_time, one_line, print0
from nanochat.mfu import forget_cpu_peak, get_peak_flops, mfu_percent, peak_memory
from nanochat.models import get_model_spec
from nanochat.optim import MUON_VARIANTS
from nanochat.report import append_metrics, truncate_metrics

# -----------------------------------------------------------------------------
# Flags every stage shares

INHERITED = ("device_batch_size", "embedding_lr", "unembedding_lr", "matrix_lr", "weight_decay", "muon_variant",
             "grad_clip")
# what a source checkpoint trained before a flag existed was trained with, whatever the flag's default is now
BEFORE_FLAG = {"muon_variant": "classic"}


def add_train_args(p, inherit=False, **defaults):
    """The flags of the training loop. With inherit=True (fine-tuning stages) the flags in INHERITED default to
    None, i.e. to the value the source checkpoint was trained with (see inherit_args)."""

    def arg(name, type, default, help, **kwargs):
        if inherit and name in INHERITED:
            default, help = None, help + " (default: the source checkpoint's)"
        p.add_argument(f"--{name}", type=type, default=defaults.get(name, default), help=help, **kwargs)

    p.add_argument("--run", default="dummy", help="wandb run name ('dummy' = no wandb)")
    p.add_argument("--device_type", default="", help="cuda|mps|cpu (empty = autodetect)")
    arg("device_batch_size", positive_int, 32, "sequences per device per micro-step")
    arg("num_iterations", auto_or_positive_int, -1,
        "optimizer steps (-1: decided by the stage's data or compute budget)")
    arg("embedding_lr", non_negative_float, 0.2, "AdamW learning rate of the token embedding")
    arg("unembedding_lr", non_negative_float, 0.004,
        "AdamW learning rate of the lm_head (and of learnable norm weights)")
    arg("matrix_lr", non_negative_float, 0.02, "Muon learning rate of the matrices inside the blocks")
    arg("weight_decay", non_negative_float, 0.0, "AdamW weight decay")
    arg("muon_variant", str, "nanochat", "Muon for the matrices: nanochat (Polar Express, NorMuon, cautious weight "
        "decay) or classic (fixed Newton-Schulz coefficients); see nanochat/optim.py and docs/benchmarks.md",
        choices=list(MUON_VARIANTS))
    arg("matrix_weight_decay", auto_or_non_negative_float, 0.0 if inherit else -1.0, "Muon's weight decay of the "
        "matrices (-1: the --muon_variant's rule, 0.2*(768/width)^2 for nanochat; the fine-tuning stages default to "
        "0, as nanochat's)")
    arg("grad_clip", non_negative_float, 1.0, "max gradient norm (0 = off)")
    arg("init_lr_frac", non_negative_float, 1.0, "every learning rate is multiplied by this at the start")
    arg("warmup_ratio", fraction, 0.0, "fraction of the steps with a linear warmup")
    arg("warmdown_ratio", fraction, 0.2, "fraction of the steps at the end with a linear warmdown")
    arg("final_lr_frac", fraction, 0.0, "learning rate at the end of the warmdown, as a fraction of the initial one")
    arg("eval_every", auto_or_positive_int, 250, "evaluate every N steps (-1 = only at the start and the end)")
    arg("save_every", auto_or_positive_int, -1, "checkpoint every N steps (-1 = only at the end)")
    arg("log_every", positive_int, 1, "print and record loss and grad norm every N steps: reading them waits for the "
        "device, so the steps in between queue work without waiting (NaN/inf is still caught, at the next log step "
        "or checkpoint, and names the step it happened at)")
    arg("seed", int, 42, "random seed (weights at init, data order, sampling)")
    p.add_argument("--model_tag", default="", help="checkpoint directory name")
    p.add_argument("--resume", type=str2bool, nargs="?", const=True, default=False,
                   help="continue from the latest complete checkpoint of this model_tag")
    p.add_argument("--compile", type=str2bool, default=None, help="torch.compile the model (default: on CUDA only)")
    p.add_argument("--activation_checkpointing", type=str2bool, nargs="?", const=True, default=False,
                   help="recompute each block's activations in backward: less memory, ~1/3 more compute")


def inherit_args(args, source_meta):
    """Flags left at None take the value the source checkpoint was trained with."""
    source_args = source_meta.get("train_args", {})
    if source_args:
        source_args = {**BEFORE_FLAG, **source_args}
    for name in INHERITED:
        if getattr(args, name, None) is None and source_args.get(name) is not None:
            setattr(args, name, source_args[name])
    for name in INHERITED:  # a source without train_args (an import): the base_train defaults
        if getattr(args, name, None) is None:
            defaults = argparse.ArgumentParser()
            add_train_args(defaults)
            setattr(args, name, defaults.get_default(name))


def check_args(args):
    """What the flag types (nanochat.common) cannot check alone, before any work: a one-line error."""
    if args.warmup_ratio + args.warmdown_ratio > 1:
        raise UserError(f"--warmup_ratio={args.warmup_ratio} + --warmdown_ratio={args.warmdown_ratio} > 1: the "
                        f"warmup and the warmdown would overlap")


# -----------------------------------------------------------------------------
# Schedules


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


def weight_decay_multiplier(it, num_iterations):
    """Muon's weight decay ramps linearly from full to 0 over the run (nanochat: better than a constant)."""
    return 1 - it / num_iterations


def setup_optimizers(model, args):
    """The model's optimizers with the run's learning rates, all scaled by --init_lr_frac."""
    optimizers = model.setup_optimizers(unembedding_lr=args.unembedding_lr, embedding_lr=args.embedding_lr,
                                        matrix_lr=args.matrix_lr, weight_decay=args.weight_decay,
                                        muon_variant=args.muon_variant,
                                        matrix_weight_decay=None if args.matrix_weight_decay == -1
                                        else args.matrix_weight_decay)
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"] = group["initial_lr"] * args.init_lr_frac
    return optimizers


def optimizer_step(model, optimizers, lrm, momentum, grad_clip, wdm=1.0):
    """Clip, set the learning rates (and Muon's momentum and weight decay), step, zero the grads. Returns the
    gradient norm before clipping (a tensor)."""
    # foreach: one norm over all grads instead of a Python loop per parameter (not the default on CPU; MPS has none)
    foreach = True if model.get_device().type in ("cpu", "cuda") else None
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else math.inf,
                                               foreach=foreach)
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"] * lrm
            if "momentum" in group:
                group["momentum"] = momentum
            if "initial_weight_decay" in group:
                group["weight_decay"] = group["initial_weight_decay"] * wdm
        opt.step()
    model.zero_grad(set_to_none=True)
    return grad_norm


# -----------------------------------------------------------------------------
# Errors a run ends with


class NonFiniteLoss(UserError):
    def __init__(self, step, ckpt_dir):
        try:
            last = f"the last good checkpoint is step {find_last_step(ckpt_dir)} in {ckpt_dir} (left untouched)"
        except CheckpointError:
            last = "no checkpoint had been saved yet"
        super().__init__(f"the training loss became NaN/inf at step {step}; stopping without saving. {last}. "
                         f"Try a lower learning rate (e.g. --matrix_lr, --embedding_lr) or --grad_clip=1.0, "
                         f"then --resume.")


class OutOfMemory(UserError):
    def __init__(self, script, args, note):
        super().__init__(oom_advice(script, args, note))


def oom_advice(script, args, note=""):
    """The guide's troubleshooting advice, turned into the concrete next flags for this run."""
    B, T, depth = args.device_batch_size, getattr(args, "max_seq_len", None), getattr(args, "depth", None)
    flags = {k: v for k, v in (("model_type", getattr(args, "model_type", None)), ("depth", depth),
                               ("device_batch_size", B), ("max_seq_len", T)) if v is not None}
    if B > 1:  # halve the batch first: gradient accumulation keeps the total batch (and the results) the same
        flags["device_batch_size"] = B // 2
    elif T is not None and T > 256:
        flags["max_seq_len"] = T // 2
    elif depth is not None:
        flags["depth"] = max(1, depth - 4)
    now = " ".join(f"--{k}={getattr(args, k)}" for k in flags)
    lines = [f"CUDA out of memory with {now}.",
             "Try, in this order (gradient accumulation keeps the total batch size the same):",
             f"  - Reduce --device_batch_size (e.g. {B} -> {max(1, B // 2)})"]
    if T is not None:
        lines.append(f"  - Reduce --max_seq_len (e.g. {T} -> {max(1, T // 2)})")
    if depth is not None:
        lines.append(f"  - Reduce --depth (e.g. {depth} -> {max(1, depth - 4)})")
    lines.append(f"Next try: python -m scripts.{script} " + " ".join(f"--{k}={v}" for k, v in flags.items()))
    if note:
        lines.append(note)
    return "\n".join(lines)


def run_stage(fn, args):
    """Run a training stage; a NaN loss or an out-of-memory error ends it with its message on stdout, like the
    step lines, and a non-zero exit status (1 and 2)."""
    try:
        return fn(args)
    except NonFiniteLoss as e:
        print0(f"ERROR: {e}")
        sys.exit(1)
    except OutOfMemory as e:
        print0(str(e))
        sys.exit(2)
    finally:
        compute_cleanup()


# -----------------------------------------------------------------------------
# Starting and resuming


Resume = namedtuple("Resume", "step rank_state meta")


def resume_from(source, model_tag, device, tokenizer, model_type=None):
    """(model, Resume) from the latest complete checkpoint of `model_tag`, to continue training."""
    ckpt_dir = checkpoint_dir(source, model_tag)
    try:
        step = find_last_step(ckpt_dir)
    except CheckpointError as e:
        raise UserError(f"--resume: {e}. Start without --resume to train from scratch.") from None
    model, meta = load_model_from_dir(ckpt_dir, device, phase="train", step=step, model_type=model_type,
                                      tokenizer=tokenizer)
    _, rank, _, _ = get_dist_info()
    print0(f"Resuming {ckpt_dir} from step {step}")
    return model, Resume(step, load_rank_state(ckpt_dir, step, rank), meta)


def restore(optimizers, loader, rank_state, ckpt_dir, step, rank):
    """Put optimizers, data position and RNG back where a checkpoint left them; a rank state that loads but does not
    fit this run (another model, optimizer or loader) is a one-line error naming its file."""
    try:
        for opt, state in zip(optimizers, rank_state["optimizers"], strict=True):
            opt.load_state_dict(state)
        if loader is not None:
            loader.load_state_dict(rank_state["dataloader"])
        set_rng_state(rank_state["rng"])
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{rank_state_path(ckpt_dir, step, rank)} does not fit this run "
                              f"({type(e).__name__}: {one_line(e)}); start without --resume") from e


class DummyWandb:
    """Stand-in for a wandb run when --run=dummy (the default): logging becomes a no-op."""

    def log(self, *args, **kwargs):
        pass

    def finish(self):
        pass


def init_wandb(args, master):
    if args.run == "dummy" or not master:
        return DummyWandb()
    try:
        import wandb
    except ImportError:
        raise UserError("--run needs wandb: pip install wandb (or use --run=dummy)") from None
    return wandb.init(project="nanochat", name=args.run, config=vars(args))


# -----------------------------------------------------------------------------
# The loop


def token_loss_sum(model, x, y):
    return model(x, y, loss_reduction="sum")


def forward_backward(model, batches, ddp, world_size, device_type, loss_fn=token_loss_sum, count=None):
    """Backward of sum(loss_fn over the micro-batches) / (supervised tokens in the step, all ranks). A batch is
    (inputs, targets, *extra), loss_fn(model, *batch) sums its per-token losses. Returns (mean loss, number of
    supervised tokens); (None, 0) when there is none, and then nothing is run. `count`: the number of supervised
    tokens when the caller knows it (every target counts), which saves counting them on the device."""
    if count is None:
        count = sum((batch[1] >= 0).sum() for batch in batches)
        if ddp:
            dist.all_reduce(count)
        count = int(count)  # a host-device sync: the optimizer step is skipped when it is 0
    if count == 0:
        return None, 0
    scale = world_size / count  # DDP averages the gradients of the ranks: undo that, then divide by the count
    loss_sum = torch.zeros((), device=batches[0][0].device)
    for i, batch in enumerate(batches):
        sync = i == len(batches) - 1  # DDP all-reduces the gradients on the last micro-batch only
        with (model.no_sync() if ddp and not sync else nullcontext()), autocast_ctx(device_type):
            loss = loss_fn(model, *batch)
        (loss * scale).backward()
        loss_sum += loss.detach()
    if ddp:
        dist.all_reduce(loss_sum)
    return loss_sum / count, count


def is_due(every, step):
    """Whether a periodic action (every N steps; -1 = never) falls on this step."""
    return every > 0 and step % every == 0


def params_are_finite(model):
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


def train(args, model, loader, *, source, model_tag, num_iterations, grad_accum, meta, script, evaluate=None,
          eval_due=None, resume=None, compile_dynamic=False, tokens_per_step=None):
    """
    Train `model` for num_iterations optimizer steps of grad_accum micro-batches from `loader`, and save checkpoints
    into {source}_checkpoints/{model_tag}.
    meta: what every checkpoint records besides the step's own (train_args, tokenizer_hash, lineage, ...).
    evaluate(model, step) -> dict of metrics, run at the first step, at the end, and at the steps where
    eval_due(step) says so (default: every --eval_every steps).
    resume: a Resume from resume_from(). tokens_per_step: for tok/s and MFU (default: counted).
    """
    ddp, rank, local_rank, world_size = get_dist_info()
    master = rank == 0
    device = model.get_device()
    device_type = device.type
    ckpt_dir = checkpoint_dir(source, model_tag)
    metrics_path = os.path.join(ckpt_dir, "metrics.jsonl")
    start_step, rank_state = (resume.step, resume.rank_state) if resume is not None else (0, None)

    optimizers = setup_optimizers(model, args)
    if rank_state is not None:
        restore(optimizers, loader, rank_state, checkpoint_dir(source, model_tag), start_step, rank)
        if master:
            truncate_metrics(metrics_path, start_step)
    elif master and os.path.exists(metrics_path):
        os.remove(metrics_path)  # a fresh run of this tag starts a fresh metrics file
    if master:
        os.makedirs(ckpt_dir, exist_ok=True)

    orig_model = model  # the plain module: saving, evaluation and sampling use it
    orig_model.activation_checkpointing = getattr(args, "activation_checkpointing", False)
    use_compile = device_type == "cuda" if args.compile is None else args.compile
    if use_compile:
        model = torch.compile(model, dynamic=compile_dynamic)
    if ddp:
        model = DDP(model, device_ids=[local_rank] if device_type == "cuda" else None)
    flops_per_token = orig_model.estimate_flops()
    peak_flops = get_peak_flops(device_type)
    if peak_flops:
        print0(f"MFU is measured against {peak_flops / 1e12:.3g} TFLOP/s per device"
               + (" (best of timed fp32 matmuls on this CPU, cached)" if device_type == "cpu" else ""))
    wandb_run = init_wandb(args, master)

    def log(record):
        if master:
            append_metrics(metrics_path, record)
        wandb_run.log(record)

    def run_evaluation(step):
        orig_model.eval()
        with autocast_ctx(device_type):
            results = evaluate(orig_model, step) if evaluate else {}
        orig_model.train()
        if results:
            log({"step": step, **results})
        return results

    def save(step, loader_state):
        if not params_are_finite(orig_model):
            raise NonFiniteLoss(step, ckpt_dir)
        position = {k: v for k, v in loader_state.items() if k != "buffer"}  # meta stays small and readable
        step_meta = dict(meta, dataloader_state=position, num_iterations=num_iterations,
                         metrics={**last_metrics, "train_loss": smooth_loss,
                                  "peak_memory_bytes": peak_memory(device_type)})
        state = {"optimizers": [o.state_dict() for o in optimizers], "dataloader": loader_state,
                 "rng": get_rng_state()}
        save_checkpoint(ckpt_dir, step, orig_model, step_meta, rank_state=state, rank=rank)

    def fetch():
        state = loader.state_dict()  # where the data stands before these batches: what a checkpoint records
        return state, [next(loader) for _ in range(grad_accum)]

    step, smooth_loss, ema_dt, train_time, t0, peak_warned = start_step, None, None, 0.0, None, False
    # the first step whose loss or grad norm was NaN/inf, kept on the device (-1: none) so that checking it costs
    # no wait; read at log steps and before every checkpoint, which is then never written after a bad step
    first_bad = torch.full((), -1, dtype=torch.long, device=device)

    def check_finite():
        bad = int(first_bad)
        if bad >= 0:
            raise NonFiniteLoss(bad, ckpt_dir)

    # every target of a plain token stream counts: the step's count is known without asking the device
    every_target_counts = getattr(loader, "every_target_counts", False)
    last_metrics = dict(resume.meta.get("metrics", {})) if resume is not None else {}
    last_metrics.pop("train_loss", None)
    try:
        loader_state, batches = fetch()
        while True:
            last_step = step == num_iterations
            if last_step or step == 0 or (eval_due or (lambda s: is_due(args.eval_every, s)))(step):
                last_metrics.update(run_evaluation(step))
                t0 = None  # evaluation is not training time
            if last_step or (args.save_every > 0 and step > start_step and step % args.save_every == 0):
                check_finite()
                save(step, loader_state)
                t0 = None
            if last_step:
                break

            if t0 is None:  # a timing window starts: from here to the next log step
                synchronize(device_type)
                t0, window = time.time(), 0
            window += 1
            processed = tokens_per_step or sum(batch[0].numel() for batch in batches) * world_size
            known = sum(batch[1].numel() for batch in batches) * world_size if every_target_counts else None
            loss, count = forward_backward(model, batches, ddp, world_size, device_type, count=known)
            lrm = lr_multiplier(step, num_iterations, args)
            grad_norm = None
            if loss is not None:
                grad_norm = optimizer_step(orig_model, optimizers, lrm, muon_momentum(step), args.grad_clip,
                                           weight_decay_multiplier(step, num_iterations))
                values = torch.stack([loss, grad_norm.to(loss.device)])
                first_bad = torch.where((first_bad < 0) & ~values.isfinite().all(), step, first_bad)
            loader_state, batches = fetch()  # the next batches are prepared while the device finishes this step
            # the first step is logged alone: it includes compilation and warm-up
            if not (step == start_step or is_due(args.log_every, step + 1) or step + 1 == num_iterations):
                step += 1  # nothing read back from the device: the next step is queued right away
                continue
            check_finite()
            if loss is not None:
                loss, grad_norm = values.tolist()
            synchronize(device_type)
            dt = (time.time() - t0) / window  # per step, over the steps since the last log
            t0 = None

            if step > start_step:
                train_time += dt * window
                ema_dt = dt if ema_dt is None else 0.9 * ema_dt + 0.1 * dt
            if loss is not None:
                smooth_loss = loss if smooth_loss is None else 0.9 * smooth_loss + 0.1 * loss
            tok_per_sec = processed / dt
            mfu = mfu_percent(flops_per_token, tok_per_sec, peak_flops, world_size)
            if mfu is None and peak_flops and not peak_warned:  # above 100%: the peak is too low, not the model fast
                peak_warned = True
                print0(f"MFU n/a: this step would be above 100% of the {peak_flops / 1e12:.3g} TFLOP/s peak, so the "
                       f"peak is wrong" + ("; the cached CPU peak is dropped and measured again at the next run"
                                          if device_type == "cpu" else ""))
                if device_type == "cpu" and master:
                    forget_cpu_peak()
            eta = fmt_time((num_iterations - step - 1) * (ema_dt or dt))
            print0(f"step {step + 1:05d}/{num_iterations:05d} ({100 * (step + 1) / num_iterations:5.1f}%) | "
                   + (f"loss {loss:.6f} | " if loss is not None else "no supervised token: skipped | ")
                   + f"lrm {lrm:.3f} | " + (f"grad norm {grad_norm:.3f} | " if grad_norm is not None else "")
                   + f"dt {dt * 1000:.0f}ms | tok/s {tok_per_sec:,.0f} | "
                   + (f"mfu {mfu:.2f}% | " if mfu is not None else "mfu n/a | ") + f"eta {eta}")
            record = {"step": step, "lrm": lrm, "dt": dt, "tok_per_sec": tok_per_sec, "supervised_tokens": count}
            if loss is not None:
                record.update(loss=loss, grad_norm=grad_norm)
            if mfu is not None:
                record["mfu"] = mfu
            log(record)
            step += 1
    except torch.OutOfMemoryError:
        raise OutOfMemory(script, args, get_model_spec(orig_model.model_type).memory_advice) from None

    peak = peak_memory(device_type)
    if peak is not None:
        print0(f"Peak memory: {peak / 2**30:.2f} GiB ({'max allocated' if device_type == 'cuda' else 'max RSS'})")
    summary = ", ".join(f"{k} {v:.4f}" for k, v in last_metrics.items() if isinstance(v, float))
    print0(f"Done: {num_iterations} steps, training time {fmt_time(train_time)}"
           + (f", {summary}" if summary else "") + f". Checkpoint: {ckpt_dir}")
    wandb_run.finish()
    return {"checkpoint_dir": ckpt_dir, "step": step, **last_metrics}
