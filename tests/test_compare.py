import dataclasses
import json
import os
import subprocess
import sys

import pytest

from nanochat import cli
from nanochat.compare import report as compare
from nanochat.compare import runs as compare_runs
from nanochat.config import BaseTrainConfig, CompareConfig
from nanochat.log import UserError
from nanochat.models import config_from_depth, config_to_dict
from nanochat.plan import describe
from scripts import compare as compare_script

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse(argv):
    config, rest = cli.parse(CompareConfig, argv, known=True)
    compare_runs.refuse_own_flags(rest)
    return config, cli.parse(BaseTrainConfig, rest), rest


@pytest.mark.parametrize("match,key", [("--param_match", "total"), ("--flop_match", "flops")])
@pytest.mark.parametrize("depth", [4, 6, 12])
def test_matching_equalises_params_or_flops_within_one_percent(match, key, depth):
    args, train_args, _ = parse(["--model_types", "gpt", "alcoholic", "--depth", str(depth), match,
                                 "--max_seq_len=256"])
    runs = compare_runs.plan_runs(args, train_args, vocab_size=4096)
    shapes = {r.arm.model_type: describe(r.arm.model_type, config_from_depth(r.arm.model_type, depth, 256, 4096,
                                                                            **r.arm.overrides)) for r in runs}
    assert abs(shapes["alcoholic"][key] - shapes["gpt"][key]) <= 0.01 * shapes["gpt"][key]
    assert runs[1].arm.overrides["intermediate_size"] % 8 == 0


def test_plan_tags_seeds_and_arms():
    args, train_args, _ = parse(["--model_types", "gpt", "alcoholic", "--depth", "4", "6", "--seeds", "2",
                                 "--param_match", "--max_seq_len=128"])
    runs = compare_runs.plan_runs(args, train_args, vocab_size=4096)
    assert [r.tag for r in runs[:4]] == ["cmp_gpt_d4_s1", "cmp_alcoholic_d4_pm_s1", "cmp_gpt_d6_s1",
                                         "cmp_alcoholic_d6_pm_s1"]
    assert len(runs) == 8 and {r.seed for r in runs} == {1, 2}
    assert len({r.arm.label for r in runs}) == 4


def test_flags_compare_sets_itself_are_refused():
    with pytest.raises(UserError, match="--seed is set by scripts.compare"):
        parse(["--model_types", "gpt", "--seed=3"])
    with pytest.raises(SystemExit):  # one line on stderr, exit status 2: tested in tests/reliability/test_flags.py
        parse(["--model_types", "gpt", "--no_such_flag=1"])
    args, train_args, _ = parse(["--model_types", "alcoholic", "gpt", "--param_match"])
    with pytest.raises(UserError, match="List gpt first"):
        compare_runs.plan_runs(args, train_args, vocab_size=4096)


