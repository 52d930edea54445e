"""Helpers of `savepoint` (appliance.cli): argv fix-ups, serve's checks, its own name."""

from __future__ import annotations

import argparse
import os
import sys

from appliance.runtime_dirs import default_control_path

SIZE_OPTIONS = ("--size", "--unit")


def join_negative_sizes(argv: list[str]) -> list[str]:
    """`--size -5G` -> `--size=-5G`: argparse would take -5G for an option and say only
    "expected one argument"; joined, the size parser says what is wrong with it."""
    out: list[str] = []
    for arg in argv:
        if out and out[-1] in SIZE_OPTIONS and arg.startswith("-") and arg[1:2].isdigit():
            out[-1] = f"{out[-1]}={arg}"
        else:
            out.append(arg)
    return out


RESTORE_NEEDS_YES = (
    "RESTORE discards everything written since the last SAVE; with no "
    "terminal to confirm on, nothing was done: add --yes to restore anyway"
)


def restore_needs_yes(action: str, yes: bool) -> bool:
    """True when a RESTORE must be refused: nobody at a terminal to confirm (cron, a pipe,
    a script) and no --yes. Every CLI that can RESTORE says RESTORE_NEEDS_YES then."""
    return action == "restore" and not yes and not sys.stdin.isatty()


def own_command() -> str:
    """How the user can run this CLI again: `savepoint` when that is what PATH finds, else the
    path they used (`.venv/bin/savepoint`), else `python -m appliance.cli`."""
    import shutil

    argv0 = sys.argv[0]
    if os.path.basename(argv0) == "savepoint":
        on_path = shutil.which("savepoint")
        if on_path and os.path.realpath(on_path) == os.path.realpath(argv0):
            return "savepoint"
        return argv0 if os.sep in argv0 else os.path.abspath(argv0)
    return f"{sys.executable} -m appliance.cli"


def sockets_taken(args: argparse.Namespace) -> str:
    """Why serve cannot start here (another daemon on these sockets), before creating a thing."""
    from appliance import runtime_dirs
    from appliance.preflight import socket_in_use
    from appliance.runtime_dirs import default_nbd_path

    def probe(path: str, given: str | None) -> bool:
        try:  # a runtime dir another user made is the daemon's to refuse: never connect there
            if not given and os.path.isdir(os.path.dirname(path)):
                runtime_dirs.check_client(os.path.dirname(path))
        except (runtime_dirs.UnsafeDir, OSError):
            return False
        return socket_in_use(path)

    taken = [
        (flag, path)
        for flag, path in (
            ("--socket", args.socket or default_nbd_path()),
            ("--control", args.control or default_control_path()),
        )
        if probe(path, args.socket if flag == "--socket" else args.control)
    ]
    if not taken:
        return ""
    what = " and ".join(path for _flag, path in taken)
    return (
        f"another savepoint is already serving on {what}; nothing was created. Stop it, or "
        "give this one its own sockets with --socket and --control, e.g. "
        f"savepoint serve {args.target} --socket /tmp/sp2/nbd.sock "
        "--control /tmp/sp2/control.sock"
    )


def create_for_serve(args: argparse.Namespace) -> int:
    """Create the new store with init's checks; non-zero (after saying why) if it failed."""
    from appliance.preflight import Refused, explain_os_error
    from appliance.store import StoreError
    from appliance.store.cli import create_checked
    from appliance.store.init import InitError

    def fail(reason: str) -> int:
        print(f"savepoint: {reason}", file=sys.stderr)
        return 1

    try:
        create_checked(args.target, args.size, args.unit, allow_overcommit=args.allow_overcommit)
    except (InitError, StoreError, ValueError, Refused) as e:
        return fail(f"cannot create {args.target}: {e}")
    except OSError as e:
        return fail(f"cannot create the store: {explain_os_error(e, args.target)}")
    return 0
