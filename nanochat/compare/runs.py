"""
The runs a comparison needs (scripts/compare.py): arms (a model type at a depth, possibly one of its ablations), each
with several seeds, the same data order and token budget for all, parameter or FLOP counts matched through each
architecture's MLP width field (its ModelSpec's mlp_width_field), at a learning-rate multiplier of its own
(--lr_sweep), optionally continued through mid-training, SFT and chat_eval (--chat).

Runs are tagged {prefix}_{type}_d{depth}[_pm|_fm][_{ablation}][_lr{multiplier}]_s{seed}: one run store for every
comparison, so a run whose checkpoint is complete is reused by a later one (its training flags must be the ones asked
for), one that was cut short resumes, and only the stages that are missing are run. Each stage is a subprocess
(torchrun with --nproc_per_node > 1), so training is base_train's, memory is measured per run, and a crash leaves
the finished runs in place.
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
from nanochat.fileio import open_regular
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
SWEPT = {"all": ("embedding_lr", "unembedding_lr", "matrix_lr"), "matrix": ("matrix_lr",)}


@dataclass(frozen=True)
class Arm:
    stem: str  # the tags of its runs, without the multiplier and the seed
    model_type: str
    depth: int
    overrides: dict  # config fields this arm adds: the matched MLP width, an ablation's switches
    label: str
    ablation: str | None = None


@dataclass(frozen=True)
class Planned:
    arm: Arm
    seed: int
    multiplier: float = 1.0

    @property
    def tag(self):
        return self.arm.stem + (f"_lr{self.multiplier:g}" if self.multiplier != 1 else "") + f"_s{self.seed}"


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


def measure(model_type, depth, train, vocab_size, key, **extra):
    """Params ("total") or FLOPs per token ("flops") of a meta-device model: nothing is allocated."""
    overrides = dict(overrides_for(model_type, train.model), **extra)
    return describe(model_type, config_from_depth(model_type, depth, train.max_seq_len, vocab_size, **overrides))[key]


def matched_width(ref_type, model_type, depth, train, vocab_size, key, fixed=None):
    """The MLP width that brings model_type's `key` to the reference type's at this depth (with the `fixed`
    overrides of an ablation). Both are linear in the width, so two meta-device models give the exact value; it is
    rounded to a multiple of 8 (friendlier matmuls) when that stays within MATCH_TOLERANCE."""
    field = get_model_spec(model_type).mlp_width_field
    if field is None:
        raise UserError(f"--{'param' if key == 'total' else 'flop'}_match sets the MLP width of every type but the "
                        f"first ({ref_type}); {model_type} has none (its ModelSpec's mlp_width_field is None). List "
                        f"{model_type} first.")
    fixed = fixed or {}
    target = measure(ref_type, depth, train, vocab_size, key)

    def at(size):
        return measure(model_type, depth, train, vocab_size, key, **fixed, **{field: size})

    a, b = at(256), at(512)
    exact = 256 + (target - a) * 256 / (b - a)
    size = max(8, round(exact / 8) * 8)
    if abs(at(size) - target) > MATCH_TOLERANCE * target:
        size = max(1, round(exact))
    if abs(at(size) - target) > MATCH_TOLERANCE * target:
        raise UserError(f"cannot match {model_type} to {ref_type} at depth {depth} within 1% ({key}: {at(size):,} "
                        f"vs {target:,} at {field}={size})")
    return field, size


def ablation_overrides(model_type, name, depth, train, vocab_size):
    """An ablation's switches with the functions of the config (e.g. n_kv_head = n_head) evaluated at this depth."""
    switches = get_model_spec(model_type).ablations[name]
    config = config_from_depth(model_type, depth, train.max_seq_len, vocab_size,
                               **overrides_for(model_type, train.model))
    return {k: v(config) if callable(v) else v for k, v in switches.items()}


def plan_arm(config, train, vocab_size, model_type, depth, ablation=None):
    key, suffix = ("total", "_pm") if config.param_match else ("flops", "_fm") if config.flop_match else (None, "")
    ref = config.model_types[0]
    overrides = ablation_overrides(model_type, ablation, depth, train, vocab_size) if ablation else {}
    stem, label = f"{config.tag_prefix}_{model_type}_d{depth}", f"{model_type} d{depth}"
    if key and (model_type != ref or ablation):
        field, size = matched_width(ref, model_type, depth, train, vocab_size, key, overrides)
        if field in train.model:
            raise UserError(f"--{field} and --param_match/--flop_match both set it: give one")
        overrides[field] = size
        stem += suffix
        label += f" ({field}={size}, {'params' if key == 'total' else 'FLOPs'} = {ref}'s)"
    if ablation:
        stem, label = f"{stem}_{ablation}", f"{label} {ablation}"
    return Arm(stem, model_type, depth, overrides, label, ablation)


