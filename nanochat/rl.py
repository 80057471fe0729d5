"""
Reinforcement learning on problems with a checkable answer (GSM8K, or the generated arithmetic problems when GSM8K is
not on disk), on-policy and GRPO-like, as nanochat (scripts/chat_rl.py):
- for each prompt, sample k answers with the Engine (calculator tool included);
- reward each with the task's `reward`; advantage = reward - mean reward of the k answers;
- policy gradient on the sampled tokens only: the prompt and the tool outputs forced by the Engine get no gradient.
It runs in the trainer's loop like every stage: what RL brings is its batches (Rollouts: sampling, rewards,
advantages), its loss (pg_loss) and its evaluation (pass@k on held-out problems).
"""

import dataclasses
import math

import torch
import torch.distributed as dist

from nanochat.dist import autocast_ctx, compute_init, get_dist_info
from nanochat.engine import Engine
from nanochat.log import UserError, print0, progress
from nanochat.report import get_report
from nanochat.start import start_finetune
from nanochat.trainer import Stage, train
from tasks import mixtures

# -----------------------------------------------------------------------------
# Rollouts


@torch.no_grad()
def rollouts(engine, task, indices, config, seed, desc=None):
    """k answers to each of the problems `indices`: [(token rows, masks, rewards)] in their order. A mask is 1 on
    the tokens the model sampled. Problems whose prompts have one length are sampled together (one batch of rows
    per --device_batch_size prompts)."""
    tokenizer = engine.tokenizer
    conversations = [task[i] for i in indices]
    prompts = [tokenizer.render_for_completion(c) for c in conversations]
    ends = (tokenizer.encode_special("<|assistant_end|>"), tokenizer.get_bos_token_id())
    out = [None] * len(indices)
    groups = engine.generate_batch_many(prompts, config.num_samples, keep_end=True,
                                        max_prompts=config.device_batch_size, seeds=[seed + i for i in indices],
                                        max_tokens=config.max_new_tokens, temperature=config.temperature,
                                        top_k=config.top_k)
    with autocast_ctx(engine.model.get_device().type):
        for j, rows, masks in progress(groups, desc, total=len(indices), unit="problem") if desc else groups:
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


class Rollouts:
    """RL's batches: each step samples k answers to the step's problems with the current policy. The problems and
    the seed are a function of the step, so a resumed run samples what the interrupted one would have."""

    prefetch = False  # the next rollouts need the weights of this step's update

    def __init__(self, engine, task, config, device):
        _, self.rank, _, self.world_size = get_dist_info()
        self.engine, self.task, self.config, self.device = engine, task, config, device
        self.pad_id = engine.tokenizer.encode_special("<|assistant_end|>")
        self.next_step, self.rewards = 0, []  # the mean reward of every step, for the summary

    def fetch(self, step, model):
        c, per_rank = self.config, self.config.examples_per_step // self.world_size
        indices = [(step * c.examples_per_step + self.rank + i * self.world_size) % len(self.task)
                   for i in range(per_rank)]
        seed = (c.seed * 1_000_003 + step * 10_007) % 2**31
        model.eval()  # sampling: no dropout
        rows, masks, advs, rewards = [], [], [], []
        for r, m, rw in rollouts(self.engine, self.task, indices, c, seed):
            rows, masks, rewards, advs = rows + r, masks + m, rewards + rw, advs + advantages(rw)
        model.train()
        stats = torch.tensor([sum(rewards), len(rewards)], dtype=torch.float64, device=self.device)
        if self.world_size > 1:
            dist.all_reduce(stats)
        mean_reward = (stats[0] / stats[1]).item()
        self.rewards.append(mean_reward)
        self.next_step = step + 1
        return policy_batches(rows, masks, advs, self.pad_id, self.device, c.device_batch_size), \
            {"reward": mean_reward}

    def state_dict(self):
        return {"step": self.next_step}

    def load_state_dict(self, state):
        self.next_step = state["step"]


