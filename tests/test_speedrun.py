import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_speedrun_dry_runs_every_stage(tmp_path):
    """runs/speedrun.sh --dry: the 8-GPU pipeline's every stage, at toy size on CPU with 2 gloo processes."""
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(tmp_path),
               PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    proc = subprocess.run(["bash", "runs/speedrun.sh", "--dry"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=3600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-5000:]
    for stage, step in (("base", 6), ("mid", 4), ("chatsft", 4), ("chatrl", 2)):
        meta = json.loads((tmp_path / f"{stage}_checkpoints" / "gpt_d2" / f"meta_{step:06d}.json").read_text())
        assert meta["world_size"] == 2, stage
    report = (tmp_path / "report" / "report.md").read_text()
    for section in ("Tokenizer training", "Tokenizer evaluation", "Base model training", "Base model loss",
                    "Base model evaluation", "Midtraining", "Chat evaluation mid", "Chat SFT", "Chat evaluation sft",
                    "Chat RL", "Chat evaluation rl", "Summary"):
        assert f"## {section}\n" in report, section
    assert "torch " in report and "Total wall-clock time" in report