def test_a_finished_run_with_other_flags_is_not_reused(base_env):
    args, train_args, rest = parse(["--model_types", "gpt", "--num_iterations", "10", "--max_seq_len=128"])
    run = compare_runs.plan_runs(args, train_args, vocab_size=512)[0]
    argv = compare_runs.run_argv(run, args, rest, train_args)
    d = base_env / "base_checkpoints" / run.tag
    d.mkdir(parents=True)
    old = dict(dataclasses.asdict(train_args), model_type="gpt", depth=4, num_iterations=10, seed=1, max_seq_len=64)
    config = config_to_dict(config_from_depth("gpt", 4, 64, 512))
    meta = {"model_type": "gpt", "model_config": config, "train_args": old}
    (d / "meta_000010.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match="max_seq_len=64"):
        compare_runs.train_state(run, argv, 10)
    old["max_seq_len"] = 128
    (d / "meta_000010.json").write_text(json.dumps(meta))
    assert compare_runs.train_state(run, argv, 10) == "done"


def test_welch_and_mean_std():
    assert compare.mean_std([1.0, 2.0, 3.0, None]) == (2.0, 1.0, 3)
    diff, se, t, p = compare.welch([1.0, 2.0, 3.0], [3.0, 4.0, 5.0])
    assert diff == 2.0 and se == pytest.approx((2 / 3) ** 0.5) and t == pytest.approx(2 / (2 / 3) ** 0.5)
    assert p == pytest.approx(0.0705, abs=5e-4)  # Student's t with 4 degrees of freedom: P(|T| > 2.449) = 0.0705
    _, _, t, p = compare.welch([1.0, 2.0, 3.0], [1.0, 2.0, 9.0])  # unequal spreads: Welch's 2.2 dof, not 4
    assert t == pytest.approx(2 / (20 / 3) ** 0.5) and p == pytest.approx(0.513, abs=0.002)  # pooled dof 4: 0.48
    assert compare.welch([1.0], [2.0])[1:] == (None, None, None)
    assert compare.welch([1.0, 1.0], [2.0, 2.0])[2:] == (None, None)  # no spread at all


def fake_run(model_type, seed, bpb, loss, tag=None):
    config = config_from_depth(model_type, 2, 64, 512)
    meta = {"model_type": model_type, "model_config": dataclasses.asdict(config), "step": 4,
            "train_args": {"seed": seed}, "metrics": {"train_loss": loss, "peak_memory_bytes": 500 * 2**20}}
    train = [{"step": s, "loss": loss + 4 - s, "tok_per_sec": 1000.0 + seed, "dt": 0.128} for s in range(4)]
    val = [{"step": s, "val_bpb": bpb + (4 - s) / 10} for s in (0, 2, 4)]
    return compare.Run(tag or f"{model_type}_s{seed}", meta, train, val, {"sft ARC-Easy": 0.25 + seed / 100})


def test_report_states_what_exceeds_the_seed_spread(tmp_path):
    gpt = compare.Arm("gpt d2", [fake_run("gpt", s, 2.00 + s / 1000, 5.0 + s / 100) for s in (1, 2, 3)])
    alc = compare.Arm("alcoholic d2", [fake_run("alcoholic", s, 1.90 + s / 1000, 5.0 + (4 - s) / 100)
                                       for s in (1, 2, 3)])
    md, png, text = compare.write([gpt, alc], str(tmp_path), reference_of=lambda a: gpt if a is alc else None)
    assert os.path.getsize(png) > 10_000
    assert "| val bpb (end of training) | 2.0020 ± 0.0010 | 1.9020 ± 0.0010 |" in text
    assert "**val bpb (end of training): -0.1000, t = -122.5, p = " in text and "exceeds the seed spread**" in text
    assert "final train loss (EMA 0.9): +0.0000, t = 0.0, p = 1: within the seed spread" in text
    assert "| sft ARC-Easy |" in text and "| params: total |" in text and "| peak memory (MiB) | 500 ± 0 |" in text


def test_tabulating_existing_checkpoints(base_env):
    """--model_tags a b: one arm per tag; tags differing only by _s<seed> (shell patterns allowed) form one arm."""
    from scripts import base_train

    for model_type in ("gpt", "alcoholic"):
        for seed in (1, 2):
            base_train.main([f"--model_type={model_type}", "--depth=1", "--head_dim=32", "--max_seq_len=32",
                             "--device_batch_size=2", "--num_iterations=2", "--eval_every=-1", "--eval_tokens=128",
                             "--sample_every=-1", f"--seed={seed}", f"--model_tag=grp_{model_type}_s{seed}"])
    text = open(compare_script.main(["--model_tags", "grp_gpt_s1", "grp_alcoholic_s1"])).read()
    assert "| | grp_gpt | grp_alcoholic |" in text and "one run per arm" in text
    assert os.path.getsize(base_env / "report" / "compare.png") > 10_000
    text = open(compare_script.main(["--model_tags", "grp_g*", "grp_alcoholic_s*"])).read()
    assert "| runs (seeds) | 2 | 2 |" in text and "**grp_alcoholic vs grp_gpt**" in text and ", p = " in text


@pytest.mark.slow
def test_compare_trains_evaluates_and_reuses(base_env):
    base = base_env
    env = dict(os.environ, OMP_NUM_THREADS="1")  # NANOCHAT_BASE_DIR: base_env's
    cmd = [sys.executable, "-m", "scripts.compare", "--model_types", "gpt", "alcoholic", "--depth", "1",
           "--seeds", "2", "--num_iterations", "4", "--param_match", "--head_dim=32", "--max_seq_len=32",
           "--device_batch_size=2", "--eval_tokens=128", "--loss_tokens=256", "--core_max_per_task=12"]
    first = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    text = (base / "report" / "compare.md").read_text()
    for row in ("| params: total |", "| val bpb (base_loss) |", "| CORE |", "| peak memory (MiB) |",
                "Which differences exceed the seed spread"):
        assert row in text
    assert (base / "base_checkpoints" / "cmp_alcoholic_d1_pm_s2" / "meta_000004.json").exists()
    again = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and again.stdout.count("complete, reused") == 4
