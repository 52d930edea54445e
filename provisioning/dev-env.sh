#!/usr/bin/env bash
# Create (or update) the development virtualenv in .venv with the project and its test tools.
# Idempotent: a second run only re-checks what is installed.
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
cd "$top"
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q -e ".[test]"
# man pages and completion from the parsers: `man savepoint` finds .venv/share/man when
# .venv/bin is on PATH (source .venv/bin/activate)
.venv/bin/python -m appliance.manpages .venv >/dev/null
echo "savepoint: development environment ready in $top/.venv"
