"""
The chat tasks' evaluation (scripts/chat_eval.py): ARC-Easy, ARC-Challenge, MMLU (multiple choice), GSM8K, HumanEval,
SpellingBee, Arithmetic (generated answers; Arithmetic is generated word problems with the calculator, held out
from the ones the offline chat data trains on).

Multiple choice is scored from the logits: the prompt ends with <|assistant_start|>, and the answer is the choice
letter with the highest logit at that position (only the letters offered count), so base models can be scored
too. Generative tasks sample a reply with the Engine (calculator tool included) and check it.
With more than one task, ChatCORE is the mean accuracy centered on chance: 0 = random, 1 = perfect.
"""

from functools import partial

import torch
import torch.distributed as dist

from nanochat.checkpoint import load_model, record_metrics, resolve_source
from nanochat.dist import autocast_ctx, compute_init, get_dist_info
from nanochat.engine import Engine
from nanochat.log import UserError, print0, progress
from nanochat.report import get_report
from tasks.arc import ARC
from tasks.arithmetic import ArithmeticTool
from tasks.gsm8k import GSM8K
from tasks.humaneval import HumanEval
from tasks.mmlu import MMLU
from tasks.spellingbee import SpellingBee

# task name -> (constructor, accuracy of random guessing)
TASKS = {
    "ARC-Easy": (partial(ARC, subset="ARC-Easy", split="test"), 0.25),  # 4-way multiple choice
    "ARC-Challenge": (partial(ARC, subset="ARC-Challenge", split="test"), 0.25),
    "MMLU": (partial(MMLU, subset="all", split="test"), 0.25),
    "GSM8K": (partial(GSM8K, subset="main", split="test"), 0.0),  # open-ended: guessing gets nothing
    "HumanEval": (HumanEval, 0.0),
    "SpellingBee": (partial(SpellingBee, size=256, split="test"), 0.0),
    "Arithmetic": (partial(ArithmeticTool, size=500, split="test"), 0.0),
}


