"""
Reinforcement learning on problems with a checkable answer (GSM8K, or the generated arithmetic problems when GSM8K
is not on disk), on-policy and GRPO-like, as nanochat:
- for each prompt, sample k answers with the Engine (calculator tool included);
- reward each with the task's `reward`; advantage = reward - mean reward of the k answers;
- policy gradient on the sampled tokens only: the prompt and the tool outputs forced by the Engine get no gradient.
    python -m scripts.chat_rl --model_tag=alcoholic_d4     # sft -> chatrl_checkpoints/alcoholic_d4
    torchrun --standalone --nproc_per_node=8 -m scripts.chat_rl -- --model_tag=gpt_d20
The learning-rate schedule, optimizer step, checkpoints, resume and DDP are base_train's (nanochat.trainer).
"""

import argparse
import math
import os
import time

import torch

from nanochat.checkpoint import (
    SOURCE_DIRS,
    checkpoint_dir,
    find_largest_model_tag,
    get_rng_state,
    load_model,
    save_checkpoint,
)
from nanochat.cli import non_negative_float, non_negative_int, parse_args, positive_float, positive_int, run_cli
from nanochat.dist import autocast_ctx, compute_init, get_dist_info
from nanochat.engine import Engine
from nanochat.log import UserError, fmt_time, print0
from nanochat.models import get_model_spec
from nanochat.report import append_metrics, get_report, truncate_metrics
from nanochat.tokenizer import get_tokenizer
from nanochat.trainer import (
    NonFiniteLoss,
    OutOfMemory,
    add_train_args,
    check_args,
    forward_backward,
    inherit_args,
    init_wandb,
    lr_multiplier,
    optimizer_step,
    params_are_finite,
    restore,
    resume_from,
    run_stage,
    setup_optimizers,
    weight_decay_multiplier,
)
from tasks import mixtures


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-i", "--source", default="sft", choices=list(SOURCE_DIRS), help="stage to start from")
    p.add_argument("--model_step", type=non_negative_int, default=None,
                   help="step of the source checkpoint (default: the last)")
    p.add_argument("--model_type", default=None, help="check that the source holds this architecture")
    p.add_argument("--num_epochs", type=positive_float, default=1.0, help="passes over the problems (--num_iterations, "
                   "when given, is the step budget instead)")
    p.add_argument("--examples_per_step", type=positive_int, default=16, help="prompts per optimizer step (all ranks)")
    p.add_argument("--num_samples", type=positive_int, default=16, help="answers sampled per prompt (k)")
    p.add_argument("--max_new_tokens", type=positive_int, default=256, help="longest sampled answer")
    p.add_argument("--temperature", type=non_negative_float, default=1.0, help="sampling temperature")
    p.add_argument("--top_k", type=non_negative_int, default=50, help="sample among the k most likely tokens")
    p.add_argument("--eval_examples", type=positive_int, default=400, help="held-out problems per pass@k evaluation")
    p.add_argument("--chat_data", default="auto", choices=mixtures.SOURCES,
                   help="hub: GSM8K from $NANOCHAT_HF_DIR; embedded: the generated arithmetic problems")
    add_train_args(p, inherit=True, device_batch_size=8, init_lr_frac=0.05, warmdown_ratio=1.0, eval_every=60,
                   save_every=60)
    return p


# -----------------------------------------------------------------------------
# Rollouts


@torch.no_grad()
def rollouts(engine, tokenizer, task, indices, args, seed):
    """k answers to each of the problems `indices`: [(token rows, masks, rewards)] in their order. A mask is 1 on
    the tokens the model sampled. Problems whose prompts have one length are sampled together (one batch of
    rows per --device_batch_size prompts)."""
    conversations = [task[i] for i in indices]
    prompts = [tokenizer.render_for_completion(c) for c in conversations]
    ends = (tokenizer.encode_special("<|assistant_end|>"), tokenizer.get_bos_token_id())
    out = [None] * len(indices)
    with autocast_ctx(engine.model.get_device().type):
        for j, rows, masks in engine.generate_batch_many(prompts, args.num_samples, keep_end=True,
                                                         max_prompts=args.device_batch_size,
                                                         seeds=[seed + i for i in indices],
                                                         max_tokens=args.max_new_tokens,
                                                         temperature=args.temperature, top_k=args.top_k):
            answers = [row[len(prompts[j]):-1] if row[-1] in ends else row[len(prompts[j]):] for row in rows]
            out[j] = (rows, masks, [task.reward(conversations[j], tokenizer.decode(a)) for a in answers])
    return out


def advantages(rewards):
    """GRPO without the std normalisation (as nanochat): how much better each answer did than its siblings."""
    mean = sum(rewards) / len(rewards)
    return [r - mean for r in rewards]


