"""`savepoint`: run the daemon (serve, daemon), talk to it (save, restore, unlock, lock, status,
history, watch, pair, fobs, buttons) and work on a store that is not served (init, inspect,
history TARGET).

Errors exit non-zero with a one-line reason on stderr; every talking command takes --json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from typing import Any

from appliance import __version__, runtime_dirs
from appliance.cli_support import (
    RESTORE_NEEDS_YES,
    create_for_serve,
    join_negative_sizes,
    own_command,
    restore_needs_yes,
    sockets_taken,
)
from appliance.config import (
    ConfigError,
    default_control_path,
    find_control_path,
    serve_config,
)
from appliance.control.socket import ControlClient, ControlError
from appliance.store.cli import add_store_commands, human, parse_size

SAVE_TIMEOUT = 660  # a SAVE may wait up to [save] max_wait (at most 600 s) for a quiet host
TALK = ("save", "restore", "unlock", "lock", "status", "history", "watch", "pair")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="savepoint", description="A disk with SAVE and RESTORE.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("serve", help="serve a store over NBD (creates it if missing)")
    p.add_argument("target", help="backing file or block device")
    p.add_argument("--size", type=parse_size, help="disk size when creating, e.g. 1G")
    p.add_argument("--unit", type=parse_size, default=4096, help="unit size when creating (4K)")
    p.add_argument("--socket", help="NBD Unix socket path (default: <runtime dir>/nbd.sock)")
    p.add_argument("--tcp", metavar="HOST:PORT", help="also serve NBD on TCP (loopback)")
    p.add_argument(
        "--allow-remote",
        action="store_true",
        help="allow a non-loopback --tcp address (NBD has no authentication)",
    )
    p.add_argument(
        "--max-connections",
        type=int,
        metavar="N",
        help="NBD clients served at once; more are refused (default 8)",
    )
    p.add_argument("--control", help="control socket path (default: <runtime dir>/control.sock)")
    p.add_argument(
        "--allow-overcommit",
        action="store_true",
        help="when creating: allow a store file larger than the free space of its "
        "file system (sparse; writes fail with 'no space left' when it fills)",
    )
    p.add_argument(
        "--map-cache",
        metavar="SIZE",
        help="RAM for the unit map whatever the disk size (default 32M; "
        "docs/config.md: how to choose)",
    )
    p.add_argument(
        "--config",
        help="TOML with more sections: parts such as [mqtt], [lock], "
        "[policy] (not [store]); the options above win",
    )
    p.set_defaults(func=cmd_serve)
    p = sub.add_parser("daemon", help="run the appliance daemon from a config file")
    p.add_argument("--config", default="/etc/savepoint/config.toml", help="TOML config")
    p.add_argument("--check", action="store_true", help="validate the config and exit")
    p.set_defaults(func=cmd_daemon)
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
        p.add_argument("--json", action="store_true", help="print the daemon's JSON reply")
        p.add_argument(
            "--control",
            help="control socket (default: $SAVEPOINT_CONTROL or <runtime dir>/control.sock)",
        )
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
    p = sub.add_parser("fobs", help="list, rename or revoke paired BLE fobs")
    p.add_argument("op", nargs="?", default="list", choices=("list", "rename", "revoke"))
    p.add_argument("id", nargs="?", type=int, help="fob id (rename, revoke)")
    p.add_argument("name", nargs="?", help="new name (rename)")
    p.add_argument("--json", action="store_true", help="print the daemon's JSON reply")
    p.add_argument(
        "--control",
        help="control socket (default: $SAVEPOINT_CONTROL or <runtime dir>/control.sock)",
    )
    p.set_defaults(func=cmd_fobs)
    add_buttons_command(sub)
    add_store_commands(sub)  # init, inspect
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(join_negative_sizes(sys.argv[1:] if argv is None else argv))
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0


def fail(reason: str, code: int = 1) -> int:
    print(f"savepoint: {reason}", file=sys.stderr)
    return code


def fail_as(args: argparse.Namespace, reason: str, code: int = 1) -> int:
    """fail(), and with --json also the daemon's reply shape on stdout for a script to read."""
    if getattr(args, "json", False):
        print(json.dumps({"ok": False, "reason": reason, "data": {}}, indent=2))
    return fail(reason, code)


