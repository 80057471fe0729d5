"""
GPT vs Alcoholic, fairly: train and evaluate the runs a comparison needs (several seeds per architecture, the same
data order and token budget for all), then write a side-by-side report: $NANOCHAT_BASE_DIR/report/compare.md + .png.

    python -m scripts.compare --model_types gpt alcoholic --depth 4 --seeds 3 --num_iterations 300 --param_match \\
        --max_seq_len=256 --device_batch_size=4          # any other flag goes to base_train as is
    python -m scripts.compare --model_tags gpt_d4 alcoholic_d4    # only tabulate existing checkpoints
    python -m scripts.compare --model_tags 'cmp_*_d4*' 'cmp_*_d6*'  # ... runs of several comparisons, seeds grouped
    python -m scripts.compare                                     # every base checkpoint

Runs are tagged {prefix}_{type}_d{depth}[_pm|_fm]_s{seed} (e.g. cmp_gpt_d4_s1); a run whose checkpoint is complete
is reused (its training flags must be the ones asked for), one that was cut short resumes, and only the evaluations
that are missing are run. Each stage is a subprocess (torchrun with --nproc_per_node > 1), so training is
base_train's, memory is measured per run, and a crash leaves the finished runs in place.
--param_match / --flop_match set intermediate_size of every type but the first so that its parameter count /
FLOPs per token equal the first type's within 1% (SwiGLU has three MLP matrices, ReLU^2 two), counted on
meta-device models by the models' own num_params_by_group() and estimate_flops().
"""

import argparse
import fnmatch
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass

import nanochat.compare as comparison
from nanochat.checkpoint import SOURCE_DIRS, checkpoint_dir, list_model_tags, list_steps, read_meta
from nanochat.cli import normalize_argv, run_cli
from nanochat.dist import resolve_device_type
from nanochat.fileio import get_base_dir
from nanochat.log import UserError
from nanochat.models import MODEL_TYPES, config_fields, config_from_depth, config_overrides
from nanochat.plan import describe

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# base_train flags that compare sets itself, per run
OWN_FLAGS = ("model_type", "depth", "num_iterations", "seed", "model_tag", "resume", "dry_run")
# training flags that do not change what a run learns: a finished run is reused whatever they were
NOT_COMPARED = ("run", "resume", "dry_run", "model_tag", "save_every", "sample_every", "eval_every", "device_type",
                "compile", "core_metric_every", "core_metric_max_per_task")
MATCH_TOLERANCE = 0.01  # "equal" parameter counts / FLOPs: within 1%


def build_parser():
    # no abbreviations: --seed and --model_type are base_train's (refused), not --seeds and --model_types
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--model_types", nargs="+", default=None, choices=list(MODEL_TYPES),
                   help="train and compare these architectures (the first is the reference of the matching)")
    p.add_argument("--depth", nargs="+", type=int, default=[4], help="one or more depths; an arm per type and depth")
    p.add_argument("--seeds", type=int, default=3, help="runs per arm, seeds 1..N (the seed sets the initial weights; "
                   "the data order is the same for every run)")
    p.add_argument("--num_iterations", type=int, default=200, help="optimizer steps of every run")
    match = p.add_mutually_exclusive_group()
    match.add_argument("--param_match", action="store_true", help="equal parameter counts (via intermediate_size)")
    match.add_argument("--flop_match", action="store_true", help="equal FLOPs per token (via intermediate_size)")
    p.add_argument("--tag_prefix", default="cmp", help="checkpoint tags are {prefix}_{type}_d{depth}..._s{seed}")
    p.add_argument("--nproc_per_node", type=int, default=1, help="processes per run (torchrun when > 1)")
    p.add_argument("--loss_tokens", type=int, default=65536,
                   help="tokens per split for scripts.base_loss after training (0 = skip)")
    p.add_argument("--core_max_per_task", type=int, default=50,
                   help="examples per CORE task for scripts.base_eval after training (-1 = all, 0 = skip)")
    p.add_argument("--chat_tasks", default="", help="chat_eval tasks on the base models, e.g. 'ARC-Easy' (empty = "
                   "skip); chat scores of sft/rl checkpoints with the same tags are reported whenever they exist")
    p.add_argument("--chat_max_problems", type=int, default=200, help="problems per chat task")
    p.add_argument("--dry_run", action="store_true", help="print the runs and their shapes, train nothing")
    p.add_argument("-i", "--source", default="base", choices=list(SOURCE_DIRS), help="stage of --model_tags")
    p.add_argument("--model_tags", nargs="*", default=None,
                   help="tabulate these checkpoints instead of training; shell patterns allowed, tags differing only "
                        "by _s<seed> form one arm (default: every checkpoint of the source)")
    p.add_argument("--out_dir", default=None, help="default: $NANOCHAT_BASE_DIR/report")
    return p


