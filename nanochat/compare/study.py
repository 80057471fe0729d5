"""What scripts/compare.py does: train and evaluate the missing runs, then report; or only tabulate checkpoints."""

import fnmatch
import os
import re

from nanochat.checkpoint import checkpoint_dir, list_model_tags
from nanochat.compare import report
from nanochat.compare.runs import execute, plan_runs
from nanochat.dist import resolve_device_type
from nanochat.fileio import get_base_dir
from nanochat.log import UserError, print0
from nanochat.models import MODEL_TYPES, config_from_depth, overrides_for
from nanochat.plan import describe


def tabulated_arms(source, patterns):
    """Arms of existing checkpoints: tags (shell patterns allowed: 'cmp_*') in the order given, those that differ
    only by a _s<seed> suffix (scripts.compare's runs) grouped into one arm."""
    available = list_model_tags(source)
    tags = []
    for pattern in patterns or ["*"]:
        matched = [t for t in available if fnmatch.fnmatchcase(t, pattern)] if any(c in pattern for c in "*?[") \
            else [pattern]
        tags += [t for t in matched if t not in tags]
    if not tags:
        raise UserError(f"no {source} checkpoints to compare{' match ' + ' '.join(patterns) if patterns else ''}; "
                        f"train some first (python -m scripts.base_train) or pass --model_types to train them")
    arms = {}
    for run in report.collect(source, tags):
        arms.setdefault(re.sub(r"_s\d+$", "", run.tag), []).append(run)
    arms = [report.Arm(label, runs) for label, runs in arms.items()]
    if any(c in p for p in patterns or ["*"] for c in "*?["):  # matched, not listed: by depth, then registry order
        types = list(MODEL_TYPES)
        arms.sort(key=lambda a: (a.runs[0].meta["model_config"]["n_layer"], types.index(a.runs[0].meta["model_type"])))
    return arms


def tabulate(config):
    """The report of existing checkpoints; each arm is compared with the first arm of its depth."""
    arms = tabulated_arms(config.source, config.model_tags)
    depth = {a.label: a.runs[0].meta["model_config"]["n_layer"] for a in arms}

    def reference_of(arm):
        ref = next(a for a in arms if depth[a.label] == depth[arm.label])
        return None if ref is arm else ref

    setup = ("Existing checkpoints; tags that differ only by a _s<seed> suffix form one arm. "
             "Compare like with like: the table's steps x tokens/step row shows each arm's budget.")
    return report.write(arms, out_dir(config), setup=setup, reference_of=reference_of)


def out_dir(config):
    return config.out_dir or os.path.join(get_base_dir(), "report")


def setup_text(config, runs, train, rest):
    total = None
    first = report.read_metrics_jsonl(checkpoint_dir("base", runs[0].tag))[0]
    if first:
        total = round(first[-1]["tok_per_sec"] * first[-1]["dt"]) * config.num_iterations
    match = ("parameter counts matched" if config.param_match else "FLOPs/token matched" if config.flop_match
             else "each type at its default config_from_depth shape")
    device = resolve_device_type(train.device_type)
    return (f"{config.seeds} seeds per arm (seed s = 1..{config.seeds} sets the initial weights; every run reads the "
            f"same data in the same order), {config.num_iterations:,} steps"
            + (f" = {total:,} tokens per run" if total else "") + f"; {match}. base_train flags: "
            f"`{' '.join(rest) or '(defaults)'}`. Throughput and memory are measured on this machine "
            f"({device}, {os.cpu_count()} cores), with whatever else ran on it at the time; memory is the "
            "process's peak RSS on CPU (Python and torch included) and max allocated on CUDA.")


def print_plan(runs, train, vocab_size):
    for label in dict.fromkeys(r.label for r in runs):
        r = next(r for r in runs if r.label == label)
        config = config_from_depth(r.model_type, r.depth, train.max_seq_len, vocab_size,
                                   **overrides_for(r.model_type, train.model), **r.overrides)
        d = describe(r.model_type, config)
        print0(f"{label}: {d['shape']}, params {d['total']:,}, FLOPs/token {d['flops']:.3e}; "
               f"runs {', '.join(x.tag for x in runs if x.label == label)}")


def study(config, train, rest):
    """Train and evaluate what is missing, then write the report; with --dry_run only print the plan."""
    from nanochat.pretrain import ensure_data_and_tokenizer

    vocab_size = ensure_data_and_tokenizer(train, 0)[0].get_vocab_size()
    runs = plan_runs(config, train, vocab_size)
    print_plan(runs, train, vocab_size)
    if config.dry_run:
        return None
    execute(runs, config, rest, train, os.path.join(out_dir(config), "compare_logs"))
    labels = list(dict.fromkeys(r.label for r in runs))
    collected = {r.tag: r for r in report.collect("base", [r.tag for r in runs])}
    arms = [report.Arm(label, [collected[r.tag] for r in runs if r.label == label]) for label in labels]
    depth_of = {label: next(r.depth for r in runs if r.label == label) for label in labels}
    reference = {d: next(a for a in arms if depth_of[a.label] == d) for d in config.depth}

    def reference_of(arm):
        ref = reference[depth_of[arm.label]]
        return None if ref is arm else ref

    title = f"{' vs '.join(config.model_types)}: {', '.join(f'd{d}' for d in config.depth)}"
    return report.write(arms, out_dir(config), title=title, setup=setup_text(config, runs, train, rest),
                        reference_of=reference_of)
