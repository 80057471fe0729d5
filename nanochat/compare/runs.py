"""
The runs a comparison needs (scripts/compare.py): several seeds per architecture, the same data order and token
budget for all, parameter or FLOP counts matched through each architecture's MLP width field (its ModelSpec's
mlp_width_field). Runs are tagged {prefix}_{type}_d{depth}[_pm|_fm]_s{seed}; a run whose checkpoint is complete is
reused (its training flags must be the ones asked for), one that was cut short resumes, and only the evaluations that
are missing are run. Each stage is a subprocess (torchrun with --nproc_per_node > 1), so training is base_train's,
memory is measured per run, and a crash leaves the finished runs in place.
"""

import dataclasses
import os
import subprocess
import sys
import time
from dataclasses import dataclass

from nanochat.checkpoint import checkpoint_dir, list_steps, read_meta
from nanochat.cli import normalize_argv, parse
from nanochat.config import BaseTrainConfig
from nanochat.log import UserError, print0, progress
from nanochat.models import config_from_depth, get_model_spec, overrides_for
from nanochat.plan import describe

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# base_train flags that compare sets itself, per run
OWN_FLAGS = ("model_type", "depth", "num_iterations", "seed", "model_tag", "resume", "dry_run")
# training flags that do not change what a run learns: a finished run is reused whatever they were
NOT_COMPARED = ("run", "resume", "dry_run", "model_tag", "save_every", "sample_every", "eval_every", "device_type",
                "compile", "core_metric_every", "core_metric_max_per_task", "log_every")
MATCH_TOLERANCE = 0.01  # "equal" parameter counts / FLOPs: within 1%


@dataclass
class Planned:
    tag: str
    model_type: str
    depth: int
    seed: int
    overrides: dict  # config fields this run adds (the matched MLP width)
    label: str  # the arm


def refuse_own_flags(rest):
    """The base_train flags given to compare must not be the ones it sets for each run."""
    names = [a[2:].split("=")[0] for a in normalize_argv(rest) if a.startswith("--")]
    clash = [n for n in names if n in OWN_FLAGS]
    if clash:
        raise UserError(f"--{clash[0]} is set by scripts.compare for each run; use --model_types, --depth, "
                        f"--seeds, --num_iterations or --tag_prefix instead")


def absolute_data_paths(rest):
    """The base_train flags with --data made absolute: each run is a subprocess started in the repository."""
    rest, out = normalize_argv(rest), []
    for i, arg in enumerate(rest):
        if arg.startswith("--data="):
            arg = "--data=" + os.path.abspath(arg[len("--data="):])
        elif i > 0 and rest[i - 1] == "--data":
            arg = os.path.abspath(arg)
        out.append(arg)
    return out


def matched_width(ref_type, model_type, depth, train, vocab_size, key):
    """The MLP width that brings model_type's `key` ("total" params or "flops" per token) to the reference type's
    at this depth. Both are linear in the width, so two meta-device models give the exact value; it is rounded to a
    multiple of 8 (friendlier matmuls) when that stays within MATCH_TOLERANCE."""
    field = get_model_spec(model_type).mlp_width_field
    if field is None:
        raise UserError(f"--{'param' if key == 'total' else 'flop'}_match sets the MLP width of every type but the "
                        f"first ({ref_type}); {model_type} has none (its ModelSpec's mlp_width_field is None). List "
                        f"{model_type} first.")

    def measure(model_type, **extra):
        overrides = dict(overrides_for(model_type, train.model), **extra)
        return describe(model_type, config_from_depth(model_type, depth, train.max_seq_len, vocab_size,
                                                      **overrides))[key]

    target = measure(ref_type)
    a, b = measure(model_type, **{field: 256}), measure(model_type, **{field: 512})
    exact = 256 + (target - a) * 256 / (b - a)
    size = max(8, round(exact / 8) * 8)
    if abs(measure(model_type, **{field: size}) - target) > MATCH_TOLERANCE * target:
        size = max(1, round(exact))
    achieved = measure(model_type, **{field: size})
    if abs(achieved - target) > MATCH_TOLERANCE * target:
        raise UserError(f"cannot match {model_type} to {ref_type} at depth {depth} within 1% ({key}: {achieved:,} "
                        f"vs {target:,} at {field}={size})")
    return field, size


