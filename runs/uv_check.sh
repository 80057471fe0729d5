#!/usr/bin/env bash
# Smoke check of the uv set-up: `uv lock` resolves the project for every Python that requires-python admits and for
# every extra and group, as `uv run` does on a fresh clone. Run by .ci/run; needs PyPI (or UV_DEFAULT_INDEX).
# The PyTorch indexes: UV_INDEX as the README shows, if set; else a one-package index of the torch wheel that pip
# can install without an index (pip's --find-links), served from a temporary directory.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
UV="$(command -v uv || true)"
[ -n "$UV" ] || UV=".venv/bin/uv"
if [ ! -x "$UV" ]; then echo "uv_check: uv is not installed (pip install uv)" >&2; exit 1; fi
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
if [ -z "${UV_INDEX:-}" ]; then
    if ! python3 -m pip download -q --no-index --no-deps "torch==2.13.0" -d "$TMP/files" 2>/dev/null; then
        echo "uv_check: skipped: no PyTorch index mirror (set UV_INDEX as in the README's uv section)" >&2
        exit 0
    fi
    mkdir -p "$TMP/simple/torch"
    for whl in "$TMP"/files/*.whl; do
        echo "<a href=\"file://$whl\">$(basename "$whl")</a>" >> "$TMP/simple/torch/index.html"
    done
    export UV_INDEX="pytorch-cpu=file://$TMP/simple pytorch-cu128=file://$TMP/simple"
fi
mkdir "$TMP/project"
cp pyproject.toml README.md "$TMP/project/"
start=$(date +%s)
(cd "$TMP/project" && "$UV" lock --quiet)
echo "uv_check: uv lock resolved $(grep -c '^name = ' "$TMP/project/uv.lock") packages in $(( $(date +%s) - start )) s"
