import os
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_quickstart_runs_end_to_end(tmp_path):
    """runs/quickstart.sh, as a new user runs it, with fewer training steps: every stage must succeed."""
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(tmp_path), QUICK_STEPS="20")
    proc = subprocess.run(["bash", "runs/quickstart.sh"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=3600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-5000:]
    for marker in ("=== 7/7 done", "CORE: ", "ARC-Easy accuracy", "val bpb"):
        assert marker in out, marker
    for tag in ("gpt_d4", "alcoholic_d4"):
        assert os.path.exists(tmp_path / "base_checkpoints" / tag / "meta_000020.json")
    assert (tmp_path / "report" / "compare.png").stat().st_size > 10_000