def policy_batches(rows, masks, advs, pad_id, device, rows_per_pass):
    """(inputs, targets, advantages) micro-batches; targets are -1 wherever the model did not sample the token."""
    width = max(len(r) for r in rows)
    ids = torch.tensor([r + [pad_id] * (width - len(r)) for r in rows], dtype=torch.long)
    mask = torch.tensor([m + [0] * (width - len(m)) for m in masks], dtype=torch.long)
    x, y = ids[:, :-1], ids[:, 1:].masked_fill(mask[:, 1:] == 0, -1)
    a = torch.tensor(advs, dtype=torch.float32)
    return [(x[i:i + rows_per_pass].to(device), y[i:i + rows_per_pass].to(device), a[i:i + rows_per_pass].to(device))
            for i in range(0, len(rows), rows_per_pass)]


def pg_loss(model, x, y, adv):
    """Negated policy-gradient objective: sum over sampled tokens of -log p(token) * advantage of its answer."""
    return (model(x, y, loss_reduction="none") * adv[:, None]).sum()


@torch.no_grad()
def mean_and_error(values):
    mean = sum(values) / len(values)
    var = sum((v - mean) ** 2 for v in values) / max(1, len(values) - 1)
    return f"{mean:.3f} ± {math.sqrt(var / len(values)):.3f}"


def pass_at_k(engine, tokenizer, task, args):
    """pass@1 (the mean success rate of the k samples) and pass@k (any of them right) on held-out problems,
    each rank taking every world_size-th problem."""
    _, rank, _, world_size = get_dist_info()
    n = min(args.eval_examples, len(task))
    stats = torch.zeros(3, dtype=torch.float64, device=engine.model.get_device())
    for _, _, rewards in rollouts(engine, tokenizer, task, list(range(rank, n, world_size)), args, seed=0):
        stats += torch.tensor([sum(r > 0 for r in rewards) / len(rewards), float(any(r > 0 for r in rewards)), 1.0],
                              dtype=torch.float64, device=stats.device)
    if world_size > 1:
        torch.distributed.all_reduce(stats)
    return {"pass@1": (stats[0] / stats[2]).item(), f"pass@{args.num_samples}": (stats[1] / stats[2]).item()}


# -----------------------------------------------------------------------------


