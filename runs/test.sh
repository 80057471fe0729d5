#!/usr/bin/env bash
# The one test command. Usage: bash runs/test.sh [--slow] [extra pytest args]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source runs/setup_env.sh
ARGS=()
if [ "${1:-}" = "--slow" ]; then shift; ARGS+=(-m "slow or not slow"); fi
set +e
python -m pytest -q "${ARGS[@]}" "$@"
rc=$?
set -e
# pytest exit 5 = no tests collected: that is a failure, never a silent pass
if [ $rc -eq 5 ]; then echo "runs/test.sh: no tests were collected" >&2; exit 1; fi
exit $rc