def pass_at_k(engine, task, config):
    """pass@1 (the mean success rate of the k samples) and pass@k (any of them right) on held-out problems, each
    rank taking every world_size-th problem."""
    _, rank, _, world_size = get_dist_info()
    n = min(config.eval_examples, len(task))
    stats = torch.zeros(3, dtype=torch.float64, device=engine.model.get_device())
    for _, _, rewards in rollouts(engine, task, list(range(rank, n, world_size)), config, seed=0, desc="pass@k"):
        stats += torch.tensor([sum(r > 0 for r in rewards) / len(rewards), float(any(r > 0 for r in rewards)), 1.0],
                              dtype=torch.float64, device=stats.device)
    if world_size > 1:
        dist.all_reduce(stats)
    return {"pass@1": (stats[0] / stats[2]).item(), f"pass@{config.num_samples}": (stats[1] / stats[2]).item()}


def mean_and_error(values):
    mean = sum(values) / len(values)
    var = sum((v - mean) ** 2 for v in values) / max(1, len(values) - 1)
    return f"{mean:.3f} ± {math.sqrt(var / len(values)):.3f}"


def print_summary(history, rewards, config):
    """Did the policy improve? The held-out problems are the same at every evaluation, so their pass@1 (the mean
    reward) is the fair trend; the training reward is over different problems each step, hence its error bars."""
    if len(history) >= 2:
        (s0, p0), (s1, p1) = history[0], history[-1]
        print0(f"held-out mean reward (pass@1, {config.eval_examples} problems): {p0:.3f} at step {s0} -> {p1:.3f} at "
               f"step {s1}")
    if len(rewards) >= 4:
        q = len(rewards) // 4
        print0(f"training mean reward: first {q} steps {mean_and_error(rewards[:q])} -> last {q} steps "
               f"{mean_and_error(rewards[-q:])} (mean ± standard error over steps)")


# -----------------------------------------------------------------------------


def reinforce(config):
    """RL from the source checkpoint (sft by default), or --resume the stage's own."""
    ddp, rank, _, world_size, device = compute_init(config.device_type, seed=config.seed)
    if config.examples_per_step % world_size:
        raise UserError(f"--examples_per_step={config.examples_per_step} must be a multiple of the {world_size} ranks")
    model, tokenizer, lineage, resume, config = start_finetune(config, "rl", device)
    train_task = mixtures.rl_task("train", source=config.chat_data)
    val_task = mixtures.rl_task("val", source=config.chat_data)
    steps_per_epoch = len(train_task) // config.examples_per_step
    num_iterations = config.num_iterations if config.num_iterations > 0 else \
        max(1, int(config.num_epochs * steps_per_epoch))
    print0(f"chat_rl: {model.model_type} {config.model_tag} from {lineage[-1]['source']} step {lineage[-1]['step']}; "
           f"{num_iterations} steps of {config.examples_per_step} prompts x {config.num_samples} samples on "
           f"{mixtures.describe(train_task)}")
    engine, history = Engine(model, tokenizer), []

    def evaluate(model, step):
        results = pass_at_k(engine, val_task, config)
        history.append((step, results["pass@1"]))
        print0(f"step {step:05d} | " + " | ".join(f"{k} {v:.4f}" for k, v in results.items()))
        return results

    batches = Rollouts(engine, train_task, config, device)
    meta = {"train_args": dataclasses.asdict(config), "tokenizer_hash": tokenizer.hash, "lineage": lineage,
            "chat_data": mixtures.describe(train_task)}
    results = train(config, model, Stage("rl", "chat_rl", config.model_tag, num_iterations, batches, meta, evaluate,
                                         loss_fn=pg_loss, compile_dynamic=True), resume)
    print_summary(history, batches.rewards, config)
    get_report().log(section="Chat RL", data=[{"model_tag": config.model_tag}, dataclasses.asdict(config), results])
    return results