def run(args):
    check_args(args)
    ddp, rank, local_rank, world_size, device = compute_init(args.device_type, seed=args.seed)
    master = rank == 0
    if args.examples_per_step % world_size:
        raise UserError(f"--examples_per_step={args.examples_per_step} must be a multiple of the "
                        f"{world_size} ranks")
    model_tag = args.model_tag or find_largest_model_tag(args.source, args.model_type)
    args.model_tag = model_tag
    resume = None
    if args.resume:
        model, resume = resume_from("rl", model_tag, device, get_tokenizer(), model_type=args.model_type)
        tokenizer, lineage = get_tokenizer(), resume.meta["lineage"]
        inherit_args(args, resume.meta)
    else:
        model, tokenizer, source_meta = load_model(args.source, device, phase="train", model_tag=model_tag,
                                                   step=args.model_step, model_type=args.model_type)
        lineage = source_meta.get("lineage", []) + [{"source": args.source, "model_tag": model_tag,
                                                     "step": source_meta["step"]}]
        inherit_args(args, source_meta)
    train_task = mixtures.rl_task("train", source=args.chat_data)
    val_task = mixtures.rl_task("val", source=args.chat_data)
    per_rank = args.examples_per_step // world_size
    steps_per_epoch = len(train_task) // args.examples_per_step
    num_iterations = args.num_iterations if args.num_iterations > 0 else max(1, int(args.num_epochs * steps_per_epoch))
    print0(f"chat_rl: {model.model_type} {model_tag} from {lineage[-1]['source']} step {lineage[-1]['step']}; "
           f"{num_iterations} steps of {args.examples_per_step} prompts x {args.num_samples} samples on "
           f"{mixtures.describe(train_task)}")

    ckpt_dir = checkpoint_dir("rl", model_tag)
    metrics_path = os.path.join(ckpt_dir, "metrics.jsonl")
    optimizers = setup_optimizers(model, args)
    model.activation_checkpointing = args.activation_checkpointing
    start_step = 0
    if resume is not None:
        start_step = resume.step
        restore(optimizers, None, resume.rank_state, ckpt_dir, start_step, rank)
        if master:
            truncate_metrics(metrics_path, start_step)
    elif master and os.path.exists(metrics_path):
        os.remove(metrics_path)
    if master:
        os.makedirs(ckpt_dir, exist_ok=True)
    train_model = model
    if ddp:
        train_model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[local_rank]
                                                                if device.type == "cuda" else None)
    engine = Engine(model, tokenizer)
    wandb_run = init_wandb(args, master)
    pad_id = tokenizer.encode_special("<|assistant_end|>")
    meta = {"train_args": vars(args), "tokenizer_hash": tokenizer.hash, "lineage": lineage,
            "chat_data": mixtures.describe(train_task)}
    metrics = dict(resume.meta.get("metrics", {})) if resume is not None else {}

    def log(record):
        if master:
            append_metrics(metrics_path, record)
        wandb_run.log(record)

    def save(step):
        if not params_are_finite(model):
            raise NonFiniteLoss(step, ckpt_dir)
        state = {"optimizers": [o.state_dict() for o in optimizers], "dataloader": {"step": step},
                 "rng": get_rng_state()}
        save_checkpoint(ckpt_dir, step, model, dict(meta, metrics=metrics, num_iterations=num_iterations),
                        rank_state=state, rank=rank)

    step, ema_reward, train_time, history, first_eval = start_step, None, 0.0, [], None
    try:
        while True:
            last_step = step == num_iterations
            if last_step or step == 0 or (args.eval_every > 0 and step % args.eval_every == 0):
                model.eval()
                metrics.update(pass_at_k(engine, tokenizer, val_task, args))
                first_eval = first_eval or (step, metrics["pass@1"])
                print0(f"step {step:05d} | " + " | ".join(f"{k} {v:.4f}" for k, v in metrics.items() if "pass@" in k))
                log({"step": step, **{k: v for k, v in metrics.items() if "pass@" in k}})
            if last_step or (args.save_every > 0 and step > start_step and step % args.save_every == 0):
                save(step)
            if last_step:
                break

            t0 = time.time()
            model.eval()  # sampling: no dropout
            rows, masks, advs, rewards = [], [], [], []
            # problems of this step: a deterministic function of the step, so resume is exact
            indices = [(step * args.examples_per_step + rank + i * world_size) % len(train_task)
                       for i in range(per_rank)]
            seed = (args.seed * 1_000_003 + step * 10_007) % 2**31
            for r, m, rw in rollouts(engine, tokenizer, train_task, indices, args, seed):
                rows += r
                masks += m
                rewards += rw
                advs += advantages(rw)
            model.train()
            batches = policy_batches(rows, masks, advs, pad_id, device, args.device_batch_size)
            loss, count = forward_backward(train_model, batches, ddp, world_size, device.type, loss_fn=pg_loss)
            lrm = lr_multiplier(step, num_iterations, args)
            if loss is not None:
                wdm = weight_decay_multiplier(step, num_iterations)
                grad_norm = optimizer_step(model, optimizers, lrm, 0.95, args.grad_clip, wdm).item()
                if not (math.isfinite(loss.item()) and math.isfinite(grad_norm)):
                    raise NonFiniteLoss(step, ckpt_dir)
            stats = torch.tensor([sum(rewards), len(rewards), sum(len(r) for r in rows)], dtype=torch.float64)
            if ddp:
                torch.distributed.all_reduce(stats)
            mean_reward = (stats[0] / stats[1]).item()
            ema_reward = mean_reward if ema_reward is None else 0.9 * ema_reward + 0.1 * mean_reward
            history.append(mean_reward)
            dt = time.time() - t0
            train_time += dt if step > start_step else 0.0
            print0(f"step {step + 1:05d}/{num_iterations:05d} | mean reward {mean_reward:.3f} (ema {ema_reward:.3f}) | "
                   f"answer tokens {count} | lrm {lrm:.3f} | dt {dt:.1f}s | "
                   f"eta {fmt_time((num_iterations - step - 1) * dt)}")
            log({"step": step, "reward": mean_reward, "sampled_tokens": count, "lrm": lrm, "dt": dt})
            step += 1
    except torch.OutOfMemoryError:
        raise OutOfMemory("chat_rl", args, get_model_spec(model.model_type).memory_advice) from None
    # Did the policy improve? The held-out problems are the same at every evaluation, so their pass@1 (the mean
    # reward) is the fair trend; the training reward is over different problems each step, hence its error bars.
    if first_eval is not None and step > first_eval[0]:
        print0(f"held-out mean reward (pass@1, {args.eval_examples} problems): {first_eval[1]:.3f} at step "
               f"{first_eval[0]} -> {metrics['pass@1']:.3f} at step {step}")
    if len(history) >= 4:
        q = len(history) // 4
        print0(f"training mean reward: first {q} steps {mean_and_error(history[:q])} -> last {q} steps "
               f"{mean_and_error(history[-q:])} (mean ± standard error over steps)")
    print0(f"Done: {num_iterations} steps, training time {fmt_time(train_time)}. Checkpoint: {ckpt_dir}")
    wandb_run.finish()
    results = {"checkpoint_dir": ckpt_dir, "step": step, **metrics}
    get_report().log(section="Chat RL", data=[{"model_tag": args.model_tag}, vars(args), results])
    return results


def main(argv=None):
    return run_stage(run, parse_args(build_parser(), argv))


if __name__ == "__main__":
    run_cli(main)
