"""What scripts/compare.py does: train and evaluate the missing runs, then report; or only tabulate checkpoints."""

import fnmatch
import os
import re

from nanochat.checkpoint import checkpoint_dir, list_model_tags
from nanochat.compare import fit, report, sweep
from nanochat.compare.runs import Planned, execute, plan_arms
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
    lr = (f"each arm at the best of learning-rate multipliers x{', x'.join(f'{m:g}' for m in config.multipliers)} "
          f"({'every learning rate' if config.lr_sweep_param == 'all' else 'the matrices'}' learning rate), chosen "
          f"on seed 1's validation bpb" if len(config.multipliers) > 1 else "nanochat's learning rates for every arm")
    chat = (f" Every base run then went through mid-training ({config.mid_iterations} steps) and SFT "
            f"({config.sft_iterations} steps) with the same settings for every arm (learning rates inherited from "
            f"the run), and chat_eval ({', '.join(config.chat_eval_tasks)}, {config.chat_max_problems} problems each)."
            if config.chat else "")
    device = resolve_device_type(train.device_type)
    return (f"{config.seeds} seeds per arm (seed s = 1..{config.seeds} sets the initial weights; every run reads the "
            f"same data in the same order), {config.num_iterations:,} steps"
            + (f" = {total:,} tokens per run" if total else "") + f"; {match}; {lr}. base_train flags: "
            f"`{' '.join(rest) or '(defaults)'}`.{chat} Throughput and memory are measured on this machine "
            f"({device}, {os.cpu_count()} cores), with whatever else ran on it at the time; memory is the "
            "process's peak RSS on CPU (Python and torch included) and max allocated on CUDA.")


def print_plan(arms, config, train, vocab_size):
    for arm in arms:
        model_config = config_from_depth(arm.model_type, arm.depth, train.max_seq_len, vocab_size,
                                         **overrides_for(arm.model_type, train.model), **arm.overrides)
        d = describe(arm.model_type, model_config)
        print0(f"{arm.label}: {d['shape']}, params {d['total']:,}, FLOPs/token {d['flops']:.3e}; "
               f"seeds 1..{config.seeds} at {'the best of x' + ', x'.join(f'{m:g}' for m in config.multipliers)}"
               f" (tags {arm.stem}_*)")


def tuned_runs(arms, config, rest, train, log_dir):
    """The runs of the comparison: with --lr_sweep, seed 1 of each arm at each multiplier first, then the seeds at
    each arm's best; returns (runs, the sweep's section of the report or None)."""
    best, section = {arm.stem: 1.0 for arm in arms}, None
    if len(config.multipliers) > 1:
        execute(sweep.sweep_runs(arms, config.multipliers), config, rest, train, log_dir, evaluate=False)
        results = sweep.sweep_results(arms, config.multipliers)
        best = {stem: sweep.best_multiplier(r)[0] for stem, r in results.items()}
        what = "every learning rate" if config.lr_sweep_param == "all" else "Muon's (matrix) learning rate"
        png = sweep.plot(arms, results, os.path.join(out_dir(config), "compare_lr.png"))
        section = sweep.markdown(arms, results, what) + f"\n![learning-rate sweep]({png})\n"
        for arm in arms:
            print0(f"{arm.label}: learning-rate multiplier x{best[arm.stem]:g}")
    runs = [Planned(arm, seed, best[arm.stem]) for seed in range(1, config.seeds + 1) for arm in arms]
    return runs, section


def study(config, train, rest):
    """Train and evaluate what is missing, then write the report; with --dry_run only print the plan."""
    from nanochat.chat_eval import TASKS
    from nanochat.pretrain import ensure_data_and_tokenizer

    unknown = [t for t in config.chat_eval_tasks if t not in TASKS]
    if unknown:
        raise UserError(f"--chat_tasks: unknown task {unknown[0]!r}; valid: {'|'.join(TASKS)}")
    vocab_size = ensure_data_and_tokenizer(train, 0)[0].get_vocab_size()
    arms = plan_arms(config, train, vocab_size)
    print_plan(arms, config, train, vocab_size)
    if config.dry_run:
        return None
    log_dir = os.path.join(out_dir(config), "compare_logs")
    runs, sweep_section = tuned_runs(arms, config, rest, train, log_dir)
    execute(runs, config, rest, train, log_dir)
    collected = {r.tag: r for r in report.collect("base", [r.tag for r in runs])}
    arm_runs = {arm.stem: [collected[r.tag] for r in runs if r.arm == arm] for arm in arms}
    arms_out = [report.Arm(arm.label + label_lr(runs, arm), arm_runs[arm.stem]) for arm in arms]
    by_stem = dict(zip((a.stem for a in arms), arms_out))
    sections = [s for s in (sweep_section, fit_section(arms, arm_runs, config)) if s]
    title = f"{' vs '.join(config.model_types)}: {', '.join(f'd{d}' for d in config.depth)}"
    return report.write(arms_out, out_dir(config), title=title, setup=setup_text(config, runs, train, rest),
                        reference_of=references(arms, by_stem, config), sections=sections)


def label_lr(runs, arm):
    m = next(r.multiplier for r in runs if r.arm == arm)
    return f" lr x{m:g}" if m != 1 else ""


def references(arms, by_stem, config):
    """Each arm is compared with the first type's arm at its depth; an ablation with its own type's full arm."""
    ref_of = {}
    for arm in arms:
        if arm.ablation:
            ref = next(a for a in arms if a.model_type == arm.model_type and a.depth == arm.depth and not a.ablation)
        else:
            ref = next(a for a in arms if a.depth == arm.depth and not a.ablation)
        ref_of[id(by_stem[arm.stem])] = None if ref is arm else by_stem[ref.stem]
    return lambda report_arm: ref_of.get(id(report_arm))


def fit_section(arms, arm_runs, config):
    """The fit of val bpb against training FLOPs per type, with 3 or more depths; None otherwise."""
    if len(config.depth) < 3:
        return None
    runs_by_type = {}
    for arm in arms:
        if not arm.ablation:
            runs_by_type.setdefault(arm.model_type, []).extend(arm_runs[arm.stem])
    result = fit.section(runs_by_type, os.path.join(out_dir(config), "compare_fit.png"))
    return None if result is None else result[0] + f"\n![fit]({result[1]})\n"