# -----------------------------------------------------------------------------
# The runs


@dataclass
class Planned:
    tag: str
    model_type: str
    depth: int
    seed: int
    overrides: dict  # config flags this run adds (the matched intermediate_size)
    label: str  # the arm


def base_train_args(rest):
    """The base_train flags given to compare, parsed (errors surface now, not after an hour of training)."""
    from scripts.base_train import build_parser as base_train_parser

    names = [a[2:].split("=")[0] for a in normalize_argv(rest) if a.startswith("--")]
    clash = [n for n in names if n in OWN_FLAGS]
    if clash:
        raise UserError(f"--{clash[0]} is set by scripts.compare for each run; use --model_types, --depth, "
                        f"--seeds, --num_iterations or --tag_prefix instead")
    try:
        return base_train_parser().parse_args(normalize_argv(rest))
    except SystemExit:
        raise UserError(f"base_train does not accept {' '.join(rest)} (see python -m scripts.base_train --help)")


def matched_intermediate_size(ref_type, model_type, depth, train_args, vocab_size, key):
    """The intermediate_size that brings model_type's `key` ("total" params or "flops" per token) to the reference
    type's at this depth. Both are linear in intermediate_size, so two meta-device models give the exact value; it
    is rounded to a multiple of 8 (friendlier matmuls) when that stays within MATCH_TOLERANCE."""
    if "intermediate_size" not in config_fields(model_type):
        raise UserError(f"--{'param' if key == 'total' else 'flop'}_match sets intermediate_size of every type but "
                        f"the first ({ref_type}); {model_type} has no intermediate_size. List {model_type} first.")

    def measure(model_type, **extra):
        overrides = dict(config_overrides(train_args, model_type), **extra)
        return describe(model_type, config_from_depth(model_type, depth, train_args.max_seq_len, vocab_size,
                                                      **overrides))[key]

    target = measure(ref_type)
    a, b = measure(model_type, intermediate_size=256), measure(model_type, intermediate_size=512)
    exact = 256 + (target - a) * 256 / (b - a)
    size = max(8, round(exact / 8) * 8)
    if abs(measure(model_type, intermediate_size=size) - target) > MATCH_TOLERANCE * target:
        size = max(1, round(exact))
    achieved = measure(model_type, intermediate_size=size)
    if abs(achieved - target) > MATCH_TOLERANCE * target:
        raise UserError(f"cannot match {model_type} to {ref_type} at depth {depth} within 1% ({key}: {achieved:,} "
                        f"vs {target:,} at intermediate_size={size})")
    return size


def plan_runs(args, train_args, vocab_size):
    """Planned runs, seed by seed (so a comparison stopped early has balanced arms)."""
    if train_args.intermediate_size is not None and (args.param_match or args.flop_match):
        raise UserError("--intermediate_size and --param_match/--flop_match both set it: give one")
    key, suffix = ("total", "_pm") if args.param_match else ("flops", "_fm") if args.flop_match else (None, "")
    ref = args.model_types[0]
    arms = {}
    for depth in args.depth:
        for model_type in args.model_types:
            overrides, tag, label = {}, f"{args.tag_prefix}_{model_type}_d{depth}", f"{model_type} d{depth}"
            if key and model_type != ref:
                size = matched_intermediate_size(ref, model_type, depth, train_args, vocab_size, key)
                overrides = {"intermediate_size": size}
                tag += suffix
                label += f" (I={size}, {'params' if key == 'total' else 'FLOPs'} = {ref}'s)"
            arms[(depth, model_type)] = (tag, label, overrides)
    return [Planned(f"{tag}_s{seed}", model_type, depth, seed, overrides, label)
            for seed in range(1, args.seeds + 1) for (depth, model_type), (tag, label, overrides) in arms.items()]