# -- running the daemon ---------------------------------------------------------------------
def cmd_serve(args: argparse.Namespace) -> int:
    from appliance.daemon import run_daemon

    if not os.path.exists(args.target) and args.size is None:
        return fail(
            f"{args.target} does not exist; give --size to create it, e.g. "
            f"savepoint serve {args.target} --size 1G"
        )
    try:
        extra = read_toml(args.config) if args.config else None
        cfg = serve_config(
            os.path.abspath(args.target),
            args.size,
            args.unit,
            args.socket,
            args.tcp,
            args.allow_remote,
            args.control,
            args.max_connections,
            allow_overcommit=args.allow_overcommit,
            map_cache=args.map_cache,
            extra=extra,
        )
    except ConfigError as e:
        return fail(
            str(e)
            .replace("[store] ", "--")
            .replace("[nbd] ", "--")
            .replace("--max_connections", "--max-connections")
            .replace("--map_cache", "--map-cache")
        )
    busy = sockets_taken(args)
    if busy:
        return fail(busy)
    created = not os.path.exists(args.target)
    if created:
        if create_for_serve(args):
            return 1
    elif args.size is not None:
        print(
            f"savepoint: {args.target} exists: serving it as it is (--size ignored)",
            file=sys.stderr,
        )
    ready: list[bool] = []

    def on_ready(daemon: Any) -> None:
        ready.append(True)
        print_serving(daemon, args)

    code = run_daemon(cfg, on_ready=on_ready)
    if created and not ready:  # it never served: leave nothing behind
        with contextlib.suppress(OSError):
            os.unlink(args.target)
    return code


def read_toml(path: str) -> dict[str, Any]:
    import tomllib

    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"--config {path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"--config {path}: not valid TOML: {e}") from None


def print_serving(daemon: Any, args: argparse.Namespace) -> None:
    st = daemon.store.status()
    print(
        f"Savepoint: serving {args.target} ({human(st['size'])}, unit "
        f"{human(st['unit_size'])}, epoch {st['epoch']}, {st['dirty_units']} unsaved units)"
    )
    for uri in daemon.nbd.uris:
        print(f"NBD: {uri}")
    print("Connect with:")
    print(daemon.nbd.examples())
    control = (
        ""
        if daemon.control_socket == default_control_path()
        else f" --control {daemon.control_socket}"
    )
    print(f"Control: {own_command()} save|restore|status|history|watch{control}")
    from appliance.store.space import overcommit_warning

    warning = overcommit_warning(st.get("space") or {})
    if warning:
        print(f"savepoint: warning: {warning}", file=sys.stderr)
    print("Stop with Ctrl-C.", flush=True)


def cmd_daemon(args: argparse.Namespace) -> int:
    from appliance.config import load
    from appliance.daemon import run_daemon

    try:
        cfg = load(args.config)
    except ConfigError as e:
        return fail(f"config: {e}", 2)
    if args.check:
        print(f"{args.config}: OK")
        return 0
    return run_daemon(cfg)


# -- talking to the daemon ---------------------------------------------------------------
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


def add_buttons_command(sub: Any) -> None:
    p = sub.add_parser("buttons", help="list, add, rename or remove BTHome buttons")
    p.add_argument("op", nargs="?", default="list", choices=("list", "add", "rename", "remove"))
    p.add_argument("address", nargs="?", help="the button's BLE address (add, rename, remove)")
    p.add_argument("name", nargs="?", help="new name (rename)")
    p.add_argument("--key", help="the button's 32-hex-digit encryption key (add)")
    p.add_argument("--name", dest="add_name", metavar="NAME", help="a name for it (add)")
    p.add_argument("--json", action="store_true", help="print the daemon's JSON reply")
    p.add_argument(
        "--control",
        help="control socket (default: $SAVEPOINT_CONTROL or <runtime dir>/control.sock)",
    )
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
            f"{b['address']}  {b['name']:<16} last seen {_when(b.get('last_seen'))}  "
            f"battery {battery}  counter {counter}"
        )
        print(line + (f"  WARNING: {b['warning']}" if b.get("warning") else ""))
    counts = data.get("counts") or {}
    if counts:
        print(
            f"scan: {data.get('scan')}; adverts: "
            + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in sorted(counts.items()))
        )


