"""
The CORE metric of the DCLM paper (https://arxiv.org/abs/2406.11794), computed as nanochat does.

22 in-context-learning tasks of three types, each item scored from one forward pass of its candidate prompts:
- multiple_choice: the query is shared, the choices differ (common token prefix); the prediction is the choice
  whose continuation tokens have the lowest mean loss.
- schema: the context differs, the continuation is shared (common token suffix); lowest mean loss again.
- language_modeling: correct when greedy argmax reproduces every continuation token.
A task's accuracy is centered on its random-guess baseline (percent), (acc - rb/100) / (1 - rb/100), and CORE is
the mean centered accuracy over the tasks.

The tasks live in a DCLM-style bundle: core.yaml (icl_tasks), eval_meta_data.csv (random baselines) and
eval_data/*.jsonl[.gz]. The official bundle is downloaded once into $NANOCHAT_BASE_DIR/eval_bundle; without a
network the small offline bundle shipped in data/eval_bundle is used (fewer tasks, subsampled: not comparable).
"""

import contextlib
import csv
import gzip
import io
import json
import os
import random
import shutil
import time
import zipfile

import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml

from nanochat.fileio import download_file, get_base_dir, open_regular, remove_orphan_tmp_files
from nanochat.log import print0
from nanochat.log import progress as progress_bar  # evaluate_core's flag is `progress`

CORE_TASKS = [
    "hellaswag_zeroshot", "jeopardy", "bigbench_qa_wikidata", "arc_easy", "arc_challenge", "copa", "commonsense_qa",
    "piqa", "openbook_qa", "lambada_openai", "hellaswag", "winograd", "winogrande", "bigbench_dyck_languages",
    "agi_eval_lsat_ar", "bigbench_cs_algorithms", "bigbench_operators", "bigbench_repeat_copy_logic", "squad", "coqa",
    "boolq", "bigbench_language_identification",
]
TASK_TYPES = ("multiple_choice", "schema", "language_modeling")
OFFICIAL_BUNDLE_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip"
OFFICIAL_BUNDLE_SHA256 = "90a7c19e28ee7a52b4f6e1f87658deb9fde7f63deba2379045bdb1fe9ea5d200"
OFFLINE_BUNDLE_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "eval_bundle")
SHUFFLE_SEED = 1337  # items are shuffled before --max_per_task cuts them, so a cut is a random subset
FEWSHOT_SEED = 1234  # few-shot donors of item idx come from random.Random(FEWSHOT_SEED + idx)

# -----------------------------------------------------------------------------
# Prompt rendering: few-shot examples (each followed by a blank line), then the item, once per candidate


def render_prompts_mc(item, continuation_delimiter, fewshot_examples=None):
    """One prompt per choice: shots as `query + delim + gold choice`, then `query + delim + choice`."""
    shots = "".join(f"{ex['query']}{continuation_delimiter}{ex['choices'][ex['gold']]}\n\n"
                    for ex in fewshot_examples or [])
    return [f"{shots}{item['query']}{continuation_delimiter}{choice}" for choice in item["choices"]]


def render_prompts_schema(item, continuation_delimiter, fewshot_examples=None):
    """One prompt per context option, all ending in the same continuation."""
    shots = "".join(f"{ex['context_options'][ex['gold']]}{continuation_delimiter}{ex['continuation']}\n\n"
                    for ex in fewshot_examples or [])
    return [f"{shots}{context}{continuation_delimiter}{item['continuation']}" for context in item["context_options"]]


def render_prompts_lm(item, continuation_delimiter, fewshot_examples=None):
    """[prompt without the continuation, prompt with it]. Contexts are stripped (some carry trailing spaces), and
    so is the prompt without: a trailing space would merge into the continuation's first token in the prompt with
    it, and the former would no longer be a token prefix of the latter."""
    shots = "".join(f"{ex['context'].strip()}{continuation_delimiter}{ex['continuation']}\n\n"
                    for ex in fewshot_examples or [])
    prompt = f"{shots}{item['context'].strip()}{continuation_delimiter}"
    return [prompt.strip(), prompt + item["continuation"]]


# -----------------------------------------------------------------------------
# Tokens: where each candidate's scored span [start, end) lies


def common_length(sequences, direction="left"):
    """Length of the common prefix (left) or suffix (right) of token sequences."""
    n = min(len(s) for s in sequences)
    for i in range(n):
        idx = i if direction == "left" else -1 - i
        if any(s[idx] != sequences[0][idx] for s in sequences):
            return i
    return n