def run_argv(run, args, rest, train_args):
    defaults = []
    if train_args.eval_every == base_default("eval_every"):  # enough points for the curves
        defaults.append(f"--eval_every={max(1, args.num_iterations // 10)}")
    if train_args.sample_every == base_default("sample_every"):
        defaults.append("--sample_every=-1")  # samples at the end only
    return [f"--model_type={run.model_type}", f"--depth={run.depth}", f"--num_iterations={args.num_iterations}",
            f"--seed={run.seed}", f"--model_tag={run.tag}", *defaults, *rest,
            *(f"--{k}={v}" for k, v in run.overrides.items())]


def base_default(name):
    from scripts.base_train import build_parser as base_train_parser

    return base_train_parser().get_default(name)


def train_state(run, argv, num_iterations):
    """'done', 'partial' (resume) or 'new'. A finished run trained with other flags is an error, not a silent mix."""
    d = checkpoint_dir("base", run.tag)
    steps = list_steps(d)
    if not steps:
        return "new"
    from scripts.base_train import build_parser as base_train_parser

    wanted = vars(base_train_parser().parse_args(normalize_argv(argv)))
    had = read_meta(d, steps[-1]).get("train_args", {})
    diffs = [f"--{k}={had.get(k)!r} (now {v!r})" for k, v in wanted.items()
             if k not in NOT_COMPARED and k in had and had[k] != v]
    if diffs:
        raise UserError(f"{d} was trained with {', '.join(diffs)}. Use another --tag_prefix for this comparison, "
                        f"or remove that directory to retrain it.")
    return "done" if steps[-1] == num_iterations else "partial"


def run_script(name, script_args, log_path, nproc):
    """One stage as a subprocess (its output in log_path); the run report of the user's pipeline is left alone."""
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", f"scripts.{name}", "--", *script_args]
    else:
        cmd = [sys.executable, "-m", f"scripts.{name}", *script_args]
    env = dict(os.environ, NANOCHAT_REPORT="0")
    with open(log_path, "w") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    if proc.returncode != 0:
        with open(log_path) as f:
            tail = "".join(f.readlines()[-15:])
        raise UserError(f"{' '.join(cmd)} failed (exit status {proc.returncode}). End of {log_path}:\n{tail}")


def execute(runs, args, rest, train_args, log_dir):
    """Train and evaluate what is missing."""
    chat_tasks = [t.strip() for t in args.chat_tasks.split("|") if t.strip()]
    os.makedirs(log_dir, exist_ok=True)
    for i, run in enumerate(runs, 1):
        argv = run_argv(run, args, rest, train_args)
        state = train_state(run, argv, args.num_iterations)
        stages = []
        if state != "done":
            stages.append(("base_train", argv + (["--resume"] if state == "partial" else [])))
        metrics = {} if state != "done" else read_meta(checkpoint_dir("base", run.tag), args.num_iterations).get(
            "metrics", {})
        if args.loss_tokens and "train_bpb" not in metrics:
            stages.append(("base_loss", [f"--model_tag={run.tag}", f"--split_tokens={args.loss_tokens}",
                                         f"--device_batch_size={train_args.device_batch_size}"]))
        if args.core_max_per_task and "core" not in metrics:
            stages.append(("base_eval", [f"--model_tag={run.tag}", f"--max_per_task={args.core_max_per_task}"]))
        missing = [t for t in chat_tasks if f"chat_eval/{t}" not in metrics]
        if missing:
            stages.append(("chat_eval", ["-i", "base", f"--model_tag={run.tag}", "-a", "|".join(missing),
                                         f"--max_problems={args.chat_max_problems}"]))
        if not stages:
            print(f"[{i}/{len(runs)}] {run.tag}: complete, reused")
        for name, script_args in stages:
            log_path = os.path.join(log_dir, f"{run.tag}.{name}.log")
            print(f"[{i}/{len(runs)}] {run.tag}: {name} ... (log: {log_path})", flush=True)
            t0 = time.time()
            run_script(name, script_args, log_path, args.nproc_per_node)
            print(f"[{i}/{len(runs)}] {run.tag}: {name} done in {time.time() - t0:.0f}s", flush=True)


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
    for run in comparison.collect(source, tags):
        arms.setdefault(re.sub(r"_s\d+$", "", run.tag), []).append(run)
    arms = [comparison.Arm(label, runs) for label, runs in arms.items()]
    if any(c in p for p in patterns or ["*"] for c in "*?["):  # matched, not listed: by depth, then registry order
        types = list(MODEL_TYPES)
        arms.sort(key=lambda a: (a.runs[0].meta["model_config"]["n_layer"], types.index(a.runs[0].meta["model_type"])))
    return arms


