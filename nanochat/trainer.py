"""
The one training loop of every stage: base, mid, SFT and RL run train(config, stage). The loop owns the checkpoint
directory, the optimizers, resume, DDP, torch.compile, wandb, logging, saving and the NaN/out-of-memory stops; a
Stage (what differs) brings its batches, its loss, its evaluation and what its checkpoints record.

The loop knows neither the architecture (the model builds its own optimizers) nor the data: stage.batches.fetch(step)
returns micro-batches (inputs, targets, *extra), with target -1 where nothing is to be learned, and has
state_dict() / load_state_dict(), so a checkpoint records where the data stands and --resume continues bit for bit.

Every supervised token weighs the same: a step's loss is the sum of the per-token losses (stage.loss_fn) of all its
micro-batches on all ranks, divided by the number of supervised tokens in the step. A step with no supervised token
at all changes nothing (no backward, no optimizer step).
"""

import os
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from nanochat.checkpoint import CheckpointError, checkpoint_dir, find_last_step, get_rng_state, save_checkpoint
from nanochat.dist import autocast_ctx, compute_cleanup, get_dist_info, synchronize
from nanochat.log import UserError, fmt_time, print0
from nanochat.mfu import forget_cpu_peak, get_peak_flops, mfu_percent, peak_memory
from nanochat.models import get_model_spec
from nanochat.report import append_metrics, truncate_metrics
from nanochat.start import restore
from nanochat.steps import (
    forward_backward,
    lr_multiplier,
    muon_momentum,
    optimizer_step,
    setup_optimizers,
    token_loss_sum,
    weight_decay_multiplier,
)

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
    def __init__(self, script, config, note):
        super().__init__(oom_advice(script, config, note))


