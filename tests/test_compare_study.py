"""scripts.compare's study at toy size: the learning-rate sweep's choice and its edge flag, the chat rows, what a
rerun trains (nothing), the ablation arms, and the power-law fit against compute."""

import json
import os

import numpy as np
import pytest

from nanochat import cli
from nanochat.checkpoint import checkpoint_dir
from nanochat.compare import fit, report, sweep
from nanochat.compare.runs import Planned, base_stages, chat_stages, plan_arms, run_argv
from nanochat.config import BaseTrainConfig, CompareConfig
from nanochat.models import config_from_depth, config_to_dict


def configs(argv):
    config, rest = cli.parse(CompareConfig, argv, known=True)
    return config, cli.parse(BaseTrainConfig, rest), rest


def fake_checkpoint(source, tag, step, metrics, model_type="gpt", train_args=None):
    """A complete checkpoint as far as the comparison reads it: a meta file with its metrics."""
    d = checkpoint_dir(source, tag)
    os.makedirs(d, exist_ok=True)
    meta = {"model_type": model_type, "step": step, "model_config": config_to_dict(config_from_depth(model_type, 2, 64,
                                                                                                    512)),
            "metrics": metrics, "train_args": train_args or {}}
    with open(os.path.join(d, f"meta_{step:06d}.json"), "w") as f:
        json.dump(meta, f)
    return d


def test_sweep_keeps_each_arms_best_multiplier_and_flags_an_edge(base_env):
    config, train, _ = configs(["--model_types", "gpt", "alcoholic", "--depth", "2", "--lr_sweep=0.5,1,2",
                                "--max_seq_len=64"])
    arms = plan_arms(config, train, vocab_size=512)
    assert config.multipliers == (0.5, 1.0, 2.0)
    bpb = {"gpt": {0.5: 2.10, 1.0: 2.00, 2.0: 2.05}, "alcoholic": {0.5: 2.20, 1.0: 2.10, 2.0: 1.95}}
    for arm in arms:
        for m, v in bpb[arm.model_type].items():
            fake_checkpoint("base", Planned(arm, 1, m).tag, 10, {"val_bpb": v, "train_bpb": v}, arm.model_type)
    results = sweep.sweep_results(arms, config.multipliers)
    chosen = {arm.model_type: sweep.best_multiplier(results[arm.stem]) for arm in arms}
    assert chosen == {"gpt": (1.0, False), "alcoholic": (2.0, True)}  # alcoholic's best is the largest tried
    text = sweep.markdown(arms, results, "every learning rate")
    assert "| gpt d2 | 2.1000 | **2.0000** | 2.0500 | x1 |" in text
    assert "| x2 (at the edge) |" in text and "**At the edge of the sweep** (alcoholic d2)" in text
    # the multiplier scales the learning rates given to base_train, and names the run
    run = Planned(arms[1], 2, 2.0)
    argv = run_argv(run, config, [], train)
    assert run.tag == "cmp_alcoholic_d2_lr2_s2" and "--matrix_lr=0.04" in argv and "--embedding_lr=0.4" in argv
    matrix_only, train, _ = configs(["--model_types", "gpt", "--lr_sweep=1,3", "--lr_sweep_param=matrix"])
    argv = run_argv(Planned(arms[0], 1, 3.0), matrix_only, [], train)
    assert "--matrix_lr=0.06" in argv and not any(a.startswith("--embedding_lr") for a in argv)


def test_bad_sweep_is_a_flag_error(capsys):
    with pytest.raises(SystemExit) as e:
        cli.parse(CompareConfig, ["--lr_sweep=0.5,-1"])
    assert e.value.code == 2 and "--lr_sweep: '0.5,-1' is not comma-separated numbers > 0" in capsys.readouterr().err


def test_chat_rows_have_a_spread_and_a_verdict(base_env, tmp_path):
    runs = {}
    for model_type, arithmetic in (("gpt", [0.70, 0.75, 0.80]), ("alcoholic", [0.30, 0.38, 0.40])):
        for seed, acc in enumerate(arithmetic, 1):
            tag = f"chat_{model_type}_s{seed}"
            fake_checkpoint("base", tag, 4, {"val_bpb": 2.0}, model_type)
            fake_checkpoint("sft", tag, 3, {"val_loss": 0.9 + seed / 100, "chat_eval/Arithmetic": acc,
                                            "chat_eval/Arithmetic/operands_from_question": acc},
                            model_type)
            runs.setdefault(model_type, []).append(report.collect("base", [tag])[0])
    gpt, alc = report.Arm("gpt d2", runs["gpt"]), report.Arm("alcoholic d2", runs["alcoholic"])
    text = report.markdown([gpt, alc], "x.png", reference_of=lambda a: gpt if a is alc else None)
    assert "| sft Arithmetic | 0.7500 ± 0.0500 | 0.3600 ± 0.0529 |" in text
    assert "| sft held-out loss | 0.9200 ± 0.0100 | 0.9200 ± 0.0100 |" in text
    assert "| sft Arithmetic/operands_from_question |" in text
    assert "**sft Arithmetic: -0.3900, t = " in text and "exceeds the seed spread**" in text