def batch_mc(tokenizer, prompts):
    tokens = tokenizer(prompts, prepend=tokenizer.get_bos_token_id())
    # the choices start where the prompts first differ (at least one token each, should a choice be a token
    # prefix of another)
    start = min(common_length(tokens, "left"), min(len(t) for t in tokens) - 1)
    return tokens, [start] * len(tokens), [len(t) for t in tokens]


def batch_schema(tokenizer, prompts):
    tokens = tokenizer(prompts, prepend=tokenizer.get_bos_token_id())
    suffix = min(common_length(tokens, "right"), min(len(t) for t in tokens) - 1)  # the shared continuation
    return tokens, [len(t) - suffix for t in tokens], [len(t) for t in tokens]


def batch_lm(tokenizer, prompts):
    without, with_cont = tokenizer(prompts, prepend=tokenizer.get_bos_token_id())
    # normally `without` is a token prefix of `with_cont`; if BPE merged across the boundary, score from the
    # first differing token
    start = common_length([without, with_cont], "left")
    if start >= len(with_cont):
        raise ValueError(f"language_modeling item has an empty continuation: {prompts[1][-80:]!r}")
    return [with_cont], [start], [len(with_cont)]


def crop_to_context(tokens, starts, ends, max_len):
    """Keep the last max_len tokens of each sequence (the continuation is at the end) and shift the spans.
    Position 0 has no prediction for it, so a span pushed off the left is scored from position 1."""
    cuts = [max(0, len(t) - max_len) for t in tokens]
    return ([t[c:] for t, c in zip(tokens, cuts)], [max(1, s - c) for s, c in zip(starts, cuts)],
            [e - c for e, c in zip(ends, cuts)])


@torch.no_grad()
def forward_losses(model, input_ids):
    """Per-position next-token losses and argmax predictions, both (B, T-1): column j is about token j+1."""
    logits = model(input_ids)[:, :-1].float()
    targets = input_ids[:, 1:]
    losses = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), reduction="none")
    return losses.view_as(targets), logits.argmax(dim=-1)


RENDER_AND_BATCH = {"multiple_choice": (render_prompts_mc, batch_mc), "schema": (render_prompts_schema, batch_schema),
                    "language_modeling": (render_prompts_lm, batch_lm)}

# -----------------------------------------------------------------------------
# Scoring


def fewshot_examples(data, idx, num_fewshot):
    """num_fewshot other items of the task, drawn reproducibly per item."""
    if num_fewshot == 0:
        return []
    rng = random.Random(FEWSHOT_SEED + idx)
    return [data[i] for i in rng.sample([i for i in range(len(data)) if i != idx], num_fewshot)]


@torch.no_grad()
def evaluate_example(idx, model, tokenizer, data, device, task_meta):
    """True when the model gets item data[idx] right. task_meta: task_type, num_fewshot, continuation_delimiter."""
    item, task_type = data[idx], task_meta["task_type"]
    if task_type not in TASK_TYPES:
        raise ValueError(f"task_type {task_type!r} is not one of {', '.join(TASK_TYPES)}")
    render, batch = RENDER_AND_BATCH[task_type]
    prompts = render(item, task_meta["continuation_delimiter"], fewshot_examples(data, idx, task_meta["num_fewshot"]))
    tokens, starts, ends = crop_to_context(*batch(tokenizer, prompts), model.config.sequence_len)
    # right-pad with BOS: padding comes after every scored position, so causal attention never sees it
    input_ids = torch.full((len(tokens), max(len(t) for t in tokens)), tokenizer.get_bos_token_id(), dtype=torch.long)
    for i, t in enumerate(tokens):
        input_ids[i, :len(t)] = torch.tensor(t, dtype=torch.long)
    losses, predictions = forward_losses(model, input_ids.to(device))
    if task_type == "language_modeling":
        s, e = starts[0], ends[0]
        return bool(torch.equal(predictions[0, s - 1:e - 1], input_ids[0, s:e].to(predictions.device)))
    mean_losses = [losses[i, s - 1:e - 1].mean().item() for i, (s, e) in enumerate(zip(starts, ends))]
    return mean_losses.index(min(mean_losses)) == item["gold"]


def cut(data, max_per_task=None):
    """data[:max_per_task]; None or <= 0: all of it."""
    return data[:max_per_task] if max_per_task is not None and max_per_task > 0 else data


