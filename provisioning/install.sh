#!/bin/sh
# Savepoint installer: sudo provisioning/install.sh [--root DIR] [--dry-run] [--uninstall]
#   [--device PATH] [--size SIZE] [--unit UNIT] [--force] [--yes] [--bthome-passive]
# The work is done by provisioning/installer.py with the system Python (3.11 on Bookworm),
# so it runs before the project's virtualenv exists. See docs/install.md.
set -eu
src=$(cd "$(dirname "$0")/.." && pwd)
py=${PYTHON:-python3}
if ! "$py" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    echo "install.sh: needs $py to be Python 3.11 or newer (Raspberry Pi OS Bookworm has it)" >&2
    exit 2
fi
PYTHONPATH="$src${PYTHONPATH:+:$PYTHONPATH}" exec "$py" -m provisioning.installer "$@"
