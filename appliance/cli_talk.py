"""`savepoint save|restore|unlock|lock|status|history|watch|pair`: the commands that talk to
the daemon over its control socket, and what a part's own commands (`fobs`, `buttons`) use
to do the same: `talk_options`, `part_request`, `fail`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from appliance import runtime_dirs
from appliance.cli_show import show, when
from appliance.cli_support import RESTORE_NEEDS_YES, restore_needs_yes
from appliance.control.client import ControlClient, ControlError
from appliance.parts import Subcommands
from appliance.sizes import human

SAVE_TIMEOUT = 660  # a SAVE may wait up to [save] max_wait (at most 600 s) for a quiet host
TALK = ("save", "restore", "unlock", "lock", "status", "history", "watch", "pair")


def talk_options(p: argparse.ArgumentParser) -> None:
    """--json and --control: every command that talks to the daemon takes both."""
    p.add_argument("--json", action="store_true", help="print the daemon's JSON reply")
    p.add_argument(
        "--control",
        help="control socket (default: $SAVEPOINT_CONTROL or <runtime dir>/control.sock)",
    )


def add_talk_commands(sub: Subcommands) -> None:
    helps = {
        "save": "make everything written so far the saved state",
        "restore": "discard everything written since the last SAVE/RESTORE",
        "unlock": "allow SAVE (the appliance starts LOCKED)",
        "lock": "refuse SAVE again",
        "status": "mode, epoch, unsaved data, parts",
        "history": "SAVE/RESTORE history",
        "watch": "print live events until Ctrl-C",
        "pair": "open the fob pairing window",
    }
    for name in TALK:
        p = sub.add_parser(name, help=helps[name])
        talk_options(p)
        p.set_defaults(func=cmd_talk)
        if name == "restore":
            p.add_argument("--yes", "-y", action="store_true", help="do not ask for confirmation")
        if name == "save":
            p.add_argument(
                "--now",
                action="store_true",
                help="commit at once, without waiting for the host to stop writing",
            )
        if name == "history":
            p.add_argument("target", nargs="?", help="read this store offline instead")
            p.add_argument("--limit", type=int, help="only the last N records")


def fail(reason: str, code: int = 1) -> int:
    print(f"savepoint: {reason}", file=sys.stderr)
    return code


def fail_as(args: argparse.Namespace, reason: str, code: int = 1) -> int:
    """fail(), and with --json also the daemon's reply shape on stdout for a script to read."""
    if getattr(args, "json", False):
        print(json.dumps({"ok": False, "reason": reason, "data": {}}, indent=2))
    return fail(reason, code)


def cmd_talk(args: argparse.Namespace) -> int:
    if args.command == "history" and args.target:
        from appliance.store.cli import history_offline

        return history_offline(args.target, args.json, args.limit)
    if restore_needs_yes(args.command, getattr(args, "yes", False)):  # only restore has it
        return fail_as(args, RESTORE_NEEDS_YES, 2)
    if args.command == "history" and args.limit is not None and args.limit < 1:
        return fail_as(
            args,
            f"--limit {args.limit}: give a positive number of records "
            "(leave --limit out for all of them)",
            2,
        )
    clients = 0
    try:
        path = control_path(args)
        if args.command == "restore" and not args.yes:
            if not confirm_restore(path):  # on its own connection: a person may take a while
                return fail("RESTORE cancelled; nothing changed")
        timeout = {"watch": None, "save": SAVE_TIMEOUT}.get(args.command, 120)
        with ControlClient(path, timeout=timeout) as client:
            if args.command == "watch":
                from appliance.cli_watch import watch

                try:
                    return watch(client, args.json, path)
                except KeyboardInterrupt:  # the normal way to stop watching
                    return 0
            cmd_args: dict[str, Any] = {}
            if args.command == "history" and args.limit is not None:
                cmd_args["limit"] = args.limit
            if args.command == "restore":  # clients connected now keep stale caches after it
                clients = int((client.request("status").get("data") or {}).get("nbd_clients", 0))
            if args.command == "save" and args.now:
                cmd_args["now"] = True
            reply = client.request(args.command, cmd_args)
    except ControlError as e:
        return fail_as(args, str(e))
    data = reply.get("data") or {}
    if args.command == "restore" and reply.get("ok") and clients:
        data["stale_clients"] = clients
    if args.command == "pair" and reply.get("ok") and data.get("ble", "up") != "up":
        reply = {
            "ok": False,
            "data": data,
            "reason": f"no fob can pair: BLE is {data['ble']} "
            "on this appliance (enable [ble] in the config; `savepoint status` shows why)",
        }
    if args.json:
        print(json.dumps(reply, indent=2, default=str))
    if not reply.get("ok"):
        return fail(reply.get("reason") or "refused")
    if not args.json:
        show(args.command, data)
    return 0


def part_request(
    args: argparse.Namespace, command: str, request: dict[str, Any], when_off: str
) -> dict[str, Any] | int:
    """A part command's reply (printed as JSON with --json), or the exit code of its failure;
    `when_off` replaces 'unknown command' (the part is not running)."""
    try:
        with ControlClient(control_path(args), timeout=30) as client:
            reply = client.request(command, {k: v for k, v in request.items() if v is not None})
    except ControlError as e:
        return fail_as(args, str(e))
    if args.json:
        print(json.dumps(reply, indent=2, default=str))
    if not reply.get("ok"):
        reason = reply.get("reason") or "refused"
        return fail(when_off if "unknown command" in reason else reason)
    return reply


def control_path(args: argparse.Namespace) -> str:
    """--control as given; else the default, after checking nobody else made its directory."""
    if args.control or "SAVEPOINT_CONTROL" in os.environ:
        return args.control or os.environ["SAVEPOINT_CONTROL"]
    path = runtime_dirs.find_control_path()
    try:
        runtime_dirs.check_client(os.path.dirname(path))
    except runtime_dirs.UnsafeDir as e:
        raise ControlError(f"refusing to talk to {path}: {e}") from None
    return path


def confirm_restore(path: str) -> bool:
    with ControlClient(path, timeout=120) as client:
        st = client.request("status").get("data") or {}
    last = st.get("last_save")
    since = f"the SAVE of {when(last)}" if last else "the disk's creation"
    clients = int(st.get("nbd_clients", 0))
    warn = (
        f"{clients} NBD client{'s are' if clients != 1 else ' is'} connected: "
        "their caches will be stale after it (stop or reconnect them). "
        if clients
        else ""
    )
    answer = input(
        f"{warn}Discard {st.get('dirty_units', '?')} unsaved units "
        f"({human(st.get('dirty_bytes', 0))}) and go back to {since}? [y/N] "
    )
    return answer.strip().lower() in ("y", "yes")