def plan_runs(config, train, vocab_size):
    """Planned runs, seed by seed (so a comparison stopped early has balanced arms)."""
    key, suffix = ("total", "_pm") if config.param_match else ("flops", "_fm") if config.flop_match else (None, "")
    ref = config.model_types[0]
    arms = {}
    for depth in config.depth:
        for model_type in config.model_types:
            overrides, tag, label = {}, f"{config.tag_prefix}_{model_type}_d{depth}", f"{model_type} d{depth}"
            if key and model_type != ref:
                field, size = matched_width(ref, model_type, depth, train, vocab_size, key)
                if field in train.model:
                    raise UserError(f"--{field} and --param_match/--flop_match both set it: give one")
                overrides = {field: size}
                tag += suffix
                label += f" ({field}={size}, {'params' if key == 'total' else 'FLOPs'} = {ref}'s)"
            arms[(depth, model_type)] = (tag, label, overrides)
    return [Planned(f"{tag}_s{seed}", model_type, depth, seed, overrides, label)
            for seed in range(1, config.seeds + 1) for (depth, model_type), (tag, label, overrides) in arms.items()]


def default_of(name):
    return next(f.default for f in dataclasses.fields(BaseTrainConfig) if f.name == name)


def run_argv(run, config, rest, train):
    """base_train's flags for one run."""
    defaults = []
    if train.eval_every == default_of("eval_every"):  # enough points for the curves
        defaults.append(f"--eval_every={max(1, config.num_iterations // 10)}")
    if train.sample_every == default_of("sample_every"):
        defaults.append("--sample_every=-1")  # samples at the end only
    return [f"--model_type={run.model_type}", f"--depth={run.depth}", f"--num_iterations={config.num_iterations}",
            f"--seed={run.seed}", f"--model_tag={run.tag}", *defaults, *rest,
            *(f"--{k}={v}" for k, v in run.overrides.items())]


def train_state(run, argv, num_iterations):
    """'done', 'partial' (resume) or 'new'. A finished run trained with other flags is an error, not a silent mix."""
    d = checkpoint_dir("base", run.tag)
    steps = list_steps(d)
    if not steps:
        return "new"
    wanted = dataclasses.asdict(parse(BaseTrainConfig, argv))
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


def stages_of(run, config, rest, train):
    """[(script, argv)] still missing for one run: training (or its resumption) and each evaluation."""
    argv = run_argv(run, config, rest, train)
    state = train_state(run, argv, config.num_iterations)
    stages = [("base_train", argv + (["--resume"] if state == "partial" else []))] if state != "done" else []
    metrics = {} if state != "done" else read_meta(checkpoint_dir("base", run.tag), config.num_iterations).get(
        "metrics", {})
    if config.loss_tokens and "train_bpb" not in metrics:
        stages.append(("base_loss", [f"--model_tag={run.tag}", f"--split_tokens={config.loss_tokens}",
                                     f"--device_batch_size={train.device_batch_size}"]))
    if config.core_max_per_task and "core" not in metrics:
        stages.append(("base_eval", [f"--model_tag={run.tag}", f"--max_per_task={config.core_max_per_task}"]))
    chat_tasks = [t.strip() for t in config.chat_tasks.split("|") if t.strip()]
    missing = [t for t in chat_tasks if f"chat_eval/{t}" not in metrics]
    if missing:
        stages.append(("chat_eval", ["-i", "base", f"--model_tag={run.tag}", "-a", "|".join(missing),
                                     f"--max_problems={config.chat_max_problems}"]))
    return stages


def execute(runs, config, rest, train, log_dir):
    """Train and evaluate what is missing, run by run, with a progress bar (and its ETA) over the stages."""
    os.makedirs(log_dir, exist_ok=True)
    todo = [(i, run, stages_of(run, config, rest, train)) for i, run in enumerate(runs, 1)]
    for i, run, stages in todo:
        if not stages:
            print0(f"[{i}/{len(runs)}] {run.tag}: complete, reused")
    bar = progress(desc="compare", total=sum(len(stages) for _, _, stages in todo), unit="stage", every=60.0)
    for i, run, stages in todo:
        for name, script_args in stages:
            log_path = os.path.join(log_dir, f"{run.tag}.{name}.log")
            bar.write(f"[{i}/{len(runs)}] {run.tag}: {name} ... (log: {log_path})")
            t0 = time.time()
            run_script(name, script_args, log_path, config.nproc_per_node)
            bar.write(f"[{i}/{len(runs)}] {run.tag}: {name} done in {time.time() - t0:.0f}s")
            bar.update()
    bar.close()
