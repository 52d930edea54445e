"""The `savepoint` subcommands of the BLE parts: `fobs` (the [ble] part's paired fobs) and
`buttons` (the [bthome] part's buttons). Their specs (ble/spec.py) add them to the CLI; each
talks to its part through the daemon's control socket, so nothing here imports BlueZ or bleak.
"""

from __future__ import annotations

import argparse
from typing import Any

from appliance.cli_show import when
from appliance.cli_talk import fail, part_request, talk_options
from appliance.parts import Subcommands


def add_fobs_command(sub: Subcommands) -> None:
    p = sub.add_parser("fobs", help="list, rename or revoke paired BLE fobs")
    p.add_argument("op", nargs="?", default="list", choices=("list", "rename", "revoke"))
    p.add_argument("id", nargs="?", type=int, help="fob id (rename, revoke)")
    p.add_argument("name", nargs="?", help="new name (rename)")
    talk_options(p)
    p.set_defaults(func=cmd_fobs)


def cmd_fobs(args: argparse.Namespace) -> int:
    if args.op != "list" and args.id is None:
        return fail(f"fobs {args.op} needs a fob id (see `savepoint fobs`)")
    if args.op == "rename" and not args.name:
        return fail("fobs rename needs a new name: savepoint fobs rename ID NAME")
    reply = part_request(
        args,
        "fobs",
        {"op": args.op, "id": args.id, "name": args.name},
        "BLE is off on this appliance (enable [ble] in the config)",
    )
    if isinstance(reply, int):
        return reply
    if not args.json:
        data = reply.get("data") or {}
        fobs = data.get("fobs", [data["fob"]] if "fob" in data else [])
        if not fobs:
            print("no fobs paired; pair one with `savepoint pair`")
        for fob in fobs:
            print("  ".join(f"{k}={v}" for k, v in fob.items()))
    return 0


def add_buttons_command(sub: Subcommands) -> None:
    p = sub.add_parser("buttons", help="list, add, rename or remove BTHome buttons")
    p.add_argument("op", nargs="?", default="list", choices=("list", "add", "rename", "remove"))
    p.add_argument("address", nargs="?", help="the button's BLE address (add, rename, remove)")
    p.add_argument("name", nargs="?", help="new name (rename)")
    p.add_argument("--key", help="the button's 32-hex-digit encryption key (add)")
    p.add_argument("--name", dest="add_name", metavar="NAME", help="a name for it (add)")
    talk_options(p)
    p.set_defaults(func=cmd_buttons)


def cmd_buttons(args: argparse.Namespace) -> int:
    if args.op != "list" and not args.address:
        return fail(f"buttons {args.op} needs the button's address (see `savepoint buttons`)")
    if args.op == "add" and not args.key:
        return fail("buttons add needs --key: savepoint buttons add ADDRESS --key HEX")
    if args.op == "rename" and not args.name:
        return fail("buttons rename needs a new name: savepoint buttons rename ADDRESS NAME")
    request = {
        "op": args.op,
        "address": args.address,
        "key": args.key,
        "name": args.add_name if args.op == "add" else args.name,
    }
    reply = part_request(
        args,
        "buttons",
        request,
        "BTHome buttons are off on this appliance (enable [bthome] in the config)",
    )
    if isinstance(reply, int):
        return reply
    if not args.json:
        print_buttons(reply.get("data") or {})
    return 0


def print_buttons(data: dict[str, Any]) -> None:
    if "button" in data:
        b, done = data["button"], {"add": "enrolled", "rename": "renamed", "remove": "removed"}
        print(f"{b['address']} ({b['name']}): {done.get(data.get('op', ''), 'done')}")
        return
    devices = data.get("devices", [])
    if not devices:
        print("no buttons enrolled; add one with `savepoint buttons add ADDRESS --key HEX`")
    for b in devices:
        battery = "?" if b.get("battery") is None else f"{b['battery']}%"
        counter = "none yet" if b.get("counter", -1) < 0 else b["counter"]
        line = (
            f"{b['address']}  {b['name']:<16} last seen {when(b.get('last_seen'))}  "
            f"battery {battery}  counter {counter}"
        )
        print(line + (f"  WARNING: {b['warning']}" if b.get("warning") else ""))
    counts = data.get("counts") or {}
    if counts:
        print(
            f"scan: {data.get('scan')}; adverts: "
            + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in sorted(counts.items()))
        )