def control_path(args: argparse.Namespace) -> str:
    """--control as given; else the default, after checking nobody else made its directory."""
    if args.control or "SAVEPOINT_CONTROL" in os.environ:
        return args.control or os.environ["SAVEPOINT_CONTROL"]
    path = find_control_path()
    try:
        runtime_dirs.check_client(os.path.dirname(path))
    except runtime_dirs.UnsafeDir as e:
        raise ControlError(f"refusing to talk to {path}: {e}") from None
    return path


def confirm_restore(path: str) -> bool:
    with ControlClient(path, timeout=120) as client:
        st = client.request("status").get("data") or {}
    last = st.get("last_save")
    since = f"the SAVE of {_when(last)}" if last else "the disk's creation"
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


def describe_event(event: dict[str, Any]) -> str:
    kind, data = event.get("event"), event.get("data") or {}
    if kind == "outcome":
        verdict = "done" if data.get("ok") else f"refused: {data.get('reason')}"
        return f"{str(data.get('action')).upper()} from {data.get('source')}: {verdict}"
    if kind == "status":
        from appliance.cli_watch import describe_status

        return describe_status(data)
    if kind == "state":
        return (
            f"state: {data.get('mode')}, epoch {data.get('epoch')}, "
            f"{data.get('dirty_units')} unsaved units"
        )
    if kind == "progress":
        if data.get("phase") == "waiting":
            return (
                f"saving, waiting for the host (quiet for {data.get('settle')} s, at most "
                f"{data.get('max_wait')} s; press SAVE again or `savepoint save --now`)"
            )
        return f"{str(data.get('action')).upper()} {data.get('phase')}"
    if kind == "host":
        return "host connected" if data.get("connected") else "host disconnected"
    if kind == "pairing":
        if data.get("open"):
            return "pairing window open"
        return (
            f"pairing window closed ({data['why']})" if data.get("why") else "pairing window closed"
        )
    if kind == "fault":
        if data.get("cleared"):
            return f"part {data.get('part')} is up again"
        hint = f" ({data['hint']})" if data.get("hint") else ""
        return f"part {data.get('part')} failed: {data.get('reason')}{hint}"
    if kind == "warning":
        return f"warning: {data.get('name') or data.get('part')}: {data.get('reason')}"
    if kind == "buttons":
        return f"button {data.get('address')} ({data.get('name')}): {data.get('op')}"
    return f"{kind}: {json.dumps(data)}"


def show(command: str, data: dict[str, Any]) -> None:
    if command == "status":
        print_status(data)
    elif command == "history":
        from appliance.store.cli import print_history

        print_history(data.get("history", []))
    elif command == "save" and data.get("hurried"):
        print("the waiting SAVE commits now")
    elif command in ("save", "restore"):
        print_outcome(command, data)
    elif command in ("unlock", "lock"):
        after, once = data.get("relock_after"), data.get("single_use")
        limits = ([f"for {after:g} s"] if after else []) + (["until one SAVE"] if once else [])
        extra = f" ({', '.join(limits)})" if limits else ""
        print(f"{data.get('mode', command).upper()}{extra}")
    elif command == "pair":
        print(
            f"pairing window open until {_when(data.get('until'))}.\n"
            "On the fob (any computer with Bluetooth, or a Pi with a button), run now:\n"
            "  savepoint-fob pair\n"
            "It finds the appliance, pairs and stores its key; then `savepoint-fob save`, "
            "`restore`, `unlock` or `status` work from it. `savepoint fobs` lists paired fobs."
        )


def print_outcome(command: str, data: dict[str, Any]) -> None:
    """The epoch named is the one `history` lists for this record."""
    epoch, units = data.get("epoch", 0), data.get("units", 0)
    if not units:
        what = (
            "nothing to save: no writes since the last SAVE/RESTORE, the saved state is unchanged"
            if command == "save"
            else "nothing to discard: no writes since the last SAVE/RESTORE"
        )
    else:
        what = (
            f"{units} units ({human(data.get('bytes', 0))}) "
            f"{'kept' if command == 'save' else 'discarded'}"
        )
    print(f"{command.upper()} done: epoch {epoch}, {what}")
    clients = data.get("stale_clients")
    if clients:
        print(
            f"savepoint: {clients} NBD client{'s were' if clients != 1 else ' was'} connected "
            "during the RESTORE: their caches are now stale; stop or reconnect them before "
            "they read or write again",
            file=sys.stderr,
        )
    if command == "save" and data.get("quiet") is not None:
        from appliance.store.cli import host_column

        print(f"  {host_column(data)}; waited {data.get('waited', 0):.1f} s")


