#!/usr/bin/env bash
# Creates .venv (if missing) with the CPU-friendly pinned torch and the project in editable mode.
# Sourced by quickstart.sh and test.sh so that a fresh clone needs no manual step.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
STAMP="$VENV/.nanochat-installed"
if [ ! -f "$STAMP" ] || [ "$ROOT/pyproject.toml" -nt "$STAMP" ]; then
    echo "[setup] creating/updating $VENV (python3 -m venv, torch==2.13.0, project with dev extras)"
    [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip
    # torch is pinned here (not in pyproject) so an unpinned resolve never pulls a multi-GB CUDA build
    "$VENV/bin/python" -m pip install -q "torch==2.13.0"
    "$VENV/bin/python" -m pip install -q -e "$ROOT[dev]"
    touch "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
export VIRTUAL_ENV="$VENV"
# HumanEval runs model-written code only inside bubblewrap's sandbox (nanochat/execution.py), with a seccomp filter
# from libseccomp; without them it refuses to run that code. Install both when missing and we can.
if ! command -v bwrap >/dev/null; then
    if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
        echo "[setup] installing bubblewrap and libseccomp2 (the sandbox for model-written code)"
        (apt-get update -qq \
            && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bubblewrap libseccomp2 >/dev/null) \
            || echo "[setup] bubblewrap could not be installed: HumanEval will refuse to run model-written code"
    else
        echo "[setup] bubblewrap (bwrap) is missing: HumanEval refuses to run model-written code without it." \
             "Install it: sudo apt-get install bubblewrap libseccomp2 (Debian/Ubuntu), sudo dnf install bubblewrap" \
             "libseccomp (Fedora)"
    fi
fi
