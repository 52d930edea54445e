"""The lab runs in two places: the host session boots the VM once (test_lab.py), and pytest
inside the VM runs the scenarios in inside/. Outside the VM those are never collected."""

import os

collect_ignore = [] if os.environ.get("SAVEPOINT_LAB_GUEST") else ["inside"]