def _all_reduce_counts(counts, device):
    """Sum integer counts over ranks when running under torchrun."""
    ddp, _, _, _ = get_dist_info()
    if not (ddp and dist.is_initialized()):
        return counts
    t = torch.tensor(counts, dtype=torch.long, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return [int(c) for c in t]


def _num_problems(task, max_problems):
    n = len(task) if max_problems is None else min(len(task), max_problems)
    if n <= 0:
        raise ValueError(f"nothing to evaluate: the task has {len(task)} problems and --max_problems={max_problems}")
    return n


def letter_token_ids(tokenizer, letters, cache):
    ids = []
    for letter in letters:
        if letter not in cache:
            encoded = tokenizer.encode(letter)
            if len(encoded) != 1:
                raise ValueError(f"choice label {letter!r} encodes to {len(encoded)} tokens {encoded}; categorical "
                                 "evaluation needs every label to be a single token")
            cache[letter] = encoded[0]
        ids.append(cache[letter])
    return ids


@torch.no_grad()
def run_categorical_eval(task, tokenizer, model, batch_size=8, max_problems=None):
    """Accuracy from the logits over the offered letters at the answer position. Ranks take turns on batches."""
    _, rank, _, world_size = get_dist_info()
    device = model.get_device()
    bos = tokenizer.get_bos_token_id()  # padding on the right: a causal model never looks at it
    context = model.config.sequence_len
    num_problems = _num_problems(task, max_problems)
    letter_cache, passed, total, truncated = {}, 0, 0, 0
    batches = range(rank, -(-num_problems // batch_size), world_size)
    for b in progress(batches, type(task).__name__, unit="batch"):
        conversations = [task[i] for i in range(b * batch_size, min((b + 1) * batch_size, num_problems))]
        prompts = []
        for conversation in conversations:
            ids = tokenizer.render_for_completion(conversation)
            if len(ids) > context:  # keep the end: the choices, the instruction and <|assistant_start|>
                ids, truncated = ids[-context:], truncated + 1
            prompts.append(ids)
        width = max(len(ids) for ids in prompts)
        batch = torch.tensor([ids + [bos] * (width - len(ids)) for ids in prompts], dtype=torch.long, device=device)
        with autocast_ctx(device.type):
            logits = model(batch)  # (B, T, V)
        for row, (conversation, ids) in enumerate(zip(conversations, prompts)):
            letters = conversation["letters"]
            choice_logits = logits[row, len(ids) - 1, letter_token_ids(tokenizer, letters, letter_cache)]
            predicted = letters[int(choice_logits.argmax())]
            passed += int(bool(task.evaluate(conversation, predicted)))
            total += 1
    passed, total, truncated = _all_reduce_counts([passed, total, truncated], device)
    if truncated:
        print0(f"{truncated} prompts were longer than the model's context ({context}) and were cut from the left")
    print0(f"Final: {passed}/{total} ({100 * passed / total:.2f}%)")
    return passed / total


def run_generative_eval(task, tokenizer, model, engine, num_samples=1, max_new_tokens=512, temperature=0.0,
                        top_k=50, max_problems=None, batch_size=8, details=None):
    """pass@num_samples: a problem counts as solved when any of its samples is correct. Ranks take turns; prompts
    of one length are decoded together, batch_size rows at a time. With a `details` dict and a task that can
    diagnose its answers (task.diagnose -> {name: 0 or 1}), details gets each diagnosis's mean over the samples."""
    diagnose = getattr(task, "diagnose", None) if details is not None else None  # optional in the Task interface
    sums, samples = {}, 0
    _, rank, _, world_size = get_dist_info()
    device = model.get_device()
    context = model.config.sequence_len
    num_problems = _num_problems(task, max_problems)
    indices = list(range(rank, num_problems, world_size))
    conversations = [task[i] for i in indices]
    prompts = [tokenizer.render_for_completion(c) for c in conversations]
    fits = [j for j, prompt in enumerate(prompts) if len(prompt) < context]  # no room to answer: a failure
    too_long = len(indices) - len(fits)
    passed, total = 0, too_long
    answers = engine.generate_batch_many([prompts[j] for j in fits], num_samples,
                                         max_prompts=max(1, batch_size // num_samples),
                                         seeds=[indices[j] for j in fits], max_tokens=max_new_tokens,
                                         temperature=temperature, top_k=top_k)
    bar = progress(answers, type(task).__name__, total=len(fits), unit="problem")
    with autocast_ctx(device.type):
        for f, rows, _ in bar:
            j = fits[f]
            completions = [tokenizer.decode(tokens[len(prompts[j]):]) for tokens in rows]
            passed += int(any(task.evaluate(conversations[j], completion) for completion in completions))
            total += 1
            bar.set_postfix_str(f"{passed}/{total} right")
            for completion in completions if diagnose else ():
                for key, value in diagnose(conversations[j], completion).items():
                    sums[key] = sums.get(key, 0) + value
                samples += 1
    passed, total, too_long = _all_reduce_counts([passed, total, too_long], device)
    if diagnose:
        names = sorted(sums)
        *counts, samples = _all_reduce_counts([sums[k] for k in names] + [samples], device)
        details.update({k: c / samples for k, c in zip(names, counts)} if samples else {})
    if too_long:
        print0(f"{too_long} prompts did not fit the model's context ({context}) and count as failures")
    print0(f"Final: {passed}/{total} ({100 * passed / total:.2f}%)")
    return passed / total


def run_chat_eval(task_name, model, tokenizer, engine, batch_size=8, num_samples=1, max_new_tokens=512,
                  temperature=0.0, top_k=50, max_problems=None, details=None):
    if task_name not in TASKS:
        raise ValueError(f"unknown task {task_name!r}; valid: {'|'.join(TASKS)}")
    task = TASKS[task_name][0]()
    if task.eval_type == "categorical":
        return run_categorical_eval(task, tokenizer, model, batch_size, max_problems)
    if task.eval_type == "generative":
        return run_generative_eval(task, tokenizer, model, engine, num_samples, max_new_tokens, temperature,
                                   top_k, max_problems, batch_size, details)
    raise ValueError(f"{task_name}: unsupported eval_type {task.eval_type!r} (expected categorical|generative)")


def chatcore(results):
    """Mean of the accuracies centered on chance: (acc - baseline) / (1 - baseline)."""
    centered = [(acc - TASKS[name][1]) / (1.0 - TASKS[name][1]) for name, acc in results.items()]
    return sum(centered) / len(centered)


def task_names(config):
    """The tasks of -a (one name, or several separated by |); every task when it is not given."""
    return list(TASKS) if config.task_name is None else [t.strip() for t in config.task_name.split("|")]


def evaluate_chat(config):
    """Evaluate a checkpoint on the chosen tasks; records the accuracies (and ChatCORE) in its meta and the report."""
    from nanochat.execution import sandbox_problem

    names = task_names(config)
    # HumanEval runs model-written code, only ever in the sandbox: say so before loading anything when it is missing
    problem = sandbox_problem() if "HumanEval" in names else None
    if problem is not None:
        raise UserError(f"HumanEval cannot run here: {problem}")
    ddp, rank, _, _, device = compute_init(config.device_type)
    source = resolve_source(config.source, config.model_type)
    model, tokenizer, meta = load_model(source, device, phase="eval", model_tag=config.model_tag, step=config.step,
                                        model_type=config.model_type)
    print0(f"Evaluating {meta['checkpoint_dir']} step {meta['step']} ({meta['model_type']}) on {', '.join(names)}")
    engine, results, metrics = Engine(model, tokenizer), {}, {}
    for name in names:
        details = {}
        results[name] = run_chat_eval(name, model, tokenizer, engine, batch_size=config.batch_size,
                                      num_samples=config.num_samples, max_new_tokens=config.max_new_tokens,
                                      temperature=config.temperature, top_k=config.top_k,
                                      max_problems=config.max_problems, details=details)
        print0(f"{name} accuracy: {100 * results[name]:.2f}%"
               + "".join(f", {k} {100 * v:.1f}%" for k, v in details.items()))
        metrics.update({f"chat_eval/{name}/{k}": v for k, v in details.items()})
    for name, acc in results.items():
        metrics[f"chat_eval/{name}"] = acc
        metrics[f"chat_eval/{name}/max_problems"] = config.max_problems  # None: the whole task
    if len(results) > 1:
        metrics["chat_eval/ChatCORE"] = chatcore(results)
        print0(f"ChatCORE metric: {metrics['chat_eval/ChatCORE']:.4f}")
    if rank == 0:
        record_metrics(source, meta["model_tag"], meta["step"], metrics)
        get_report().log(section=f"Chat evaluation {source}", data=[{"model_tag": meta["model_tag"], "step":
                         meta["step"], "max_problems": config.max_problems}, results, {"ChatCORE": metrics.get(
                         "chat_eval/ChatCORE")}])
    return results