def oom_advice(script, config, note=""):
    """The guide's troubleshooting advice, turned into the concrete next flags for this run."""
    B, T, depth = config.device_batch_size, getattr(config, "max_seq_len", None), getattr(config, "depth", None)
    now = {k: v for k, v in (("model_type", getattr(config, "model_type", None)), ("depth", depth),
                             ("device_batch_size", B), ("max_seq_len", T)) if v is not None}
    flags = dict(now)
    if B > 1:  # halve the batch first: gradient accumulation keeps the total batch (and the results) the same
        flags["device_batch_size"] = B // 2
    elif T is not None and T > 256:
        flags["max_seq_len"] = T // 2
    elif depth is not None:
        flags["depth"] = max(1, depth - 4)
    lines = [f"CUDA out of memory with {' '.join(f'--{k}={v}' for k, v in now.items())}.",
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


def run_stage(fn, config):
    """Run a training stage; a NaN loss or an out-of-memory error ends it with its message on stdout, like the
    step lines, and a non-zero exit status (1 and 2)."""
    try:
        return fn(config)
    except NonFiniteLoss as e:
        print0(f"ERROR: {e}")
        sys.exit(1)
    except OutOfMemory as e:
        print0(str(e))
        sys.exit(2)
    finally:
        compute_cleanup()


class DummyWandb:
    """Stand-in for a wandb run when --run=dummy (the default): logging becomes a no-op."""

    def log(self, *args, **kwargs):
        pass

    def finish(self):
        pass


def init_wandb(config, master):
    if config.run == "dummy" or not master:
        return DummyWandb()
    try:
        import wandb
    except ImportError:
        raise UserError("--run needs wandb: pip install wandb (or use --run=dummy)") from None
    from dataclasses import asdict

    return wandb.init(project="nanochat", name=config.run, config=asdict(config))


def is_due(every, step):
    """Whether a periodic action (every N steps; -1 = never) falls on this step."""
    return every > 0 and step % every == 0


def params_are_finite(model):
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


# -----------------------------------------------------------------------------
# The stage and the loop


class LoaderBatches:
    """A stage's batches from a data loader: grad_accum micro-batches per step, the loader's position as state."""

    prefetch = True  # the next step's batches are read while the device still works on this one

    def __init__(self, loader, grad_accum):
        self.loader, self.grad_accum = loader, grad_accum
        self.every_target_counts = getattr(loader, "every_target_counts", False)

    def fetch(self, step, model):
        return [next(self.loader) for _ in range(self.grad_accum)], {}

    def state_dict(self):
        return self.loader.state_dict()

    def load_state_dict(self, state):
        self.loader.load_state_dict(state)


@dataclass
class Stage:
    """What a stage brings to the loop."""

    source: str  # its checkpoints: {source}_checkpoints/{model_tag}
    script: str  # python -m scripts.{script}: named in the out-of-memory advice
    model_tag: str
    num_iterations: int
    batches: object  # fetch(step, model) -> ([(inputs, targets, *extra)], {info}); state_dict(); load_state_dict()
    meta: dict  # what every checkpoint records besides the step's own (config, tokenizer hash, lineage, ...)
    evaluate: Callable | None = None  # (model, step) -> {metric: value}, at the first and last step and when due
    eval_due: Callable | None = None  # step -> bool (default: every --eval_every steps)
    loss_fn: Callable = token_loss_sum
    tokens_per_step: int | None = None  # for tok/s and MFU (default: counted)
    compile_dynamic: bool = False  # rows of varying length (SFT, RL)


def train(config, model, stage, resume=None):
    """Train `model` for stage.num_iterations optimizer steps and save its checkpoints. resume: where an
    interrupted run of this stage stopped (nanochat/start.py). Returns {"checkpoint_dir", "step", **the last
    evaluation's metrics}."""
    loop = Loop(config, model, stage, resume)
    try:
        loop.run()
    except torch.OutOfMemoryError:
        raise OutOfMemory(stage.script, config, get_model_spec(model.model_type).memory_advice) from None
    return loop.finish()



class Loop:
    """The state of one run of train(): set up in __init__, stepped by run(), summed up by finish()."""

    def __init__(self, config, model, stage, resume):
        self.config, self.stage, self.orig_model = config, stage, model  # the plain module: saved, evaluated, sampled
        self.ddp, self.rank, local_rank, self.world_size = get_dist_info()
        self.master, self.device_type = self.rank == 0, model.get_device().type
        self.ckpt_dir = checkpoint_dir(stage.source, stage.model_tag)
        self.metrics_path = os.path.join(self.ckpt_dir, "metrics.jsonl")
        self.step = resume.step if resume is not None else 0
        self.start_step = self.step
        self.optimizers = setup_optimizers(model, config)
        if resume is not None:
            restore(self.optimizers, stage.batches, resume.rank_state, self.ckpt_dir, self.step, self.rank)
        self._fresh_metrics(resume)
        model.activation_checkpointing = config.activation_checkpointing
        use_compile = self.device_type == "cuda" if config.compile is None else config.compile
        self.model = torch.compile(model, dynamic=stage.compile_dynamic) if use_compile else model
        if self.ddp:
            self.model = DDP(self.model, device_ids=[local_rank] if self.device_type == "cuda" else None)
        self.flops_per_token = model.estimate_flops()
        self.peak_flops = get_peak_flops(self.device_type)
        if self.peak_flops:
            print0(f"MFU is measured against {self.peak_flops / 1e12:.3g} TFLOP/s per device"
                   + (" (best of timed fp32 matmuls on this CPU, cached)" if self.device_type == "cpu" else ""))
        self.wandb = init_wandb(config, self.master)
        self.last_metrics = dict(resume.meta.get("metrics", {})) if resume is not None else {}
        self.last_metrics.pop("train_loss", None)
        self.smooth_loss, self.ema_dt, self.train_time, self.t0, self.peak_warned = None, None, 0.0, None, False
        # the first step whose loss or grad norm was NaN/inf, kept on the device (-1: none) so that checking it costs
        # no wait; read at log steps and before every checkpoint, which is then never written after a bad step
        self.first_bad = torch.full((), -1, dtype=torch.long, device=model.get_device())

    def _fresh_metrics(self, resume):
        if not self.master:
            return
        os.makedirs(self.ckpt_dir, exist_ok=True)
        if resume is not None:
            truncate_metrics(self.metrics_path, self.step)
        elif os.path.exists(self.metrics_path):
            os.remove(self.metrics_path)  # a fresh run of this tag starts a fresh metrics file

    def log(self, record):
        if self.master:
            append_metrics(self.metrics_path, record)
        self.wandb.log(record)

    def evaluate(self, step):
        if self.stage.evaluate is None:
            return
        self.orig_model.eval()
        with autocast_ctx(self.device_type):
            results = self.stage.evaluate(self.orig_model, step)
        self.orig_model.train()
        if results:
            self.log({"step": step, **results})
            self.last_metrics.update(results)

    def check_finite(self):
        bad = int(self.first_bad)
        if bad >= 0:
            raise NonFiniteLoss(bad, self.ckpt_dir)

    def save(self, step, data_state):
        self.check_finite()
        if not params_are_finite(self.orig_model):
            raise NonFiniteLoss(step, self.ckpt_dir)
        position = {k: v for k, v in data_state.items() if k != "buffer"}  # meta stays small and readable
        meta = dict(self.stage.meta, dataloader_state=position, num_iterations=self.stage.num_iterations,
                    metrics={**self.last_metrics, "train_loss": self.smooth_loss,
                             "peak_memory_bytes": peak_memory(self.device_type)})
        state = {"optimizers": [o.state_dict() for o in self.optimizers], "dataloader": data_state,
                 "rng": get_rng_state()}
        save_checkpoint(self.ckpt_dir, step, self.orig_model, meta, rank_state=state, rank=self.rank)

    def due(self, step):
        n, c = self.stage.num_iterations, self.config
        evaluate = step in (0, n) or (self.stage.eval_due or (lambda s: is_due(c.eval_every, s)))(step)
        save = step == n or (c.save_every > 0 and step > self.start_step and step % c.save_every == 0)
        return evaluate, save

    def fetch(self, step):
        """(data state before this step's batches, the batches, their info)."""
        state = self.stage.batches.state_dict()
        batches, info = self.stage.batches.fetch(step, self.orig_model)
        return state, batches, info

    def run(self):
        n, batches = self.stage.num_iterations, None
        data_state = self.stage.batches.state_dict()
        while True:
            evaluate, save = self.due(self.step)
            if evaluate:
                self.evaluate(self.step)
                self.t0 = None  # evaluation is not training time
            if save:
                self.save(self.step, data_state)
                self.t0 = None
            if self.step == n:
                break
            if batches is None:
                data_state, batches, info = self.fetch(self.step)
            batches, info, data_state = self.train_step(batches, info, data_state)

    def train_step(self, batches, info, data_state):
        """One optimizer step; returns the next step's (batches, info, data state), prefetched or not."""
        if self.t0 is None:  # a timing window starts: from here to the next log step
            synchronize(self.device_type)
            self.t0, self.window = time.time(), 0
        self.window += 1
        step, world = self.step, self.world_size
        processed = self.stage.tokens_per_step or sum(b[0].numel() for b in batches) * world
        every_target = getattr(self.stage.batches, "every_target_counts", False)
        known = sum(b[1].numel() for b in batches) * world if every_target else None
        loss, count = forward_backward(self.model, batches, self.ddp, world, self.device_type, self.stage.loss_fn,
                                       known)
        lrm = lr_multiplier(step, self.stage.num_iterations, self.config)
        values = None
        if loss is not None:
            grad_norm = optimizer_step(self.orig_model, self.optimizers, lrm,
                                       muon_momentum(step, self.config.muon_momentum_warmup), self.config.grad_clip,
                                       weight_decay_multiplier(step, self.stage.num_iterations))
            values = torch.stack([loss, grad_norm.to(loss.device)])
            self.first_bad = torch.where((self.first_bad < 0) & ~values.isfinite().all(), step, self.first_bad)
        next_batches = None
        if getattr(self.stage.batches, "prefetch", False):  # read while the device finishes this step
            next_state, next_batches, next_info = self.fetch(step + 1)
        else:
            next_state, next_info = self.stage.batches.state_dict(), {}
        # the first step is logged alone: it includes compilation and warm-up
        if step == self.start_step or is_due(self.config.log_every, step + 1) or step + 1 == self.stage.num_iterations:
            self.log_step(values, count, lrm, processed, info)
        self.step += 1
        return next_batches, next_info, next_state

    def log_step(self, values, count, lrm, processed, info):
        self.check_finite()
        loss, grad_norm = values.tolist() if values is not None else (None, None)
        synchronize(self.device_type)
        dt = (time.time() - self.t0) / self.window  # per step, over the steps since the last log
        self.t0, step, n = None, self.step, self.stage.num_iterations
        if step > self.start_step:
            self.train_time += dt * self.window
            self.ema_dt = dt if self.ema_dt is None else 0.9 * self.ema_dt + 0.1 * dt
        if loss is not None:
            self.smooth_loss = loss if self.smooth_loss is None else 0.9 * self.smooth_loss + 0.1 * loss
        tok_per_sec = processed / dt
        mfu = self.mfu(tok_per_sec)
        print0(f"step {step + 1:05d}/{n:05d} ({100 * (step + 1) / n:5.1f}%) | "
               + (f"loss {loss:.6f} | " if loss is not None else "no supervised token: skipped | ")
               + "".join(f"{k} {v:.3f} | " for k, v in info.items())
               + f"lrm {lrm:.3f} | " + (f"grad norm {grad_norm:.3f} | " if grad_norm is not None else "")
               + f"dt {dt * 1000:.0f}ms | tok/s {tok_per_sec:,.0f} | "
               + (f"mfu {mfu:.2f}% | " if mfu is not None else "mfu n/a | ")
               + f"eta {fmt_time((n - step - 1) * (self.ema_dt or dt))}")
        record = {"step": step, "lrm": lrm, "dt": dt, "tok_per_sec": tok_per_sec, "supervised_tokens": count, **info}
        if loss is not None:
            record.update(loss=loss, grad_norm=grad_norm)
        if mfu is not None:
            record["mfu"] = mfu
        self.log(record)

    def mfu(self, tok_per_sec):
        mfu = mfu_percent(self.flops_per_token, tok_per_sec, self.peak_flops, self.world_size)
        if mfu is None and self.peak_flops and not self.peak_warned:  # above 100%: the peak is too low
            self.peak_warned = True
            cpu = self.device_type == "cpu"
            print0(f"MFU n/a: this step would be above 100% of the {self.peak_flops / 1e12:.3g} TFLOP/s peak, so the "
                   f"peak is wrong" + ("; the cached CPU peak is dropped and measured again at the next run" if cpu
                                      else ""))
            if cpu and self.master:
                forget_cpu_peak()
        return mfu

    def finish(self):
        peak = peak_memory(self.device_type)
        if peak is not None:
            what = "max allocated" if self.device_type == "cuda" else "max RSS"
            print0(f"Peak memory: {peak / 2**30:.2f} GiB ({what})")
        summary = ", ".join(f"{k} {v:.4f}" for k, v in self.last_metrics.items() if isinstance(v, float))
        print0(f"Done: {self.stage.num_iterations} steps, training time {fmt_time(self.train_time)}"
               + (f", {summary}" if summary else "") + f". Checkpoint: {self.ckpt_dir}")
        self.wandb.finish()
        return {"checkpoint_dir": self.ckpt_dir, "step": self.step, **self.last_metrics}
