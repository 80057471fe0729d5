import os
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_quickstart_runs_end_to_end(tmp_path):
    """runs/quickstart.sh, as a new user runs it, with fewer training steps: every stage must succeed."""
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(tmp_path), QUICK_STEPS="40")
    proc = subprocess.run(["bash", "runs/quickstart.sh"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=3600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-5000:]
    for marker in ("=== done in", "CORE: ", "ARC-Easy accuracy", "Arithmetic accuracy", "SpellingBee accuracy",
                   "held-out loss", "pass@1", "[calculator: "):
        assert marker in out, marker
    for stage, step in (("base", 40), ("mid", 12), ("chatsft", 30), ("chatrl", 6)):
        for tag in ("gpt_d4", "alcoholic_d4"):
            assert os.path.exists(tmp_path / f"{stage}_checkpoints" / tag / f"meta_{step:06d}.json"), (stage, tag)
    assert (tmp_path / "report" / "compare.png").stat().st_size > 10_000