def plan_arms(config, train, vocab_size):
    """Every arm: each type at each depth, and with --ablate each of its ablations."""
    arms = []
    for depth in config.depth:
        for model_type in config.model_types:
            arms.append(plan_arm(config, train, vocab_size, model_type, depth))
            ablations = get_model_spec(model_type).ablations if config.ablate else {}
            arms += [plan_arm(config, train, vocab_size, model_type, depth, name) for name in ablations]
    return arms


def plan_runs(config, train, vocab_size):
    """The runs at multiplier 1, seed by seed (so a comparison stopped early has balanced arms)."""
    arms = plan_arms(config, train, vocab_size)
    return [Planned(arm, seed) for seed in range(1, config.seeds + 1) for arm in arms]


def default_of(name):
    return next(f.default for f in dataclasses.fields(BaseTrainConfig) if f.name == name)


def run_argv(run, config, rest, train):
    """base_train's flags for one run."""
    defaults = []
    if train.eval_every == default_of("eval_every"):  # enough points for the curves
        defaults.append(f"--eval_every={max(1, config.num_iterations // 10)}")
    if train.sample_every == default_of("sample_every"):
        defaults.append("--sample_every=-1")  # samples at the end only
    lrs = [f"--{name}={getattr(train, name) * run.multiplier:g}" for name in SWEPT[config.lr_sweep_param]
           if run.multiplier != 1]
    return [f"--model_type={run.arm.model_type}", f"--depth={run.arm.depth}",
            f"--num_iterations={config.num_iterations}", f"--seed={run.seed}", f"--model_tag={run.tag}", *defaults,
            *rest, *(f"--{k}={v}" for k, v in run.arm.overrides.items()), *lrs]


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
        with open_regular(log_path, "r", errors="replace") as f:
            tail = "".join(f.readlines()[-15:])
        raise UserError(f"{' '.join(cmd)} failed (exit status {proc.returncode}). End of {log_path}:\n{tail}")


def last_metrics(source, tag, step=None):
    """The metrics in the meta of `tag`'s checkpoint at `step` (default: its last), {} without one."""
    steps = list_steps(checkpoint_dir(source, tag))
    if not steps or (step is not None and step not in steps):
        return {}
    return read_meta(checkpoint_dir(source, tag), step or steps[-1]).get("metrics", {})


def base_stages(run, config, rest, train, evaluate):
    """[(script, argv)] still missing of a base run: training (or its resumption), bits per byte and, when
    `evaluate`, CORE and chat_eval of the base model."""
    tag, argv = run.tag, run_argv(run, config, rest, train)
    state = train_state(run, argv, config.num_iterations)
    stages = [("base_train", argv + (["--resume"] if state == "partial" else []))] if state != "done" else []
    metrics = last_metrics("base", tag, config.num_iterations) if state == "done" else {}
    if config.loss_tokens and "train_bpb" not in metrics:
        stages.append(("base_loss", [f"--model_tag={tag}", f"--split_tokens={config.loss_tokens}",
                                     f"--device_batch_size={train.device_batch_size}"]))
    if evaluate and config.core_max_per_task and "core" not in metrics:
        stages.append(("base_eval", [f"--model_tag={tag}", f"--max_per_task={config.core_max_per_task}"]))
    missing = [t for t in config.chat_eval_tasks if f"chat_eval/{t}" not in metrics] if not config.chat else []
    if evaluate and missing:
        stages.append(("chat_eval", ["-i", "base", f"--model_tag={tag}", "-a", "|".join(missing),
                                     f"--max_problems={config.chat_max_problems}"]))
    return stages


def chat_stages(run, config):
    """Mid-training, SFT and chat_eval of the SFT model, those that are missing (the same settings for every arm)."""
    tag, stages = run.tag, []
    if config.mid_iterations not in list_steps(checkpoint_dir("mid", tag)):
        stages.append(("mid_train", ["-i", "base", f"--model_tag={tag}", f"--num_iterations={config.mid_iterations}"]))
    if config.sft_iterations not in list_steps(checkpoint_dir("sft", tag)) or stages:
        stages.append(("chat_sft", ["-i", "mid", f"--model_tag={tag}", f"--num_iterations={config.sft_iterations}"]))
    metrics = {} if stages else last_metrics("sft", tag, config.sft_iterations)
    missing = [t for t in config.chat_eval_tasks if f"chat_eval/{t}" not in metrics]
    if missing:
        stages.append(("chat_eval", ["-i", "sft", f"--model_tag={tag}", "-a", "|".join(missing),
                                     f"--max_problems={config.chat_max_problems}"]))
    return stages


def execute(runs, config, rest, train, log_dir, evaluate=True):
    """Train and evaluate what is missing, run by run, with a progress bar (and its ETA) over the stages. Without
    `evaluate` (a learning-rate sweep's runs) only training and bits per byte."""
    os.makedirs(log_dir, exist_ok=True)
    todo = [(i, run, base_stages(run, config, rest, train, evaluate)
             + (chat_stages(run, config) if evaluate and config.chat else [])) for i, run in enumerate(runs, 1)]
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