def _rank_and_world_size():
    ddp = dist.is_available() and dist.is_initialized()
    return (dist.get_rank(), dist.get_world_size()) if ddp else (0, 1)


def evaluate_task(model, tokenizer, data, device, task_meta, max_per_task=None, bar=None):
    """Accuracy on cut(data, max_per_task). Under torchrun rank r scores items r::world_size and the results are
    summed across ranks, so every rank returns the same accuracy. `bar`: a progress bar advanced once per item."""
    data = cut(data, max_per_task)
    if task_meta["num_fewshot"] >= len(data):  # the few-shot donors are other items of the same (cut) task
        raise ValueError(f"task {task_meta.get('label')}: {task_meta['num_fewshot']}-shot prompts need at least "
                         f"{task_meta['num_fewshot'] + 1} items, got {len(data)}; use --max_per_task >= "
                         f"{task_meta['num_fewshot'] + 1} (or -1 for all)")
    rank, world_size = _rank_and_world_size()
    correct = torch.zeros(len(data), dtype=torch.float32, device=device)
    for idx in range(rank, len(data), world_size):
        correct[idx] = float(evaluate_example(idx, model, tokenizer, data, device, task_meta))
        if bar is not None:
            bar.update()
    if world_size > 1:
        dist.all_reduce(correct, op=dist.ReduceOp.SUM)
    return correct.mean().item()


def centered_accuracy(accuracy, random_baseline):
    """0 at chance, 1 at perfect; random_baseline is in percent as in eval_meta_data.csv."""
    return (accuracy - 0.01 * random_baseline) / (1.0 - 0.01 * random_baseline)


# -----------------------------------------------------------------------------
# The bundle: loading, downloading, choosing


def load_bundle(bundle_dir):
    """The tasks of a bundle as task_meta dicts: label, task_type, num_fewshot, continuation_delimiter,
    dataset_uri, random_baseline."""
    with open_regular(os.path.join(bundle_dir, "core.yaml"), "r", encoding="utf-8") as f:
        config = yaml.safe_load(f)
    with open_regular(os.path.join(bundle_dir, "eval_meta_data.csv"), "r", encoding="utf-8", newline="") as f:
        baselines = {row["Eval Task"]: float(row["Random baseline"]) for row in csv.DictReader(f)}
    tasks = []
    for t in config["icl_tasks"]:
        if t["icl_task_type"] not in TASK_TYPES:
            raise ValueError(f"{bundle_dir}/core.yaml: task {t['label']} has icl_task_type {t['icl_task_type']!r}; "
                             f"supported: {', '.join(TASK_TYPES)}")
        if t["label"] not in baselines:
            raise ValueError(f"{bundle_dir}/eval_meta_data.csv has no 'Random baseline' row for task {t['label']}")
        shots = t["num_fewshot"]
        tasks.append({"label": t["label"], "task_type": t["icl_task_type"],
                      "num_fewshot": shots[0] if isinstance(shots, list) else shots,
                      "continuation_delimiter": t.get("continuation_delimiter", " "),
                      "dataset_uri": t["dataset_uri"], "random_baseline": baselines[t["label"]]})
    return tasks


def load_task_data(bundle_dir, task):
    """The items of a task (.jsonl or .jsonl.gz), in file order."""
    path = os.path.join(bundle_dir, "eval_data", task["dataset_uri"])
    with open_regular(path) as raw, (gzip.open(raw, "rt", encoding="utf-8") if path.endswith(".gz") else
                                     io.TextIOWrapper(raw, encoding="utf-8")) as f:
        return [json.loads(line) for line in f if line.strip()]