HOST_ROW: dict[object, str] = {True: "connected", False: "not connected"}


def print_status(st: dict[str, Any]) -> None:
    mode = str(st.get("mode", "?")).upper()
    if st.get("relock_in") is not None:
        mode += f" (re-locks in {int(st['relock_in'])} s)"
    elif not st.get("lock_enabled", True):
        mode += (
            " (SAVE refused until `savepoint unlock`; lock mode off: nothing re-locks)"
            if mode == "LOCKED"
            else " (lock mode off: SAVE needs no unlock)"
        )
    frac = float(st.get("unsaved_fraction", 0.0))
    bar = "#" * round(frac * 20) + "." * (20 - round(frac * 20))
    rows = [
        ("mode", mode),
        ("epoch", str(st.get("epoch"))),
        (
            "unsaved",
            f"{st.get('dirty_units', 0)} units, {human(st.get('dirty_bytes', 0))} "
            f"[{bar}] {frac:.1%} of {human(st.get('size', 0))}",
        ),
        (
            "background",
            "idle (map up to date)"
            if not st.get("pending_units")
            else f"{st.get('background_progress', 0):.0%} ({st['pending_units']} units waiting)",
        ),
        *_cache_rows(st),
        ("host", HOST_ROW.get(st.get("host_connected"), "unknown (no USB gadget)")),
        *_storage_rows(st),
        ("last SAVE", _when(st.get("last_save"))),
        ("last RESTORE", _when(st.get("last_restore"))),
    ]
    if st.get("saving"):
        rows.append(
            (
                "SAVE",
                f"saving, {st['saving']} (press SAVE again or `savepoint save "
                "--now` to commit now)",
            )
        )
    if st.get("pairing", {}).get("open"):
        rows.append(("pairing", f"open until {_when(st['pairing'].get('until'))}"))
    for uri in st.get("nbd_uris", []):
        rows.append(("NBD", f"{uri} ({st.get('nbd_clients', 0)} clients)"))
    for name, part in (st.get("parts") or {}).items():
        if name == "storage":  # shown in the storage rows
            continue
        text = part["state"]
        if part["state"] == "failed":
            text += f": {part['reason']}" + (f" ({part['hint']})" if part.get("hint") else "")
        rows.append((f"part {name}", text))
    for b in (st.get("buttons") or {}).get("devices", []):
        battery = "?" if b.get("battery") is None else f"{b['battery']}%"
        warning = f", WARNING: {b['warning']}" if b.get("warning") else ""
        rows.append(
            (
                "button",
                f"{b['name']} {b['address']}: battery {battery}, last seen "
                f"{_when(b.get('last_seen'))}{warning}",
            )
        )
    for label, value in rows:
        print(f"{label:<13}{value}")


def _storage_rows(st: dict[str, Any]) -> list[tuple[str, str]]:
    """Allocation, free space and margin of a store file; the "full" fault with what to do."""
    space = st.get("space") or {}
    rows = []
    if "fs_free_bytes" in space:
        margin = space["margin_bytes"]
        room = f"margin {human(margin)}" if margin >= 0 else f"OVER-COMMITTED by {human(-margin)}"
        rows.append(
            (
                "storage",
                f"{human(space['allocated_bytes'])} allocated of up to "
                f"{human(space['full_size'])}; {human(space['fs_free_bytes'])} "
                f"free on its file system ({room})",
            )
        )
    part = (st.get("parts") or {}).get("storage") or {}
    faults = [r for r in (space.get("full_reason"), space.get("punch_fault")) if r]
    if not faults and (space.get("full") or part.get("state") == "failed"):
        faults = [part.get("reason") or "backing storage full"]
    rows += [("FAULT", reason) for reason in faults]
    if faults and part.get("hint"):
        rows.append(("what to do", part["hint"]))
    return rows


def _cache_rows(st: dict[str, Any]) -> list[tuple[str, str]]:
    """The map cache: RAM in use against its budget ([store] map_cache) and its hit rate."""
    c = st.get("map_cache")
    if not c:
        return []
    return [
        (
            "map cache",
            f"{human(c['size'])} of {human(c['budget'])} budget, "
            f"{c['hit_rate']:.1%} hits, {c['evictions']} pages evicted",
        )
    ]


def _when(t: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else "never"


if __name__ == "__main__":
    sys.exit(main())
