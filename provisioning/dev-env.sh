#!/usr/bin/env bash
# Create (or update) the development virtualenv in .venv with the project and its test tools.
# Idempotent: a second run only re-checks what is installed.
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
cd "$top"
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q -e ".[test]"
echo "savepoint: development environment ready in $top/.venv"