def test_a_rerun_finds_every_stage_done(base_env):
    """With every checkpoint and evaluation in place (as a finished comparison leaves them), nothing is planned."""
    config, train, rest = configs(["--model_types", "gpt", "--depth", "2", "--chat", "--num_iterations", "4",
                                   "--max_seq_len=64", "--mid_iterations=2", "--sft_iterations=3"])
    (arm,) = plan_arms(config, train, vocab_size=512)
    run = Planned(arm, 1)
    assert [name for name, _ in base_stages(run, config, rest, train, evaluate=True)] == [
        "base_train", "base_loss", "base_eval"]
    assert [name for name, _ in chat_stages(run, config)] == ["mid_train", "chat_sft", "chat_eval"]
    done = {f"chat_eval/{t}": 0.5 for t in config.chat_eval_tasks}
    train_args = dict(cli.parse(BaseTrainConfig, run_argv(run, config, rest, train)).__dict__)
    fake_checkpoint("base", run.tag, 4, {"train_bpb": 2.0, "val_bpb": 2.1, "core": 0.0}, train_args=train_args)
    fake_checkpoint("mid", run.tag, 2, {"val_loss": 1.0})
    fake_checkpoint("sft", run.tag, 3, {"val_loss": 0.9, **done})
    assert base_stages(run, config, rest, train, evaluate=True) == [] and chat_stages(run, config) == []
    fake_checkpoint("sft", run.tag, 3, {"val_loss": 0.9, "chat_eval/Arithmetic": 0.5})  # one task evaluated
    assert chat_stages(run, config) == [("chat_eval", ["-i", "sft", f"--model_tag={run.tag}", "-a",
                                                       "SpellingBee|ARC-Easy", "--max_problems=200"])]


def test_ablation_arms_switch_one_choice_each_and_stay_matched(base_env):
    config, train, _ = configs(["--model_types", "gpt", "alcoholic", "--depth", "4", "--ablate", "--param_match",
                                "--max_seq_len=256"])
    arms = plan_arms(config, train, vocab_size=4096)
    ablations = {a.ablation: a for a in arms if a.ablation}
    assert set(ablations) == {"relu2", "rope10k", "qknorm_after_rope", "no_io_norms", "mha"}
    assert ablations["mha"].overrides["n_kv_head"] == 2 and ablations["rope10k"].overrides["rope_theta"] == 1e4
    assert ablations["relu2"].stem == "cmp_alcoholic_d4_pm_relu2"
    from nanochat.plan import describe

    gpt_params = describe("gpt", config_from_depth("gpt", 4, 256, 4096))["total"]
    for arm in ablations.values():  # every ablation re-matched to gpt's parameter count
        params = describe("alcoholic", config_from_depth("alcoholic", 4, 256, 4096, **arm.overrides))["total"]
        assert abs(params - gpt_params) <= 0.01 * gpt_params, arm.ablation


def test_fit_recovers_a_known_exponent_within_its_uncertainty():
    rng = np.random.default_rng(0)
    a, b, c, c0 = 1.5, 0.35, 1.2, 1e12
    flops = np.repeat(np.geomspace(1e12, 3e14, 4), 3)  # 4 "depths" x 3 "seeds"
    losses = a * (flops / c0) ** -b + c + rng.normal(0, 0.005, size=flops.size)
    law = fit.fit_power_law(flops, losses)
    assert abs(law.b - b) <= 2 * law.se[1] and law.se[1] < 0.1, (law.b, law.se)
    assert abs(law.c - c) <= 2 * law.se[2]
    assert fit.fit_power_law(flops[:3], losses[:3]) is None  # 3 points, 3 parameters: no uncertainty


def test_crossing_inside_and_beyond_the_fitted_range():
    def law(a, b, c, hi):
        return fit.PowerLaw(a, b, c, (0, 0, 0), 1.0, 1.0, hi, 12)

    # 2 x^-0.5 + 1 falls below 0.5 x^-0.05 + 1.1 at x = 13.8
    steep, flat = law(2.0, 0.5, 1.0, 100.0), law(0.5, 0.05, 1.1, 100.0)
    x = fit.crossing(steep, flat, 1.0, 100.0)
    assert x == pytest.approx(13.79, abs=0.01) and steep(x) == pytest.approx(flat(x), rel=1e-4)
    assert fit.describe_crossing({"a": steep, "b": flat}).endswith("cross at 13.8 FLOPs, inside the fitted range.")
    # fitted only up to x = 10: the crossing is an extrapolation, and said to be one
    text = fit.describe_crossing({"a": law(2.0, 0.5, 1.0, 10.0), "b": law(0.5, 0.05, 1.1, 10.0)})
    assert "do not cross within the fitted range (1-10 FLOPs), where b is lower" in text
    assert "would cross at 13.8 FLOPs (1.4x beyond the largest run): an extrapolation" in text
    never = fit.describe_crossing({"a": law(2.0, 0.5, 2.0, 100.0), "b": law(0.5, 0.05, 1.1, 100.0)})
    assert "nor within 100x beyond it" in never


@pytest.mark.slow
def test_sweep_and_chat_end_to_end_then_a_rerun_trains_nothing(base_env):
    import subprocess
    import sys

    base = base_env
    env = dict(os.environ, OMP_NUM_THREADS="1")  # NANOCHAT_BASE_DIR: base_env's
    cmd = [sys.executable, "-m", "scripts.compare", "--model_types", "gpt", "alcoholic", "--depth", "1",
           "--seeds", "2", "--num_iterations", "4", "--lr_sweep=0.5,1", "--chat", "--mid_iterations=2",
           "--sft_iterations=2", "--chat_tasks=Arithmetic", "--chat_max_problems=4", "--core_max_per_task=0",
           "--param_match", "--head_dim=32", "--max_seq_len=64", "--device_batch_size=2", "--eval_tokens=128",
           "--loss_tokens=256"]
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    first = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=1800)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    text = (base / "report" / "compare.md").read_text()
    assert "## Learning rate: each arm at its own best" in text and "| sft Arithmetic |" in text
    assert (base / "report" / "compare_lr.png").stat().st_size > 10_000
    again = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-3000:]
    assert again.stdout.count("complete, reused") == 4 + 4 and " ... (log: " not in again.stdout  # sweep + seeds