def download_bundle(dest_dir, url=OFFICIAL_BUNDLE_URL, sha256=OFFICIAL_BUNDLE_SHA256, retries=3, timeout=60):
    """Download a zipped bundle (fileio.download_file: retries, sha256 check), extract it to dest_dir. dest_dir
    appears complete or not at all (extracted to a temp folder, then renamed); a checksum mismatch is never retried
    nor extracted. Raises DownloadError (a RuntimeError; ChecksumError, a ValueError, on a mismatch)."""
    parent = os.path.dirname(os.path.abspath(dest_dir))
    os.makedirs(parent, exist_ok=True)
    tmp_zip, tmp_dir = f"{dest_dir}.zip.tmp.{os.getpid()}", f"{dest_dir}.tmp.{os.getpid()}"
    remove_orphan_tmp_files(parent, prefix=os.path.basename(dest_dir) + ".zip.tmp")  # a killed earlier download
    try:
        download_file(url, tmp_zip, retries=retries, backoff=1.0, timeout=timeout, expected_sha256=sha256,
                      validate=lambda path: zipfile.ZipFile(path).close(), name=os.path.basename(url))
        with zipfile.ZipFile(tmp_zip) as zf:
            for name in zf.namelist():  # no member may land outside the temp folder
                if os.path.isabs(name) or ".." in name.split("/"):
                    raise ValueError(f"{url}: refusing unsafe zip member {name!r}")
            zf.extractall(tmp_dir)
        root = os.path.join(tmp_dir, "eval_bundle") if os.path.isdir(os.path.join(tmp_dir, "eval_bundle")) else tmp_dir
        if not os.path.exists(os.path.join(root, "core.yaml")):
            raise ValueError(f"{url}: the archive has no core.yaml (expected eval_bundle/core.yaml)")
        if not os.path.isdir(dest_dir):  # another process may have finished first
            os.replace(root, dest_dir)
    finally:
        if os.path.exists(tmp_zip):
            os.remove(tmp_zip)
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return dest_dir


def resolve_bundle(bundle_dir=None, allow_download=True):
    """(bundle folder, kind). kind: 'local' (bundle_dir given), 'cached' ($BASE/eval_bundle), 'downloaded'
    (fetched now into $BASE/eval_bundle) or 'offline' (data/eval_bundle of this repository)."""
    if bundle_dir:
        if not os.path.exists(os.path.join(bundle_dir, "core.yaml")):
            raise FileNotFoundError(f"--bundle_dir={bundle_dir} has no core.yaml; point it at an eval_bundle folder "
                                    f"(core.yaml, eval_meta_data.csv, eval_data/)")
        return bundle_dir, "local"
    cached = os.path.join(get_base_dir(), "eval_bundle")
    if os.path.exists(os.path.join(cached, "core.yaml")):
        return cached, "cached"
    if allow_download:
        try:
            return download_bundle(cached, OFFICIAL_BUNDLE_URL, OFFICIAL_BUNDLE_SHA256), "downloaded"
        except (RuntimeError, ValueError, OSError, zipfile.BadZipFile) as e:
            print0(f"WARNING: official CORE bundle unavailable ({e})")
    return OFFLINE_BUNDLE_DIR, "offline"


def prepare_bundle(bundle_dir=None):
    """resolve_bundle for every rank: rank 0 alone may download, the others then find the same folder (or fall
    back to the same offline bundle). Returns (bundle folder, a note saying which bundle and how complete)."""
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    if rank == 0:
        bundle_dir, kind = resolve_bundle(bundle_dir)
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    if rank != 0:
        bundle_dir, kind = resolve_bundle(bundle_dir, allow_download=False)
    labels = [t["label"] for t in load_bundle(bundle_dir)]
    n_core = len(set(labels) & set(CORE_TASKS))
    incomplete = kind == "offline" or n_core < len(CORE_TASKS)
    return bundle_dir, f"{kind} bundle: {n_core} of {len(CORE_TASKS)} tasks", incomplete


def evaluate_core(model, tokenizer, device, bundle_dir, max_per_task=-1, progress=True):
    """Every task of the bundle: {"results": {label: accuracy}, "centered": {label: centered}, "core": mean}.
    progress: a bar with an ETA over the items of all tasks (off inside training, whose log it would break up)."""
    tasks = []
    for task in load_bundle(bundle_dir):
        data = load_task_data(bundle_dir, task)
        random.Random(SHUFFLE_SEED).shuffle(data)
        tasks.append((task, cut(data, max_per_task)))
    rank, world_size = _rank_and_world_size()
    total = sum(len(range(rank, len(data), world_size)) for _, data in tasks)
    results, centered = {}, {}
    with progress_bar(desc="CORE", total=total, unit="item") if progress else contextlib.nullcontext() as bar:
        for task, data in tasks:
            t0 = time.time()
            label = task["label"]
            results[label] = evaluate_task(model, tokenizer, data, device, task, bar=bar)
            centered[label] = centered_accuracy(results[label], task["random_baseline"])
            print0(f"{label:34s} ({task['num_fewshot']:2d}-shot, {task['task_type']:17s}) accuracy: "
                   f"{results[label]:.4f} | centered: {centered[label]:+.4f} | {time.time() - t0:.1f}s")
    core = sum(centered.values()) / len(centered) if centered else float("nan")
    return {"results": results, "centered": centered, "core": core}