def setup_text(args, runs, train_args, rest):
    total = None
    first = checkpoint_dir("base", runs[0].tag)
    train = comparison.read_metrics_jsonl(first)[0]
    if train:
        total = round(train[-1]["tok_per_sec"] * train[-1]["dt"]) * args.num_iterations
    match = ("parameter counts matched" if args.param_match else "FLOPs/token matched" if args.flop_match
             else "each type at its default config_from_depth shape")
    device = resolve_device_type(train_args.device_type)
    return (f"{args.seeds} seeds per arm (seed s = 1..{args.seeds} sets the initial weights; every run reads the same "
            f"data in the same order), {args.num_iterations:,} steps"
            + (f" = {total:,} tokens per run" if total else "") + f"; {match}. base_train flags: "
            f"`{' '.join(rest) or '(defaults)'}`. Throughput and memory are measured on this machine "
            f"({device}, {os.cpu_count()} cores), with whatever else ran on it at the time; memory is the "
            "process's peak RSS on CPU (Python and torch included) and max allocated on CUDA.")


def main(argv=None):
    argv = normalize_argv(sys.argv[1:] if argv is None else list(argv))
    args, rest = build_parser().parse_known_args(argv)
    out_dir = args.out_dir or os.path.join(get_base_dir(), "report")
    if args.model_types is None:  # tabulate existing checkpoints
        if rest:
            raise UserError(f"unknown arguments {' '.join(rest)} (training flags need --model_types)")
        arms = tabulated_arms(args.source, args.model_tags)
        depth = {a.label: a.runs[0].meta["model_config"]["n_layer"] for a in arms}

        def reference_of(arm):  # the first arm of the same depth
            ref = next(a for a in arms if depth[a.label] == depth[arm.label])
            return None if ref is arm else ref

        setup = ("Existing checkpoints; tags that differ only by a _s<seed> suffix form one arm. "
                 "Compare like with like: the table's steps x tokens/step row shows each arm's budget.")
        md, png, text = comparison.write(arms, out_dir, setup=setup, reference_of=reference_of)
    else:
        from scripts.base_train import ensure_data_and_tokenizer

        train_args = base_train_args(rest)
        vocab_size = ensure_data_and_tokenizer(0).get_vocab_size()
        runs = plan_runs(args, train_args, vocab_size)
        labels = list(dict.fromkeys(r.label for r in runs))
        for label in labels:
            r = next(r for r in runs if r.label == label)
            config = config_from_depth(r.model_type, r.depth, train_args.max_seq_len, vocab_size,
                                       **config_overrides(train_args, r.model_type), **r.overrides)
            d = describe(r.model_type, config)
            print(f"{label}: {d['shape']}, params {d['total']:,}, FLOPs/token {d['flops']:.3e}; "
                  f"runs {', '.join(x.tag for x in runs if x.label == label)}")
        if args.dry_run:
            return None
        execute(runs, args, rest, train_args, os.path.join(out_dir, "compare_logs"))
        by_label = {label: [r.tag for r in runs if r.label == label] for label in labels}
        collected = {r.tag: r for r in comparison.collect("base", [r.tag for r in runs])}
        arms = [comparison.Arm(label, [collected[t] for t in tags]) for label, tags in by_label.items()]
        depth_of = {label: next(r.depth for r in runs if r.label == label) for label in labels}
        reference = {d: next(a for a in arms if depth_of[a.label] == d) for d in args.depth}

        def reference_of(arm):
            ref = reference[depth_of[arm.label]]
            return None if ref is arm else ref

        md, png, text = comparison.write(arms, out_dir, title=f"{' vs '.join(args.model_types)}: "
                                     f"{', '.join(f'd{d}' for d in args.depth)}",
                                     setup=setup_text(args, runs, train_args, rest), reference_of=reference_of)
    print(text)
    print(f"Report: {md}\nPlots:  {png}")
    return md


if __name__ == "__main__":
    run_cli(main)
