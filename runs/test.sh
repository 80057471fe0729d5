#!/usr/bin/env bash
# The one test command. Usage: bash runs/test.sh [--slow] [extra pytest args]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source runs/setup_env.sh
# The browser test drives Debian's Chromium; install it when missing (it is skipped, saying why, if that fails)
if [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    echo "[setup] installing chromium for the browser test"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
        || echo "[setup] chromium could not be installed: the browser test will be skipped"
fi
ARGS=()
if [ "${1:-}" = "--slow" ]; then shift; ARGS+=(-m "slow or not slow"); fi
# One pytest-xdist worker per core (at most 8): each is a process with one torch thread (tests/conftest.py)
WORKERS="${TEST_WORKERS:-$(nproc)}"
[ "$WORKERS" -gt 8 ] && WORKERS=8
[ "$WORKERS" -gt 1 ] && ARGS+=(-n "$WORKERS")
ruff check nanochat scripts tasks tests  # lint first: a style error fails like a test
set +e
python -m pytest -q "${ARGS[@]}" "$@"
rc=$?
set -e
# pytest exit 5 = no tests collected: that is a failure, never a silent pass
if [ $rc -eq 5 ]; then echo "runs/test.sh: no tests were collected" >&2; exit 1; fi
exit $rc
